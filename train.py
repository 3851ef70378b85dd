"""Train CAST heads: source + cartridge (teacher) -> target + heads (student), on general text only.

    python train.py                       # the embedded default: SmolLM2-135M + arithmetic cartridge -> Gemma-3-270M
    python train.py --source S --cartridge DIR --target T --corpus PATH --steps 1000 --out RUN_DIR

Pipeline: load the bare source; cut the corpus into chunks (plus held-out task prompts, measured only);
run the source bare, then with its cartridge, and cache what the loss needs (final hidden states at the
aligned positions, from which each step recomputes the teacher's exact log-probs over the shared
vocabulary; the source site inputs x_S at a budgeted sample of them; bare pairs for the ridge start);
free the source; load the target, run it bare once (delta teacher, ridge start); train the heads with
AdamW (nothing else has a gradient); export the target LoRA.
"""
import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cast
import lora
from data import (CACHE, chunk_texts, default_device_dtype, load_model, monitor_problems, pad_batch, prompt,
                  read_corpus, resolve_model, sample_continuations, split_corpus)
from lora import load_lora, read_adapter


@dataclass
class Config:
    source: str = "smollm2-135m"  # embedded alias, local folder or Hugging Face id
    cartridge: str = "cartridges/smollm2-arith"  # PEFT-layout LoRA of the source; made by lora.py if missing
    target: str = "gemma3-270m"  # another architecture, another tokenizer
    corpus: str = "teacher"  # teacher[:PATH] = the teacher continues prompts from stdlib (or PATH): teacher_corpus;
    #                          stdlib = built-in docstring prose, no download; or a .txt/.jsonl file or folder
    out: str = "runs/smollm2-to-gemma3"  # run folder: config, heads, log, exported LoRA
    steps: int = 1000  # the paper's budget
    batch_size: int = 4  # chunks per step
    seq_len: int = 128  # source tokens per chunk
    lr: float = 1e-3  # relative AdamW step: each head moves ~0.1% of its own RMS per step (see make_optimizer)
    kl_weight: float = 1.0  # weight of the KL term (output alignment; the paper's alpha)
    mse_weight: float = 1.0  # weight of the MSE term (internal alignment; the paper's beta)
    temperature: float = 2.0  # distillation temperature T; softer targets carry more of the teacher
    teacher: str = "delta"  # delta = the cartridge's effect on the target's own distribution; paper = source + cartridge
    top_k: int = 0  # 0 = exact KL over the whole shared vocabulary; k = top k + rest bucket (hides the tail)
    cache_mb: int = 2048  # budget for the teacher cache; x_S is sampled to fit
    init: str = "ridge"  # ridge = closed form, bare source vs bare target; ridge-in = the same P_in, P_out = 0;
    #                      ridge-cartridge = the older start (cartridge on: counts upstream kernels twice); random
    ridge: float = 1e-4  # ridge strength relative to the mean activation energy; 1e-2 shrinks the identity by 0.7%
    ridge_positions: int = 4096  # aligned positions used for the ridge fit
    loss: str = "kl+mse"  # ablations: kl, mse, kl+mse
    max_chunks: int = 1000  # the first chunks of the corpus (0 = all): 4 visits each in 1000 steps of 4
    log_every: int = 20  # one progress line every N steps
    task: str = "arithmetic"  # the cartridge's task: its held-out prompts are measured, never trained on
    monitor: int = 32  # task prompts whose teacher-student KL is logged (0 = none)
    monitor_every: int = 100  # steps between two task KL measurements
    ckpt_every: int = 100  # checkpoint heads + optimizer every N steps (for --resume)
    device: str = ""  # '' = cuda when available, else cpu
    dtype: str = ""  # '' = bf16 on cuda, fp32 on cpu
    seed: int = 0
    paper_recipe: bool = False  # the paper's recipe as first built here: sets teacher, corpus, init, lr, top_k below
    save_start: bool = False  # also write the heads as they start (heads_start.safetensors), to measure the move
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
    if cfg.loss not in ("kl", "mse", "kl+mse") or cfg.init not in ("ridge", "ridge-in", "ridge-cartridge", "random") \
            or cfg.teacher not in ("paper", "delta"):
        ap.error("--loss is one of kl, mse, kl+mse; --init one of ridge, ridge-in, ridge-cartridge, random; "
                 "--teacher one of paper, delta")
    if cfg.paper_recipe:  # the source + cartridge as teacher on general text, top-64 KL, start fitted with it on
        cfg.teacher, cfg.corpus, cfg.init, cfg.lr, cfg.top_k = "paper", "stdlib", "ridge-cartridge", 1e-2, 64
    cfg.kl_weight = cfg.kl_weight if "kl" in cfg.loss else 0.0
    cfg.mse_weight = cfg.mse_weight if "mse" in cfg.loss else 0.0
    return cfg


