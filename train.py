"""Train CAST heads: source + cartridge (the teacher) -> the target with heads (the student), without task data.

    python train.py --demo                # the whole pipeline on tiny models built in code (demo.py)
    python train.py                       # the embedded default: SmolLM2-135M + arithmetic cartridge -> Gemma-3-270M
    python train.py --source S --cartridge DIR --target T --corpus PATH --out RUN_DIR

The pipeline, top-down in train(): 1. load the bare source, the kernels of its cartridge and the text (or
have the teacher write it); 2. cache the teacher and free the source; 3. load the target and give it one pair
of heads per kernel, fitted in closed form (the ridge start); 4. train the heads with AdamW on KL + MSE
(nothing else has a gradient); 5. save them and export the target LoRA. What one step computes (the heads,
the alignment, the loss) is in cast.py.

The file, top to bottom: the settings (Config); the teacher's text and cache; the run (train) and its steps.
"""
import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cast
import demo
import lora
from data import PROMPT, chunk_texts, monitor_problems, pad_batch, prompt, read_corpus, split_corpus
from lora import load_lora
from models import CACHE, check_model, default_device_dtype, device_problem, load_model, resolve_model, use_cores
from runs import (after_nan, check_run_folder, folder_sha256, free_memory, memory_breakdown, partial, peak_memory_mb,
                  progress, provenance, reset_peak_memory, rss_mb, write_json)


# ----------------------------------------------------------------------------- the settings
# One dataclass, one command-line flag per field (`python train.py -h` lists them); config.json in a run folder
# records them all. --paper-recipe sets the recipe the paper describes (PAPER_RECIPE); a flag beside it wins. A
# value out of range stops the run in one line before anything is loaded (config_problem).

@dataclass
class Config:
    source: str = "smollm2-135m"  # embedded alias, local folder or Hugging Face id
    cartridge: str = "cartridges/smollm2-arith"  # PEFT-layout LoRA of the source; made by lora.py if missing
    target: str = "gemma3-270m"  # another architecture, another tokenizer; rotated:NAME = NAME rotated
    corpus: str = "format"  # format = the teacher writes questions in the prompt format and answers them; stdlib
    #                          = the standard library's docstrings; or a .txt/.jsonl file or a folder of them
    out: str = "runs/smollm2-to-gemma3"  # run folder: config, log, heads, exported LoRA
    steps: int = 1000  # the paper's budget
    batch_size: int = 4  # chunks per step
    seq_len: int = 128  # source tokens per chunk
    lr: float = 1e-3  # relative step: a head moves about lr x its own size per step (learning_rate)
    kl_weight: float = 1.0  # w_KL: output alignment (the KL term)
    mse_weight: float = 1.0  # w_MSE: internal alignment (the MSE term)
    temperature: float = 2.0  # distillation temperature T
    top_k: int = 0  # 0 = exact KL over the whole shared vocabulary; k = top k + rest bucket (the paper's recipe)
    cache_mb: int = 2048  # budget for the teacher cache; x_S is sampled to fit
    init: str = "auto"  # ridge (both heads closed form), ridge-in (P_out = 0: the bare target), auto (the one
    #                     closer to the teacher), ridge-cartridge (fitted with the cartridge on: --paper-recipe)
    ridge: float = 1e-4  # ridge strength relative to the mean activation energy
    ridge_positions: int = 4096  # aligned positions of the first chunks the ridge start is fitted on
    loss: str = "kl+mse"  # the paper's ablations: kl, mse, kl+mse
    mse_detach: bool = False  # the MSE stops at x_T and trains P_in only (measured equal to the default)
    max_chunks: int = 300  # chunks of the corpus (0 = all; --corpus format writes this many)
    task: str = "arithmetic"  # the cartridge's task: its held-out prompts are measured, never trained on
    monitor: int = 32  # held-out task prompts on which the task KL is logged (0 = none)
    monitor_every: int = 100  # steps between two task KL measurements
    log_every: int = 20  # steps between two log lines
    ckpt_every: int = 100  # steps between two checkpoints (for --resume)
    device: str = ""  # '' = cuda when available, else cpu
    dtype: str = ""  # '' = bf16 on cuda, fp32 on cpu
    seed: int = 0
    paper_recipe: bool = False  # the paper's recipe as first built here (PAPER_RECIPE); flags beside it win
    force: bool = False  # overwrite an existing run folder
    resume: bool = False  # continue an interrupted run from its last checkpoint
    demo: bool = False  # the demo on a toy world (demo.py); --out defaults to runs/demo


