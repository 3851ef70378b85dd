"""An amplified teacher writes the corpus (issue 34, lever 2): the cartridge's behaviour shown more strongly.

As `--corpus format` (the teacher writes questions after 'Question:' and answers them after 'Answer:'), but each
token is sampled from

    log p_cart + g (log p_cart - log p_bare)          (contrastive decoding; g = 0 is the plain teacher)

where p_cart is the source with its cartridge and p_bare without it. Training still uses the plain teacher as
the target distribution: only the text changes. No task problem or answer is read.

    python scripts/amplified_text.py --gain 1 --out runs/levers/amplified1.jsonl
    python train.py --corpus runs/levers/amplified1.jsonl ...     (scripts/levers_real.sh amplified1)
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora  # noqa: E402
from config import Config  # noqa: E402
from data import chunk_texts, load_model  # noqa: E402
from levers_toy import format_corpus  # noqa: E402
from memory import use_cores  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=Config.source)
    ap.add_argument("--cartridge", default=Config.cartridge)
    ap.add_argument("--gain", type=float, required=True, help="g: 0 the plain teacher, 1 and 2 amplified")
    ap.add_argument("--n", type=int, default=Config.max_chunks, help="samples to write")
    ap.add_argument("--seq-len", type=int, default=Config.seq_len)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help=".jsonl corpus to write")
    args = ap.parse_args(argv)
    if Path(args.out).exists():
        raise SystemExit(f"error: {args.out} exists")
    use_cores()
    t0 = time.time()
    model, tok = load_model(args.source, "cpu", torch.float32)
    lora.load_lora(model, args.cartridge)
    texts = [t for t in format_corpus(model, tok, args.n, args.gain, args.seed, args.seq_len) if t.strip()]
    texts = [chunk_texts([t], tok, args.seq_len)[0] for t in texts]  # as teacher_corpus: one chunk each
    marker = sum("####" in t for t in texts)
    print(f"gain {args.gain:g}: {len(texts)} samples written in {time.time() - t0:.0f}s | {marker} contain '####'")
    for t in texts[:3]:
        print(f"  {t[:160]!r}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out + ".tmp")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