# ----------------------------------------------------------------------------- teacher cache

def forward_chunks(model, chunk_ids: list[list[int]], pad: int, names=()):
    """Yield (chunk index, final hidden states (T, d), {module name: (input (T, d_in), output (T, d_out))})
    for every chunk, 8 chunks per forward, right-padded (a causal model never reads the padding). Callers run
    it under torch.no_grad (a no_grad inside a generator would also switch gradients off between its yields)."""
    device = next(model.parameters()).device
    with cast.captured(model, list(names)) as store:
        for first in range(0, len(chunk_ids), 8):
            group = range(first, min(first + 8, len(chunk_ids)))
            ids, mask = pad_batch([chunk_ids[c] for c in group], pad, device)  # (G, T)
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (G, T, d)
            for b, c in enumerate(group):
                yield c, hidden[b], {n: (x[b], y[b]) for n, (x, y) in store.items()}


@torch.no_grad()
def build_cache(cfg: Config, source, tok_S, tok_T, kernels, vocab_S, chunks: list[str], n_train: int,
                d_T: int) -> dict:
    """Run the source once without and once with its cartridge over every chunk; keep, on the CPU, what the
    loss and the ridge start need. The teacher is stored as final hidden states at the aligned positions
    (fp32, d_S per position) plus the shared-vocabulary rows of the source's LM head, so each step recomputes
    its exact log-probs over the whole shared vocabulary. Chunks from n_train on are the task prompts that
    are only ever measured (--monitor), never trained on. Loads the cartridge into `source`."""
    sites = [k.source_name for k in kernels]
    d_S, delta = source.config.hidden_size, cfg.teacher == "delta"
    enc_S = [tok_S(c, return_offsets_mapping=True) for c in chunks]
    enc_T = [tok_T(c, return_offsets_mapping=True) for c in chunks]
    pairs = [cast.aligned_positions(s["offset_mapping"], t["offset_mapping"]) for s, t in zip(enc_S, enc_T)]
    n_aligned = sum(len(p[0]) for p in pairs[:n_train])
    # fp32 final hidden states per aligned position: the teacher; with delta also the bare source and bare target
    h_bytes = 4 * sum(len(p[0]) for p in pairs) * (d_S * (2 if delta else 1) + (d_T if delta else 0))
    # fp16 x_S of one position, all sites
    x_bytes = 2 * sum(k.A_S.shape[1] for k in kernels) if cfg.mse_weight > 0 else 0
    if cfg.cache_mb * 2**20 < h_bytes + x_bytes * n_train:
        raise ValueError(f"--cache-mb {cfg.cache_mb} is too small: the teacher's hidden states need "
                         f"{(h_bytes + x_bytes * n_train) / 2**20:.0f} MB; raise it or lower --max-chunks")
    # x_S only feeds the MSE term: with --loss kl none is kept (all 128 positions would not fit in memory)
    x_per_chunk = min(cfg.seq_len, (cfg.cache_mb * 2**20 - h_bytes) // (x_bytes * n_train)) if x_bytes else 0
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = [torch.randperm(len(p[0]), generator=gen)[:x_per_chunk].sort().values for p in pairs[:n_train]]
    ridge_chunks = 0  # the first chunks, up to --ridge-positions aligned positions, feed the ridge start
    while cfg.init.startswith("ridge") and ridge_chunks < n_train and \
            sum(len(p[0]) for p in pairs[:ridge_chunks]) < cfg.ridge_positions:
        ridge_chunks += 1
    cache = {"ids_T": [torch.tensor(e["input_ids"]) for e in enc_T], "pos_T": [torch.tensor(p[1]) for p in pairs],
             "n_train": n_train, "n_aligned": n_aligned, "ridge_chunks": ridge_chunks, "x_rows": rows,
             "head_S": source.get_output_embeddings().weight[vocab_S].float().cpu(),  # (V, d_S)
             "softcap_S": getattr(source.config, "final_logit_softcapping", None),
             "h_teacher": [], "h_source": [], "x_S": {n: [] for n in sites},
             "ridge_x_S": {n: [] for n in sites}, "ridge_y_S": {n: [] for n in sites},
             "n_tokens_S": sum(len(e["input_ids"]) for e in enc_S[:n_train]),
             "n_tokens_T": sum(len(e["input_ids"]) for e in enc_T[:n_train])}
    ids_S = [e["input_ids"] for e in enc_S]
    pad = tok_S.pad_token_id if tok_S.pad_token_id is not None else 0

    def keep_ridge_pairs(c, store, suffix=""):
        for n in sites:  # all aligned positions of the first chunks, fp32
            x, y = store[n + suffix]
            cache["ridge_x_S"][n].append(x[pairs[c][0]].float().cpu())  # (N, d_in_S)
            cache["ridge_y_S"][n].append(y[pairs[c][0]].float().cpu())  # (N, d_out_S)
    # 1. the bare source (no cartridge): the delta teacher's p_S, and the ridge start's x_S, W_S x_S
    bare_ridge = cfg.init in ("ridge", "ridge-in")
    bare_chunks = len(chunks) if delta else (ridge_chunks if bare_ridge else 0)
    for c, hidden, store in forward_chunks(source, ids_S[:bare_chunks], pad, sites if bare_ridge else ()):
        if delta:
            cache["h_source"].append(hidden[pairs[c][0]].float().cpu())  # (N, d_S)
        if c < ridge_chunks and bare_ridge:
            keep_ridge_pairs(c, store)
    # 2. source + cartridge: the teacher, and x_S for the MSE (module inputs with the upstream kernels active,
    #    as the student's x_T will have its upstream heads active)
    load_lora(source, cfg.cartridge)
    names = [n + ".base" for n in sites] if (x_per_chunk or cfg.init == "ridge-cartridge") else []
    for c, hidden, store in forward_chunks(source, ids_S, pad, names):  # .base: the frozen W_S inside the LoRA
        cache["h_teacher"].append(hidden[pairs[c][0]].float().cpu())  # (N, d_S)
        for n in sites if c < n_train and x_per_chunk else ():
            cache["x_S"][n].append(store[n + ".base"][0][torch.tensor(pairs[c][0])[rows[c]]].half().cpu())  # (m, d_in_S)
        if c < ridge_chunks and cfg.init == "ridge-cartridge":
            keep_ridge_pairs(c, store, ".base")
    cache["x_start"] = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)  # chunk -> its first x_S row
    cache["x_S"] = {n: torch.cat(ts) if ts else torch.zeros(0, 1) for n, ts in cache["x_S"].items()}  # (sum m, d_in_S)
    cache["var_S"] = {n: x.float().var().item() for n, x in cache["x_S"].items() if len(x) > 1}  # Var(x_S) per site
    cache["size_mb"] = (h_bytes + sum(x.numel() * x.element_size() for x in cache["x_S"].values())) / 2**20
    print(f"teacher cache: {cache['size_mb']:.1f} MB (budget {cfg.cache_mb} MB) | {n_train} chunks | "
          f"x_S kept at {x_per_chunk} aligned positions per chunk | {n_aligned} aligned positions | "
          f"teacher {cfg.teacher}, KL over {'all ' + str(len(vocab_S)) if cfg.top_k <= 0 else 'top ' + str(cfg.top_k)} "
          f"shared tokens")
    return cache


