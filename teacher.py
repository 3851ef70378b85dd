"""The teacher: what it needs loaded, the text it writes, its cache, and its log-probabilities at each step.

The teacher is the source with its cartridge (`--teacher paper`) or the cartridge's effect put on the bare
target (`--teacher delta`, cast.delta_teacher_logits). Before training, the source runs over every chunk once
bare and once with its cartridge, and the bare target once; the cache keeps, on the CPU, what the loss and
the ridge start need: final hidden states at the aligned positions (each step recomputes the exact log-probs
over the shared vocabulary from them), the source site inputs x_S at a budgeted sample of positions (the
MSE), and bare input/output pairs of the first chunks (the ridge start). Before the first step what a step
reads of it moves to the training device (to_device). `cfg` is train.py's Config.

Shapes: N aligned positions of a batch, d_S / d_T the two hidden sizes, V the shared vocabulary.
"""
import hashlib
import json
import os
import time
from pathlib import Path

import torch

import align
import cast
from data import (CACHE, chunk_texts, default_device_dtype, folder_sha256, load_model, pad_batch, provenance, read_corpus,
                  resolve_model, sample_continuations, split_corpus)
from lora import load_lora, read_adapter
from memory import free_memory
from task import PROMPT, monitor_problems, prompt


# ----------------------------------------------------------------------------- before training

