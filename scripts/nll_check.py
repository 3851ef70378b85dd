"""Why the same teacher scores the same strict accuracy but another answer NLL on another machine.

On an H200 (transformers 5.17) the teacher (SmolLM2 + its cartridge) scored strict 0.650 like on our CPU
(transformers 5.24), but answer NLL 0.497 against 0.062, and its outputs there ended with a newline. One
improbable end-of-text label per answer adds about 0.4 nats per token, so the first suspect is the
end-of-text id of each version's GGUF conversion. This prints, in one call, everything that separates the
suspects: versions, model and cartridge hashes, the special ids (tokenizer, config, generation config), and
per device / dtype / attention kernel the answer NLL split into its end-of-text label and the rest, with
the first greedy outputs (repr, so a trailing newline shows).

    python scripts/nll_check.py [--model smollm2-135m] [--cartridge cartridges/smollm2-arith] [--n 64]

On a GPU machine it runs the CPU rows too, so the two sets are from one machine and one library version;
compare with the CPU rows printed on another machine (results/nll_check/).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import answer_batch, arithmetic_problems, prompt  # noqa: E402
from models import ALIASES, _gguf_file, load_model, resolve_model  # noqa: E402
from runs import folder_sha256, provenance  # noqa: E402
from evaluate import generate  # noqa: E402
from lora import load_lora  # noqa: E402


@torch.no_grad()
def split_nll(model, tokenizer, problems, batch_size: int = 16) -> dict:
    """Mean NLL per answer token, and apart: the last label of each answer (end of text) and the others."""
    device = next(model.parameters()).device
    end, rest, n_end, n_rest = 0.0, 0.0, 0, 0
    for i in range(0, len(problems), batch_size):
        pairs = [(prompt(p["question"]), " " + p["answer"]) for p in problems[i:i + batch_size]]
        ids, labels, mask = answer_batch(tokenizer, pairs, device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)  # (B, T-1, V)
        target, keep = labels[:, 1:], labels[:, 1:] != -100  # (B, T-1)
        nll = -logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]  # (B, T-1)
        last = keep.cumsum(1) == keep.sum(1, keepdim=True)  # the last kept label of each row: end of text
        is_end = keep & last
        end += nll[is_end].sum().item()
        rest += nll[keep & ~is_end].sum().item()
        n_end, n_rest = n_end + is_end.sum().item(), n_rest + (keep & ~is_end).sum().item()
    return {"nll": (end + rest) / (n_end + n_rest), "nll_end_label": end / n_end, "nll_other_labels": rest / n_rest}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cartridge", default="cartridges/smollm2-arith", help="'none': the bare model's rows only")
    ap.add_argument("--n", type=int, default=64, help="validation problems")
    ap.add_argument("--out", default="", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    problems = arithmetic_problems(args.n, "validation")
    model, tokenizer = load_model(args.model, "cpu", torch.float32)
    record = provenance({"model": args.model}, {"model": tokenizer})
    record["cartridge_sha256"] = folder_sha256(args.cartridge) if args.cartridge != "none" else None
    record["config_eos_token_id"] = model.config.eos_token_id
    record["generation_config_eos_token_id"] = model.generation_config.eos_token_id
    record["eos_token"] = tokenizer.eos_token
    if args.model in ALIASES:  # the end of text the GGUF conversion itself gives, before agree_end_of_text
        from transformers import AutoTokenizer
        gguf = _gguf_file(args.model)
        raw = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        record["gguf_tokenizer_eos"] = [raw.eos_token, raw.eos_token_id]
    record["answer_tail_ids"] = tokenizer(" " + problems[0]["answer"], add_special_tokens=False)["input_ids"][-3:] \
        + [tokenizer.eos_token_id]
    print(json.dumps(record, indent=1), flush=True)
    rows = []
    settings = [("cpu", torch.float32)] + ([("cuda", torch.float32), ("cuda", torch.bfloat16)]
                                          if torch.cuda.is_available() else [])
    for device, dtype in settings:
        for attn in ("sdpa", "eager"):
            from transformers import AutoModelForCausalLM
            path = resolve_model(args.model)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device).eval()
            bare = split_nll(model, tokenizer, problems)
            if args.cartridge != "none":
                load_lora(model, args.cartridge)
            cart = split_nll(model, tokenizer, problems)  # with --cartridge none: the bare model's rows again
            outputs = generate(model, tokenizer, [prompt(p["question"]) for p in problems[:3]])
            row = {"device": device, "dtype": str(dtype).split(".")[-1], "attn": attn, "bare": bare,
                   "teacher": cart, "teacher_outputs": outputs}
            rows.append(row)
            print(f"{device} {row['dtype']} {attn:5s} | bare nll {bare['nll']:.3f} (end {bare['nll_end_label']:.3f}, "
                  f"other {bare['nll_other_labels']:.3f}) | teacher nll {cart['nll']:.3f} (end "
                  f"{cart['nll_end_label']:.3f}, other {cart['nll_other_labels']:.3f}) | {outputs!r}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"provenance": record, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
