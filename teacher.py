"""The teacher: the source model with its cartridge. The text it writes and its cache.

Before training, the source runs bare over the first chunks (the ridge start), then with its cartridge over
every chunk; the cache keeps, on the CPU, what the loss and the ridge start need: the teacher's final
hidden states at the aligned positions (each step recomputes its exact log-probs over the shared vocabulary
from them), the source's site inputs x_S at a budgeted sample of positions (the MSE), and bare input/output
pairs of the first chunks (the ridge start). `cfg` is config.py's Config.

Shapes: N aligned positions of a batch, d_S the source's hidden size, V the shared vocabulary.
"""
import hashlib
import json
import os
import time
from pathlib import Path

import torch

import align
import cast
from data import CACHE, chunk_texts, load_model, pad_batch
from lora import load_lora
from task import PROMPT

# ----------------------------------------------------------------------------- the text it writes

@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], new_tokens: int, seed: int = 0, batch_size: int = 32) -> list[str]:
    """Each prompt continued by plain sampling (temperature 1, no top-k or top-p: the model's own distribution)
    for up to `new_tokens` tokens. Prompts of one length share a batch (no padding)."""
    device = next(model.parameters()).device
    ids = [row for row in tokenizer(prompts, add_special_tokens=False)["input_ids"] if row]
    by_length = {}
    for i, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(i)
    torch.manual_seed(seed)
    texts = [""] * len(ids)
    for length in sorted(by_length):
        for first in range(0, len(by_length[length]), batch_size):
            group = by_length[length][first:first + batch_size]
            batch = torch.tensor([ids[i] for i in group], device=device)  # (B, length)
            out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for i, row in zip(group, out):  # row: (length + new,)
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    return [t for t in texts if t.strip()]


QUESTION_ROUNDS = 4  # rounds of asking for the questions still missing, before a short corpus is refused