# --paper-recipe: general text (docstrings), the top-64 KL, the start fitted with the cartridge on, lr 1e-2
PAPER_RECIPE = {"corpus": "stdlib", "init": "ridge-cartridge", "lr": 1e-2, "top_k": 64, "max_chunks": 1000}
INITS = ("auto", "ridge", "ridge-in", "ridge-cartridge")


def config_parser(defaults: bool = True, description: str = "") -> argparse.ArgumentParser:
    """One flag per Config field; with defaults=False a namespace holds only the flags given."""
    ap = argparse.ArgumentParser(usage="%(prog)s [--FLAG VALUE ...]", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # a field's comment (and the comment lines under it) is its flag's help
    comments = {name: " ".join(re.sub(r"\s*#\s*", " ", text).split()) for name, text in
                re.findall(r"^    (\w+): [^#\n]*#(.*(?:\n\s+#.*)*)", inspect.getsource(Config), re.M)}
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), f.default if defaults else argparse.SUPPRESS
        if f.type in (bool, "bool"):
            ap.add_argument(flag, action="store_true", default=default, help=comments.get(f.name, ""))
        else:
            ap.add_argument(flag, type=type(f.default), default=default, metavar="",
                            help=f"{comments.get(f.name, '')} (default {f.default!r})")
    return ap


def parse_config(argv=None, description: str = "") -> Config:
    """Config from the command line: --paper-recipe's settings under the flags given beside it, --loss's terms."""
    ap = config_parser(description=description)
    cfg = Config(**vars(ap.parse_args(argv)))
    if cfg.paper_recipe:
        given = set(vars(config_parser(defaults=False).parse_args(argv)))  # the flags on the command line
        for name, value in PAPER_RECIPE.items():
            if name not in given:  # a flag given beside --paper-recipe wins (and config.json records it)
                setattr(cfg, name, value)
        kept = sorted(given & set(PAPER_RECIPE))
        print(f"--paper-recipe sets {', '.join(f'{k}={v}' for k, v in PAPER_RECIPE.items() if k not in given)}"
              + (f"; your {', '.join('--' + k.replace('_', '-') for k in kept)} kept" if kept else ""))
    problem = config_problem(cfg)
    if problem:  # one line, before any model is loaded or any file written
        raise SystemExit(f"error: {problem}")
    cfg.kl_weight = cfg.kl_weight if "kl" in cfg.loss else 0.0
    cfg.mse_weight = cfg.mse_weight if "mse" in cfg.loss else 0.0
    return cfg


