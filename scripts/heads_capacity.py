"""What linear heads can carry when told the answers (a capacity check, not CAST: it uses task labels).

    python scripts/heads_capacity.py --demo runs/demo --target gemma --steps 1200 --lr 1e-2
    python scripts/heads_capacity.py --steps 150     # the embedded pair: SmolLM2's cartridge, heads on Gemma-3

Trains only P_in and P_out around the cartridge's frozen kernels (A_S, B_S), attached to the target, by
cross-entropy on the task's training answers, and scores the held-out problems. If the heads reach the LoRA
retrained on the target, a linear map that carries the skill exists and CAST's failure is in its signal
(distillation on general text), not in the heads. Works on the demo's folders (python train.py --demo) or,
without --demo, on any source, cartridge and target with the arithmetic task; there the default --lr picks
a rate per head that moves A_T = A_S P_in and B_T = P_out B_S about as fast as lora.py moves a LoRA's
factors (2e-3 per entry): an absolute step on P_in moves A_T by up to the L1 norm of A_S's rows times it.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cast  # noqa: E402
import evaluate  # noqa: E402
from data import answer_batch, arithmetic_problems, prompt, task_problems  # noqa: E402
from models import load_model  # noqa: E402
from lora import read_adapter  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="", help="a folder written by python train.py --demo (its models and task)")
    ap.add_argument("--source", default="smollm2-135m", help="without --demo: the cartridge's model")
    ap.add_argument("--cartridge", default="cartridges/smollm2-arith", help="without --demo")
    ap.add_argument("--target", default="gemma3-270m", help="with --demo: gemma or twin; else a model alias")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="AdamW, absolute; default 1e-2 with --demo, else "
                    "a rate per head matched to lora.py's 2e-3 (above)")
    ap.add_argument("--n-held", type=int, default=100, help="with --demo: the task file's rows held out for each of "
                    "validation (scored here) and test, as the demo's; without, evaluate.py's 200 validation problems")
    ap.add_argument("--seed", type=int, default=0, help="seeds P_in's random start and the batches")
    args = ap.parse_args()
    if args.demo:
        demo = Path(args.demo)
        task_file = str(demo / "world" / "task.jsonl")  # scored on its validation split, as the demo scores
        train, test = (task_problems(task_file, s, n_held=args.n_held) for s in ("train", "validation"))
        source, _ = load_model(str(demo / "models" / "source"), "cpu", "float32")
        target, tok_T = load_model(str(demo / "models" / args.target), "cpu", "float32")
        config, factors = read_adapter(demo / "cartridge")
    else:  # the same training problems as lora.py's cartridges, the same 200 validation problems as evaluate.py
        train, test = arithmetic_problems(4000, "train"), arithmetic_problems(200, "validation")
        source, _ = load_model(args.source, "cpu", "float32")
        target, tok_T = load_model(args.target, "cpu", "float32")
        config, factors = read_adapter(args.cartridge)
    torch.manual_seed(args.seed)
    heads = cast.make_heads(cast.find_kernels(config, factors, source, target), target)
    del source
    with torch.no_grad():
        for h in heads:
            h.P_out.weight.zero_()  # the target as it is at the start; P_in keeps nn.Linear's random init
    if args.demo and args.lr is None:
        args.lr = 1e-2
    lora_lr = 2e-3
    groups = [{"params": [h.P_in.weight], "lr": args.lr or lora_lr / h.A_S.abs().sum(1).mean().item()} for h in heads]
    groups += [{"params": [h.P_out.weight], "lr": args.lr or lora_lr / h.B_S.abs().sum(0).mean().item()} for h in heads]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    print(f"{len(heads)} heads | lr P_in median {sorted(g['lr'] for g in groups[:len(heads)])[len(heads) // 2]:.2e} "
          f"| P_out median {sorted(g['lr'] for g in groups[len(heads):])[len(heads) // 2]:.2e}", flush=True)
    pairs = [(prompt(r["question"]), " " + r["answer"]) for r in train]
    gen, start = torch.Generator().manual_seed(args.seed), time.time()
    for step in range(1, args.steps + 1):
        batch = [pairs[i] for i in torch.randint(len(pairs), (args.batch_size,), generator=gen)]
        ids, labels, mask = answer_batch(tok_T, batch, "cpu")
        with cast.attached(target, heads):
            logits = target(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == args.steps or (not args.demo and step % 10 == 0):
            print(f"step {step}/{args.steps} | answer loss {loss.item():.3f}", flush=True)
    train_s = time.time() - start
    with cast.attached(target, heads):
        acc = evaluate.task_accuracy(target, tok_T, test)
        nll = evaluate.answer_nll(target, tok_T, test)
    print(f"heads on {[h.target_name for h in heads][:8]}... ({len(heads)})")
    print(f"heads trained on the answers, {args.target}: strict {acc['strict']:.3f} ({acc['strict_ci'][0]:.2f}-"
          f"{acc['strict_ci'][1]:.2f}) | flexible {acc['flexible']:.3f} ({acc['flexible_ci'][0]:.2f}-"
          f"{acc['flexible_ci'][1]:.2f}) | answer NLL {nll:.3f} | training {train_s:.0f}s, "
          f"scoring {time.time() - start - train_s:.0f}s | outputs {acc['outputs'][:3]}")


if __name__ == "__main__":
    main()
