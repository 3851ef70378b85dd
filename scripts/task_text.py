"""The ceiling row's text (not CAST: task data): training problems of the arithmetic task with their worked answers,
in the cartridge's prompt format, one per paragraph, for `python train.py --corpus task.txt`.

    python scripts/task_text.py --n 300 --out task.txt
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import arithmetic_problems, prompt  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="problems of the train split")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if Path(args.out).exists():
        raise SystemExit(f"error: {args.out} exists; choose another --out")
    text = "\n\n".join(prompt(p["question"]) + " " + p["answer"] for p in arithmetic_problems(args.n, "train"))
    Path(args.out).write_text(text)
    print(f"wrote {args.out}: {args.n} training problems with their answers")


if __name__ == "__main__":
    main()
