"""The cartridge's task: generated arithmetic word problems in GSM8K format (`#### 42`) or a GSM8K JSONL
file, the prompt format the cartridges are called with, and how an answer is read from a model's output.

Plain Python, no model and no torch: every other file may use it (task, data, memory, align, config <-
lora <- cast <- losses <- teacher <- evaluate <- demo <- train).
"""
import functools
import json
import random
import re
from pathlib import Path

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
