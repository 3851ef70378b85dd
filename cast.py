"""CAST: run a frozen source LoRA ("cartridge") inside a target model through linear heads.

For every cartridge kernel (one source layer, one module role) CAST learns two heads:

    y_T = W_T x_T + P_out( s * B_S A_S ( P_in x_T ) )                     (the paper's mechanism)

    P_in: d_in_T -> d_in_S,  P_out: d_out_S -> d_out_T    trainable, no bias
    A_S: (r, d_in_S), B_S: (d_out_S, r), s                frozen, straight from the cartridge

Because the heads are linear the whole path is a rank-r LoRA on the target:

    A_T = A_S P_in  (r, d_in_T),   B_T = P_out B_S  (d_out_T, r)          (export)

Shapes: B batch, T tokens, r rank. SmolLM2-135M -> Gemma-3-270M, q_proj, r = 8: P_in is (576, 640),
P_out (1024, 576); A_T is (8, 640), B_T (1024, 8).
"""
import contextlib
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora import PEFT_PREFIX, adapter_config, linear_names, write_adapter


# ----------------------------------------------------------------------------- sites and layer map

def layer_map(n_source: int, n_target: int) -> list[int]:
    """Source layer i -> target layer j = round(i * (L_T - 1) / (L_S - 1)), rounding halves up."""
    if n_source == 1:
        return [0]
    return [math.floor(i * (n_target - 1) / (n_source - 1) + 0.5) for i in range(n_source)]


def layer_and_role(name: str) -> tuple[int, str]:
    """'model.layers.7.self_attn.q_proj' -> (7, 'q_proj')."""
    found = re.search(r"\.(\d+)\.", name)
    if found is None:
        raise ValueError(f"module {name} has no layer index; CAST maps modules inside numbered decoder layers")
    return int(found.group(1)), name.split(".")[-1]


@dataclass
class Kernel:
    """One frozen cartridge kernel and the target module it is moved to."""
    source_name: str  # e.g. model.layers.7.self_attn.q_proj
    target_name: str  # e.g. model.layers.4.self_attn.q_proj
    A_S: torch.Tensor  # (r, d_in_S)
    B_S: torch.Tensor  # (d_out_S, r)
    scale: float  # s = alpha / r, or alpha / sqrt(r) with rsLoRA


def find_kernels(config: dict, factors: dict, source: nn.Module, target: nn.Module) -> list[Kernel]:
    """Pair each cartridge kernel with its target module (same role, mapped layer), checking every shape."""
    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    source_linears = {n: source.get_submodule(n) for n in linear_names(source)}
    target_sites = {layer_and_role(n): n for n in linear_names(target) if re.search(r"\.\d+\.", n)}
    target_roles = sorted({role for _, role in target_sites})
    mapping = layer_map(source.config.num_hidden_layers, target.config.num_hidden_layers)
    kernels = []
    for name in sorted(factors, key=lambda n: (layer_and_role(n), n)):
        A, B = factors[name]["A"], factors[name]["B"]
        if name not in source_linears:
            raise ValueError(f"the cartridge has a kernel for {name}, which the source model lacks; "
                             "was it made for another source model?")
        base = source_linears[name]
        base = getattr(base, "base", base)  # a LoRALinear wraps the nn.Linear
        if A.shape != (r, base.in_features) or B.shape != (base.out_features, r):
            raise ValueError(f"the cartridge's {name} has A {tuple(A.shape)}, B {tuple(B.shape)}; the source model "
                             f"needs A {(r, base.in_features)}, B {(base.out_features, r)}")
        layer, role = layer_and_role(name)
        if role not in target_roles:
            raise ValueError(f"the cartridge adapts '{role}', which the target model lacks; "
                             f"the target's module roles are {target_roles}")
        kernels.append(Kernel(name, target_sites[(mapping[layer], role)], A.float(), B.float(), scale))
    return kernels


# ----------------------------------------------------------------------------- heads and hooks

class Head(nn.Module):
    """P_in and P_out around one frozen kernel (A_S, B_S, s)."""

    def __init__(self, kernel: Kernel, d_in_T: int, d_out_T: int):
        super().__init__()
        d_in_S, d_out_S = kernel.A_S.shape[1], kernel.B_S.shape[0]
        self.source_name, self.target_name, self.scale = kernel.source_name, kernel.target_name, kernel.scale
        self.P_in = nn.Linear(d_in_T, d_in_S, bias=False)  # weight (d_in_S, d_in_T)
        self.P_out = nn.Linear(d_out_S, d_out_T, bias=False)  # weight (d_out_T, d_out_S)
        self.register_buffer("A_S", kernel.A_S.clone())  # (r, d_in_S), frozen: buffers get no gradient
        self.register_buffer("B_S", kernel.B_S.clone())  # (d_out_S, r)
        self.x_T = None  # the target module input of the last forward, kept for the MSE when capturing

    def target_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # A_T = A_S P_in,  B_T = P_out B_S
        A_T = self.A_S @ self.P_in.weight  # (r, d_in_S) @ (d_in_S, d_in_T) -> (r, d_in_T)
        B_T = self.P_out.weight @ self.B_S  # (d_out_T, d_out_S) @ (d_out_S, r) -> (d_out_T, r)
        return A_T, B_T

    def forward(self, x_T: torch.Tensor) -> torch.Tensor:  # x_T: (B, T, d_in_T)
        # delta_T = P_out( s * B_S A_S (P_in x_T) ) = s * B_T (A_T x_T): the same numbers, rank-r cost per token
        A_T, B_T = self.target_factors()
        return self.scale * (x_T @ A_T.T) @ B_T.T  # (B,T,d_in_T) -> (B,T,r) -> (B,T,d_out_T)


