"""Two runs scored on the same problems, compared problem by problem (the exact McNemar test).

Two accuracies whose 95% intervals overlap may still differ: on the same problems, only the problems where the two
runs disagree carry information. Of those, a run that is no better than the other wins each with probability 1/2,
so the two-sided p-value is that of a binomial(discordant, 1/2) count at least as far from half as the observed
one. Reads the per-problem strings (`strict_each`, '1' right) that evaluate.py writes into eval.json.

    python scripts/paired.py results/levers/default_c58c0_s300 results/levers/weighted_c58c0_s300
"""
import argparse
import json
import math
from collections import Counter
from pathlib import Path


def mcnemar(only_a: int, only_b: int) -> float:
    """Exact two-sided p-value: P(a binomial(n, 1/2) count is at least as far from n/2 as max(only_a, only_b))."""
    n, k = only_a + only_b, max(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(a: Path, b: Path, row: str = "target + CAST (hooks)", mode: str = "strict") -> dict:
    runs = []
    for path in (a, b):
        record = json.loads((path / "eval.json" if path.is_dir() else path).read_text())
        if mode + "_each" not in record.get(row, {}):
            raise SystemExit(f"error: {path} has no '{mode}_each' in its row '{row}' (scored before evaluate.py "
                             "wrote per-problem results: score it again)")
        runs.append(record)
    if runs[0]["split"]["sha256"] != runs[1]["split"]["sha256"]:
        raise SystemExit(f"error: {a} and {b} were scored on different problems (split sha256 differs)")
    each_a, each_b = runs[0][row][mode + "_each"], runs[1][row][mode + "_each"]
    count = Counter(zip(each_a, each_b))  # ('1', '0'): only a right, and so on
    only_a, only_b = count["1", "0"], count["0", "1"]
    return {"n": len(each_a), "both": count["1", "1"], "only_a": only_a, "only_b": only_b, "p": mcnemar(only_a, only_b)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="a run folder (or its eval.json)")
    ap.add_argument("b", type=Path)
    ap.add_argument("--row", default="target + CAST (hooks)")
    ap.add_argument("--mode", default="strict", choices=("strict", "flexible"))
    args = ap.parse_args(argv)
    r = compare(args.a, args.b, args.row, args.mode)
    print(f"{r['n']} problems: both right {r['both']} | only {args.a} {r['only_a']} | only {args.b} {r['only_b']} "
          f"| exact McNemar p = {r['p']:.3f}")
    return r


if __name__ == "__main__":
    main()