@torch.no_grad()
def target_pass(cfg: Config, target, heads, cache: dict, pad: int):
    """One no-grad pass of the bare target: its own hidden states for the delta teacher, and the ridge start
    on the first chunks: P_in = ridge of x_S on x_T, P_out = ridge of W_T x_T on W_S x_S (bare on both sides)."""
    delta = cfg.teacher == "delta"
    n_chunks = len(cache["ids_T"]) if delta else cache["ridge_chunks"]
    names = sorted({h.target_name for h in heads}) if cfg.init != "random" else []
    x_T, y_T, cache["h_target"] = {n: [] for n in names}, {n: [] for n in names}, []
    ids = [t.tolist() for t in cache["ids_T"][:n_chunks]]
    for c, hidden, store in forward_chunks(target, ids, pad, names if cache["ridge_chunks"] else ()):
        pos = cache["pos_T"][c]
        if delta:
            cache["h_target"].append(hidden[pos].float().cpu())  # (N, d_T)
        for n in names if c < cache["ridge_chunks"] else ():
            x_T[n].append(store[n][0][pos].float().cpu())  # (N, d_in_T)
            y_T[n].append(store[n][1][pos].float().cpu())  # (N, d_out_T)
    for h in heads if names else ():
        h.P_in.weight.copy_(cast.ridge_fit(torch.cat(x_T[h.target_name]), torch.cat(cache["ridge_x_S"][h.source_name]), cfg.ridge))
        h.P_out.weight.copy_(cast.ridge_fit(torch.cat(cache["ridge_y_S"][h.source_name]), torch.cat(y_T[h.target_name]), cfg.ridge))


