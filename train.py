"""Train CAST heads: source + cartridge (teacher) -> target + heads (student), on general text only.

    python train.py --demo                # three minutes: the whole pipeline on tiny models built in code (demo.py)
    python train.py                       # the embedded default: SmolLM2-135M + arithmetic cartridge -> Gemma-3-270M
    python train.py --source S --cartridge DIR --target T --corpus PATH --steps 1000 --out RUN_DIR

Pipeline: load the bare source; cut the corpus into chunks (or have the teacher write them), plus
held-out task prompts that are measured only; cache the teacher (teacher.py: final hidden states at the
aligned positions, x_S at a sample of them, bare pairs for the ridge start); free the source; run the bare
target once (delta teacher, ridge start); train the heads with AdamW (nothing else has a gradient);
export the target LoRA.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cast
import demo
import lora
import teacher
from data import write_json
from memory import free_memory, memory_breakdown, peak_memory_mb, reset_peak_memory, rss_mb, use_cores


@dataclass
class Config:
    source: str = "smollm2-135m"  # embedded alias, local folder or Hugging Face id
    cartridge: str = "cartridges/smollm2-arith"  # PEFT-layout LoRA of the source; made by lora.py if missing
    target: str = "gemma3-270m"  # another architecture, another tokenizer
    corpus: str = "format"  # format = the teacher writes a question, then answers it after 'Answer:' (no task data);
    #                          template = the teacher continues the prompt format's first word ('Question:');
    #                          teacher[:PATH] = the teacher continues prompts from stdlib (or PATH): teacher_corpus;
    #                          stdlib = built-in docstring prose, no download; or a .txt/.jsonl file or folder
    write_temperature: float = 1.0  # sampling temperature when the teacher writes the corpus (1 = its own distribution)
    out: str = "runs/smollm2-to-gemma3"  # run folder: config, heads, log, exported LoRA
    steps: int = 1000  # the paper's budget
    batch_size: int = 4  # chunks per step
    seq_len: int = 128  # source tokens per chunk
    lr: float = 1e-3  # relative AdamW step: a head moves ~0.1% of its RMS per step, less from a start near the teacher
    kl_weight: float = 1.0  # weight of the KL term (output alignment; the paper's alpha)
    mse_weight: float = 1.0  # weight of the MSE term (internal alignment; the paper's beta)
    temperature: float = 2.0  # distillation temperature T; softer targets carry more of the teacher
    teacher: str = "paper"  # paper = source + cartridge; delta = the cartridge's effect on the target's own distribution
    top_k: int = 0  # 0 = exact KL over the whole shared vocabulary; k = top k + rest bucket (hides the tail)
    cache_mb: int = 2048  # budget for the teacher cache; x_S is sampled to fit
    init: str = "auto"  # auto = ridge where it starts closer to the teacher than the bare target, else ridge-in;
    #                  ridge-in = closed-form P_in (bare source vs bare target), P_out = 0: the student starts as the
    #                  bare target; ridge = both heads closed form (exact on identity and twin pairs);
    #                  ridge-cartridge = the older start (cartridge on: counts upstream kernels twice); random
    ridge: float = 1e-4  # ridge strength relative to the mean activation energy; 1e-2 shrinks the identity by 0.7%
    ridge_positions: int = 4096  # aligned positions used for the ridge fit
    loss: str = "kl+mse"  # ablations: kl, mse, kl+mse
    max_chunks: int = 300  # the first chunks of the corpus (0 = all): about 13 visits each in 1000 steps of 4
    log_every: int = 20  # one progress line every N steps
    task: str = "arithmetic"  # the cartridge's task: its held-out prompts are measured, never trained on
    monitor: int = 32  # task prompts whose teacher-student KL is logged (0 = none)
    monitor_every: int = 100  # steps between two task KL measurements
    ckpt_every: int = 100  # checkpoint heads + optimizer every N steps (for --resume)
    device: str = ""  # '' = cuda when available, else cpu
    dtype: str = ""  # '' = bf16 on cuda, fp32 on cpu
    seed: int = 0
    recompute: bool = False  # activation checkpointing: the target's layers run again in the backward (less memory)
    paper_recipe: bool = False  # the paper's recipe as first built here: sets teacher, corpus, init, lr, top_k, chunks
    save_start: bool = False  # also write the heads as they start (heads_start.safetensors), to measure the move
    force: bool = False  # overwrite an existing run folder
    resume: bool = False  # continue an interrupted run from its last checkpoint
    demo: bool = False  # the three-minute demo on a toy world (demo.py); --out defaults to runs/demo


# --paper-recipe: the paper's teacher (source + cartridge) on general text, top-64 KL, the start fitted with the
# cartridge on, as first built here; a flag given beside it wins
PAPER_RECIPE = {"teacher": "paper", "corpus": "stdlib", "init": "ridge-cartridge", "lr": 1e-2, "top_k": 64,
                "max_chunks": 1000}


def config_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """One flag per Config field; with defaults=False a parsed namespace holds only the flags given."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), f.default if defaults else argparse.SUPPRESS
        if f.type in (bool, "bool"):
            ap.add_argument(flag, action="store_true", default=default)
        else:
            ap.add_argument(flag, type=type(f.default), default=default)
    return ap


