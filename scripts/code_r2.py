"""What each kernel reads after a transfer: the per-kernel code R^2 of a run's heads on task texts.

    python scripts/code_r2.py --run runs/smollm2-to-gemma3 [--task arithmetic] [--n 64]

A kernel sees its input only through A_S (r numbers per position: its "code"). At the aligned positions of
task texts (validation problems with their worked answers), the student's code A_S P_in x_T (x_T: the target
module input, heads on) is compared with the teacher's A_S x_S (x_S: the source module input, cartridge on).
1 for exact heads (the identity, the rotated twin). Prints the median, min and max over the kernels and
writes RUN/code_r2.json (kernel -> R^2).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import cast  # noqa: E402
from models import default_device_dtype, load_model  # noqa: E402
from runs import write_json  # noqa: E402
from evaluate import run_heads  # noqa: E402
from lora import load_lora  # noqa: E402
from data import prompt, task_problems  # noqa: E402


@torch.no_grad()
def code_r2(teacher, tok_S, target, tok_T, heads, texts: list[str]) -> dict:
    """Per kernel, how well the student's code A_S P_in x_T matches the teacher's A_S x_S on task text, at
    aligned positions (r numbers per position: all the kernel reads of its input).
        R^2 = 1 - sum (A_S P_in x_T - A_S x_S)^2 / sum (A_S x_S - mean)^2
    x_S: the source module input with the cartridge on; x_T: the target module input with the heads on."""
    codes = {h.source_name: ([], []) for h in heads}
    for text in texts:
        idx_S, idx_T = cast.aligned_positions(cast.offsets(tok_S, text), cast.offsets(tok_T, text))
        with cast.captured(teacher, [h.source_name + ".base" for h in heads]) as store:
            teacher(input_ids=torch.tensor([tok_S(text)["input_ids"]], device=heads[0].A_S.device))
        with cast.attached(target, heads, capture=True):
            target(input_ids=torch.tensor([tok_T(text)["input_ids"]], device=heads[0].A_S.device))
            for h in heads:
                x_S = store[h.source_name + ".base"][0][0, idx_S].float()  # (N, d_in_S)
                A_T, _ = h.target_factors()  # (r, d_in_T)
                codes[h.source_name][0].append(x_S @ h.A_S.T)  # (N, r)
                codes[h.source_name][1].append(h.x_T[0, idx_T].float() @ A_T.T)  # (N, r)
    r2 = {}
    for name, (code_S, code_T) in codes.items():
        code_S, code_T = torch.cat(code_S), torch.cat(code_T)
        r2[name] = 1 - ((code_T - code_S) ** 2).sum().item() / ((code_S - code_S.mean(0)) ** 2).sum().item()
    return r2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder written by train.py")
    ap.add_argument("--task", default="arithmetic", help="'arithmetic' or a GSM8K-format .jsonl file")
    ap.add_argument("--n", type=int, default=64, help="task texts (the first n validation problems)")
    ap.add_argument("--n-held", type=int, default=200, help="a GSM8K file's rows held out per split (as for lora.py)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    cfg = json.loads((run / "config.json").read_text())
    device, dtype = default_device_dtype()
    source, tok_S = load_model(cfg["source"], device, dtype)
    target, tok_T = load_model(cfg["target"], device, dtype)
    heads, _ = run_heads(run, source, target)
    load_lora(source, cfg["cartridge"])
    texts = [prompt(p["question"]) + " " + p["answer"] for p in task_problems(args.task, "validation", args.n, args.n_held)]
    r2 = code_r2(source, tok_S, target, tok_T, heads, texts)
    values = sorted(r2.values())
    print(f"code R^2 (A_S P_in x_T vs A_S x_S, {len(texts)} task texts) | median {values[len(values) // 2]:.3f} | "
          f"min {values[0]:.3f} | max {values[-1]:.3f} over {len(values)} kernels")
    write_json(run / "code_r2.json", r2)
    return r2


if __name__ == "__main__":
    main()
