"""What linear heads can carry when told the answers (a capacity check, not CAST: it uses task labels).

    python scripts/heads_capacity.py --demo runs/demo --target gemma --steps 1200 --lr 1e-2

Trains only P_in and P_out around the cartridge's frozen kernels (A_S, B_S), attached to the target, by
cross-entropy on the task's training answers, and scores the held-out problems. If the heads reach the LoRA
retrained on the target, a linear map that carries the skill exists and CAST's failure is in its signal
(distillation on general text), not in the heads. Works on the demo's folders (python train.py --demo).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cast  # noqa: E402
import evaluate  # noqa: E402
from data import answer_batch, load_model, prompt  # noqa: E402
from lora import read_adapter  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="runs/demo", help="a folder written by python train.py --demo")
    ap.add_argument("--target", default="gemma", help="gemma or twin")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=1e-2, help="AdamW, absolute (not relative as in train.py)")
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="seeds P_in's random start and the batches")
    args = ap.parse_args()
    demo = Path(args.demo)
    rows = [json.loads(line) for line in (demo / "world" / "task.jsonl").read_text().splitlines()]
    train, test = rows[:-args.n_test], rows[-args.n_test:]
    source, _ = load_model(str(demo / "models" / "source"), "cpu", "float32")
    target, tok_T = load_model(str(demo / "models" / args.target), "cpu", "float32")
    config, factors = read_adapter(demo / "cartridge")
    torch.manual_seed(args.seed)
    heads = cast.make_heads(cast.find_kernels(config, factors, source, target), target)
    with torch.no_grad():
        for h in heads:
            h.P_out.weight.zero_()  # the target as it is at the start; P_in keeps nn.Linear's random init
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=0.0)
    pairs = [(prompt(r["question"]), " " + r["answer"]) for r in train]
    gen, start = torch.Generator().manual_seed(args.seed), time.time()
    for step in range(1, args.steps + 1):
        batch = [pairs[i] for i in torch.randint(len(pairs), (16,), generator=gen)]
        ids, labels, mask = answer_batch(tok_T, batch, "cpu")
        with cast.attached(target, heads):
            logits = target(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} | answer loss {loss.item():.3f}", flush=True)
    with cast.attached(target, heads):
        acc = evaluate.task_accuracy(target, tok_T, test)
    print(f"heads on {[h.target_name for h in heads]}")
    print(f"heads trained on the answers, {args.target}: strict {acc['strict']:.3f} ({acc['strict_ci'][0]:.2f}-"
          f"{acc['strict_ci'][1]:.2f}) | flexible {acc['flexible']:.3f} | {time.time() - start:.0f}s | "
          f"outputs {acc['outputs'][:2]}")


if __name__ == "__main__":
    main()