def parse_config(argv=None) -> Config:
    ap = config_parser()
    cfg = Config(**vars(ap.parse_args(argv)))
    inits = ("ridge", "ridge-in", "auto", "ridge-cartridge", "random")
    if cfg.loss not in ("kl", "mse", "kl+mse") or cfg.init not in inits \
            or cfg.teacher not in ("paper", "delta") or cfg.write_temperature <= 0:
        ap.error(f"--loss is one of kl, mse, kl+mse; --init one of {', '.join(inits)}; "
                 "--teacher one of paper, delta; --write-temperature above 0")
    if cfg.paper_recipe:  # the source + cartridge as teacher on general text, top-64 KL, start fitted with it on
        given = set(vars(config_parser(defaults=False).parse_args(argv)))  # the flags on the command line
        for name, value in PAPER_RECIPE.items():
            if name not in given:  # a flag given beside --paper-recipe wins (and config.json records it)
                setattr(cfg, name, value)
        kept = sorted(given & set(PAPER_RECIPE))
        print(f"--paper-recipe sets {', '.join(f'{k}={v}' for k, v in PAPER_RECIPE.items() if k not in given)}"
              + (f"; your {', '.join('--' + k.replace('_', '-') for k in kept)} kept" if kept else ""))
    cfg.kl_weight = cfg.kl_weight if "kl" in cfg.loss else 0.0
    cfg.mse_weight = cfg.mse_weight if "mse" in cfg.loss else 0.0
    return cfg


# ----------------------------------------------------------------------------- training step