# ----------------------------------------------------------------------------- training step

def batch_of(cache: dict, chunk_ids: list[int], device):
    """Right-padded target ids (B, T) and mask for the given chunks."""
    return pad_batch([cache["ids_T"][c].tolist() for c in chunk_ids], 0, device)


@torch.no_grad()
def teacher_logits(cfg: Config, target, cache: dict, vocab_T, chunk_ids: list[int]) -> torch.Tensor:
    """The teacher's logits (N, V) over the shared vocabulary at the aligned positions of the chunks,
    recomputed from the cached hidden states: one (N, d_S) @ (d_S, V) product per source stream."""
    device = vocab_T.device
    head_S = cache["head_S"].to(device)  # (V, d_S)
    def source_logits(key):
        h = torch.cat([cache[key][c] for c in chunk_ids]).to(device)  # (N, d_S)
        return cast.lm_logits(h, head_S, cache["softcap_S"])  # (N, V)
    z_S_cart = source_logits("h_teacher")
    if cfg.teacher == "paper":
        return z_S_cart
    h_T = torch.cat([cache["h_target"][c] for c in chunk_ids]).to(device)  # (N, d_T)
    z_T = cast.shared_logits(target, h_T.to(next(target.parameters()).dtype), vocab_T)  # (N, V)
    return cast.delta_teacher_logits(z_T, z_S_cart, source_logits("h_source"))


