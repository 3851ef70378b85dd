"""Factored heads: train the target LoRA's factors A_T, B_T directly instead of P_in, P_out (issue 34, lever 4).

CAST with linear heads trains P_in (d_in_S, d_in_T) and P_out (d_out_T, d_out_S), but only their products with the
frozen kernel reach the target:

    A_T = A_S P_in  (r, d_in_T),   B_T = P_out B_S  (d_out_T, r)

so the same function class has r (d_in_T + d_out_T) parameters per site instead of d_in_S d_in_T + d_out_S d_out_T.
This script starts A_T, B_T from train.py's own start (ridge, or ridge-in with B_T = 0), puts the MSE on the
kernel's code, MSE(A_T x_T, A_S x_S) / Var(A_S x_S), trains with train.fit (the same relative step, step factor
and schedule), and writes a run folder that evaluate.py scores: its heads.safetensors holds the minimum-norm
P_in = A_S^+ A_T and P_out = B_T B_S^+, which give back A_T and B_T exactly (A_S has full row rank r).

    python scripts/factored_heads.py [train.py flags ...]        e.g. the demo's legs:
    python scripts/factored_heads.py --source runs/demo/models/source --cartridge runs/demo/cartridge \
        --target runs/demo/models/gemma --corpus runs/demo/world/corpus.txt --task runs/demo/world/task.jsonl \
        --steps 300 --seq-len 64 --max-chunks 0 --monitor 16 --cache-mb 256 --out runs/factored/different
"""
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cast  # noqa: E402
import teacher  # noqa: E402
import train  # noqa: E402
from config import parse_config  # noqa: E402
from data import check_run_folder, load_model, partial, write_json  # noqa: E402
from memory import free_memory, peak_memory_mb, reset_peak_memory, use_cores  # noqa: E402


class Code(nn.Module):
    """x_T -> A_T x_T: the kernel's code on the target side (what the MSE compares with A_S x_S)."""

    def __init__(self, A_T: nn.Parameter):
        super().__init__()
        self.A_T = A_T

    def forward(self, x):  # (N, d_in_T) -> (N, r)
        return x @ self.A_T.T


class FactoredHead(nn.Module):
    """A_T and B_T trained directly around one frozen kernel; started from a trained Head's P_in, P_out."""

    def __init__(self, head: cast.Head, B_T_scale_from: torch.Tensor):
        super().__init__()
        self.source_name, self.target_name, self.scale = head.source_name, head.target_name, head.scale
        self.register_buffer("A_S", head.A_S.clone())
        self.register_buffer("B_S", head.B_S.clone())
        A_T, B_T = head.target_factors()
        self.A_T = nn.Parameter(A_T.detach().clone())  # (r, d_in_T)
        self.B_T = nn.Parameter(B_T.detach().clone())  # (d_out_T, r)
        self.P_in = Code(self.A_T)  # for losses.cast_loss's MSE: h.P_in(x_T) is the code A_T x_T
        self.B_T_rms = B_T_scale_from.pow(2).mean().sqrt().item()  # ridge-in starts B_T at 0: its step scale
        self.x_T = None

    def target_factors(self):
        return self.A_T, self.B_T

    def forward(self, x_T):  # (B, T, d_in_T)
        return self.scale * (x_T @ self.A_T.T) @ self.B_T.T  # (B, T, d_out_T)

    def as_head(self, head: cast.Head) -> cast.Head:
        """Write P_in = A_S^+ A_T, P_out = B_T B_S^+ into `head`: then A_S P_in = A_T and P_out B_S = B_T."""
        head.P_in.weight.data.copy_(torch.linalg.pinv(self.A_S.double()) @ self.A_T.detach().double())
        head.P_out.weight.data.copy_(self.B_T.detach().double() @ torch.linalg.pinv(self.B_S.double()))
        return head


def main(argv=None):
    cfg = parse_config(argv, __doc__)
    use_cores()
    check_run_folder(cfg.out, cfg.force, False, cfg.ckpt_every)
    torch.manual_seed(cfg.seed)
    kernels, vocab_T, cache, device, dtype = train.prepare(cfg)
    target, tok_T = load_model(cfg.target, device, dtype)
    heads = cast.make_heads(kernels, target).to(device)
    train.ridge_start(cfg, target, heads, cache, tok_T.pad_token_id or 0)
    ridge_B_T = [h.target_factors()[1].detach().clone() for h in heads]  # before ridge-in zeroes P_out
    del tok_T, cache["ridge_x_S"], cache["ridge_y_S"]  # as train.train does before training
    teacher.to_device(cache, device)
    free_memory()
    run = partial(cfg.out)
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    probe = train.make_optimizer(cfg, heads)  # choose_start multiplies its lr_scale by the step factor
    record = train.choose_start(cfg, target, heads, cache, vocab_T, probe, run)
    factored = nn.ModuleList(FactoredHead(h, b) for h, b in zip(heads, ridge_B_T)).to(device)
    # the MSE on the code: x_S -> A_S x_S (r values a position), its variance per site
    for k in kernels:
        code = cache["x_S"][k.source_name].float() @ k.A_S.T.to(cache["x_S"][k.source_name].device)  # (M, r)
        cache["x_S"][k.source_name] = code.half()
        cache["var_S"][k.source_name] = code.var().item()
    gap = record["step_gap"]
    groups = []
    for h in factored:
        groups.append({"params": [h.A_T], "lr_scale": h.A_T.detach().pow(2).mean().sqrt().item() * gap})
        groups.append({"params": [h.B_T], "lr_scale": h.B_T_rms * gap})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    n_full, n_fact = sum(p.numel() for p in heads.parameters()), sum(p.numel() for p in factored.parameters())
    print(f"factored heads: {n_fact / 1e6:.3f}M parameters (full heads {n_full / 1e6:.2f}M)")
    (run / "log.jsonl").write_text(json.dumps({**record, "factored": True, "parameters": n_fact}) + "\n")
    write_json(run / "config.json", {**dataclasses.asdict(cfg), "factored_heads": True,
                                     "provenance": cache["provenance"]})
    del heads, probe
    reset_peak_memory(device)
    t0 = time.time()
    train.fit(cfg, target, factored, cache, vocab_T, opt, run, 0)
    seconds, peak = time.time() - t0, peak_memory_mb(device)
    full = cast.make_heads(kernels, target)  # P_in, P_out that give the trained A_T, B_T exactly
    for f, h in zip(factored, full):
        f.as_head(h)
    cast.save_heads(full, run / "heads.safetensors", {"source": cfg.source, "target": cfg.target,
                                                       "cartridge": cfg.cartridge, "factored": "true"})
    cast.export_lora(factored, run / "lora", base_model_name_or_path=cfg.target, force=True)
    (run / "checkpoint.pt").unlink(missing_ok=True)
    shutil.rmtree(cfg.out, ignore_errors=True)
    os.replace(run, cfg.out)
    print(f"wrote {cfg.out} | {seconds:.0f}s training, {seconds / cfg.steps:.3f} s a step | peak {peak:.0f} MB")


if __name__ == "__main__":
    main()
