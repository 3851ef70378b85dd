"""Levers on the text the heads are shown, tried first on the demo's different pair (tiny Llama -> tiny Gemma-3).

Each rung changes one thing against the default recipe, trains 300 steps as the demo does, and is scored on the
validation split of the toy task (100 problems; the test split is not read). No task problem is read to make
any text: only the source, its cartridge and the prompt format.

    python train.py --demo                  # once: runs/demo (models, cartridge, toy text, task)
    python scripts/levers_toy.py            # every rung; or name some: python scripts/levers_toy.py format effect

Rungs:
  toytext    the demo's own corpus: the toy world's general text (no counting question in it)
  format     --corpus format: the teacher writes questions after 'Question:' and answers them (the default)
  amplified1 the same, written by an amplified teacher: sampled from log p_cart + g (log p_cart - log p_bare),
  amplified2 g = 1 and 2 (contrastive decoding: the cartridge's behaviour shown more strongly)
  effect     3,000 candidates (teacher-written samples and toy-text chunks), each scored by the cartridge's own
             effect on the source, mean KL(source + cartridge || source) over its positions; the top 300 kept
  effect_toy the same selection among the toy-text chunks only (what a fixed corpus gives)

Writes results/levers_toy/<rung>/ (config.json, log.jsonl, eval.json; corpus.jsonl samples for written text) and
results/levers_toy/summary.md.
"""
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate  # noqa: E402
import lora  # noqa: E402
import train  # noqa: E402
from effect_text import cartridge_on, effect  # noqa: E402
from data import chunk_texts, load_model, read_corpus  # noqa: E402
from task import PROMPT  # noqa: E402

DEMO, RUNS, OUT = Path("runs/demo"), Path("runs/levers_toy"), Path("results/levers_toy")
SEQ_LEN, N_KEEP, N_CANDIDATES = 64, 300, 3000


@torch.no_grad()
def write(model, tok, prompts: list[str], new_tokens: int, gain: float, seed: int) -> list[str]:
    """Sample a continuation of each prompt from log p_cart + gain (log p_cart - log p_bare), temperature 1.
    gain 0: the teacher's own distribution. Prompts of one length share a batch; each text ends at EOS."""
    torch.manual_seed(seed)
    # the key/value cache's keyword: `cache` in newer transformers (5.24 takes it), `past_key_values` in older ones
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    by_length, texts = {}, [""] * len(prompts)
    for i, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(i)
    for length, group in by_length.items():
        for first in range(0, len(group), 64):
            rows = group[first:first + 64]
            seq = torch.tensor([ids[i] for i in rows])  # (B, length)
            past, step_in = {True: None, False: None}, seq
            for _ in range(new_tokens):
                logp = {}
                for on in (True, False) if gain else (True,):
                    cartridge_on(model, on)
                    out = model(input_ids=step_in, use_cache=True, **{cache_kw: past[on]})
                    past[on], logp[on] = out[cache_kw], out.logits[:, -1].float().log_softmax(-1)  # (B, V)
                scores = logp[True] + gain * (logp[True] - logp[False]) if gain else logp[True]
                step_in = torch.multinomial(scores.softmax(-1), 1)  # (B, 1)
                seq = torch.cat([seq, step_in], 1)
            cartridge_on(model, True)
            for i, row in zip(rows, seq.tolist()):
                new = row[length:]
                new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
                texts[i] = prompts[i] + tok.decode(new, skip_special_tokens=True)
    return texts


def format_corpus(model, tok, n: int, gain: float, seed: int, seq_len: int = SEQ_LEN) -> list[str]:
    """As teacher.teacher_corpus: n questions after the prompt's first word, each first line answered."""
    opening = PROMPT.partition("{question}")[0].strip()  # 'Question:'
    texts = write(model, tok, [opening] * n, seq_len - 4, gain, seed)
    questions = [next((ln for ln in t[len(opening):].splitlines() if ln.strip()), "").strip() for t in texts]
    asked = [PROMPT.format(question=q) for q in questions if q]
    return write(model, tok, asked, seq_len // 2, gain, seed + 1)


def corpus_for(rung: str, model, tok) -> list[str] | None:
    """The text of a rung (None: the rung uses a corpus flag of train.py)."""
    if rung.startswith("amplified"):
        return format_corpus(model, tok, N_KEEP, float(rung[-1]), seed=0)
    if rung.startswith("effect"):
        toy = chunk_texts(read_corpus(DEMO / "world" / "corpus.txt"), tok, SEQ_LEN)
        candidates = toy if rung == "effect_toy" else format_corpus(model, tok, N_CANDIDATES - len(toy), 0.0, 1) + toy
        scores = effect(model, tok, candidates, SEQ_LEN, batch_size=64)
        order = sorted(range(len(candidates)), key=lambda i: -scores[i])[:N_KEEP]
        kept = [candidates[i] for i in order]
        n_written = len(candidates) - len(toy)
        print(f"{rung}: {len(candidates)} candidates ({n_written} written), kept {N_KEEP}: "
              f"{sum(i < n_written for i in order)} written, effect {scores[order[-1]]:.3f}-{scores[order[0]]:.3f} "
              f"(all: mean {sum(scores) / len(scores):.3f})")
        return kept
    return None


def rung_argv(rung: str, corpus: str) -> list[str]:
    return ["--source", str(DEMO / "models/source"), "--cartridge", str(DEMO / "cartridge"),
            "--target", str(DEMO / "models/gemma"), "--corpus", corpus, "--task", str(DEMO / "world/task.jsonl"),
            "--out", str(RUNS / rung), "--steps", "300", "--seq-len", str(SEQ_LEN), "--max-chunks",
            str(N_KEEP) if corpus == "format" else "0", "--monitor", "16", "--monitor-every", "100",
            "--log-every", "50", "--cache-mb", "256", "--force"]


def main(rungs: list[str]) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    RUNS.mkdir(parents=True, exist_ok=True)
    for rung in rungs:
        t0 = time.time()
        source, tok = load_model(str(DEMO / "models/source"), "cpu", torch.float32)
        lora.load_lora(source, DEMO / "cartridge")
        texts = corpus_for(rung, source, tok)
        corpus = {"toytext": str(DEMO / "world/corpus.txt"), "format": "format"}.get(rung, str(RUNS / f"{rung}.jsonl"))
        if texts is not None:
            Path(corpus).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        del source
        train.main(rung_argv(rung, corpus))
        result = evaluate.main(["--run", str(RUNS / rung), "--retrained", str(DEMO / "retrained-gemma"),
                                "--task", str(DEMO / "world/task.jsonl"), "--n", "100", "--n-held", "100"])
        keep = OUT / rung
        keep.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "log.jsonl", "eval.json"):
            (keep / f).write_text((RUNS / rung / f).read_text())
        if texts is not None:
            (keep / "corpus_head.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:20]))
        cast_row = result["target + CAST (exported)"]
        line = (f"| {rung} | {cast_row['strict']:.2f} | {cast_row['nll']:.3f} | "
                f"{evaluate.percent(cast_row['retention']['strict']['paper'])} | {time.time() - t0:.0f} s |")
        print(line)
        with open(OUT / "summary.md", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or ["toytext", "format", "amplified1", "amplified2", "effect", "effect_toy"])