def cast_loss(cfg: Config, target, heads, cache: dict, vocab_T, chunk_ids: list[int]) -> dict:
    """L = kl_weight * T^2 * KL(p_teacher || p_student)
          + mse_weight * mean over sites of MSE(P_in x_T, x_S) / Var(x_S)."""
    device = next(target.parameters()).device
    ids, mask = batch_of(cache, chunk_ids, device)
    with cast.attached(target, heads, capture=cfg.mse_weight > 0):
        hidden = target.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d_T)
        b_idx = torch.cat([torch.full_like(cache["pos_T"][c], b) for b, c in enumerate(chunk_ids)])  # (N,)
        t_idx = torch.cat([cache["pos_T"][c] for c in chunk_ids])  # (N,)
        kl = mse = hidden.new_zeros((), dtype=torch.float32)  # a term that is switched off stays 0
        if cfg.kl_weight > 0:
            logits = cast.shared_logits(target, hidden[b_idx, t_idx], vocab_T)  # (N, V): aligned rows, shared vocab
            kl = cast.kl_loss(teacher_logits(cfg, target, cache, vocab_T, chunk_ids), logits, cfg.temperature, cfg.top_k)
        if cfg.mse_weight > 0:
            xb = torch.cat([torch.full_like(cache["x_rows"][c], b) for b, c in enumerate(chunk_ids)])
            xt = torch.cat([cache["pos_T"][c][cache["x_rows"][c]] for c in chunk_ids])  # target positions with x_S
            xs = torch.cat([torch.arange(cache["x_start"][c], cache["x_start"][c + 1]) for c in chunk_ids])
            mse = sum(cast.mse_loss(h.P_in(h.x_T[xb, xt].float()), cache["x_S"][h.source_name][xs].to(device),
                                    cache["var_S"][h.source_name]) for h in heads) / len(heads)
    return {"loss": cfg.kl_weight * kl + cfg.mse_weight * mse, "kl": kl, "mse": mse}


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


