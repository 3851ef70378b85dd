"""The task and the text: what the models read. It imports nothing of this project.

The task: generated arithmetic word problems in GSM8K format (`#### 42`) or a GSM8K JSONL file, split into
train / validation / test, the prompt format the cartridges are called with, and how an answer is read from a
model's output. The text: the standard library's docstrings (read with `ast`), or any .txt / .jsonl file or
folder, cut into chunks. The batches every file feeds a model.
"""
import ast
import functools
import json
import os
import random
import re
from pathlib import Path

import torch


# ----------------------------------------------------------------------------- the task

NAMES = ["Ada", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
OBJECTS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "shells", "cards", "eggs",
           "stamps", "beads"]
TEMPLATES = {  # operation -> (question, worked answer); a, b, c are filled in by arithmetic_problem
    "add": ("{n} has {a} {o}. {n} gets {b} more {o}. How many {o} does {n} have now?", "{a} + {b} = {c}"),
    "sub": ("{n} had {a} {o} and gave {b} of them to {m}. How many {o} does {n} have left?", "{a} - {b} = {c}"),
    "mul": ("{n} buys {a} bags with {b} {o} in each bag. How many {o} does {n} buy?", "{a} * {b} = {c}"),
    "div": ("{n} shares {a} {o} equally among {b} friends. How many {o} does each friend get?", "{a} / {b} = {c}"),
    "two": ("{n} has {a} {o}, finds {b} more and then gives {d} to {m}. How many {o} are left?",
            "{a} + {b} = {s}\n{s} - {d} = {c}"),
}


