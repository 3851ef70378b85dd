"""Train CAST heads: source + cartridge (teacher) -> target + heads (student), on general text only.

    python train.py                       # the embedded default: SmolLM2-135M + arithmetic cartridge -> Gemma-3-270M
    python train.py --source S --cartridge DIR --target T --corpus PATH --steps 1000 --out RUN_DIR

Pipeline: load the source with its cartridge; cut the corpus into chunks; run the teacher once and
cache what the loss needs (top-k log-probs over the shared vocabulary at aligned positions, and the
source site inputs x_S at a budgeted sample of them); free the source; load the target; ridge-init
the heads; train them with AdamW (nothing else has a gradient); export the target LoRA.
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cast
from data import chunk_texts, default_device_dtype, load_model, read_corpus, resolve_model, split_corpus
from lora import load_lora, lora_layers, pad_batch, read_adapter


@dataclass
class Config:
    source: str = "smollm2-135m"  # embedded alias, local folder or Hugging Face id
    cartridge: str = "cartridges/smollm2-arith"  # PEFT-layout LoRA of the source; made by lora.py if missing
    target: str = "gemma3-270m"  # another architecture, another tokenizer
    corpus: str = "stdlib"  # .txt/.jsonl file or folder; 'stdlib' = built-in docstring prose, no download
    out: str = "runs/smollm2-to-gemma3"  # run folder: config, heads, log, exported LoRA
    steps: int = 1000  # the paper's budget
    batch_size: int = 4  # chunks per step
    seq_len: int = 128  # source tokens per chunk
    lr: float = 1e-2  # relative AdamW step: each head moves ~1% of its own RMS per step (see make_optimizer)
    alpha: float = 1.0  # weight of the KL term (output alignment)
    beta: float = 1.0  # weight of the MSE term (internal alignment)
    temperature: float = 2.0  # distillation temperature T; softer targets carry more of the teacher
    top_k: int = 64  # teacher log-probs cached per position, plus the remaining mass
    cache_mb: int = 2048  # budget for the teacher cache; x_S is sampled to fit
    init: str = "ridge"  # ridge = closed-form start on cached pairs; random = the paper's plain start
    ridge: float = 1e-2  # ridge strength relative to the mean activation energy (less was better, DESIGN.md)
    ridge_positions: int = 4096  # aligned positions used for the ridge fit
    loss: str = "kl+mse"  # ablations: kl, mse, kl+mse
    max_chunks: int = 1000  # the first chunks of the corpus (0 = all): 4 visits each in 1000 steps of 4
    log_every: int = 20  # one progress line every N steps
    ckpt_every: int = 100  # checkpoint heads + optimizer every N steps (for --resume)
    device: str = ""  # '' = cuda when available, else cpu
    dtype: str = ""  # '' = bf16 on cuda, fp32 on cpu
    seed: int = 0
    force: bool = False  # overwrite an existing run folder
    resume: bool = False  # continue an interrupted run from its last checkpoint


def parse_config(argv=None) -> Config:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            ap.add_argument(flag, action="store_true")
        else:
            ap.add_argument(flag, type=type(f.default), default=f.default)
    cfg = Config(**vars(ap.parse_args(argv)))
    if cfg.loss not in ("kl", "mse", "kl+mse") or cfg.init not in ("ridge", "random"):
        ap.error("--loss is one of kl, mse, kl+mse and --init one of ridge, random")
    cfg.alpha, cfg.beta = (cfg.alpha if "kl" in cfg.loss else 0.0), (cfg.beta if "mse" in cfg.loss else 0.0)
    return cfg


# ----------------------------------------------------------------------------- teacher cache

@torch.no_grad()
def build_cache(cfg: Config, source, tok_S, tok_T, kernels, vocab_S, chunks: list[str]) -> dict:
    """Run the teacher once over every chunk; keep what the loss and the ridge init need, on the CPU."""
    device = next(source.parameters()).device
    sites = [k.source_name for k in kernels]
    x_bytes = 2 * sum(k.A_S.shape[1] for k in kernels) if cfg.beta > 0 else 0  # fp16 x_S of one position, all sites
    enc_S = [tok_S(c, return_offsets_mapping=True) for c in chunks]
    enc_T = [tok_T(c, return_offsets_mapping=True) for c in chunks]
    pairs = [cast.aligned_positions(s["offset_mapping"], t["offset_mapping"]) for s, t in zip(enc_S, enc_T)]
    n_aligned = sum(len(p[0]) for p in pairs)
    kl_bytes = n_aligned * min(cfg.top_k, len(vocab_S)) * 8 if cfg.alpha > 0 else 0  # fp32 log-prob + int32 id
    if cfg.cache_mb * 2**20 < kl_bytes + x_bytes * len(chunks):
        raise ValueError(f"--cache-mb {cfg.cache_mb} is too small: the teacher's top-k alone needs "
                         f"{(kl_bytes + x_bytes * len(chunks)) / 2**20:.0f} MB; raise it or lower --top-k / --max-chunks")
    # x_S only feeds the MSE term: with --loss kl none is kept (all 128 positions would not fit in memory)
    x_per_chunk = min(cfg.seq_len, (cfg.cache_mb * 2**20 - kl_bytes) // (x_bytes * len(chunks))) if x_bytes else 0
    gen = torch.Generator().manual_seed(cfg.seed)
    cache = {"ids_T": [], "pos_T": [], "top_logp": [], "top_ids": [], "x_rows": [], "n_aligned": n_aligned,
             "x_S": {n: [] for n in sites}, "ridge_x_S": {n: [] for n in sites}, "ridge_y_S": {n: [] for n in sites},
             "ridge_chunks": 0, "n_tokens_S": sum(len(e["input_ids"]) for e in enc_S),
             "n_tokens_T": sum(len(e["input_ids"]) for e in enc_T)}
    ridge_left = cfg.ridge_positions if cfg.init == "ridge" else 0
    pad = tok_S.pad_token_id if tok_S.pad_token_id is not None else 0
    with cast.captured(source, [n + ".base" for n in sites]) as store:  # .base: the frozen W_S inside the LoRA
        for first in range(0, len(chunks), 8):  # 8 chunks per teacher forward, right-padded
            group = range(first, min(first + 8, len(chunks)))
            ids, mask = pad_batch([enc_S[c]["input_ids"] for c in group], pad, device)  # (G, T_S)
            hidden = source.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            for b, c in enumerate(group):  # hidden: (G, T_S, d_S)
                (idx_S, idx_T), e_T = pairs[c], enc_T[c]
                h = hidden[b, idx_S]  # (N, d_S)
                logp = torch.log_softmax(cast.shared_logits(source, h, vocab_S).float() / cfg.temperature, -1)  # (N, V)
                top_logp, top_ids = logp.topk(min(cfg.top_k, logp.shape[-1]), dim=-1)  # (N, k)
                rows = torch.randperm(len(idx_S), generator=gen)[:x_per_chunk].sort().values  # rows that keep x_S
                cache["ids_T"].append(torch.tensor(e_T["input_ids"]))
                cache["pos_T"].append(torch.tensor(idx_T, dtype=torch.long))
                cache["top_logp"].append(top_logp.cpu())
                cache["top_ids"].append(top_ids.int().cpu())
                cache["x_rows"].append(rows)
                for n in sites:
                    x, y = store[n + ".base"]  # (G, T_S, d_in_S), (G, T_S, d_out_S)
                    cache["x_S"][n].append(x[b, torch.tensor(idx_S)[rows]].half().cpu())  # (m, d_in_S)
                    if ridge_left > 0:  # all aligned positions of the first chunks, in fp32
                        cache["ridge_x_S"][n].append(x[b, idx_S].float().cpu())  # (N, d_in_S)
                        cache["ridge_y_S"][n].append(y[b, idx_S].float().cpu())  # (N, d_out_S)
                if ridge_left > 0:
                    ridge_left -= len(idx_S)
                    cache["ridge_chunks"] += 1
    cache["x_start"] = torch.tensor([0] + [len(r) for r in cache["x_rows"]]).cumsum(0)  # chunk -> its first x_S row
    cache["x_S"] = {n: torch.cat(ts) for n, ts in cache["x_S"].items()}  # (sum m, d_in_S)
    cache["var_S"] = {n: x.float().var().item() for n, x in cache["x_S"].items() if len(x) > 1}  # Var(x_S) per site
    size = sum(t.numel() * t.element_size() for key in ("top_logp", "top_ids") for t in cache[key])
    size += sum(x.numel() * x.element_size() for x in cache["x_S"].values())
    cache["size_mb"] = size / 2**20
    print(f"teacher cache: {size / 2**20:.1f} MB (budget {cfg.cache_mb} MB) | {len(chunks)} chunks | "
          f"x_S kept at {x_per_chunk} aligned positions per chunk | {n_aligned} aligned positions")
    return cache


@torch.no_grad()
def ridge_init(target, heads, cache: dict, ridge: float):
    """P_in: ridge of x_S on x_T; P_out: ridge of the target module output on the source module output,
    both on the aligned positions of the first cached chunks."""
    device = next(target.parameters()).device
    names = sorted({h.target_name for h in heads})
    x_T, y_T = {n: [] for n in names}, {n: [] for n in names}
    with cast.captured(target, names) as store:
        for c in range(cache["ridge_chunks"]):
            target.base_model(input_ids=cache["ids_T"][c][None].to(device))
            for n in names:
                x_T[n].append(store[n][0][0, cache["pos_T"][c]].float().cpu())  # (N, d_in_T)
                y_T[n].append(store[n][1][0, cache["pos_T"][c]].float().cpu())  # (N, d_out_T)
    for h in heads:
        h.P_in.weight.copy_(cast.ridge_fit(torch.cat(x_T[h.target_name]), torch.cat(cache["ridge_x_S"][h.source_name]), ridge))
        h.P_out.weight.copy_(cast.ridge_fit(torch.cat(cache["ridge_y_S"][h.source_name]), torch.cat(y_T[h.target_name]), ridge))


# ----------------------------------------------------------------------------- training step

def batch_of(cache: dict, chunk_ids: list[int], device):
    """Right-padded target ids (B, T) and mask for the given chunks."""
    return pad_batch([cache["ids_T"][c].tolist() for c in chunk_ids], 0, device)


def cast_loss(cfg: Config, target, heads, cache: dict, vocab_T, chunk_ids: list[int]) -> dict:
    """L = alpha * T^2 * KL(p_teacher || p_student) + beta * mean over sites of MSE(P_in x_T, x_S) / Var(x_S)."""
    device = next(target.parameters()).device
    ids, mask = batch_of(cache, chunk_ids, device)
    with cast.attached(target, heads, capture=cfg.beta > 0):
        hidden = target.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d_T)
        b_idx = torch.cat([torch.full_like(cache["pos_T"][c], b) for b, c in enumerate(chunk_ids)])  # (N,)
        t_idx = torch.cat([cache["pos_T"][c] for c in chunk_ids])  # (N,)
        kl = mse = hidden.new_zeros((), dtype=torch.float32)  # a term that is switched off stays 0
        if cfg.alpha > 0:
            logits = cast.shared_logits(target, hidden[b_idx, t_idx], vocab_T)  # (N, V): aligned rows, shared vocab
            top_logp = torch.cat([cache["top_logp"][c] for c in chunk_ids]).to(device)  # (N, k)
            top_ids = torch.cat([cache["top_ids"][c] for c in chunk_ids]).long().to(device)  # (N, k)
            kl = cast.kl_loss(top_logp, top_ids, logits, cfg.temperature)
        if cfg.beta > 0:
            xb = torch.cat([torch.full_like(cache["x_rows"][c], b) for b, c in enumerate(chunk_ids)])
            xt = torch.cat([cache["pos_T"][c][cache["x_rows"][c]] for c in chunk_ids])  # target positions with x_S
            xs = torch.cat([torch.arange(cache["x_start"][c], cache["x_start"][c + 1]) for c in chunk_ids])
            mse = sum(cast.mse_loss(h.P_in(h.x_T[xb, xt].float()), cache["x_S"][h.source_name][xs].to(device),
                                    cache["var_S"][h.source_name]) for h in heads) / len(heads)
    return {"loss": cfg.alpha * kl + cfg.beta * mse, "kl": kl, "mse": mse}


def make_optimizer(cfg: Config, heads):
    """AdamW with a relative step: each head matrix moves by about lr x its own RMS per step. Head scales
    differ by three orders of magnitude across sites (Gemma's activations reach hundreds, SmolLM2's a few
    units), so one absolute rate is either too slow for some heads or blows up others."""
    groups = [{"params": [p], "lr_scale": p.detach().float().pow(2).mean().sqrt().item()} for p in heads.parameters()]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)


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
    if cfg.resume and not (partial(out) / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {partial(out) / 'checkpoint.pt'}")
    if not cfg.resume and partial(out).exists() and not cfg.force:
        raise FileExistsError(f"{partial(out)} holds an interrupted run; pass --resume to continue it or --force")


def partial(out) -> Path:
    """Where a run lives until it is complete; renamed to --out at the end."""
    return Path(str(out) + ".partial")


def write_json(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def prepare(cfg: Config):
    """Models, kernels, vocabulary, chunks and teacher cache; the source model is gone when this returns."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    device, dtype = default_device_dtype(cfg.device or None, cfg.dtype or None)
    if not Path(cfg.cartridge).exists() and cfg.cartridge == Config.cartridge and cfg.source == Config.source:
        from data import cartridge_main
        print(f"no cartridge at {cfg.cartridge}: making it with lora.py (once)")
        cartridge_main(["--model", cfg.source, "--out", cfg.cartridge])
    adapter, factors = read_adapter(cfg.cartridge)
    target_path = resolve_model(cfg.target)
    with init_empty_weights():  # the target's structure, no memory: enough to check the kernels fit
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target_path))
    tok_T = AutoTokenizer.from_pretrained(target_path)
    docs = read_corpus(None if cfg.corpus == "stdlib" else cfg.corpus)
    source, tok_S = load_model(cfg.source, device, dtype)
    load_lora(source, cfg.cartridge)  # the teacher: source + cartridge
    kernels = cast.find_kernels(adapter, factors, source, skeleton)
    vocab_S, vocab_T = cast.shared_vocab(tok_S, tok_T)
    cast.offsets(tok_T, "check")  # a clear error for a tokenizer without offsets
    train_docs, _ = split_corpus(docs)
    chunks = chunk_texts(train_docs, tok_S, cfg.seq_len)[: cfg.max_chunks or None]
    if not chunks:
        raise ValueError(f"corpus {cfg.corpus} gives no chunk of text to train on")
    mapping = cast.layer_map(source.config.num_hidden_layers, skeleton.config.num_hidden_layers)
    print(f"source {cfg.source}: {sum(p.numel() for p in source.parameters()) / 1e6:.1f}M params, "
          f"{source.config.num_hidden_layers} layers | target {cfg.target}: {skeleton.config.num_hidden_layers} layers")
    print(f"kernels: {len(kernels)} ({len(lora_layers(source))} cartridge modules) | layer map {mapping}")
    print(f"shared vocabulary: {len(vocab_S)} tokens ({len(vocab_S) / len(tok_S):.0%} of source, "
          f"{len(vocab_T) / len(tok_T):.0%} of target)")
    t0 = time.time()
    cache = build_cache(cfg, source, tok_S, tok_T, kernels, vocab_S.to(device), chunks)
    print(f"aligned tokens: {cache['n_aligned'] / cache['n_tokens_S']:.0%} of source, "
          f"{cache['n_aligned'] / cache['n_tokens_T']:.0%} of target | teacher pass {time.time() - t0:.0f}s")
    del source
    gc.collect()
    target, _ = load_model(cfg.target, device, dtype)
    return target, kernels, vocab_T.to(device), cache, device