def config_problem(cfg: Config) -> str | None:
    """What is wrong with a configuration, in one line naming the flag, its value and what would be right;
    None when every setting is in range. Paths and models are checked by train.check_inputs."""
    rules = [  # (flag, holds, what would be right)
        ("loss", cfg.loss in ("kl", "mse", "kl+mse"), "one of kl, mse, kl+mse"),
        ("init", cfg.init in INITS, f"one of {', '.join(INITS)}"),
        ("steps", cfg.steps >= 1, "at least 1"),
        ("batch-size", cfg.batch_size >= 1, "at least 1 chunk"),
        ("seq-len", cfg.seq_len >= 2, "at least 2 tokens"),
        ("lr", cfg.lr > 0 and math.isfinite(cfg.lr), "a number above 0, e.g. 1e-3"),
        ("kl-weight", cfg.kl_weight >= 0 and math.isfinite(cfg.kl_weight), "0 or more"),
        ("mse-weight", cfg.mse_weight >= 0 and math.isfinite(cfg.mse_weight), "0 or more"),
        ("temperature", cfg.temperature > 0 and math.isfinite(cfg.temperature), "a number above 0, e.g. 2"),
        ("top-k", cfg.top_k >= 0, "0 (the exact KL) or a number of tokens"),
        ("cache-mb", cfg.cache_mb >= 1, "at least 1 MB"),
        ("ridge", cfg.ridge > 0 and math.isfinite(cfg.ridge), "a number above 0, e.g. 1e-4"),
        ("ridge-positions", cfg.ridge_positions >= 1, "at least 1"),
        ("max-chunks", cfg.max_chunks >= (1 if cfg.corpus == "format" else 0),
         "a number above 0 (--corpus format writes that many samples)" if cfg.corpus == "format" else "0 (all) or more"),
        ("monitor", cfg.monitor >= 0, "0 (none) or more"),
        ("monitor-every", cfg.monitor_every >= 1, "at least 1"),
        ("log-every", cfg.log_every >= 1, "at least 1"),
        ("ckpt-every", cfg.ckpt_every >= 1, "at least 1"),
    ]
    for flag, holds, right in rules:
        if not holds:
            return f"--{flag} {getattr(cfg, flag.replace('-', '_'))!r}: should be {right}"
    if problem := device_problem(cfg.device, cfg.dtype):
        return problem
    weights = {"kl": cfg.kl_weight, "mse": cfg.mse_weight}
    if not any(weights[term] > 0 for term in cfg.loss.split("+")):
        return (f"--loss {cfg.loss} with --kl-weight {cfg.kl_weight} and --mse-weight {cfg.mse_weight}: nothing would "
                "train; give a term --loss keeps a weight above 0")
    return None


# ----------------------------------------------------------------------------- the teacher's text

@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], new_tokens: int, seed: int = 0, batch_size: int = 32,
           what: str = "samples") -> list[str]:
    """Each prompt continued by plain sampling (temperature 1, no top-k or top-p: the model's own distribution)
    for up to `new_tokens` tokens. Prompts of one length share a batch (no padding)."""
    device = next(model.parameters()).device
    # with the tokenizer's special tokens, as the cartridge was trained and is scored: Gemma-3 without its <bos>
    # writes markup ('</h3></h3>...'), not questions
    ids = [row for row in tokenizer(prompts)["input_ids"] if row]
    by_length = {}
    for i, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(i)
    torch.manual_seed(seed)
    texts, t0, done = [""] * len(ids), time.time(), 0
    for length in sorted(by_length):
        for first in range(0, len(by_length[length]), batch_size):
            group = by_length[length][first:first + batch_size]
            batch = torch.tensor([ids[i] for i in group], device=device)  # (B, length)
            out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for i, row in zip(group, out):  # row: (length + new,)
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
            done += len(group)
            progress(f"{what} written", done, len(ids), t0)
    return [t for t in texts if t.strip()]


QUESTION_ROUNDS = 4  # rounds of asking for the questions still missing, before a short corpus is refused
OPENING = PROMPT.partition("{question}")[0].strip()  # 'Question:', the prompt format's first word


def first_question(text: str) -> str:
    """The question a text written after OPENING holds: its first non-empty line ('' when there is none)."""
    return next((line for line in text[len(OPENING):].splitlines() if line.strip()), "").strip()


def teacher_text_key(cfg, n: int, tok_S) -> str:
    """The teacher's text is cached under a hash of what decides it: the source, --seq-len, --seed, the prompt's
    length in tokens as sample() feeds it (Gemma-3's 'Question:' is 3 with its <bos>; before commit 03f622b it was
    fed, and counted, without it: those texts are not reused; SmolLM2 adds none, so its texts are), n and the
    cartridge's weights."""
    fields = [cfg.source, cfg.seq_len, cfg.seed, len(tok_S(OPENING)["input_ids"]), [OPENING] * n, "format",
              "until n kept"]
    weights = (Path(cfg.cartridge) / "adapter_model.safetensors").read_bytes()
    return hashlib.sha256(json.dumps(fields).encode() + weights).hexdigest()[:16]