def cast_loss(cfg: Config, target, heads, cache: dict, vocab_T, chunk_ids: list[int], backward: bool = False) -> dict:
    """L = kl_weight * T^2 * KL(p_teacher || p_student)
          + mse_weight * mean over sites of MSE(P_in x_T, x_S) / Var(x_S).
    backward: L.backward() while the hooks are still attached (--recompute runs the layers again in it)."""
    device = next(target.parameters()).device
    ids, mask = teacher.batch_of(cache, chunk_ids, device)
    # The teacher first (no grad): its temporaries are freed before the student's activations exist.
    z_teacher = teacher.teacher_logits(cfg, target, cache, vocab_T, chunk_ids) if cfg.kl_weight > 0 else None  # (N, V)
    with cast.attached(target, heads, capture=cfg.mse_weight > 0):
        hidden = target.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, d_T)
        b_idx = torch.cat([torch.full_like(cache["pos_T"][c], b) for b, c in enumerate(chunk_ids)])  # (N,)
        t_idx = torch.cat([cache["pos_T"][c] for c in chunk_ids])  # (N,)
        kl = mse = hidden.new_zeros((), dtype=torch.float32)  # a term that is switched off stays 0
        if cfg.kl_weight > 0 and cfg.top_k:  # the older top-k + rest form, through autograd
            logits = cast.shared_logits(target, hidden[b_idx, t_idx], vocab_T)  # (N, V): aligned rows, shared vocab
            kl = cast.kl_loss(z_teacher, logits, cfg.temperature, cfg.top_k)
        elif cfg.kl_weight > 0:  # exact: kl_loss's value and gradient, a block of aligned rows at a time
            kl = cast.shared_kl(target, hidden[b_idx, t_idx], vocab_T, z_teacher, cfg.temperature)
        if cfg.mse_weight > 0:
            xb = torch.cat([torch.full_like(cache["x_rows"][c], b) for b, c in enumerate(chunk_ids)])
            xt = torch.cat([cache["pos_T"][c][cache["x_rows"][c]] for c in chunk_ids])  # target positions with x_S
            xs = torch.cat([torch.arange(cache["x_start"][c], cache["x_start"][c + 1]) for c in chunk_ids])
            mse = sum(cast.mse_loss(h.P_in(h.x_T[xb, xt].float()), cache["x_S"][h.source_name][xs].to(device),
                                    cache["var_S"][h.source_name]) for h in heads) / len(heads)
        loss = cfg.kl_weight * kl + cfg.mse_weight * mse
        if backward:
            loss.backward()
    return {"loss": loss, "kl": kl, "mse": mse}


@torch.no_grad()
def task_kl(cfg: Config, target, heads, cache: dict, vocab_T) -> float:
    """Exact T^2 KL(teacher || student) on the held-out task prompts (measured only, never trained on)."""
    monitor, exact = list(range(cache["n_train"], len(cache["ids_T"]))), \
        dataclasses.replace(cfg, kl_weight=1.0, mse_weight=0.0, top_k=0)
    total = n = 0
    for i in range(0, len(monitor), 8):
        group = monitor[i:i + 8]
        positions = sum(len(cache["pos_T"][c]) for c in group)
        total += cast_loss(exact, target, heads, cache, vocab_T, group)["kl"].item() * positions
        n += positions
    return total / n if n else float("nan")


@torch.no_grad()
def start_choice(cfg: Config, target, heads, cache: dict, vocab_T) -> str:
    """--init auto: keep both ridge heads ('ridge') if they start closer to the teacher than the bare target on the
    first batch (an exact map: identity and twin pairs), else start from the bare target ('ridge-in')."""
    if cfg.init != "auto":
        return cfg.init
    first, kl_only = batch_chunks(cfg, 1, cache["n_train"]), dataclasses.replace(cfg, kl_weight=1.0, mse_weight=0.0)
    ridge_kl = cast_loss(kl_only, target, heads, cache, vocab_T, first)["kl"].item()
    bare_kl = cast_loss(kl_only, target, torch.nn.ModuleList(), cache, vocab_T, first)["kl"].item()
    choice = "ridge" if ridge_kl < bare_kl else "ridge-in"
    print(f"--init auto: first batch kl {ridge_kl:.4f} with ridge heads, {bare_kl:.4f} bare -> {choice}")
    return choice


def make_optimizer(cfg: Config, heads):
    """AdamW with a relative step: each head matrix moves by about lr x its own RMS per step. Head scales
    differ by three orders of magnitude across sites (Gemma's activations reach hundreds, SmolLM2's a few
    units), so one absolute rate is either too slow for some heads or blows up others."""
    groups = [{"params": [p], "lr_scale": p.detach().float().pow(2).mean().sqrt().item()} for p in heads.parameters()]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)


GAP_MIN = 0.01  # the smallest step factor: an exact start still trains, at 1% of the step (0.01 x lr x RMS)


