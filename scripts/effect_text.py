"""Effect-selected text: keep the candidate texts where the cartridge changes the source most (issue 34, lever 1).

Each candidate is scored by the cartridge's own effect on the source, the mean over its positions of

    KL( p(source + cartridge) || p(source) )

(no task data: only the source and its cartridge), and the top --keep are written as a .jsonl corpus for
`python train.py --corpus FILE`. Candidates: the teacher's own prompt-format samples (the text --corpus format
writes, read from its cache; --write N has the teacher write N of them first) and chunks of the standard
library's docstrings. Prints the effect's spread and a few kept texts.

    python scripts/effect_text.py --source smollm2-135m --cartridge cartridges/smollm2-arith \
        --docstrings 2700 --keep 316 --out runs/levers/effect.jsonl
"""
import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lora  # noqa: E402
import teacher  # noqa: E402
from config import Config  # noqa: E402
from data import chunk_texts, load_model, pad_batch, read_corpus, split_corpus  # noqa: E402
from memory import use_cores  # noqa: E402


def cartridge_on(model, on: bool) -> None:
    """Switch every LoRA layer's update on (its own scale) or off (scale 0)."""
    for layer in lora.lora_layers(model).values():
        layer.scale = (layer.alpha / (layer.r ** 0.5 if layer.use_rslora else layer.r)) if on else 0.0


@torch.no_grad()
def effect(model, tok, texts: list[str], seq_len: int, batch_size: int = 8) -> list[float]:
    """The cartridge's effect on the source for each text: mean over its positions of KL(p_cart || p_bare)."""
    scores, device = [], next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for first in range(0, len(texts), batch_size):
        rows = [tok(t, add_special_tokens=False)["input_ids"][:seq_len] or [pad] for t in texts[first:first + batch_size]]
        ids, mask = pad_batch(rows, pad, device)  # (B, T)
        logp = {}
        for on in (True, False):
            cartridge_on(model, on)
            logp[on] = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # (B, T, V)
        cartridge_on(model, True)
        kl = (logp[True].exp() * (logp[True] - logp[False])).sum(-1)  # (B, T)
        scores += ((kl * mask).sum(1) / mask.sum(1)).tolist()
        del logp
    return scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=Config.source)
    ap.add_argument("--cartridge", default=Config.cartridge)
    ap.add_argument("--write", type=int, default=300, help="teacher-written prompt-format samples (cached)")
    ap.add_argument("--docstrings", type=int, default=2700, help="docstring chunks among the candidates")
    ap.add_argument("--keep", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=Config.seq_len)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help=".jsonl corpus to write")
    args = ap.parse_args(argv)
    use_cores()
    if Path(args.out).exists():
        raise SystemExit(f"error: {args.out} exists")
    t0 = time.time()
    model, tok = load_model(args.source, "cpu", torch.float32)
    cfg = Config(source=args.source, cartridge=args.cartridge, seq_len=args.seq_len, seed=args.seed)
    written = teacher.teacher_corpus(cfg, args.write, tok, "cpu", torch.float32)[0] if args.write else []
    docs = chunk_texts(split_corpus(read_corpus("stdlib"))[0], tok, args.seq_len)
    docs = random.Random(args.seed).sample(docs, min(args.docstrings, len(docs)))
    candidates = written + docs
    lora.load_lora(model, args.cartridge)
    scores = effect(model, tok, candidates, args.seq_len)
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])[: args.keep]
    n_w = len(written)
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    kept_w = sum(i < n_w for i in order)
    print(f"{len(candidates)} candidates ({n_w} written, {len(docs)} docstring chunks) scored in {time.time() - t0:.0f}s"
          f" | mean effect: written {mean(scores[:n_w]):.4f}, docstrings {mean(scores[n_w:]):.4f}"
          f" | kept {args.keep}: {kept_w} written, {args.keep - kept_w} docstrings, effect "
          f"{scores[order[-1]]:.4f}-{scores[order[0]]:.4f}")
    for i in order[:3] + order[-2:]:
        print(f"  {scores[i]:.4f} {'written' if i < n_w else 'docstring'}: {candidates[i][:150]!r}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out + ".tmp")
    tmp.write_text("".join(json.dumps({"text": candidates[i], "effect": round(scores[i], 5)}) + "\n" for i in order))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
