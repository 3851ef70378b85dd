"""Why the weight-space baseline keeps part of the skill on the rotated twin on one machine and none on another:
the signs of the singular vectors. The twin's o_proj is the source's with its output rotated (W_T = R W_S), so its
right singular vectors are the source's up to a sign each; the baseline uses them as they come.

    python scripts/svd_signs.py    # after a run on rotated:smollm2-135m has made the twin
"""
from pathlib import Path

import torch
from safetensors.torch import load_file

models = Path.home() / ".cache/cast/models"
source = load_file(str(models / "smollm2-135m/model.safetensors"))
twin = load_file(str(next(models.glob("rotated-smollm2-135m-seed0-*")) / "model.safetensors"))
for layer in (0, 10, 20, 29):
    key = f"model.layers.{layer}.self_attn.o_proj.weight"
    _, _, Vh_S = torch.linalg.svd(source[key].float())
    _, _, Vh_T = torch.linalg.svd(twin[key].float())
    d = torch.diag(Vh_S @ Vh_T.T)  # +-1 where the two vectors are the same direction
    print(f"layer {layer} o_proj: |v_S . v_T| min {d.abs().min():.3f} | same sign in {int((d > 0).sum())} "
          f"of {len(d)} directions")