def step_factor(kl_start: float, kl_bare: float) -> tuple[float, str]:
    """The factor on every head's step, and why. A start near the teacher only needs refining, but AdamW moves
    each head by about lr x its RMS per step whatever the gradient: from the identity's exact start the task KL
    went 0.0006 -> 0.0078 by step 400. So the step shrinks with the distance left to the teacher; near an
    optimum KL is quadratic in the weights, so that distance goes as sqrt(KL):

        gap = clip( sqrt(KL_start / KL_bare), GAP_MIN, 1 )        (1 for the zero-effect start, ridge-in)

    An exact start (same model, rotated twin) has KL_start = 0 up to rounding, which can be slightly negative."""
    if not (math.isfinite(kl_start) and math.isfinite(kl_bare)):
        raise FloatingPointError(f"the first batch's KL is not finite (start {kl_start}, bare {kl_bare}): the heads "
                                 "or the teacher cache hold NaN or infinite values")
    if kl_bare <= 0:
        return 1.0, "the bare target already matches the teacher on the first batch: full step"
    ratio = max(kl_start, 0.0) / kl_bare
    if ratio >= 1:
        return 1.0, "the start is no closer to the teacher than the bare target: full step"
    if math.sqrt(ratio) < GAP_MIN:
        return GAP_MIN, f"the start is (near) exact, kl {kl_start:.1e} of {kl_bare:.3g} bare: floored at {GAP_MIN}"
    return math.sqrt(ratio), f"sqrt(kl {kl_start:.4f} / bare {kl_bare:.4f})"