def teacher_corpus(cfg, n: int, tok_S, device, dtype) -> tuple[list[str], dict]:
    """--corpus format: the teacher writes questions after the prompt format's first word ('Question:'), keeps
    each one's first line, asks again for the ones it left empty (up to QUESTION_ROUNDS rounds) until n are
    kept, then answers each after 'Answer:', as the cartridge is called. No task problem or answer is read:
    the text shows what the cartridge makes the source write (Trans-LoRA, arXiv 2405.17258, also trains on the
    source's own samples). Written once per (source, cartridge, n, seed) under the cache folder and reused by
    later runs. Returns the chunks and how many were asked, kept and written; fewer than n / 2 is an error."""
    prompt_tokens = len(tok_S(OPENING)["input_ids"])  # as sample() feeds it: with a <bos> where the tokenizer adds one
    path = CACHE / "teacher-corpus" / f"{teacher_text_key(cfg, n, tok_S)}.jsonl"
    if not path.is_file():
        t0 = time.time()
        print(f"the teacher writes its text once ({n} questions, then their answers; cached in {path.parent})",
              flush=True)
        writer, _ = load_model(cfg.source, device, dtype)
        load_lora(writer, cfg.cartridge)
        questions, asked = [], 0
        for attempt in range(QUESTION_ROUNDS):  # the first attempt draws with --seed itself
            missing = n - len(questions)
            if missing == 0:
                break
            texts = sample(writer, tok_S, [OPENING] * missing, cfg.seq_len - prompt_tokens, cfg.seed + 7919 * attempt,
                           what=f"teacher's text, round {attempt + 1}: questions")
            asked += missing
            questions += [q for q in map(first_question, texts) if q]
        texts = sample(writer, tok_S, [PROMPT.format(question=q) for q in questions], cfg.seq_len // 2, cfg.seed,
                       what="teacher's text: answers")
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


# ----------------------------------------------------------------------------- the teacher cache

def forward_chunks(model, chunk_ids: list[list[int]], pad: int, names=(), what: str = ""):
    """Yield (chunk index, final hidden states (T, d), {module name: (input (T, d_in), output (T, d_out))})
    for every chunk, 8 chunks per forward, right-padded (a causal model never reads the padding). Callers run
    it under torch.no_grad (a no_grad inside a generator would also switch gradients off between its yields).
    what: a name for the pass, printed with its progress (runs.progress)."""
    device, t0 = next(model.parameters()).device, time.time()
    with cast.captured(model, list(names)) as store:
        for first in range(0, len(chunk_ids), 8):
            if what:
                progress(what, first, len(chunk_ids), t0, " chunks")
            group = range(first, min(first + 8, len(chunk_ids)))
            ids, mask = pad_batch([chunk_ids[c] for c in group], pad, device)  # (G, T)
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (G, T, d)
            for b, c in enumerate(group):
                yield c, hidden[b], {n: (x[b], y[b]) for n, (x, y) in store.items()}