def make_heads(kernels: list[Kernel], target: nn.Module) -> nn.ModuleList:
    """One Head per kernel, sized by its target module; P_in and P_out start as nn.Linear's random init."""
    modules = [target.get_submodule(k.target_name) for k in kernels]
    return nn.ModuleList(Head(k, m.in_features, m.out_features) for k, m in zip(kernels, modules))


@contextlib.contextmanager
def attached(target: nn.Module, heads: nn.ModuleList, capture: bool = False):
    """Forward hooks that add each head's delta_T to its target module's output; removed on exit (the target
    is then exactly as it was). With capture, each head keeps its input x_T."""
    def hook_for(head):
        def hook(module, args, output):
            x_T = args[0]
            if capture:
                head.x_T = x_T
            return output + head(x_T.to(head.A_S.dtype)).to(output.dtype)
        return hook
    handles = [target.get_submodule(h.target_name).register_forward_hook(hook_for(h)) for h in heads]
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        for head in heads:
            head.x_T = None


@contextlib.contextmanager
def captured(model: nn.Module, names: list[str]):
    """Record each named module's input and output on every forward: {name: (x (B, T, d_in), y (B, T, d_out))}."""
    store = {}
    def hook_for(name):
        def hook(module, args, output):
            store[name] = (args[0], output)
        return hook
    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def save_heads(heads: nn.ModuleList, path, metadata: dict):
    """P_in / P_out of every kernel, each kernel's identity in the file's metadata; written, then renamed."""
    tensors = {f"{i}.{p}.weight": getattr(h, p).weight.detach().float().contiguous().cpu()
               for i, h in enumerate(heads) for p in ("P_in", "P_out")}
    kernels = [{"source": h.source_name, "target": h.target_name, "scale": h.scale, "rank": h.A_S.shape[0]}
               for h in heads]
    save_file(tensors, f"{path}.tmp", metadata={"kernels": json.dumps(kernels), **metadata})
    os.replace(f"{path}.tmp", path)


def load_heads(heads: nn.ModuleList, path):
    """Load P_in / P_out saved by save_heads into heads built for the same kernels (checked by name)."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        saved = [(k["source"], k["target"]) for k in json.loads(f.metadata()["kernels"])]
    if saved != [(h.source_name, h.target_name) for h in heads]:
        raise ValueError(f"{path} holds heads for other kernels than this cartridge and target pair")
    for i, h in enumerate(heads):
        h.P_in.weight.data.copy_(tensors[f"{i}.P_in.weight"])
        h.P_out.weight.data.copy_(tensors[f"{i}.P_out.weight"])


# ----------------------------------------------------------------------------- ridge initialisation

def ridge_fit(X: torch.Tensor, Y: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """W (d_Y, d_X) minimising |X W^T - Y|^2 + lam |W|^2 with lam = ridge * mean eigenvalue of X^T X / N."""
    X, Y = X.double(), Y.double()  # (N, d_X), (N, d_Y)
    gram = X.T @ X / len(X)  # (d_X, N) @ (N, d_X) -> (d_X, d_X)
    lam = ridge * gram.diagonal().mean()
    # W^T = (X^T X / N + lam I)^-1 X^T Y / N
    W_T = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=X.dtype), X.T @ Y / len(X))  # (d_X, d_Y)
    return W_T.T.float()


# ----------------------------------------------------------------------------- export

def export_lora(heads: nn.ModuleList, out_dir, base_model_name_or_path: str = "", force: bool = False):
    """Write the translated cartridge as an ordinary LoRA for the target (PEFT layout). Kernels on one target
    module are concatenated along the rank, and zero-padded to r = r_S * (most kernels on a module), so one
    lora_alpha = s * r keeps every kernel's scale s (exact)."""
    by_module = {}
    for head in heads:
        A_T, B_T = head.target_factors()
        by_module.setdefault(head.target_name, []).append((A_T.detach(), B_T.detach()))
    scales = {head.scale for head in heads}
    if len(scales) != 1:
        raise ValueError(f"kernels with different scales {sorted(scales)} cannot share one LoRA file")
    r_S = heads[0].A_S.shape[0]
    r = r_S * max(len(pairs) for pairs in by_module.values())
    tensors = {}
    for name, pairs in by_module.items():
        A = torch.cat([a for a, _ in pairs])  # (n * r_S, d_in_T)
        B = torch.cat([b for _, b in pairs], dim=1)  # (d_out_T, n * r_S)
        A = torch.cat([A, A.new_zeros(r - len(A), A.shape[1])])  # (r, d_in_T)
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1)  # (d_out_T, r)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous().cpu()
    config = adapter_config(r, scales.pop() * r, sorted(by_module), False, base_model_name_or_path)
    return write_adapter(out_dir, config, tensors, force)