def batch_chunks(cfg: Config, step: int, n_chunks: int) -> list[int]:
    """The chunks of a step depend only on (seed, step), so a resumed run sees the same batches."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(n_chunks, (cfg.batch_size,), generator=gen).tolist()


# ----------------------------------------------------------------------------- the run

def check_inputs(cfg: Config):
    """Everything that can be checked cheaply, before any model is loaded or any file is written."""
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise FileExistsError(f"run folder {out} exists; pass --force to overwrite it or choose another --out")
    ckpt = partial(out) / "checkpoint.pt"
    if cfg.resume and not ckpt.is_file():
        where = (f"{partial(out)} holds a run that stopped before its first checkpoint (one every {cfg.ckpt_every} "
                 "steps)") if partial(out).exists() else f"there is no interrupted run at {partial(out)}"
        raise FileNotFoundError(f"--resume: {where}; to start again, run without --resume"
                                + (" and with --force" if partial(out).exists() else ""))
    if not cfg.resume and partial(out).exists() and not cfg.force:
        if ckpt.is_file():
            raise FileExistsError(f"{partial(out)} holds an interrupted run with a checkpoint: pass --resume to "
                                  "continue it, or --force to start again")
        raise FileExistsError(f"{partial(out)} holds a run that stopped before its first checkpoint: pass --force "
                              "to start again")


def after_nan(cfg: Config, run: Path) -> str:
    """What to do after a NaN: the interrupted run folder keeps its last checkpoint, if one was written."""
    if (run / "checkpoint.pt").is_file():
        step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
        return f"{run} keeps the checkpoint of step {step}: --resume continues from it (try a lower --lr), --force starts again"
    return f"no checkpoint was written yet (one every {cfg.ckpt_every} steps): --force starts again"


def partial(out) -> Path:
    """Where a run lives until it is complete; renamed to --out at the end."""
    return Path(str(out) + ".partial")


def train(cfg: Config) -> Path:
    check_inputs(cfg)
    runtime_mb = rss_mb()  # Python, torch, transformers: before any model is loaded
    if not Path(cfg.cartridge).exists() and cfg.cartridge == Config.cartridge and cfg.source == Config.source:
        print(f"no cartridge at {cfg.cartridge}: making it with lora.py (once)")
        lora.main(["--model", cfg.source, "--out", cfg.cartridge])
    torch.manual_seed(cfg.seed)
    target, tok_T, kernels, vocab_T, cache, device = teacher.prepare(cfg)
    pad = tok_T.pad_token_id or 0
    del tok_T  # training needs only its pad id; Gemma-3's tokenizer (262k entries) holds about 320 MB
    heads = cast.make_heads(kernels, target).to(device)
    if cfg.recompute:
        cast.recompute_layers(target)
    t0 = time.time()
    teacher.target_pass(cfg, target, heads, cache, pad)  # bare target states (delta teacher), ridge start
    print(f"target pass {time.time() - t0:.0f}s")
    n_heads = sum(p.numel() for p in heads.parameters())
    print(f"trainable: {n_heads / 1e6:.2f}M head parameters in {len(heads)} (P_in, P_out) pairs | "
          f"target frozen: {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M")
    run = partial(cfg.out)
    start = 0
    if cfg.resume:
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        heads.load_state_dict(ckpt["heads"])
        start = ckpt["step"]
        log = [line for line in (run / "log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= start]
        (run / "log.jsonl").write_text("".join(line + "\n" for line in log))  # later steps run again: logged once
        print(f"resumed at step {start}")
    else:
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        (run / "log.jsonl").write_text("")
    del cache["ridge_x_S"], cache["ridge_y_S"]  # training does not need them
    teacher.to_device(cache, device)  # on a GPU: not copied there at every step
    free_memory()
    start_heads = cfg.init if cfg.resume else start_choice(cfg, target, heads, cache, vocab_T)
    opt = make_optimizer(cfg, heads)
    if cfg.resume:
        opt.load_state_dict(ckpt["opt"])  # also restores each group's lr_scale from the first start
    elif start_heads == "ridge-in":
        with torch.no_grad():  # zero-effect start: the student begins exactly at the bare target;
            for h in heads:    # each P_out keeps its ridge fit's RMS as its step scale (taken just above)
                h.P_out.weight.zero_()
    if cfg.save_start and not cfg.resume:
        cast.save_heads(heads, run / "heads_start.safetensors", {"source": cfg.source, "target": cfg.target})
    write_json(run / "config.json", {**dataclasses.asdict(cfg), "provenance": cache["provenance"]})
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    with torch.no_grad():  # a yardstick: how far the bare target is from the teacher, and the start with heads
        first = batch_chunks(cfg, 1, cache["n_train"])
        no_heads = torch.nn.ModuleList()
        kl_only = dataclasses.replace(cfg, kl_weight=1.0, mse_weight=0.0)
        bare = cast_loss(kl_only, target, no_heads, cache, vocab_T, first)
        init = cast_loss(dataclasses.replace(cfg, kl_weight=1.0), target, heads, cache, vocab_T, first)  # KL even if off
        start_rec = {"step": 0, "start": start_heads, "kl_first_batch_bare": round(bare["kl"].item(), 5),
                     "kl_first_batch": round(init["kl"].item(), 5)}
        if cfg.monitor:  # the skill on task text: where the student starts, bare and with the start heads
            start_rec["task_kl_bare"] = round(task_kl(cfg, target, no_heads, cache, vocab_T), 5)
            start_rec["task_kl"] = round(task_kl(cfg, target, heads, cache, vocab_T), 5)
    if not cfg.resume:  # (a resumed run restores lr_scale, this factor included, with the optimizer)
        try:
            gap, why = step_factor(init["kl"].item(), bare["kl"].item()) if sum(len(cache['pos_T'][c]) for c in first) \
                else (1.0, "the first batch has no aligned position to measure the start on: full step")
        except FloatingPointError as e:
            raise FloatingPointError(f"{e}; {after_nan(cfg, run)}") from e
        for group in opt.param_groups:
            group["lr_scale"] *= gap
        start_rec["step_gap"], start_rec["step_gap_reason"] = round(gap, 5), why
    mse = f"{init['mse']:.4f}" if cfg.mse_weight > 0 else "off (x_S not cached)"
    print(f"first batch | kl without heads {bare['kl']:.4f} | with {start_heads} heads: kl {init['kl']:.4f} mse {mse}"
          + ("" if cfg.resume else f" | step x {start_rec['step_gap']:.3f} ({start_rec['step_gap_reason']})"))
    if cfg.monitor:
        print(f"task prompts ({cfg.monitor}, never trained on) | kl without heads {start_rec['task_kl_bare']:.4f} | "
              f"with {start_heads} heads {start_rec['task_kl']:.4f}")
    if not cfg.resume:
        with open(run / "log.jsonl", "a") as f:
            f.write(json.dumps(start_rec) + "\n")
    reset_peak_memory(device)
    # Cosine decay to 10%: the ridge start is already good, late steps should only refine it.
    sched = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    t0, tokens = time.time(), 0
    for step in range(start + 1, cfg.steps + 1):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * sched(step - 1)
        chunk_ids = batch_chunks(cfg, step, cache["n_train"])
        opt.zero_grad(set_to_none=True)
        out = cast_loss(cfg, target, heads, cache, vocab_T, chunk_ids, backward=True)
        if not torch.isfinite(out["loss"]):  # stop before a NaN reaches the heads; the last checkpoint stays
            raise FloatingPointError(f"the loss is {out['loss'].item()} at step {step} (kl {out['kl'].item()}, "
                                     f"mse {out['mse'].item()}); " + after_nan(cfg, run))
        opt.step()
        free_memory(collect=False)
        tokens += sum(len(cache["ids_T"][c]) for c in chunk_ids)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, **{k: round(v.item(), 5) for k, v in out.items()}, "lr": opt.param_groups[0]["lr"],
                   "tok_s": round(tokens / (time.time() - t0), 1), "elapsed_s": round(time.time() - t0, 1)}
            if cfg.monitor and (step % cfg.monitor_every == 0 or step == cfg.steps):
                rec["task_kl"] = round(task_kl(cfg, target, heads, cache, vocab_T), 5)
            eta = (time.time() - t0) / (step - start) * (cfg.steps - step)
            task = f" | task kl {rec['task_kl']:.4f}" if "task_kl" in rec else ""
            print(f"step {step}/{cfg.steps} | loss {rec['loss']:.4f} | kl {rec['kl']:.4f} | mse {rec['mse']:.4f}{task} "
                  f"| {rec['tok_s']:.1f} tok/s | eta {eta / 60:.1f} min", flush=True)
            with open(run / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if step % cfg.ckpt_every == 0 and step < cfg.steps:
            if not all(torch.isfinite(p).all() for p in heads.parameters()):  # a finite loss, a NaN gradient
                raise FloatingPointError(f"the heads are not finite after step {step}; " + after_nan(cfg, run))
            torch.save({"heads": heads.state_dict(), "opt": opt.state_dict(), "step": step}, run / "checkpoint.tmp")
            os.replace(run / "checkpoint.tmp", run / "checkpoint.pt")
    if not all(torch.isfinite(p).all() for p in heads.parameters()):  # the last step is never checkpointed
        raise FloatingPointError(f"the heads are not finite after step {cfg.steps}; " + after_nan(cfg, run))
    cast.save_heads(heads, run / "heads.safetensors", {"source": cfg.source, "target": cfg.target,
                                                        "cartridge": cfg.cartridge})
    cast.export_lora(heads, run / "lora", base_model_name_or_path=cfg.target, force=True)
    (run / "checkpoint.pt").unlink(missing_ok=True)
    out_dir = Path(cfg.out)
    shutil.rmtree(out_dir, ignore_errors=True)  # only reached with --force (checked before any work)
    os.replace(run, out_dir)
    print(f"wrote {out_dir}: config.json heads.safetensors log.jsonl lora/ | {time.time() - t0:.0f}s training")
    print(memory_breakdown(device, peak_memory_mb(device), runtime_mb, target, cache["size_mb"], n_heads))
    return out_dir


def main(argv=None):
    cfg = parse_config(argv)
    use_cores()  # one thread per core this process may use (OMP_NUM_THREADS, taskset)
    try:
        if cfg.demo:
            changed = [f.name for f in dataclasses.fields(Config) if f.name not in ("demo", "out", "force")
                       and getattr(cfg, f.name) != f.default]
            if changed:
                raise ValueError(f"--demo takes only --out and --force, not {changed}: for other settings run train.py "
                                 "on the demo's folders (tutorial.md, Exercises)")
            demo.run(cfg.out if cfg.out != Config.out else "runs/demo", lambda a: train(parse_config(a)), cfg.force)
        else:
            train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
