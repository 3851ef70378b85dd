"""Our own LoRA, in plain PyTorch, reading and writing the PEFT file layout.

LoRA (Hu et al. 2021) freezes a linear layer W and learns a low-rank update:

    y = W x + s * B A x        A: (r, d_in), B: (d_out, r), s = alpha / r

Shapes: B batch, T tokens, d_in / d_out the wrapped layer's widths, r the rank.
Worked example, SmolLM2-135M q_proj with r=8: W is (576, 576), A is (8, 576),
B is (576, 8): 9,216 trainable numbers next to 331,776 frozen ones.

A cartridge on disk is a folder in the PEFT layout:
    adapter_config.json          peft_type, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  (r, d_in)
                                 base_model.model.<module path>.lora_B.weight  (d_out, r)
Run as a script, this file makes a cartridge (fine-tunes a LoRA on a task): `python lora.py --model
smollm2-135m --task arithmetic --out cartridges/smollm2-arith`; `python evaluate.py --lora DIR --model NAME`
scores it.
"""
import argparse
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from data import answer_batch, prompt, task_problems
from models import ALIASES, check_model, device_problem, load_model, use_cores

PEFT_PREFIX = "base_model.model."  # PEFT prefixes every key with the wrapper's path
# The learning rate of the LoRA retrained on each embedded model (the denominator of retention), chosen on the
# validation split by scripts/tune_retrained.py (results/retrained_tuning/: among five on Gemma-3, three on
# SmolLM2); --lr's default, 2e-3, is the cartridges' own setting, tuned on SmolLM2.
RETRAINED_LR = {"gemma3-270m": 5e-4, "smollm2-135m": 2e-3}


