"""The known answer for a source and its rotated twin (`--target rotated:NAME`): exact CAST heads, and how far a
run's heads are from them.

    python scripts/twin_heads.py --run runs/twin                      # the run's heads' error per kernel
    python scripts/twin_heads.py --run runs/twin --export DIR         # also write the exactly moved cartridge

With the twin's residual stream h' = Q^T h and the RMSNorm scales g folded into the readers (data.rotate_residual):
    q/k/v, gate/up (read the normed stream):  x_S = diag(g) Q x_T   ->  P_in* = diag(g) Q,   P_out* = I
    o_proj, down_proj (write the stream):     x_S = x_T             ->  P_in* = I,           P_out* = Q^T
The exported LoRA of these heads computes exactly what the teacher computes: it is the denominator for retention.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cast  # noqa: E402
from models import load_model, rotation  # noqa: E402
from lora import read_adapter  # noqa: E402

READERS = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
           "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}


@torch.no_grad()
def exact_twin_heads(heads, original, seed: int = 0):
    """Set every head to the exact map between `original` and its rotated twin (same layer count)."""
    Q = rotation(original.config.hidden_size, seed).float()  # (d, d)
    for h in heads:
        layer, role = cast.layer_and_role(h.source_name)
        eye_in, eye_out = torch.eye(h.P_in.weight.shape[1]), torch.eye(h.P_out.weight.shape[0])
        if role in READERS:
            g = getattr(original.model.layers[layer], READERS[role]).weight.float()  # (d,)
            h.P_in.weight.copy_(g[:, None] * Q)  # diag(g) Q: (d, d)
            h.P_out.weight.copy_(eye_out)
        else:
            h.P_in.weight.copy_(eye_in)
            h.P_out.weight.copy_(Q.T)
    return heads


def relative_errors(heads, exact) -> dict:
    """Per kernel: |A_S P_in - A_S P_in*| / |A_S P_in*| and |P_out B_S - P_out* B_S| / |P_out* B_S| (Frobenius)."""
    out = {}
    for h, e in zip(heads, exact):
        (A, B), (A_e, B_e) = h.target_factors(), e.target_factors()
        out[h.source_name] = ((A - A_e).norm() / A_e.norm()).item(), ((B - B_e).norm() / B_e.norm()).item()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder of train.py with --target rotated:NAME")
    ap.add_argument("--export", default="", help="write the exactly moved cartridge (PEFT layout) here")
    args = ap.parse_args(argv)
    cfg = json.loads((Path(args.run) / "config.json").read_text())
    if not cfg["target"].startswith("rotated:") or cfg["target"][len("rotated:"):] != cfg["source"]:
        raise SystemExit(f"error: {args.run} is not a run onto the source's own rotated twin")
    source, _ = load_model(cfg["source"], "cpu", torch.float32)
    twin, _ = load_model(cfg["target"], "cpu", torch.float32)
    config, factors = read_adapter(cfg["cartridge"])
    kernels = cast.find_kernels(config, factors, source, twin)
    exact = exact_twin_heads(cast.make_heads(kernels, twin), source)
    if args.export:
        cast.export_lora(exact, args.export, base_model_name_or_path=cfg["target"])
        print(f"wrote {args.export}")
    start = Path(args.run) / "heads_start.safetensors"  # in older run folders; a --steps 0 run holds the start
    for label, path in (("start", start), ("end", Path(args.run) / "heads.safetensors")):
        if not path.is_file():
            continue
        heads = cast.make_heads(kernels, twin)
        cast.load_heads(heads, path)
        errors = relative_errors(heads, exact)
        a, b = sorted(e[0] for e in errors.values()), sorted(e[1] for e in errors.values())
        print(f"{label} heads vs exact | A_S P_in: median {a[len(a) // 2]:.4f} max {a[-1]:.4f} | "
              f"P_out B_S: median {b[len(b) // 2]:.4f} max {b[-1]:.4f} | {len(errors)} kernels")


if __name__ == "__main__":
    main()
