"""The denominator, tuned: a LoRA retrained on each target with the cartridge's budget at several learning rates,
each scored on the validation split; the best (strict accuracy, then answer NLL) is the retained LoRA that
retention is measured against. The test split is never read here.

    python scripts/tune_retrained.py --model gemma3-270m --lr 2e-3 4e-3 1e-3 5e-4 2.5e-4
    python scripts/tune_retrained.py --model smollm2-135m --lr 2e-3 1e-3 4e-3
    python scripts/tune_retrained.py --model gemma3-270m --rank 16 --lr 2.5e-4 5e-4 1e-3   # the export's rank
    python scripts/tune_retrained.py --model mistralai/Mistral-7B-v0.1 --task train.jsonl --targets q_proj,v_proj \
        --steps 500 --lr 1e-4 2e-4 4e-4     # a GSM8K file: validated on rows held out of it (lora.py --n-held)

Writes cartridges/tuned/<model>[-<task file>][-r<rank>]-lr<lr>/ (the LoRA, not committed; rank 8 is not named)
and results/retrained_tuning/<same name>.json (its validation scores, learning rate, rank, steps and wall time),
then prints the table and writes the choice to results/retrained_tuning/<model>[-<task file>][-r<rank>]-chosen.json.
--rank 16 (with lora_alpha 32, the same scale 2) is the rank CAST's export has where two source layers land on one
target module (SmolLM2's 30 layers on Gemma-3's 18).
A learning rate whose record exists is not trained again.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402
from runs import write_json  # noqa: E402
import lora  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lr", type=float, nargs="+", required=True, help="at least three learning rates")
    ap.add_argument("--steps", type=int, default=150, help="the cartridge's budget (lora.py's default)")
    ap.add_argument("--task", default="arithmetic", help="'arithmetic' or a GSM8K-format .jsonl file")
    ap.add_argument("--n-held", type=int, default=200, help="a GSM8K file's rows held out for each of validation "
                    "and test (lora.py, evaluate.py)")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="the modules the LoRA adapts (lora.py)")
    ap.add_argument("--rank", type=int, default=8, help="the LoRA's rank; lora_alpha = 2 x rank keeps the scale 2")
    ap.add_argument("--n", type=int, default=200, help="validation problems")
    ap.add_argument("--out", default="results/retrained_tuning")
    args = ap.parse_args(argv)
    if len(set(args.lr)) < 3:
        ap.error("--lr takes at least three learning rates: a choice among fewer says little")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, lr in enumerate(args.lr):
        adapter = evaluate.retrained_folder(args.model, args.task, lr, args.rank)  # where evaluate.py looks for it
        record = out / f"{adapter.name}.json"
        if not record.is_file():
            start = time.time()
            if not (adapter / "adapter_config.json").is_file():
                lora.main(["--model", args.model, "--task", args.task, "--n-held", str(args.n_held), "--targets",
                           args.targets, "--out", str(adapter), "--lr", str(lr), "--steps", str(args.steps),
                           "--rank", str(args.rank), "--alpha", str(2 * args.rank), "--force"])
            train_s = time.time() - start
            baselines = ["--skip-baselines"] if i else []  # the base model is scored once
            scores = evaluate.main(["--lora", str(adapter), "--model", args.model, "--task", args.task, "--n-held",
                                    str(args.n_held), "--split", "validation", "--n", str(args.n), "--out", str(record),
                                    *baselines])
            scores.update(lr=lr, rank=args.rank, steps=args.steps, adapter=str(adapter),
                          train_s=round(train_s) if train_s > 60 else None)
            write_json(record, scores)
        rows.append(json.loads(record.read_text()))
        if (rows[-1]["steps"], rows[-1]["split"]["n"]) != (args.steps, args.n):
            raise SystemExit(f"error: {record} was made with {rows[-1]['steps']} steps and {rows[-1]['split']['n']} "
                             f"problems, not {args.steps} and {args.n}: move it away or pass --out elsewhere")
    print(f"\n| {args.model}: lr | steps | strict (95% CI) | flexible | answer NLL |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        m = r["model + LoRA"]
        print(f"| {r['lr']:g} | {r['steps']} | {m['strict']:.3f} ({m['strict_ci'][0]:.2f}-{m['strict_ci'][1]:.2f}) | "
              f"{m['flexible']:.3f} | {m['nll']:.3f} |")
    best = max(rows, key=lambda r: (r["model + LoRA"]["strict"], -r["model + LoRA"]["nll"]))
    write_json(out / f"{Path(best['adapter']).name.rsplit('-lr', 1)[0]}-chosen.json", {  # the name without the rate
        "model": args.model, "lr": best["lr"], "rank": args.rank, "steps": best["steps"], "adapter": best["adapter"],
        "chosen_on": best["split"], "among": [r["lr"] for r in rows]})
    print(f"chosen on validation: lr {best['lr']:g} -> {best['adapter']}")


if __name__ == "__main__":
    main()