class LoRALinear(nn.Module):
    """A frozen nn.Linear `base` plus the trainable factors `lora_A`, `lora_B`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, use_rslora: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r  # rsLoRA: alpha / sqrt(r)
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default for A
        nn.init.zeros_(self.lora_B.weight)  # B = 0, so the wrapped layer starts equal to `base`

    def forward(self, x):  # x: (B, T, d_in)
        # y = W x + s * B A x
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))  # (B,T,r) -> (B,T,d_out)


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the model's nn.Linear modules (LoRA wrappers count as their base)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear)) and not _inside_lora(n)]


def _inside_lora(name: str) -> bool:
    return bool(re.search(r"\.(base|lora_A|lora_B)$", name))


def _matches(name: str, target_modules) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list
    entry matches the name itself or its last dotted parts (`q_proj` matches
    `model.layers.0.self_attn.q_proj`)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def add_lora(model: nn.Module, target_modules, r: int = 8, alpha: float = 16, use_rslora: bool = False) -> list[str]:
    """Wrap every matching nn.Linear in a LoRALinear, freeze everything else, return the wrapped names."""
    names = [n for n in linear_names(model) if _matches(n, target_modules)]
    if isinstance(target_modules, str):  # a regex must match something
        unmatched = [] if names else [target_modules]
    else:  # every list entry must match something
        unmatched = [t for t in target_modules if not any(_matches(n, [t]) for n in names)]
    if unmatched:
        roles = sorted({n.split(".")[-1] for n in linear_names(model)})
        raise ValueError(f"target_modules {unmatched} match no nn.Linear in {type(model).__name__}; "
                         f"its linear module names are {roles}")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{name} already carries a LoRA; merge_lora or reload the model first")
        setattr(parent, child, LoRALinear(layer, r, alpha, use_rslora))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_config(r: int, alpha: float, target_modules: list[str], use_rslora: bool = False,
                   base_model_name_or_path: str = "") -> dict:
    """The adapter_config.json of a plain LoRA, with the fields PEFT reads."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": r, "lora_alpha": alpha, "use_rslora": use_rslora, "target_modules": target_modules,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def save_lora(model: nn.Module, out_dir, base_model_name_or_path: str = "", force: bool = False) -> Path:
    """Write the model's LoRA factors in the PEFT layout, atomically (temp folder, then rename)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model carries no LoRA layers; call add_lora or load_lora first")
    first = next(iter(layers.values()))
    config = adapter_config(first.r, first.alpha, sorted({n.split(".")[-1] for n in layers}),
                            first.use_rslora, base_model_name_or_path)
    tensors = {}
    for name, layer in layers.items():
        if (layer.r, layer.alpha, layer.use_rslora) != (first.r, first.alpha, first.use_rslora):
            raise ValueError(f"{name} has another rank or alpha than the rest; one adapter has one r and alpha")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    return write_adapter(out_dir, config, tensors, force)


def write_adapter(out_dir, config: dict, tensors: dict, force: bool = False) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into a temp folder, then rename it to out_dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass force=True (--force) to overwrite it")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def read_adapter(adapter_dir) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Read a PEFT-layout folder: (config, {module path: {"A": (r, d_in), "B": (d_out, r)}})."""
    adapter_dir = Path(adapter_dir)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / f).is_file():
            raise FileNotFoundError(f"{adapter_dir / f} not found; a cartridge folder holds "
                                    "adapter_config.json and adapter_model.safetensors (PEFT layout)")
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{adapter_dir / 'adapter_config.json'} is not valid JSON ({e})") from e
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if not (isinstance(config.get("r"), int) and config["r"] > 0 and number(config.get("lora_alpha"))
            and isinstance(config.get("use_rslora", False), bool)):
        raise ValueError(f"{adapter_dir / 'adapter_config.json'} has r {config.get('r')!r}, lora_alpha "
                         f"{config.get('lora_alpha')!r}, use_rslora {config.get('use_rslora', False)!r}: it needs an "
                         "integer r above 0, a number lora_alpha and a true/false use_rslora (PEFT layout)")
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("bias", "none") != "none" \
            or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters are supported (no DoRA, bias, rank/alpha patterns)")
    kernels: dict[str, dict[str, torch.Tensor]] = {}
    try:
        tensors = load_file(adapter_dir / "adapter_model.safetensors")
    except Exception as e:  # safetensors raises its own error type for a truncated or corrupted file
        raise ValueError(f"{adapter_dir / 'adapter_model.safetensors'} cannot be read ({e}): the file is truncated "
                         "or corrupted; copy or make the cartridge again") from e
    for key, tensor in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise ValueError(f"{adapter_dir}: unexpected key {key}; expected ...<module>.lora_A.weight / lora_B.weight")
        kernels.setdefault(m.group(1), {})[m.group(2)] = tensor
    if not kernels:
        raise ValueError(f"{adapter_dir / 'adapter_model.safetensors'} holds no LoRA weights")
    for name, pair in kernels.items():  # a complete pair, of the rank the config says: A (r, d_in), B (d_out, r)
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: {name} has lora_{next(iter(pair))} but no lora_{'B' if 'A' in pair else 'A'}")
        if pair["A"].dim() != 2 or pair["B"].dim() != 2 or pair["A"].shape[0] != config["r"] \
                or pair["B"].shape[1] != config["r"]:
            raise ValueError(f"{adapter_dir}: adapter_config.json says r = {config['r']}, but {name} has lora_A "
                             f"{tuple(pair['A'].shape)} and lora_B {tuple(pair['B'].shape)} (expected (r, d_in) "
                             "and (d_out, r)); the config and the weights do not belong together")
    return config, kernels


