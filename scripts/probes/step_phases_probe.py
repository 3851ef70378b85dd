"""Where the step's temporaries go: resident size and phase peaks (VmHWM reset per phase) inside a CAST step,
the default recipe (--init ridge-in). The step is train.cast_loss's body as of commit 4b17d1e, copied so that each phase
can be marked (a record of how step_phases.txt was measured, not kept in step with train.py).
Usage, from the project root: python scripts/probes/step_phases_probe.py [--recompute] [train flags]"""
import sys
sys.path.insert(0, ".")  # the project root
import torch
import cast, teacher
from train import parse_config, make_optimizer, batch_chunks
from memory import rss_mb, free_memory, reset_peak_memory

cfg = parse_config(["--init", "ridge-in", "--monitor", "0"] + sys.argv[1:])
target, tok_T, kernels, vocab_T, cache, device = teacher.prepare(cfg)
heads = cast.make_heads(kernels, target)
if cfg.recompute:
    cast.recompute_layers(target)
teacher.target_pass(cfg, target, heads, cache, tok_T.pad_token_id or 0)
del cache["ridge_x_S"], cache["ridge_y_S"]; free_memory()
opt = make_optimizer(cfg, heads)
with torch.no_grad():
    for h in heads: h.P_out.weight.zero_()
print(f"held: rss {rss_mb():.0f} MB after setup (target + cache + heads, no grads/AdamW yet) | recompute {cfg.recompute}", flush=True)
for step in range(1, 7):
    chunk_ids = batch_chunks(cfg, step, cache["n_train"])
    marks = []
    def mark(label):
        marks.append(f"{label} peak {rss_mb('VmHWM'):.0f} end {rss_mb():.0f}"); reset_peak_memory("cpu")
    reset_peak_memory("cpu"); base = rss_mb()
    opt.zero_grad(set_to_none=True)
    ids, mask = teacher.batch_of(cache, chunk_ids, device)
    z_teacher = teacher.teacher_logits(cfg, target, cache, vocab_T, chunk_ids); mark("teacher")
    with cast.attached(target, heads, capture=True):
        hidden = target.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state; mark("forward")
        b_idx = torch.cat([torch.full_like(cache["pos_T"][c], b) for b, c in enumerate(chunk_ids)])
        t_idx = torch.cat([cache["pos_T"][c] for c in chunk_ids])
        kl = cast.shared_kl(target, hidden[b_idx, t_idx], vocab_T, z_teacher, cfg.temperature); mark("kl")
        xb = torch.cat([torch.full_like(cache["x_rows"][c], b) for b, c in enumerate(chunk_ids)])
        xt = torch.cat([cache["pos_T"][c][cache["x_rows"][c]] for c in chunk_ids])
        xs = torch.cat([torch.arange(cache["x_start"][c], cache["x_start"][c + 1]) for c in chunk_ids])
        mse = sum(cast.mse_loss(h.P_in(h.x_T[xb, xt].float()), cache["x_S"][h.source_name][xs].to(device),
                                cache["var_S"][h.source_name]) for h in heads) / len(heads); mark("mse")
        (kl + mse).backward(); mark("backward")
    del z_teacher, hidden, kl, mse; mark("after the step's tensors are dropped")
    opt.step(); mark("opt.step")
    free_memory(collect=False)
    print(f"step {step} | {len(t_idx)} aligned rows, {len(xs)} x_S rows | before {base:.0f} | " + " | ".join(marks) + f" | trimmed {rss_mb():.0f}", flush=True)