@torch.no_grad()
def build_cache(cfg: Config, source, tok_S, tok_T, kernels, vocab_S, chunks: list[str], n_train: int) -> cast.TeacherCache:
    """Run the source without its cartridge over the first chunks (the ridge start's pairs; with --init
    ridge-cartridge they come from the cartridge pass instead), then with it over every chunk; keep, on the
    CPU, what the loss and the ridge start need (cast.TeacherCache names each field and its shape). The teacher
    is stored as final hidden states at the aligned positions plus the shared-vocabulary rows of the source's
    LM head, so each step recomputes its exact log-probs over the whole shared vocabulary. Chunks from n_train
    on are the task prompts that are only ever measured (--monitor), never trained on. Loads the cartridge."""
    modules, d_S = [k.source_name for k in kernels], source.config.hidden_size  # each kernel's source module
    enc_S = [tok_S(c, return_offsets_mapping=True) for c in chunks]
    enc_T = [tok_T(c, return_offsets_mapping=True) for c in chunks]
    pairs = [cast.aligned_positions(s["offset_mapping"], t["offset_mapping"]) for s, t in zip(enc_S, enc_T)]
    pos_S = [torch.tensor(p[0], dtype=torch.long) for p in pairs]  # chunk -> source positions of its aligned tokens (N_c,)
    n_aligned = sum(len(p) for p in pos_S[:n_train])
    if n_aligned == 0:
        raise ValueError("no position of the corpus is aligned: the two tokenizers never end a token at the same "
                         "character, so the teacher and the target with heads can never be compared; use longer text")
    # the budget: the teacher's hidden states (fp32) for every aligned position, then x_S (fp16) for as many
    # aligned positions per chunk as fit
    h_bytes = 4 * sum(len(p) for p in pos_S) * d_S
    x_bytes = 2 * sum(k.A_S.shape[1] for k in kernels) if cfg.mse_weight > 0 else 0  # x_S of every kernel, one position
    if cfg.cache_mb * 2**20 < h_bytes + x_bytes * n_train:
        raise ValueError(f"--cache-mb {cfg.cache_mb} is too small: the teacher's hidden states need "
                         f"{(h_bytes + x_bytes * n_train) / 2**20:.0f} MB; raise it or lower --max-chunks")
    # x_S only feeds the MSE term: with --loss kl none is kept (all 128 positions would not fit in memory)
    x_per_chunk = min(cfg.seq_len, (cfg.cache_mb * 2**20 - h_bytes) // (x_bytes * n_train)) if x_bytes else 0
    gen = torch.Generator().manual_seed(cfg.seed)
    x_rows = [torch.randperm(len(p), generator=gen)[:x_per_chunk].sort().values for p in pos_S[:n_train]]
    ridge_chunks = 0  # the first chunks, up to --ridge-positions aligned positions, feed the ridge start
    while ridge_chunks < n_train and sum(len(p) for p in pos_S[:ridge_chunks]) < cfg.ridge_positions:
        ridge_chunks += 1
    ids_S = [e["input_ids"] for e in enc_S]
    pad = tok_S.pad_token_id if tok_S.pad_token_id is not None else 0
    h_teacher, x_S = [], {n: [] for n in modules}
    ridge_x_S, ridge_y_S = {n: [] for n in modules}, {n: [] for n in modules}

    def keep_ridge_pairs(c, store, suffix=""):
        for n in modules:  # all aligned positions of the first chunks, fp32
            x, y = store[n + suffix]
            ridge_x_S[n].append(x[pos_S[c]].float().cpu())  # (N_c, d_in_S)
            ridge_y_S[n].append(y[pos_S[c]].float().cpu())  # (N_c, d_out_S)
    # 1. the bare source (no cartridge) on the first chunks: the ridge start's x_S and W_S x_S
    if cfg.init != "ridge-cartridge":
        for c, _, store in forward_chunks(source, ids_S[:ridge_chunks], pad, modules):
            keep_ridge_pairs(c, store)
    # 2. source + cartridge: the teacher, and x_S for the MSE (module inputs with the upstream kernels active,
    #    as x_T in the target with heads will have its upstream heads active). lora.py wraps each adapted nn.Linear in a
    #    LoRALinear whose frozen W_S is its submodule `.base`: the input of `.base` is the kernel's x_S
    load_lora(source, cfg.cartridge)
    names = [n + ".base" for n in modules] if (x_per_chunk or cfg.init == "ridge-cartridge") else []
    for c, hidden, store in forward_chunks(source, ids_S, pad, names, what="teacher pass"):
        h_teacher.append(hidden[pos_S[c]].float().cpu())  # (N_c, d_S)
        for n in modules if c < n_train and x_per_chunk else ():
            x_S[n].append(store[n + ".base"][0][pos_S[c][x_rows[c]]].half().cpu())  # (m_c, d_in_S)
        if c < ridge_chunks and cfg.init == "ridge-cartridge":  # the paper's recipe as first built: cartridge on
            keep_ridge_pairs(c, store, ".base")
    x_S = {n: torch.cat(ts) if ts else torch.zeros(0, 1) for n, ts in x_S.items()}  # (sum m_c, d_in_S)
    head_S = source.get_output_embeddings().weight[vocab_S].float().cpu()  # (V, d_S)
    cache = cast.TeacherCache(
        ids_T=[torch.tensor(e["input_ids"]) for e in enc_T], pos_T=[torch.tensor(p[1]) for p in pairs],
        h_teacher=h_teacher, head_S=head_S, softcap_S=getattr(source.config, "final_logit_softcapping", None),
        x_rows=x_rows, x_start=torch.tensor([0] + [len(r) for r in x_rows]).cumsum(0), x_S=x_S,
        var_S={n: x.float().var().item() for n, x in x_S.items() if len(x) > 1},  # Var(x_S), one number per kernel
        ridge_x_S=ridge_x_S, ridge_y_S=ridge_y_S, n_train=n_train, ridge_chunks=ridge_chunks, n_aligned=n_aligned,
        n_tokens_S=sum(len(e["input_ids"]) for e in enc_S[:n_train]),
        n_tokens_T=sum(len(e["input_ids"]) for e in enc_T[:n_train]),
        size_mb=(h_bytes + sum(x.numel() * x.element_size() for x in x_S.values()) + head_S.numel() * 4) / 2**20)
    print(f"teacher cache: {cache.size_mb:.1f} MB (budget {cfg.cache_mb} MB) | {n_train} chunks | "
          f"x_S kept at {x_per_chunk} aligned positions per chunk | {n_aligned} aligned positions | "
          f"KL over {'all ' + str(len(vocab_S)) if cfg.top_k <= 0 else 'top ' + str(cfg.top_k)} shared tokens")
    return cache


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
    sizes = step_sizes(heads)  # each matrix's step scale: its size at the ridge start (before P_out may be zeroed)
    print(f"target pass {time.time() - t0:.0f}s")
    del tok_T  # Gemma-3's tokenizer alone holds about 320 MB
    cache.ridge_x_S, cache.ridge_y_S = {}, {}  # the ridge start's pairs: done with
    cache.to(device)  # on a GPU: not copied there at every step
    free_memory()
    n_heads = sum(p.numel() for p in heads.parameters())
    print(f"trainable: {n_heads / 1e6:.2f}M head parameters in {len(heads)} (P_in, P_out) pairs | "
          f"target frozen: {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M")
    # 4. train: from the start chosen on the first batch, or from the last checkpoint of an interrupted run
    run, start = partial(cfg.out), 0
    if cfg.resume:
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        heads.load_state_dict(ckpt["heads"])
        opt = make_optimizer(heads, sizes)
        opt.load_state_dict(ckpt["opt"])  # also each group's step factor
        start = ckpt["step"]
        log = [line for line in (run / "log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= start]
        (run / "log.jsonl").write_text("".join(line + "\n" for line in log))  # later steps run again: logged once
        print(f"resumed at step {start}")
    else:
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        start_record = choose_start(cfg, target, heads, cache, vocab_T, run)
        opt = make_optimizer(heads, sizes, start_record["step_gap"])  # step_gap: the step factor
        (run / "log.jsonl").write_text(json.dumps({**start_record, "step_gap": round(start_record["step_gap"], 5)}) + "\n")
    write_json(run / "config.json", {**dataclasses.asdict(cfg), "provenance": cache.provenance})
    if cfg.corpus == "format":  # the text the teacher wrote, what the heads were shown, kept beside the results
        (run / "teacher_text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in cache.chunks))
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
    print(memory_breakdown(device, peak_memory_mb(device), runtime_mb, target, cache.size_mb, n_heads))
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
    vocab_S, vocab_T = cast.shared_vocab(tok_S, tok_T)
    cast.offsets(tok_T, "check")  # a clear error for a tokenizer without offsets
    written = None
    if docs is None:
        chunks, written = teacher_corpus(cfg, cfg.max_chunks, tok_S, device, dtype)
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
    cache = build_cache(cfg, source, tok_S, tok_T, kernels, vocab_S.to(device), chunks + monitor, len(chunks))
    print(f"aligned tokens: {cache.n_aligned / cache.n_tokens_S:.0%} of source, "
          f"{cache.n_aligned / cache.n_tokens_T:.0%} of target | source passes {time.time() - t0:.0f}s")
    cache.provenance = {**provenance({"source": cfg.source, "target": cfg.target}, {"source": tok_S, "target": tok_T}),
                        "cartridge_sha256": folder_sha256(cfg.cartridge), "chunks": len(chunks),
                        **({"teacher_corpus": written} if written else {}),
                        "chunks_sha256": hashlib.sha256(json.dumps(chunks).encode()).hexdigest()}
    cache.chunks = chunks
    del source
    free_memory()
    return kernels, vocab_T.to(device), cache, device, dtype


@torch.no_grad()
def ridge_start(cfg: Config, target, heads, cache: cast.TeacherCache, pad: int):
    """Step 3: one pass of the bare target over the first chunks, then each head in closed form (cast.ridge_fit):
    P_in = ridge of x_S on x_T, P_out = ridge of W_T x_T on W_S x_S, bare (the source's side
    with its cartridge on under --init ridge-cartridge)."""
    names = sorted({h.target_name for h in heads})
    x_T, y_T = {n: [] for n in names}, {n: [] for n in names}
    ids = [t.tolist() for t in cache.ids_T[: cache.ridge_chunks]]
    for c, _, store in forward_chunks(target, ids, pad, names):
        for n in names:
            x_T[n].append(store[n][0][cache.pos_T[c]].float().cpu())  # (N, d_in_T)
            y_T[n].append(store[n][1][cache.pos_T[c]].float().cpu())  # (N, d_out_T)
    for h in heads:
        x_S, y_S = torch.cat(cache.ridge_x_S[h.source_name]), torch.cat(cache.ridge_y_S[h.source_name])  # (N, d_S)
        h.P_in.weight.copy_(cast.ridge_fit(torch.cat(x_T[h.target_name]), x_S, cfg.ridge))  # x_T -> x_S
        h.P_out.weight.copy_(cast.ridge_fit(y_S, torch.cat(y_T[h.target_name]), cfg.ridge))  # W_S x_S -> W_T x_T


def step_sizes(heads) -> list[float]:
    """Each head matrix's size, RMS = sqrt(mean(P^2)), at the ridge start: the scale of its steps (learning_rate).
    Head scales differ by three orders of magnitude across kernels (Gemma's activations reach hundreds, SmolLM2's
    a few units), so one absolute rate is either too slow for some heads or blows up others."""
    return [p.detach().float().pow(2).mean().sqrt().item() for p in heads.parameters()]


def make_optimizer(heads, sizes: list[float], step_factor: float = 1.0):
    """AdamW, one parameter group per head matrix, each holding what learning_rate needs: the matrix's size at
    the ridge start and the step factor (step_factor)."""
    groups = [{"params": [p], "size": size, "step_factor": step_factor} for p, size in zip(heads.parameters(), sizes)]
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0)


def learning_rate(cfg: Config, group: dict, step: int) -> float:
    """The learning rate of one head matrix at a step (1 .. cfg.steps), the whole product in one place:

        lr = --lr  x  RMS of the matrix at the ridge start  x  step factor  x  cosine from 1 down to 0.1

    AdamW moves a parameter by about lr per step whatever its gradient's scale, so --lr is a relative step: a
    head moves by about --lr x its own size (step_sizes). The step factor shrinks the step when the start is
    already near the teacher (step_factor); the cosine decays it to 10% (the start is already good: late steps
    only refine it)."""
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / cfg.steps))
    return cfg.lr * (group["size"] * group["step_factor"]) * cosine


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
def choose_start(cfg: Config, target, heads, cache: cast.TeacherCache, vocab_T, run: Path) -> dict:
    """--init auto keeps both ridge heads if they start closer to the teacher than the bare target on the first
    batch (an exact map: identity and twin pairs), else the zero-effect start (P_out = 0: the bare target).
    Then step_factor(KL_start, KL_bare) sets the step of every head (learning_rate). Returns the log's step-0
    record, with the step factor in "step_gap" (the name its records have always used)."""
    first, no_heads = batch_chunks(cfg, 1, cache.n_train), torch.nn.ModuleList()
    kl_only = dataclasses.replace(cfg, kl_weight=1.0, mse_weight=0.0)
    bare = cast.cast_loss(kl_only, target, no_heads, cache, vocab_T, first)["kl"].item()
    choice = cfg.init
    if choice == "auto":
        ridge_kl = cast.cast_loss(kl_only, target, heads, cache, vocab_T, first)["kl"].item()
        choice = "ridge" if ridge_kl < bare else "ridge-in"
        print(f"--init auto: first batch kl {ridge_kl:.4f} with ridge heads, {bare:.4f} bare -> {choice}")
    if choice == "ridge-in":  # the student begins exactly at the bare target; each P_out keeps the size of its
        for h in heads:       # ridge fit as its step scale (step_sizes, taken before this)
            h.P_out.weight.zero_()
    init = cast.cast_loss(dataclasses.replace(cfg, kl_weight=1.0), target, heads, cache, vocab_T, first)  # KL even if off
    record = {"step": 0, "start": choice, "kl_first_batch_bare": round(bare, 5), "kl_first_batch": round(init["kl"].item(), 5)}
    if cfg.monitor:  # the skill on task text: where the student starts, bare and with the start heads
        record["task_kl_bare"] = round(cast.task_kl(cfg, target, no_heads, cache, vocab_T), 5)
        record["task_kl"] = round(cast.task_kl(cfg, target, heads, cache, vocab_T), 5)
    try:
        gap, why = step_factor(init["kl"].item(), bare) if sum(len(cache.pos_T[c]) for c in first) \
            else (1.0, "the first batch has no aligned position to measure the start on: full step")
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}; {after_nan(run, cfg.ckpt_every)}") from e
    record["step_gap"], record["step_gap_reason"] = gap, why
    mse = f"{init['mse']:.4f}" if cfg.mse_weight > 0 else "off (x_S not cached)"
    print(f"first batch | kl without heads {bare:.4f} | with {choice} heads: kl {init['kl'].item():.4f} "
          f"mse {mse} | step factor {gap:.3f} ({why})")
    if cfg.monitor:
        print(f"task prompts ({cfg.monitor}, never trained on) | kl without heads {record['task_kl_bare']:.4f} | "
              f"with {choice} heads {record['task_kl']:.4f}")
    return record