def teacher_corpus(cfg: Config, chunks: list[str], tok_S, device, dtype) -> list[str]:
    """--corpus teacher[:PATH]: text written by the teacher (source + cartridge), no task data. Each chunk's
    first 16 tokens (a quarter of --seq-len if less; stdlib docstrings, or PATH) are a prompt; the teacher
    continues it by sampling, so the text carries what the cartridge makes the source write (Trans-LoRA, arXiv 2405.17258, trains on the source model's own samples). Written
    once per (source, cartridge, chunks, seed) under the cache folder and reused by later runs."""
    weights, prompt_tokens = Path(cfg.cartridge) / "adapter_model.safetensors", min(16, cfg.seq_len // 4)
    key = hashlib.sha256(json.dumps([cfg.source, cfg.seq_len, cfg.seed, prompt_tokens, chunks]).encode()
                         + weights.read_bytes()).hexdigest()[:16]
    path = CACHE / "teacher-corpus" / f"{key}.jsonl"
    if not path.is_file():
        t0 = time.time()
        writer, _ = load_model(cfg.source, device, dtype)
        load_lora(writer, cfg.cartridge)
        texts = sample_continuations(writer, tok_S, chunks, prompt_tokens, cfg.seq_len - prompt_tokens, cfg.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        os.replace(path.with_suffix(".tmp"), path)
        print(f"teacher corpus: {len(texts)} samples written by the teacher in {time.time() - t0:.0f}s -> {path}")
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    print(f"teacher corpus {path} | first sample: {texts[0][:160]!r}")
    return [chunk_texts([t], tok_S, cfg.seq_len)[0] for t in texts]  # one chunk of at most seq_len tokens each


def prepare(cfg: Config):
    """Models, kernels, vocabulary, chunks and teacher cache; the source model is gone when this returns."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    device, dtype = default_device_dtype(cfg.device or None, cfg.dtype or None)
    if not Path(cfg.cartridge).exists() and cfg.cartridge == Config.cartridge and cfg.source == Config.source:
        print(f"no cartridge at {cfg.cartridge}: making it with lora.py (once)")
        lora.main(["--model", cfg.source, "--out", cfg.cartridge])
    adapter, factors = read_adapter(cfg.cartridge)
    monitor_problems(cfg.task, 0)  # a clear error for a task that is neither 'arithmetic' nor a readable file
    target_path = resolve_model(cfg.target)
    with init_empty_weights():  # the target's structure, no memory: enough to check the kernels fit
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target_path))
    tok_T = AutoTokenizer.from_pretrained(target_path)
    teacher_writes = cfg.corpus == "teacher" or cfg.corpus.startswith("teacher:")
    prompts_from = cfg.corpus.partition(":")[2] if teacher_writes else cfg.corpus
    docs = read_corpus(None if prompts_from in ("", "stdlib") else prompts_from)  # teacher: prompts from stdlib
    source, tok_S = load_model(cfg.source, device, dtype)  # bare: build_cache loads the cartridge after its bare pass
    kernels = cast.find_kernels(adapter, factors, source, skeleton)
    vocab_S, vocab_T = cast.shared_vocab(tok_S, tok_T)
    cast.offsets(tok_T, "check")  # a clear error for a tokenizer without offsets
    train_docs, _ = split_corpus(docs)
    chunks = chunk_texts(train_docs, tok_S, cfg.seq_len)[: cfg.max_chunks or None]
    if teacher_writes:
        chunks = teacher_corpus(cfg, chunks, tok_S, device, dtype)
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
    cache = build_cache(cfg, source, tok_S, tok_T, kernels, vocab_S.to(device), chunks + monitor, len(chunks),
                        skeleton.config.hidden_size)
    print(f"aligned tokens: {cache['n_aligned'] / cache['n_tokens_S']:.0%} of source, "
          f"{cache['n_aligned'] / cache['n_tokens_T']:.0%} of target | source passes {time.time() - t0:.0f}s")
    del source
    gc.collect()
    target, tok_T = load_model(cfg.target, device, dtype)
    return target, tok_T, kernels, vocab_T.to(device), cache, device


def train(cfg: Config) -> Path:
    check_inputs(cfg)
    torch.manual_seed(cfg.seed)
    target, tok_T, kernels, vocab_T, cache, device = prepare(cfg)
    heads = cast.make_heads(kernels, target).to(device)
    t0 = time.time()
    target_pass(cfg, target, heads, cache, tok_T.pad_token_id or 0)  # bare target states (delta teacher), ridge start
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
        print(f"resumed at step {start}")
    else:
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        (run / "log.jsonl").write_text("")
    del cache["ridge_x_S"], cache["ridge_y_S"]  # training does not need them
    gc.collect()
    opt = make_optimizer(cfg, heads)
    if cfg.resume:
        opt.load_state_dict(ckpt["opt"])  # also restores each group's lr_scale from the first start
    elif cfg.init == "ridge-in":  # zero-effect start: the student begins exactly at the bare target;
        with torch.no_grad():      # each P_out keeps its ridge fit's RMS as its step scale (taken just above)
            for h in heads:
                h.P_out.weight.zero_()
    if cfg.save_start and not cfg.resume:
        cast.save_heads(heads, run / "heads_start.safetensors", {"source": cfg.source, "target": cfg.target})
    write_json(run / "config.json", dataclasses.asdict(cfg))
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    with torch.no_grad():  # a yardstick: how far the bare target is from the teacher, and the start with heads
        first = batch_chunks(cfg, 1, cache["n_train"])
        no_heads = torch.nn.ModuleList()
        kl_only = dataclasses.replace(cfg, kl_weight=1.0, mse_weight=0.0)
        bare = cast_loss(kl_only, target, no_heads, cache, vocab_T, first)
        init = cast_loss(dataclasses.replace(cfg, kl_weight=1.0), target, heads, cache, vocab_T, first)  # KL even if off
        start_rec = {"step": 0, "kl_first_batch_bare": round(bare["kl"].item(), 5),
                     "kl_first_batch": round(init["kl"].item(), 5)}
        if cfg.monitor:  # the skill on task text: where the student starts, bare and with the start heads
            start_rec["task_kl_bare"] = round(task_kl(cfg, target, no_heads, cache, vocab_T), 5)
            start_rec["task_kl"] = round(task_kl(cfg, target, heads, cache, vocab_T), 5)
    mse = f"{init['mse']:.4f}" if cfg.mse_weight > 0 else "off (x_S not cached)"
    print(f"first batch | kl without heads {bare['kl']:.4f} | with {cfg.init} heads: kl {init['kl']:.4f} mse {mse}")
    if cfg.monitor:
        print(f"task prompts ({cfg.monitor}, never trained on) | kl without heads {start_rec['task_kl_bare']:.4f} | "
              f"with {cfg.init} heads {start_rec['task_kl']:.4f}")
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
        out = cast_loss(cfg, target, heads, cache, vocab_T, chunk_ids)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
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
