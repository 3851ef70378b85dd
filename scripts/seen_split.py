"""The final table (and bos_check/'s reverse rows) on two halves of the test split: problems whose computation
the cartridge's training split holds (the whole worked answer, '7 * 8 = 56\n#### 56', verbatim, under another
question) and those it does not.
The splits are disjoint by question, not by computation (data.seen_in_training); here is what that changes.
Read from the outputs every committed eval.json keeps (nothing is scored again); each row's count is checked
against the strict accuracy its record states.

    python scripts/seen_split.py          # prints the table, writes results/final/seen_unseen.md
"""
import importlib.util
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import extract_answer, same_number, seen_in_training, task_problems  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
ROWS = ["teacher (source + cartridge)", "target base", "target + CAST (exported)", "target + weight-space"]


def right(row: dict, problems: list[dict]) -> list[bool] | None:
    """Each problem's strict verdict (the row's strict_each, or read again from all its outputs), checked against
    the strict accuracy the record states; all wrong for a row that scored 0; None for a record that kept neither (eval.json kept five outputs and no
    verdicts before commit 52388bd)."""
    if row["strict"] == 0:  # nothing right: nothing right on either half
        verdicts = [False] * len(problems)
    elif "strict_each" in row:
        verdicts = [c == "1" for c in row["strict_each"]]
    elif len(row.get("outputs", [])) == len(problems):
        verdicts = [same_number(extract_answer(o, "strict"), extract_answer(p["answer"], "strict"))
                    for o, p in zip(row["outputs"], problems)]
    else:
        return None
    if len(verdicts) != len(problems) or abs(sum(verdicts) / len(problems) - row["strict"]) > 1e-9:
        raise SystemExit(f"a row's verdicts do not give its recorded strict {row['strict']}")
    return verdicts


def operation(problem: dict) -> str:
    """The kind of problem, read from its worked answer ('7 * 8 = 56'): one operator names it, two are two-step."""
    ops = re.findall(r"\d ([-+*/]) \d", problem["answer"].split("####")[0])
    return "two-step" if len(ops) > 1 else {"+": "add", "-": "sub", "*": "mul", "/": "div"}[ops[0]]


def count_by_kind(verdicts: list[bool], kinds: list[str], names: list[str]) -> str:
    """How many problems of each kind (in the order of names) the verdicts hold right: '13, 5, 0, 0, 0'."""
    return ", ".join(str(sum(v for v, k in zip(verdicts, kinds) if k == name)) for name in names)


def on(verdicts: list[bool], mask: list[bool]) -> float:
    kept = [v for v, m in zip(verdicts, mask) if m]
    return sum(kept) / len(kept)


def plot_module():
    """scripts/plot.py, whose `denominators` picks the better retrained LoRA on validation."""
    spec = importlib.util.spec_from_file_location("plot", Path(__file__).with_name("plot.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table() -> str:
    """The markdown of results/final/seen_unseen.md, computed from the records."""
    lines = ["| run | row | all | seen computations | unseen computations | retention: all / unseen |",
             "| --- | --- | --- | --- | --- | --- |"]
    problems = task_problems("arithmetic", "test", 200)
    seen = seen_in_training(problems)
    unseen = [not s for s in seen]
    # Gemma-3's tuned denominators on test, per problem: rank 8 scored beside seed 0 (the same LoRA as
    # final/retrained-gemma3-270m.json, which kept five outputs), rank 16 in its own record; retention divides by
    # the better of the two on validation, as scripts/plot.py does
    rank8 = right(json.loads((RESULTS / "final" / "forward_seed0" / "eval.json").read_text())["target + retrained LoRA"],
                  problems)
    named = {"gemma3-270m": ("forward_seed0", rank8)}
    r16 = RESULTS / "final" / "retrained-gemma3-270m-r16.json"
    if r16.is_file():
        named["gemma3-270m-r16"] = (r16.name, right(json.loads(r16.read_text())["model + LoRA"], problems))
    best = plot_module().denominators("gemma3-270m")[0]
    denominators = {"gemma3-270m": named[best][1]}
    missing = []
    kinds = [operation(p) for p in problems]
    names = sorted(set(kinds))
    by_kind = ["| run | right answers by kind: " + ", ".join(f"{k} ({kinds.count(k)})" for k in names)
               + " | the bare target, flexibly right, on the same problems |", "| --- | --- | --- |"]
    # the final table's rows, then the reverse rows trained again with the teacher after its <bos> (bos_check/)
    folders = [p for d in ("final", "bos_check") for p in sorted((RESULTS / d).iterdir()) if (p / "eval.json").is_file()]
    for folder in folders:
        run = str(folder.relative_to(RESULTS)).removeprefix("final/")
        record = json.loads((folder / "eval.json").read_text())
        if (record["split"]["split"], record["split"]["n"]) != ("test", len(problems)):
            raise SystemExit(f"{folder} was not scored on the first {len(problems)} test problems")
        if (folder / "rescored_each.json").is_file():  # scored again from its exported LoRA, each problem kept
            record["target + CAST (exported)"] = json.loads((folder / "rescored_each.json").read_text())["model + LoRA"]
        target = json.loads((folder / "config.json").read_text())["target"]
        for label in [r for r in ROWS if r in record]:
            v, d = right(record[label], problems), denominators.get(target)
            if v is None:
                missing.append(f"{run} ({label})")
                continue
            if label == "target + CAST (exported)" and sum(v):
                bare = record.get("target base", {}).get("flexible_each")  # a seed past 0 did not score it
                bare = count_by_kind([x and b == "1" for x, b in zip(v, bare)], kinds, names) if bare else "not scored"
                by_kind.append(f"| {run} | {count_by_kind(v, kinds, names)} | {bare} |")
            ret = f"{sum(v) / sum(d):.0%} / {on(v, unseen) / on(d, unseen):.0%}" \
                if label == "target + CAST (exported)" and d else ""
            lines.append(f"| {run} | {label} | {sum(v) / len(v):.3f} | {on(v, seen):.3f} | {on(v, unseen):.3f} "
                         f"| {ret} |")
    for name, (where, d) in reversed(named.items()):
        role = "the denominator" if name == best else "beside it"
        lines.insert(2, f"| {where} | retrained LoRA, rank {16 if name.endswith('r16') else 8} ({role}) | "
                        f"{sum(d) / len(d):.3f} | {on(d, seen):.3f} | {on(d, unseen):.3f} | |")
    return (f"Test split, first {len(problems)} problems: {sum(seen)} whose computation the training split holds "
            f"(seen), {sum(unseen)} whose does not (unseen). Written by scripts/seen_split.py from the committed "
            "records.\n\n" + "\n".join(lines) + "\n\nNo per-problem record (scored before eval.json kept each "
            "problem; the exported LoRAs are committed, so they can be scored again): " + ", ".join(missing) + "\n\n"
            "CAST's right answers (strict) by kind of problem, and of those how many the bare target already got "
            "right flexibly (the right number anywhere in its output); every multiplication is a seen computation."
            "\n\n" + "\n".join(by_kind) + "\n")


def main():
    text = table()
    print(text)
    (RESULTS / "final" / "seen_unseen.md").write_text(text)


if __name__ == "__main__":
    main()