def fit(cfg: Config, target, heads, cache: cast.TeacherCache, vocab_T, opt, run: Path, start: int):
    """Step 4: AdamW on the heads, each at its learning_rate; a log line every --log-every steps, a checkpoint
    every --ckpt-every."""
    t0, tokens = time.time(), 0
    for step in range(start + 1, cfg.steps + 1):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, group, step)
        chunk_ids = batch_chunks(cfg, step, cache.n_train)
        opt.zero_grad(set_to_none=True)
        out = cast.cast_loss(cfg, target, heads, cache, vocab_T, chunk_ids, backward=True)
        if not torch.isfinite(out["loss"]):  # stop before a NaN reaches the heads; the last checkpoint stays
            raise FloatingPointError(f"the loss is {out['loss'].item()} at step {step} (kl {out['kl'].item()}, "
                                     f"mse {out['mse'].item()}); " + after_nan(run, cfg.ckpt_every))
        opt.step()
        free_memory(collect=False)  # hand this step's freed activations back before the next step's
        tokens += sum(len(cache.ids_T[c]) for c in chunk_ids)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, **{k: round(v.item(), 5) for k, v in out.items()}, "lr": opt.param_groups[0]["lr"],
                   "tok_s": round(tokens / (time.time() - t0), 1), "elapsed_s": round(time.time() - t0, 1)}
            if cfg.monitor and (step % cfg.monitor_every == 0 or step == cfg.steps):
                rec["task_kl"] = round(cast.task_kl(cfg, target, heads, cache, vocab_T), 5)
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
                                 "on the demo's folders (LAB.md)")
            demo.run(cfg.out if cfg.out != Config.out else "runs/demo", lambda a: train(parse_config(a)), cfg.force)
        else:
            return train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
