"""Train CAST heads: source + cartridge (the teacher) -> target + heads (the student), without task data.

    python train.py --demo                # the whole pipeline on tiny models built in code (demo.py), 2 minutes
    python train.py                       # the embedded default: SmolLM2-135M + arithmetic cartridge -> Gemma-3-270M
    python train.py --source S --cartridge DIR --target T --corpus PATH --out RUN_DIR

The pipeline, top-down in train(): 1. load the bare source, the kernels of its cartridge and the text (or
have the teacher write it); 2. cache the teacher and free the source; 3. load the target and give it one pair
of heads per kernel, fitted in closed form (the ridge start); 4. train the heads with AdamW on KL + MSE
(nothing else has a gradient); 5. save them and export the target LoRA. The settings: config.py; the
objective: losses.py.
"""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

import align
import cast
import demo
import lora
import losses
import teacher
from config import Config, parse_config
from data import (after_nan, check_model, check_run_folder, chunk_texts, default_device_dtype, folder_sha256,
                  load_model, partial, provenance, read_corpus, resolve_model, split_corpus, write_json)
from memory import free_memory, memory_breakdown, peak_memory_mb, reset_peak_memory, rss_mb, use_cores
from task import monitor_problems, prompt


# ----------------------------------------------------------------------------- the run, top-down