def teacher_corpus(cfg, n: int, tok_S, device, dtype) -> tuple[list[str], dict]:
    """--corpus format: the teacher writes questions after the prompt format's first word ('Question:'), keeps
    each one's first line, asks again for the ones it left empty (up to QUESTION_ROUNDS rounds) until n are
    kept, then answers each after 'Answer:', as the cartridge is called. No task problem or answer is read:
    the text shows what the cartridge makes the source write (Trans-LoRA, arXiv 2405.17258, also trains on the
    source's own samples). Written once per (source, cartridge, n, seed) under the cache folder and reused by
    later runs. Returns the chunks and how many were asked, kept and written; fewer than n / 2 is an error."""
    weights, opening = Path(cfg.cartridge) / "adapter_model.safetensors", PROMPT.partition("{question}")[0].strip()
    prompt_tokens = len(tok_S(opening, add_special_tokens=False)["input_ids"])
    fields = [cfg.source, cfg.seq_len, cfg.seed, prompt_tokens, [opening] * n, "format", "until n kept"]
    key = hashlib.sha256(json.dumps(fields).encode() + weights.read_bytes()).hexdigest()[:16]
    path = CACHE / "teacher-corpus" / f"{key}.jsonl"
    if not path.is_file():
        t0 = time.time()
        writer, _ = load_model(cfg.source, device, dtype)
        load_lora(writer, cfg.cartridge)
        questions, asked = [], 0
        for attempt in range(QUESTION_ROUNDS):  # the first attempt draws with --seed itself
            missing = n - len(questions)
            if missing == 0:
                break
            texts = sample(writer, tok_S, [opening] * missing, cfg.seq_len - prompt_tokens, cfg.seed + 7919 * attempt)
            asked += missing
            firsts = [next((line for line in t[len(opening):].splitlines() if line.strip()), "") for t in texts]
            questions += [q.strip() for q in firsts if q.strip()]
        texts = sample(writer, tok_S, [PROMPT.format(question=q) for q in questions], cfg.seq_len // 2, cfg.seed)
        counts = {"asked": asked, "questions": len(questions), "samples": len(texts)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        path.with_suffix(".json").write_text(json.dumps(counts))
        os.replace(path.with_suffix(".tmp"), path)
        print(f"teacher corpus: {len(texts)} samples written by the teacher in {time.time() - t0:.0f}s -> {path}")
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    counts = json.loads(path.with_suffix(".json").read_text())
    print(f"teacher corpus {path} | asked {counts['asked']} questions, kept {counts['questions']}, {len(texts)} "
          f"samples of the {n} --max-chunks asks | first sample: {texts[0][:120] if texts else ''!r}")
    if len(texts) < n / 2:
        raise ValueError(f"the teacher wrote a question in {counts['questions']} of {counts['asked']} tries, {len(texts)} "
                         f"samples where --max-chunks asks {n}: a corpus under half of that is refused; try another "
                         "--seed or a corpus file (--corpus)")
    return [chunk_texts([t], tok_S, cfg.seq_len)[0] for t in texts], counts  # one chunk of at most seq_len tokens each


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
def build_cache(cfg, source, tok_S, tok_T, kernels, vocab_S, chunks: list[str], n_train: int) -> dict:
    """Run the source without its cartridge over the first chunks (the ridge start's pairs; with --init
    ridge-cartridge they come from the cartridge pass instead), then with it over every chunk; keep, on the
    CPU, what the loss and the ridge start need. The teacher is stored as final hidden states at the aligned
    positions (fp32, d_S per position) plus the shared-vocabulary rows of the source's LM head, so each step
    recomputes its exact log-probs over the whole shared vocabulary. Chunks from n_train on are the task
    prompts that are only ever measured (--monitor), never trained on. Loads the cartridge."""
    sites, d_S = [k.source_name for k in kernels], source.config.hidden_size
    enc_S = [tok_S(c, return_offsets_mapping=True) for c in chunks]
    enc_T = [tok_T(c, return_offsets_mapping=True) for c in chunks]
    pairs = [align.aligned_positions(s["offset_mapping"], t["offset_mapping"]) for s, t in zip(enc_S, enc_T)]
    n_aligned = sum(len(p[0]) for p in pairs[:n_train])
    if n_aligned == 0:
        raise ValueError("no position of the corpus is aligned: the two tokenizers never end a token at the same "
                         "character, so the teacher and the student can never be compared; use longer text")
    h_bytes = 4 * sum(len(p[0]) for p in pairs) * d_S  # fp32 final hidden states of the teacher
    x_bytes = 2 * sum(k.A_S.shape[1] for k in kernels) if cfg.mse_weight > 0 else 0  # fp16 x_S, one position
    if cfg.cache_mb * 2**20 < h_bytes + x_bytes * n_train:
        raise ValueError(f"--cache-mb {cfg.cache_mb} is too small: the teacher's hidden states need "
                         f"{(h_bytes + x_bytes * n_train) / 2**20:.0f} MB; raise it or lower --max-chunks")
    # x_S only feeds the MSE term: with --loss kl none is kept (all 128 positions would not fit in memory)
    x_per_chunk = min(cfg.seq_len, (cfg.cache_mb * 2**20 - h_bytes) // (x_bytes * n_train)) if x_bytes else 0
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = [torch.randperm(len(p[0]), generator=gen)[:x_per_chunk].sort().values for p in pairs[:n_train]]
    ridge_chunks = 0  # the first chunks, up to --ridge-positions aligned positions, feed the ridge start
    while ridge_chunks < n_train and sum(len(p[0]) for p in pairs[:ridge_chunks]) < cfg.ridge_positions:
        ridge_chunks += 1
    cache = {"ids_T": [torch.tensor(e["input_ids"]) for e in enc_T], "pos_T": [torch.tensor(p[1]) for p in pairs],
             "n_train": n_train, "n_aligned": n_aligned, "ridge_chunks": ridge_chunks, "x_rows": rows,
             "head_S": source.get_output_embeddings().weight[vocab_S].float().cpu(),  # (V, d_S)
             "softcap_S": getattr(source.config, "final_logit_softcapping", None),
             "h_teacher": [], "x_S": {n: [] for n in sites},
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
    # 1. the bare source (no cartridge) on the first chunks: the ridge start's x_S and W_S x_S
    if cfg.init != "ridge-cartridge":
        for c, _, store in forward_chunks(source, ids_S[:ridge_chunks], pad, sites):
            keep_ridge_pairs(c, store)
    # 2. source + cartridge: the teacher, and x_S for the MSE (module inputs with the upstream kernels active,
    #    as the student's x_T will have its upstream heads active)
    load_lora(source, cfg.cartridge)
    names = [n + ".base" for n in sites] if (x_per_chunk or cfg.init == "ridge-cartridge") else []
    for c, hidden, store in forward_chunks(source, ids_S, pad, names):  # .base: the frozen W_S inside the LoRA
        cache["h_teacher"].append(hidden[pairs[c][0]].float().cpu())  # (N, d_S)
        for n in sites if c < n_train and x_per_chunk else ():
            cache["x_S"][n].append(store[n + ".base"][0][torch.tensor(pairs[c][0])[rows[c]]].half().cpu())  # (m, d_in_S)
        if c < ridge_chunks and cfg.init == "ridge-cartridge":  # the paper's recipe as first built: cartridge on
            keep_ridge_pairs(c, store, ".base")
    cache["x_start"] = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)  # chunk -> its first x_S row
    cache["x_S"] = {n: torch.cat(ts) if ts else torch.zeros(0, 1) for n, ts in cache["x_S"].items()}  # (sum m, d_in_S)
    cache["var_S"] = {n: x.float().var().item() for n, x in cache["x_S"].items() if len(x) > 1}  # Var(x_S) per site
    cache["size_mb"] = (h_bytes + sum(x.numel() * x.element_size() for x in cache["x_S"].values())
                        + cache["head_S"].numel() * 4) / 2**20
    print(f"teacher cache: {cache['size_mb']:.1f} MB (budget {cfg.cache_mb} MB) | {n_train} chunks | "
          f"x_S kept at {x_per_chunk} aligned positions per chunk | {n_aligned} aligned positions | "
          f"KL over {'all ' + str(len(vocab_S)) if cfg.top_k <= 0 else 'top ' + str(cfg.top_k)} shared tokens")
    return cache


def to_device(cache: dict, device) -> None:
    """Move what each step reads of the cache to the training device, once, after the ridge start (whose pairs
    stay on the CPU and are dropped): the teacher's hidden states, x_S and the source's LM head rows. Copied
    from CPU memory at every step they cost a GPU step about 0.3 GB of head rows and, with 4 chunks, 0.25 GB of
    x_S at 7B sizes (results/step_feed/). The index lists stay on the CPU. On the CPU nothing moves."""
    cache["h_teacher"] = [h.to(device) for h in cache["h_teacher"]]
    cache["x_S"] = {n: x.to(device) for n, x in cache["x_S"].items()}
    cache["head_S"] = cache["head_S"].to(device)