def load_lora(model: nn.Module, adapter_dir) -> list[str]:
    """Wrap the modules named in a PEFT-layout adapter and load its factors; returns the wrapped names."""
    config, kernels = read_adapter(adapter_dir)
    missing = sorted(set(kernels) - set(linear_names(model)))
    if missing:
        raise ValueError(f"{adapter_dir} has LoRA weights for {missing[0]} (and {len(missing) - 1} more), "
                         f"which {type(model).__name__} lacks; was it made for another base model?")
    names = add_lora(model, sorted(kernels), config["r"], config["lora_alpha"], config.get("use_rslora", False))
    for name, layer in lora_layers(model).items():
        for part, param in (("A", layer.lora_A.weight), ("B", layer.lora_B.weight)):
            tensor = kernels[name][part]
            if tensor.shape != param.shape:
                raise ValueError(f"{adapter_dir}: lora_{part} of {name} has shape {tuple(tensor.shape)}, "
                                 f"the model needs {tuple(param.shape)}; was it made for another base model?")
            param.data.copy_(tensor)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold s * B A into each base weight and put the plain nn.Linear back."""
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        with torch.no_grad():
            # W' = W + s * B A
            layer.base.weight += layer.scale * (layer.lora_B.weight @ layer.lora_A.weight)  # (d_out,r)@(r,d_in)
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model


def finetune_lora(model, tokenizer, pairs: list[tuple[str, str]], steps: int, batch_size: int = 16,
                  lr: float = 2e-3, seed: int = 0, log_every: int = 10) -> list[float]:
    """Train only the LoRA factors on (prompt, answer) pairs, loss on answer tokens; returns the losses."""
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    if not params or not all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad):
        raise ValueError("finetune_lora trains LoRA factors only: call add_lora first")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen, device, losses = torch.Generator().manual_seed(seed), next(model.parameters()).device, []
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        batch = [pairs[i] for i in torch.randint(len(pairs), (batch_size,), generator=gen)]
        ids, labels, mask = answer_batch(tokenizer, batch, device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
        # next-token cross-entropy on answer tokens: -mean log p(y_t | y_<t)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            left = (time.time() - t0) / step * (steps - step) / 60
            print(f"lora step {step}/{steps} | loss {loss.item():.4f} | about {left:.1f} min left", flush=True)
    model.eval()
    return losses


def main(argv=None):
    """`python lora.py --model NAME --task arithmetic --out DIR`: fine-tune a LoRA cartridge on a task's training
    problems and save it; `python evaluate.py --lora DIR --model NAME` scores it."""
    ap = argparse.ArgumentParser(description="Make a LoRA cartridge for a task (PEFT layout).")
    ap.add_argument("--model", default="smollm2-135m", help=f"alias ({', '.join(ALIASES)}), folder or HF id")
    ap.add_argument("--task", default="arithmetic", help="'arithmetic' or a GSM8K-format .jsonl file")
    ap.add_argument("--out", required=True, help="cartridge folder to write")
    ap.add_argument("--steps", type=int, default=150, help="about 50 steps learn the format, 150 the arithmetic")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16, help="LoRA scale s = alpha / rank")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="attention only: MLP adds cost, no gain")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=None, help="training problems (default: the whole train split)")
    ap.add_argument("--n-held", type=int, default=200, help="rows of a GSM8K file held out for each of the validation "
                    "and test splits (evaluate.py --n-held must agree)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out folder")
    args = ap.parse_args(argv)
    use_cores()
    if Path(args.out).exists() and not args.force:
        raise SystemExit(f"error: {args.out} exists; pass --force to overwrite it")
    rules = [("steps", args.steps >= 1, "at least 1"), ("rank", args.rank >= 1, "at least 1"),
             ("alpha", args.alpha > 0 and math.isfinite(args.alpha), "a number above 0"),
             ("lr", args.lr > 0 and math.isfinite(args.lr), "a number above 0, e.g. 2e-3"),
             ("batch-size", args.batch_size >= 1, "at least 1"),
             ("n-train", args.n_train is None or args.n_train >= 1, "at least 1 (or leave it out: the whole split)")]
    for flag, holds, right in rules:  # before the model is loaded
        if not holds:
            raise SystemExit(f"error: --{flag} {getattr(args, flag.replace('-', '_'))!r}: should be {right}")
    if problem := device_problem(args.device, args.dtype):
        raise SystemExit(f"error: {problem}")
    try:
        check_model(args.model)
        train = task_problems(args.task, "train", args.n_train, args.n_held)  # never a validation or test problem
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    pairs = [(prompt(p["question"]), " " + p["answer"]) for p in train]
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    start = time.time()
    add_lora(model, args.targets.split(","), args.rank, args.alpha)
    finetune_lora(model, tokenizer, pairs, args.steps, args.batch_size, args.lr, args.seed)
    save_lora(model, args.out, base_model_name_or_path=args.model, force=args.force)
    hint = f" | score it: python evaluate.py --lora {args.out} --model {args.model} --task {args.task}"
    in_partial = any(part.endswith(".partial") for part in Path(args.out).parts)  # the demo's: renamed at its end
    print(f"wrote {args.out} | {time.time() - start:.0f}s" + ("" if in_partial else hint))


if __name__ == "__main__":
    main()