def train(cfg: Config) -> Path:
    check_inputs(cfg)  # before any model is loaded or any file written
    runtime_mb = rss_mb()  # Python, torch, transformers: before any model is loaded
    if not Path(cfg.cartridge).exists() and cfg.cartridge == Config.cartridge and cfg.source == Config.source:
        print(f"no cartridge at {cfg.cartridge}: making it with lora.py (once)")
        lora.main(["--model", cfg.source, "--out", cfg.cartridge])
    torch.manual_seed(cfg.seed)
    # 1-2. the source, its kernels, the text; the teacher cached; the source freed
    kernels, vocab_T, cache, device, dtype = prepare(cfg)
    # 3. the student: the target with one pair of heads per kernel, started in closed form
    target, tok_T = load_model(cfg.target, device, dtype)
    heads = cast.make_heads(kernels, target).to(device)
    t0 = time.time()
    ridge_start(cfg, target, heads, cache, tok_T.pad_token_id or 0)
    print(f"target pass {time.time() - t0:.0f}s")
    del tok_T, cache["ridge_x_S"], cache["ridge_y_S"]  # Gemma-3's tokenizer alone holds about 320 MB
    teacher.to_device(cache, device)  # on a GPU: not copied there at every step
    free_memory()
    n_heads = sum(p.numel() for p in heads.parameters())
    print(f"trainable: {n_heads / 1e6:.2f}M head parameters in {len(heads)} (P_in, P_out) pairs | "
          f"target frozen: {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M")
    # 4. train
    run, start = partial(cfg.out), 0
    opt = make_optimizer(cfg, heads)
    if cfg.resume:
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        heads.load_state_dict(ckpt["heads"])
        opt.load_state_dict(ckpt["opt"])  # also each group's lr_scale, the step factor included
        start = ckpt["step"]
        log = [line for line in (run / "log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= start]
        (run / "log.jsonl").write_text("".join(line + "\n" for line in log))  # later steps run again: logged once
        print(f"resumed at step {start}")
    else:
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        start_record = choose_start(cfg, target, heads, cache, vocab_T, opt, run)
        (run / "log.jsonl").write_text(json.dumps(start_record) + "\n")
    write_json(run / "config.json", {**dataclasses.asdict(cfg), "provenance": cache["provenance"]})
    if cfg.corpus == "format":  # the text the teacher wrote, what the heads were shown, kept beside the results
        (run / "teacher_text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in cache["chunks"]))
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    reset_peak_memory(device)
    t0 = time.time()
    fit(cfg, target, heads, cache, vocab_T, opt, run, start)
    # 5. the heads and the exported LoRA; the run folder renamed when complete
    cast.save_heads(heads, run / "heads.safetensors", {"source": cfg.source, "target": cfg.target,
                                                        "cartridge": cfg.cartridge})
    cast.export_lora(heads, run / "lora", base_model_name_or_path=cfg.target, force=True)
    (run / "checkpoint.pt").unlink(missing_ok=True)
    out = Path(cfg.out)
    shutil.rmtree(out, ignore_errors=True)  # only reached with --force (checked before any work)
    os.replace(run, out)
    print(f"wrote {out}: {' '.join(sorted(p.name for p in out.iterdir()))} | {time.time() - t0:.0f}s training")
    print(memory_breakdown(device, peak_memory_mb(device), runtime_mb, target, cache["size_mb"], n_heads))
    return out


RESUMABLE = ("steps", "log_every", "monitor_every", "ckpt_every", "resume", "force")  # change no step already taken


def check_inputs(cfg: Config):
    """Every path and model of a run, and what --force and --resume would do, checked before any work: a bad
    input stops with one line that says what is wrong and what would be right."""
    check_run_folder(cfg.out, cfg.force, cfg.resume, cfg.ckpt_every)
    if cfg.resume and (partial(cfg.out) / "config.json").is_file():
        saved = json.loads((partial(cfg.out) / "config.json").read_text())
        differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
                  if k not in RESUMABLE and saved.get(k) != v]
        if differ:
            raise ValueError(f"--resume: the interrupted run was started with other settings ({'; '.join(differ)}); "
                             "resume with its own (only --steps and the logging flags may change), or start again "
                             "with --force")
    check_model(cfg.source, "--source")
    check_model(cfg.target, "--target")
    if Path(cfg.cartridge).exists() or cfg.cartridge != Config.cartridge or cfg.source != Config.source:
        lora.read_adapter(cfg.cartridge)  # missing, or not a plain LoRA of integer rank and numeric scale
    if cfg.corpus != "format":
        read_corpus(cfg.corpus)  # missing or empty
    monitor_problems(cfg.task, 0)  # neither 'arithmetic' nor a readable GSM8K file


def prepare(cfg: Config):
    """Steps 1-2: the kernels (checked against the target's structure before any of its weights is loaded),
    the shared vocabulary, the chunks (read, or written by the teacher) and held-out task prompts, the teacher
    cache. The source model is gone when this returns."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    device, dtype = default_device_dtype(cfg.device or None, cfg.dtype or None)
    adapter, factors = lora.read_adapter(cfg.cartridge)
    target_path = resolve_model(cfg.target)
    with init_empty_weights():  # the target's structure, no memory: enough to check the kernels fit
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target_path))
    tok_T = AutoTokenizer.from_pretrained(target_path)
    if tok_T.pad_token_id is None:  # as load_model does, so that the recorded ids are those evaluate.py sees
        tok_T.pad_token = tok_T.eos_token
    docs = None if cfg.corpus == "format" else read_corpus(cfg.corpus)
    source, tok_S = load_model(cfg.source, device, dtype)  # bare: build_cache loads the cartridge after its bare pass
    kernels = cast.find_kernels(adapter, factors, source, skeleton)
    vocab_S, vocab_T = align.shared_vocab(tok_S, tok_T)
    align.offsets(tok_T, "check")  # a clear error for a tokenizer without offsets
    written = None
    if docs is None:
        chunks, written = teacher.teacher_corpus(cfg, cfg.max_chunks, tok_S, device, dtype)
    else:
        chunks = chunk_texts(split_corpus(docs)[0], tok_S, cfg.seq_len)[: cfg.max_chunks or None]
    if not chunks:
        raise ValueError(f"corpus {cfg.corpus} gives no chunk of text to train on")
    monitor = [prompt(p["question"]) + " " + p["answer"] for p in monitor_problems(cfg.task, cfg.monitor)]
    mapping = cast.layer_map(source.config.num_hidden_layers, skeleton.config.num_hidden_layers)
    print(f"source {cfg.source}: {sum(p.numel() for p in source.parameters()) / 1e6:.1f}M params, "
          f"{source.config.num_hidden_layers} layers | target {cfg.target}: {skeleton.config.num_hidden_layers} layers")
    print(f"kernels: {len(kernels)} ({len(factors)} cartridge modules) | layer map {mapping}")
    print(f"shared vocabulary: {len(vocab_S)} tokens ({len(vocab_S) / len(tok_S):.0%} of source, "
          f"{len(vocab_T) / len(tok_T):.0%} of target)")
    t0 = time.time()
    cache = teacher.build_cache(cfg, source, tok_S, tok_T, kernels, vocab_S.to(device), chunks + monitor, len(chunks))
    print(f"aligned tokens: {cache['n_aligned'] / cache['n_tokens_S']:.0%} of source, "
          f"{cache['n_aligned'] / cache['n_tokens_T']:.0%} of target | source passes {time.time() - t0:.0f}s")
    cache["provenance"] = {**provenance({"source": cfg.source, "target": cfg.target}, {"source": tok_S, "target": tok_T}),
                           "cartridge_sha256": folder_sha256(cfg.cartridge), "chunks": len(chunks),
                           **({"teacher_corpus": written} if written else {}),
                           "chunks_sha256": hashlib.sha256(json.dumps(chunks).encode()).hexdigest()}
    cache["chunks"] = chunks
    del source
    free_memory()
    return kernels, vocab_T.to(device), cache, device, dtype


@torch.no_grad()
def ridge_start(cfg: Config, target, heads, cache: dict, pad: int):
    """Step 3: one pass of the bare target over the first chunks, then each head in closed form (cast.ridge_fit):
    P_in = ridge of x_S on x_T, P_out = ridge of W_T x_T on W_S x_S, bare (the source's side
    with its cartridge on under --init ridge-cartridge)."""
    names = sorted({h.target_name for h in heads})
    x_T, y_T = {n: [] for n in names}, {n: [] for n in names}
    ids = [t.tolist() for t in cache["ids_T"][: cache["ridge_chunks"]]]
    for c, _, store in teacher.forward_chunks(target, ids, pad, names):
        for n in names:
            x_T[n].append(store[n][0][cache["pos_T"][c]].float().cpu())  # (N, d_in_T)
            y_T[n].append(store[n][1][cache["pos_T"][c]].float().cpu())  # (N, d_out_T)
    for h in heads:
        h.P_in.weight.copy_(cast.ridge_fit(torch.cat(x_T[h.target_name]), torch.cat(cache["ridge_x_S"][h.source_name]), cfg.ridge))
        h.P_out.weight.copy_(cast.ridge_fit(torch.cat(cache["ridge_y_S"][h.source_name]), torch.cat(y_T[h.target_name]), cfg.ridge))


def make_optimizer(cfg: Config, heads):
    """AdamW with a relative step: each head matrix moves by about lr x its own RMS per step (lr_scale). Head
    scales differ by three orders of magnitude across sites (Gemma's activations reach hundreds, SmolLM2's a
    few units), so one absolute rate is either too slow for some heads or blows up others."""
    groups = [{"params": [p], "lr_scale": p.detach().float().pow(2).mean().sqrt().item()} for p in heads.parameters()]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)


GAP_MIN = 0.01  # the smallest step factor: an exact start still trains, at 1% of the step


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


@torch.no_grad()
def choose_start(cfg: Config, target, heads, cache: dict, vocab_T, opt, run: Path) -> dict:
    """--init auto keeps both ridge heads if they start closer to the teacher than the bare target on the first
    batch (an exact map: identity and twin pairs), else the zero-effect start (P_out = 0: the bare target).
    Then every head's step is multiplied by step_factor(KL_start, KL_bare). Returns the log's step-0 record."""
    first, no_heads = batch_chunks(cfg, 1, cache["n_train"]), torch.nn.ModuleList()
    kl_only = dataclasses.replace(cfg, kl_weight=1.0, mse_weight=0.0)
    bare = losses.cast_loss(kl_only, target, no_heads, cache, vocab_T, first)["kl"].item()
    choice = cfg.init
    if choice == "auto":
        ridge_kl = losses.cast_loss(kl_only, target, heads, cache, vocab_T, first)["kl"].item()
        choice = "ridge" if ridge_kl < bare else "ridge-in"
        print(f"--init auto: first batch kl {ridge_kl:.4f} with ridge heads, {bare:.4f} bare -> {choice}")
    if choice == "ridge-in":  # the student begins exactly at the bare target; each P_out keeps the RMS of its
        for h in heads:       # ridge fit as its step scale (taken by make_optimizer)
            h.P_out.weight.zero_()
    init = losses.cast_loss(dataclasses.replace(cfg, kl_weight=1.0), target, heads, cache, vocab_T, first)  # KL even if off
    record = {"step": 0, "start": choice, "kl_first_batch_bare": round(bare, 5), "kl_first_batch": round(init["kl"].item(), 5)}
    if cfg.monitor:  # the skill on task text: where the student starts, bare and with the start heads
        record["task_kl_bare"] = round(losses.task_kl(cfg, target, no_heads, cache, vocab_T), 5)
        record["task_kl"] = round(losses.task_kl(cfg, target, heads, cache, vocab_T), 5)
    try:
        gap, why = step_factor(init["kl"].item(), bare) if sum(len(cache["pos_T"][c]) for c in first) \
            else (1.0, "the first batch has no aligned position to measure the start on: full step")
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}; {after_nan(run, cfg.ckpt_every)}") from e
    for group in opt.param_groups:
        group["lr_scale"] *= gap
    record["step_gap"], record["step_gap_reason"] = round(gap, 5), why
    mse = f"{init['mse']:.4f}" if cfg.mse_weight > 0 else "off (x_S not cached)"
    print(f"first batch | kl without heads {bare:.4f} | with {choice} heads: kl {record['kl_first_batch']:.4f} "
          f"mse {mse} | step x {gap:.3f} ({why})")
    if cfg.monitor:
        print(f"task prompts ({cfg.monitor}, never trained on) | kl without heads {record['task_kl_bare']:.4f} | "
              f"with {choice} heads {record['task_kl']:.4f}")
    return record


def fit(cfg: Config, target, heads, cache: dict, vocab_T, opt, run: Path, start: int):
    """Step 4: AdamW on the heads, the learning rate decayed by a cosine to 10% (the start is already good: late
    steps only refine it); a log line every --log-every steps, a checkpoint every --ckpt-every."""
    sched = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    t0, tokens = time.time(), 0
    for step in range(start + 1, cfg.steps + 1):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * sched(step - 1)
        chunk_ids = batch_chunks(cfg, step, cache["n_train"])
        opt.zero_grad(set_to_none=True)
        out = losses.cast_loss(cfg, target, heads, cache, vocab_T, chunk_ids, backward=True)
        if not torch.isfinite(out["loss"]):  # stop before a NaN reaches the heads; the last checkpoint stays
            raise FloatingPointError(f"the loss is {out['loss'].item()} at step {step} (kl {out['kl'].item()}, "
                                     f"mse {out['mse'].item()}); " + after_nan(run, cfg.ckpt_every))
        opt.step()
        free_memory(collect=False)  # hand this step's freed activations back before the next step's
        tokens += sum(len(cache["ids_T"][c]) for c in chunk_ids)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, **{k: round(v.item(), 5) for k, v in out.items()}, "lr": opt.param_groups[0]["lr"],
                   "tok_s": round(tokens / (time.time() - t0), 1), "elapsed_s": round(time.time() - t0, 1)}
            if cfg.monitor and (step % cfg.monitor_every == 0 or step == cfg.steps):
                rec["task_kl"] = round(losses.task_kl(cfg, target, heads, cache, vocab_T), 5)
            eta = (time.time() - t0) / (step - start) * (cfg.steps - step)
            task = f" | task kl {rec['task_kl']:.4f}" if "task_kl" in rec else ""
            print(f"step {step}/{cfg.steps} | loss {rec['loss']:.4f} | kl {rec['kl']:.4f} | mse {rec['mse']:.4f}{task} "
                  f"| {rec['tok_s']:.1f} tok/s | eta {eta / 60:.1f} min", flush=True)
            with open(run / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            if not all(torch.isfinite(p).all() for p in heads.parameters()):  # a finite loss, a NaN gradient
                raise FloatingPointError(f"the heads are not finite after step {step}; " + after_nan(run, cfg.ckpt_every))
            if step < cfg.steps:
                torch.save({"heads": heads.state_dict(), "opt": opt.state_dict(), "step": step}, run / "checkpoint.tmp")
                os.replace(run / "checkpoint.tmp", run / "checkpoint.pt")


def batch_chunks(cfg: Config, step: int, n_chunks: int) -> list[int]:
    """The chunks of a step depend only on (seed, step), so a resumed run sees the same batches."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(n_chunks, (cfg.batch_size,), generator=gen).tolist()


def main(argv=None):
    cfg = parse_config(argv, __doc__)
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