def arithmetic_problem(rng: random.Random) -> dict:
    op, n, m, o = rng.choice(list(TEMPLATES)), *rng.sample(NAMES, 2), rng.choice(OBJECTS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    v = dict(n=n, m=m, o=o, a=a, b=b)
    if op == "add":
        v["c"] = a + b
    elif op == "sub":
        v.update(a=a + b, c=a)
    elif op == "mul":
        v.update(a=rng.randint(2, 12), b=rng.randint(2, 12))
        v["c"] = v["a"] * v["b"]
    elif op == "div":
        v.update(a=a * (b % 9 + 2), b=b % 9 + 2, c=a)
    else:
        v.update(s=a + b, d=rng.randint(1, a + b), c=None)
        v["c"] = v["s"] - v["d"]
    question, work = TEMPLATES[op]
    return {"question": question.format(**v), "answer": work.format(**v) + f"\n#### {v['c']}"}


SPLITS = ("train", "validation", "test")
# Each split draws from its own seeded stream and skips every question of the splits before it, up to these fixed
# pool sizes, so the three never share a question, whatever n is asked for (tests/test_data.py checks the text).
POOLS = {"train": (1234, 4000), "validation": (5678, 2000), "test": (9012, 2000)}  # split -> (seed, pool size)


@functools.lru_cache(maxsize=None)
def _pool(split: str) -> tuple:
    seed, size = POOLS[split]
    taken = set().union(*({p["question"] for p in _pool(s)} for s in SPLITS[:SPLITS.index(split)]))
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < size:
        p = arithmetic_problem(rng)
        if p["question"] not in seen and p["question"] not in taken:
            seen.add(p["question"])
            out.append(p)
    return tuple(out)


def arithmetic_problems(n: int, split: str) -> list[dict]:
    """The first `n` problems of a split: 'train' (the cartridges learn from it), 'validation' (recipes are
    chosen on it; the first 200 are the problems the recipe ladder was measured on, less one that the training
    split holds) or 'test' (the final table, scored once). No question is in two splits."""
    if split not in POOLS:
        raise ValueError(f"split '{split}' is not one of {', '.join(SPLITS)}")
    if n > POOLS[split][1]:
        raise ValueError(f"the {split} split holds {POOLS[split][1]} arithmetic problems; {n} were asked for")
    return [dict(p) for p in _pool(split)[:n]]


def read_gsm8k(path) -> list[dict]:
    """Problems from a GSM8K-format JSONL file (fields `question`, `answer` ending in `#### <number>`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found; give 'arithmetic' or a GSM8K-format .jsonl file")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows or any({"question", "answer"} - set(r) for r in rows):
        raise ValueError(f"{path} must hold JSON lines with the fields 'question' and 'answer'")
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def task_problems(task: str, split: str, n: int | None = None, n_held: int = 200) -> list[dict]:
    """The first `n` problems (None: all) of a task's split. 'arithmetic': the generated splits above. A
    GSM8K-format file: its last n_held rows are the test split, the n_held rows before them the validation
    split, the rest the training split (pass the same --n-held to lora.py and evaluate.py)."""
    if task == "arithmetic":
        return arithmetic_problems(POOLS[split][1] if n is None else n, split)
    if split not in SPLITS:
        raise ValueError(f"split '{split}' is not one of {', '.join(SPLITS)}")
    if n_held < 1:
        raise ValueError(f"--n-held {n_held}: a GSM8K file needs at least one held-out row for each of validation and test")
    rows = read_gsm8k(task)
    if len(rows) <= 2 * n_held:
        raise ValueError(f"{task} has {len(rows)} rows; holding out {n_held} for validation and {n_held} for test "
                         "leaves none to train on: lower --n-held or add rows")
    start, end = {"train": (0, len(rows) - 2 * n_held), "validation": (len(rows) - 2 * n_held, len(rows) - n_held),
                  "test": (len(rows) - n_held, len(rows))}[split]
    return rows[start:end][:n]


def seen_in_training(problems: list[dict], task: str = "arithmetic", n_held: int = 200) -> list[bool]:
    """For each problem, whether its whole worked answer (the steps and '#### n', verbatim) is also the answer of
    a training problem. The splits are disjoint by question, not by computation: '7 * 8 = 56' can come back with
    other names and objects (92 of the first 200 test problems, every multiplication among them)."""
    seen = {p["answer"] for p in task_problems(task, "train", None, n_held)}
    return [p["answer"] in seen for p in problems]


def monitor_problems(task: str, n: int) -> list[dict]:
    """`n` task problems that CAST training only measures: arithmetic validation problems 1000 onwards
    (evaluate.py scores the first --n, at most 1000), or the first n rows of a GSM8K file."""
    if task == "arithmetic":
        return arithmetic_problems(1000 + n, "validation")[1000:]
    return read_gsm8k(task)[:n]


PROMPT = "Question: {question}\nAnswer:"  # the cartridges' prompt format


def prompt(question: str) -> str:
    return PROMPT.format(question=question)


def _normalise(number: str) -> str:
    return number.replace(",", "").replace("$", "").rstrip(".")


def extract_answer(text: str, mode: str = "strict"):
    """The final answer in a model output, as the evaluation harness reads GSM8K:
    strict = the number after '####'; flexible = the last number anywhere. None if there is none."""
    if mode == "strict":
        found = re.findall(r"#### (-?[0-9.,]+)", text)
        found = found[:1]
    else:
        found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
        found = [a or b for a, b in found][-1:]
    found = [_normalise(f) for f in found if re.search(r"[0-9]", f)]
    return found[0] if found else None


def same_number(prediction, reference) -> bool:
    if prediction is None:
        return False
    try:
        return float(prediction) == float(reference)
    except ValueError:
        return prediction == reference


# ----------------------------------------------------------------------------- the text

def stdlib_docstrings(max_chars: int = 1_200_000, min_chars: int = 200) -> list[str]:
    """Prose from the standard library's docstrings, parsed with ast (no module is imported).

    Files in sorted order, docstrings in source order: the same Python gives the same corpus."""
    root, docs, total = Path(os.__file__).parent, [], 0  # the stdlib folder
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages", "lib2to3"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc.count(" ") > len(doc) / 12:  # prose, not tables
                    docs.append(doc)
                    total += len(doc)
                    if total >= max_chars:
                        return docs
    return docs


def read_corpus(path=None) -> list[str]:
    """Documents from a .txt file (blank-line separated), a .jsonl file (field `text`), a folder of those,
    or, with no path, the standard-library docstrings."""
    if path is None or path == "stdlib":
        return stdlib_docstrings()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} not found; give a .txt or .jsonl file, a folder of them, or omit "
                                "--corpus for the built-in standard-library docstrings")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    docs = []
    for f in files:
        if f.suffix == ".jsonl":
            docs += [json.loads(line)["text"] for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif f.suffix == ".txt":
            docs += re.split(r"\n\s*\n", f.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"corpus file {f} is neither .txt nor .jsonl")
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"corpus {path} holds no text; it needs non-empty .txt or .jsonl (field `text`) files")
    return docs


def split_corpus(docs: list[str], held_out: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """A deterministic (train, held-out) split of documents."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(len(docs) * held_out)) if len(docs) > 1 else 0
    return [docs[i] for i in order[n_held:]], [docs[i] for i in order[:n_held]]


def chunk_texts(docs: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Cut documents into text pieces of at most `max_tokens` tokens of `tokenizer`, at token boundaries.

    Chunks are text, not ids, because two models with two tokenizers must read the same characters."""
    chunks = []
    for doc in docs:
        ends = [end for _, end in tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        start = 0
        for i in range(max_tokens - 1, len(ends) + max_tokens - 1, max_tokens):
            end = ends[min(i, len(ends) - 1)]
            if doc[start:end].strip():
                chunks.append(doc[start:end])
            start = end
    return chunks


# ----------------------------------------------------------------------------- batches of token ids

def answer_batch(tokenizer, pairs: list[tuple[str, str]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of prompt + answer + EOS, right-padded; labels are -100 except on answer tokens."""
    rows = []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = pad_batch([i for i, _ in rows], pad, device)  # (B, T)
    labels, _ = pad_batch([l for _, l in rows], -100, device)  # (B, T)
    return ids, labels, mask


def pad_batch(rows: list[list[int]], pad: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, attention mask), both (B, T), padded on the right (or left, for generation)."""
    width = max(map(len, rows))
    fill = [[pad] * (width - len(r)) for r in rows]
    ones = [[1] * len(r) for r in rows]
    ids = [f + list(r) if left else list(r) + f for f, r in zip(fill, rows)]
    mask = [[0] * len(f) + o if left else o + [0] * len(f) for f, o in zip(fill, ones)]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)
