"""What a run's answers get right and wrong beyond the count. For each problem of the split an eval.json was scored
on: does the answer have the task's form (an expression `a op b = c`, then `#### n`), are its first expression's
operands numbers of the question, is its operation the reference's first one, is its own arithmetic right, and how
far is its `####` number from the right answer. Needs an eval.json that keeps every output (evaluate.py from commit
52388bd; score an older run's LoRA again with `evaluate.py --lora ... --out ...`). With --text, the same reading
of a run's training text (teacher_text.jsonl, which train.py writes for --corpus format): what the heads were shown.

    python scripts/answers.py results/final/forward_seed2/eval.json [--row "target + CAST (exported)"]
    python scripts/answers.py --text results/final/forward_seed2/teacher_text.jsonl
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import extract_answer, task_problems  # noqa: E402

EXPRESSION = re.compile(r"(\d+)\s*([-+*/x×])\s*(\d+)\s*=\s*(-?\d+)")


def expression(match) -> tuple[int, str, int, int, bool]:
    """An `a op b = c` match as (a, op, b, c, whether c is right), op one of + - * /."""
    a, op, b, c = int(match[1]), match[2].replace("x", "*").replace("×", "*"), int(match[3]), int(match[4])
    return a, op, b, c, c == {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]


def read(output: str, problem: dict) -> dict:
    """One answer against its problem: the checks above, each True or False (None where it cannot be read)."""
    said, right = extract_answer(output), extract_answer(problem["answer"])
    mine, ref = EXPRESSION.search(output), EXPRESSION.search(problem["answer"])
    row = {"form": said is not None and mine is not None, "operands": None, "operation": None, "arithmetic": None,
           "distance": None if said is None else abs(float(said) - float(right))}
    if mine:
        _, op, _, _, row["arithmetic"] = expression(mine)
        row["operands"] = {mine[1], mine[3]} <= set(re.findall(r"\d+", problem["question"]))
        row["operation"] = ref is not None and op == ref[2]
    return row


def summary(rows: list[dict]) -> dict:
    share = lambda key: sum(r[key] is True for r in rows) / len(rows)
    far = [r["distance"] for r in rows if r["distance"] is not None]
    return {"n": len(rows), **{k: share(k) for k in ("form", "operands", "operation", "arithmetic")},
            "right": sum(d == 0 for d in far) / len(rows), "off_by_1_2": sum(0 < d <= 2 for d in far) / len(rows),
            "off_by_3_10": sum(2 < d <= 10 for d in far) / len(rows), "further": sum(d > 10 for d in far) / len(rows),
            "no_number": (len(rows) - len(far)) / len(rows)}


def read_text(texts: list[str]) -> dict:
    """A training text's samples: how many carry the answer marker, an expression `a op b = c` after 'Answer:'
    (and how many of those are right), each operation's count (first expression of each sample), how many look
    like code, how many ask 'how many'."""
    found = [EXPRESSION.search(t.partition("Answer:")[2]) for t in texts]
    found = [expression(m) for m in found if m]
    return {"samples": len(texts), "marker": sum("####" in t for t in texts), "expression": len(found),
            "expression_right": sum(f[4] for f in found), **{f"op {op}": sum(f[1] == op for f in found) for op in "+-*/"},
            "code": sum(bool(re.search(r"def |return |import |`|==|\(\)", t)) for t in texts),
            "how_many": sum("how many" in t.lower() for t in texts)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_json", nargs="?")
    ap.add_argument("--row", default="target + CAST (exported)", help="the eval.json entry to read")
    ap.add_argument("--text", help="read a training text (JSONL, field 'text') instead of an eval.json")
    args = ap.parse_args(argv)
    if args.text:
        result = read_text([json.loads(line)["text"] for line in Path(args.text).read_text().splitlines()])
        print(" | ".join(f"{k} {v}" for k, v in result.items()))
        return result
    if not args.eval_json:
        ap.error("give an eval.json, or --text FILE.jsonl")
    record = json.loads(Path(args.eval_json).read_text())
    if args.row not in record:
        raise SystemExit(f"error: {args.eval_json} has no row {args.row!r}; it has {', '.join(record)}")
    split, outputs = record["split"], record[args.row]["outputs"]
    if len(outputs) != split["n"]:
        raise SystemExit(f"error: {args.eval_json} keeps {len(outputs)} of its {split['n']} outputs: score it again "
                         "with evaluate.py from commit 52388bd on, which keeps every output")
    problems = task_problems(split["task"], split["split"], split["n"], split["n_held"])
    result = summary([read(o, p) for o, p in zip(outputs, problems)])
    print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