def prepare(cfg):
    """Everything training needs, built before its first step: the kernels (checked against the target's
    structure before any weight is loaded), the shared vocabulary, the chunks (read, or written by the
    teacher), the teacher cache, then the target. The source model is gone when this returns."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    device, dtype = default_device_dtype(cfg.device or None, cfg.dtype or None)
    adapter, factors = read_adapter(cfg.cartridge)
    monitor_problems(cfg.task, 0)  # a clear error for a task that is neither 'arithmetic' nor a readable file
    target_path = resolve_model(cfg.target)
    with init_empty_weights():  # the target's structure, no memory: enough to check the kernels fit
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target_path))
    tok_T = AutoTokenizer.from_pretrained(target_path)
    if tok_T.pad_token_id is None:  # as load_model does, so that the recorded ids are those evaluate.py sees
        tok_T.pad_token = tok_T.eos_token
    teacher_writes = cfg.corpus in ("teacher", "template", "format") or cfg.corpus.startswith("teacher:")
    prompts_from = cfg.corpus.partition(":")[2] if cfg.corpus.startswith("teacher:") else cfg.corpus
    docs = read_corpus(None if prompts_from in ("teacher", "stdlib", "template", "format") else prompts_from)
    source, tok_S = load_model(cfg.source, device, dtype)  # bare: build_cache loads the cartridge after its bare pass
    kernels = cast.find_kernels(adapter, factors, source, skeleton)
    vocab_S, vocab_T = align.shared_vocab(tok_S, tok_T)
    align.offsets(tok_T, "check")  # a clear error for a tokenizer without offsets
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
    cache["provenance"] = {**provenance({"source": cfg.source, "target": cfg.target}, {"source": tok_S, "target": tok_T}),
                           "cartridge_sha256": folder_sha256(cfg.cartridge), "chunks": len(chunks),
                           "chunks_sha256": hashlib.sha256(json.dumps(chunks).encode()).hexdigest()}
    del source
    free_memory()
    target, tok_T = load_model(cfg.target, device, dtype)
    return target, tok_T, kernels, vocab_T.to(device), cache, device


# ----------------------------------------------------------------------------- the text it writes

def teacher_corpus(cfg, chunks: list[str], tok_S, device, dtype) -> list[str]:
    """--corpus teacher[:PATH] | template | format: text written by the teacher (source + cartridge) by
    sampling, so it carries what the cartridge makes the source write (Trans-LoRA, arXiv 2405.17258, trains on
    the source model's own samples). teacher: each chunk's first 16 tokens (a quarter of --seq-len if less;
    stdlib docstrings, or PATH) are the prompt. template: the prompt format's first word ('Question:'), once
    per chunk. format: the teacher writes a question after 'Question:' (its first line), then answers it
    after 'Answer:', as the cartridge is used. No task problem or answer in any of them. Written once per
    (corpus, source, cartridge, chunks, seed) under the cache folder and reused by later runs."""
    weights, prompt_tokens = Path(cfg.cartridge) / "adapter_model.safetensors", min(16, cfg.seq_len // 4)
    if cfg.corpus in ("template", "format"):  # no task problem or answer: the format's opening, once per chunk
        chunks = [PROMPT.partition("{question}")[0].strip()] * len(chunks)
        prompt_tokens = len(tok_S(chunks[0], add_special_tokens=False)["input_ids"])
    fields = [cfg.source, cfg.seq_len, cfg.seed, prompt_tokens, chunks] + (["format"] if cfg.corpus == "format" else [])
    fields += [cfg.write_temperature] if cfg.write_temperature != 1.0 else []  # older caches keep their names
    key = hashlib.sha256(json.dumps(fields).encode() + weights.read_bytes()).hexdigest()[:16]
    path = CACHE / "teacher-corpus" / f"{key}.jsonl"
    if not path.is_file():
        t0 = time.time()
        writer, _ = load_model(cfg.source, device, dtype)
        load_lora(writer, cfg.cartridge)
        texts = sample_continuations(writer, tok_S, chunks, prompt_tokens, cfg.seq_len - prompt_tokens, cfg.seed,
                                     temperature=cfg.write_temperature)
        if cfg.corpus == "format":  # keep each question's first line of text, then let the teacher answer it
            questions = [next((line for line in t[len(chunks[0]):].splitlines() if line.strip()), "") for t in texts]
            asked = [PROMPT.format(question=q.strip()) for q in questions if q.strip()]
            texts = sample_continuations(writer, tok_S, asked, None, cfg.seq_len // 2, cfg.seed,
                                         temperature=cfg.write_temperature)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        os.replace(path.with_suffix(".tmp"), path)
        print(f"teacher corpus: {len(texts)} samples written by the teacher in {time.time() - t0:.0f}s -> {path}")
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    print(f"teacher corpus {path} | first sample: {texts[0][:160]!r}")
    return [chunk_texts([t], tok_S, cfg.seq_len)[0] for t in texts]  # one chunk of at most seq_len tokens each


# ----------------------------------------------------------------------------- the cache

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
def build_cache(cfg, source, tok_S, tok_T, kernels, vocab_S, chunks: list[str], n_train: int,
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
    pairs = [align.aligned_positions(s["offset_mapping"], t["offset_mapping"]) for s, t in zip(enc_S, enc_T)]
    n_aligned = sum(len(p[0]) for p in pairs[:n_train])
    if n_aligned == 0:
        raise ValueError("no position of the corpus is aligned: the two tokenizers never end a token at the same "
                         "character, so the teacher and the student can never be compared; use longer text")
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
    while cfg.init != "random" and ridge_chunks < n_train and \
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
    bare_ridge = cfg.init in ("ridge", "ridge-in", "auto")
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
    cache["size_mb"] = (h_bytes + sum(x.numel() * x.element_size() for x in cache["x_S"].values())
                        + cache["head_S"].numel() * 4) / 2**20
    print(f"teacher cache: {cache['size_mb']:.1f} MB (budget {cfg.cache_mb} MB) | {n_train} chunks | "
          f"x_S kept at {x_per_chunk} aligned positions per chunk | {n_aligned} aligned positions | "
          f"teacher {cfg.teacher}, KL over {'all ' + str(len(vocab_S)) if cfg.top_k <= 0 else 'top ' + str(cfg.top_k)} "
          f"shared tokens")
    return cache


@torch.no_grad()
def target_pass(cfg, target, heads, cache: dict, pad: int):
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


def to_device(cache: dict, device) -> None:
    """Move what each step reads of the cache to the training device, once, after the ridge start (whose pairs
    stay on the CPU and are dropped): the teacher's hidden states, x_S and the source's LM head rows. Copied
    from CPU memory at every step they cost a GPU step about 0.3 GB of head rows and, with 4 chunks, 0.25 GB of
    x_S at 7B sizes (results/step_feed/). The index lists stay on the CPU. On the CPU nothing moves."""
    for key in ("h_teacher", "h_source", "h_target"):
        cache[key] = [h.to(device) for h in cache.get(key, [])]
    cache["x_S"] = {n: x.to(device) for n, x in cache["x_S"].items()}
    cache["head_S"] = cache["head_S"].to(device)


# ----------------------------------------------------------------------------- at each step

def batch_of(cache: dict, chunk_ids: list[int], device):
    """Right-padded target ids (B, T) and mask for the given chunks."""
    return pad_batch([cache["ids_T"][c].tolist() for c in chunk_ids], 0, device)


@torch.no_grad()
def teacher_logits(cfg, target, cache: dict, vocab_T, chunk_ids: list[int]) -> torch.Tensor:
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