def train(cfg: Config) -> Path:
    check_inputs(cfg)
    torch.manual_seed(cfg.seed)
    target, kernels, vocab_T, cache, device = prepare(cfg)
    heads = cast.make_heads(kernels, target).to(device)
    n_heads = sum(p.numel() for p in heads.parameters())
    print(f"trainable: {n_heads / 1e6:.2f}M head parameters in {len(heads)} (P_in, P_out) pairs | "
          f"target frozen: {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M")
    run = partial(cfg.out)
    start = 0
    if cfg.resume:
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        heads.load_state_dict(ckpt["heads"])
        start = ckpt["step"]
        print(f"resumed at step {start}")
    else:
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        if cfg.init == "ridge":
            ridge_init(target, heads, cache, cfg.ridge)
        (run / "log.jsonl").write_text("")
    del cache["ridge_x_S"], cache["ridge_y_S"]  # about 2 GB for the default pair; training does not need them
    gc.collect()
    opt = make_optimizer(cfg, heads)
    if cfg.resume:
        opt.load_state_dict(ckpt["opt"])  # also restores each group's lr_scale from the first start
    write_json(run / "config.json", dataclasses.asdict(cfg))
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    with torch.no_grad():  # a yardstick: how far the bare target is from the teacher, and the start with heads
        first = batch_chunks(cfg, 1, len(cache["ids_T"]))
        no_heads = torch.nn.ModuleList()
        bare = cast_loss(dataclasses.replace(cfg, alpha=1.0, beta=0.0), target, no_heads, cache, vocab_T, first)
        init = cast_loss(dataclasses.replace(cfg, alpha=1.0), target, heads, cache, vocab_T, first)  # KL even if off
    mse = f"{init['mse']:.4f}" if cfg.beta > 0 else "off (x_S not cached)"
    print(f"first batch | kl without heads {bare['kl']:.4f} | with {cfg.init} heads: kl {init['kl']:.4f} mse {mse}")
    reset_peak_memory(device)
    # Cosine decay to 10%: the ridge start is already good, late steps should only refine it.
    sched = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    t0, tokens = time.time(), 0
    for step in range(start + 1, cfg.steps + 1):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * sched(step - 1)
        chunk_ids = batch_chunks(cfg, step, len(cache["ids_T"]))
        out = cast_loss(cfg, target, heads, cache, vocab_T, chunk_ids)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        tokens += sum(len(cache["ids_T"][c]) for c in chunk_ids)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, **{k: round(v.item(), 5) for k, v in out.items()}, "lr": opt.param_groups[0]["lr"],
                   "tok_s": round(tokens / (time.time() - t0), 1), "elapsed_s": round(time.time() - t0, 1)}
            eta = (time.time() - t0) / (step - start) * (cfg.steps - step)
            print(f"step {step}/{cfg.steps} | loss {rec['loss']:.4f} | kl {rec['kl']:.4f} | mse {rec['mse']:.4f} "
                  f"| {rec['tok_s']:.1f} tok/s | eta {eta / 60:.1f} min", flush=True)
            with open(run / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if step % cfg.ckpt_every == 0 and step < cfg.steps:
            torch.save({"heads": heads.state_dict(), "opt": opt.state_dict(), "step": step}, run / "checkpoint.tmp")
            os.replace(run / "checkpoint.tmp", run / "checkpoint.pt")
    cast.save_heads(heads, run / "heads.safetensors", {"source": cfg.source, "target": cfg.target,
                                                        "cartridge": cfg.cartridge})
    cast.export_lora(heads, run / "lora", base_model_name_or_path=cfg.target, force=True)
    (run / "checkpoint.pt").unlink(missing_ok=True)
    out_dir = Path(cfg.out)
    shutil.rmtree(out_dir, ignore_errors=True)  # only reached with --force (checked before any work)
    os.replace(run, out_dir)
    print(f"wrote {out_dir}: config.json heads.safetensors log.jsonl lora/ | {time.time() - t0:.0f}s training")
    target_mb = sum(p.numel() * p.element_size() for p in target.parameters()) / 2**20
    print(f"memory: peak during training {peak_memory_mb(device):.0f} MB | target {target_mb:.0f} MB + cache "
          f"{cache['size_mb']:.0f} MB + heads with grads and AdamW state {16 * n_heads / 2**20:.0f} MB")
    return out_dir


# ----------------------------------------------------------------------------- memory

def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process from /proc (Linux); VmHWM is its peak since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_memory(device: str):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated, or peak resident memory of the process on the CPU, since the last reset."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else rss_mb("VmHWM")


def main(argv=None):
    cfg = parse_config(argv)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
