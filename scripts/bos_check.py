"""What a Gemma-3 cartridge's teacher writes after 'Question:' with the <bos> its tokenizer adds (as the cartridge was
trained and is scored, and as train.py's teacher writes from commit 03f622b) and without it (as it wrote before).
The teacher's text (train.py, --corpus format) starts from these questions.

    python scripts/bos_check.py CARTRIDGE [--model gemma3-270m] [--n 32] [--tokens 40]

Prints, for each leg, how many of the n questions (the first non-empty line, as train.py keeps it) hold a digit
and how many two numbers with an operator between them, and the first four questions.
"""
import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora import load_lora  # noqa: E402
from models import load_model  # noqa: E402
from train import OPENING, first_question  # noqa: E402  ('Question:', and the question a text holds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cartridge")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=40)
    args = ap.parse_args()
    model, tok = load_model(args.model, "cpu", torch.float32)
    load_lora(model, args.cartridge)
    for bos in (False, True):
        batch = torch.tensor(tok([OPENING] * args.n, add_special_tokens=bos)["input_ids"])  # (n, prompt length)
        torch.manual_seed(0)
        t0 = time.time()
        out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=args.tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        texts = [tok.decode(row, skip_special_tokens=True) for row in out]
        questions = [first_question(t) for t in texts]
        digit = sum(bool(re.search(r"\d", q)) for q in questions)
        operator = sum(bool(re.search(r"\d+\s*[-+*/x×÷]\s*\d+", q)) for q in questions)
        leg = f"{'with' if bos else 'without'} <bos> (prompt ids {batch[0].tolist()})"
        print(f"{leg}: {digit}/{args.n} questions hold a digit, {operator}/{args.n} two numbers with an operator "
              f"between them ({time.time() - t0:.0f}s)")
        for q in questions[:4]:
            print("   ", repr(q[:100]))


if __name__ == "__main__":
    main()
