"""LAB.md's reference table, printed from the records scripts/exercises.sh writes (results/lab/<run>_s<seed>/):
each value as the range over the two seeds, the band a student's run is graded against.

    python scripts/lab_table.py

tests/test_docs.py checks that every row printed here is in LAB.md.
"""
import json
import re
from pathlib import Path

LAB = Path(__file__).resolve().parents[1] / "results" / "lab"
SEEDS = (0, 1)
ROWS = [  # (run, what it is)
    ("known", "known-answer leg, as the demo"),
    ("known_ridgein", "exercise 1: known-answer, `--init ridge-in`"),
    ("different", "different leg, as the demo (300 steps)"),
    ("different_s100", "exercise 2: different, `--steps 100`"),
    ("different_s1000", "exercise 2: different, `--steps 1000`"),
    ("different_kl", "exercise 3: different, `--loss kl`"),
    ("different_mse", "exercise 3: different, `--loss mse`"),
    ("different_lr1e-2", "exercise 4: different, `--lr 1e-2`"),
]
SOLUTION_ROWS = [("different_mlp", "different leg, nonlinear heads (scripts/nonlinear_heads.py)")]  # the instructor's
ROW = "target + CAST (hooks)"  # for the nonlinear heads the only row that scores them; for linear heads = exported


def band(values, form: str) -> str:
    """'low-high' over the seeds, or one value where they agree to the printed digits."""
    low, high = form.format(min(values)), form.format(max(values))
    return low if low == high else f"{low}-{high}"


def run_record(run: str, seed: int) -> dict:
    folder = LAB / f"{run}_s{seed}"
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    row = json.loads((folder / "eval.json").read_text())[ROW]
    return {"bare": log[0]["task_kl_bare"], "start": log[0]["task_kl"],
            "end": [r["task_kl"] for r in log if "task_kl" in r][-1], "strict": row["strict"], "nll": row["nll"]}


def costs(name: str) -> tuple[list[float], list[float]]:
    """Wall seconds and peak resident GB of one command over the seeds (name: run_s{s} or run_s{s}.eval), from
    results/lab/summary.txt."""
    text = (LAB / "summary.txt").read_text()
    found = [re.search(rf"^{re.escape(name.format(s=s))} wall ([\d.]+) s maxrss (\d+) KB$", text, re.M) for s in SEEDS]
    return [float(m.group(1)) for m in found], [int(m.group(2)) / 2**20 for m in found]


def rows(table=ROWS) -> list[str]:
    out = ["| run | task KL bare / start / end | strict | answer NLL | train, evaluate (s) | peak (GiB) |",
           "| --- | --- | --- | --- | --- | --- |"]
    for run, what in table:
        recs = [run_record(run, s) for s in SEEDS]
        (train_s, train_gb), (eval_s, eval_gb) = costs(run + "_s{s}"), costs(run + "_s{s}.eval")
        kl = " / ".join(band([r[k] for r in recs], "{:.3f}") for k in ("bare", "start", "end"))
        out.append(f"| {what} | {kl} | {band([r['strict'] for r in recs], '{:.2f}')} | "
                   f"{band([r['nll'] for r in recs], '{:.3f}')} | {band(train_s, '{:.0f}')}, {band(eval_s, '{:.0f}')} | "
                   f"{band([max(a, b) for a, b in zip(train_gb, eval_gb)], '{:.2f}')} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
    if (LAB / f"{SOLUTION_ROWS[0][0]}_s0").is_dir():  # not in the students' copy (scripts/student_copy.sh)
        print("\nthe assignment's reference solution:\n" + "\n".join(rows(SOLUTION_ROWS)))
