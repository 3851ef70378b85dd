"""The settings of a run: one dataclass, one command-line flag per field (`python train.py -h` lists them).

Each field's comment says what it does; config.json in a run folder records them all. --paper-recipe sets the
recipe the paper describes (PAPER_RECIPE); a flag given beside it wins. A value out of range stops the run in one
line before anything is loaded (config_problem).
"""
import argparse
import dataclasses
import math
import re
from dataclasses import dataclass


@dataclass
class Config:
    source: str = "smollm2-135m"  # embedded alias, local folder or Hugging Face id
    cartridge: str = "cartridges/smollm2-arith"  # PEFT-layout LoRA of the source; made by lora.py if missing
    target: str = "gemma3-270m"  # another architecture, another tokenizer; rotated:NAME = NAME rotated
    corpus: str = "format"  # format = the teacher writes questions in the prompt format and answers them; stdlib
    #                          = the standard library's docstrings; or a .txt/.jsonl file or a folder of them
    out: str = "runs/smollm2-to-gemma3"  # run folder: config, log, heads, exported LoRA
    steps: int = 1000  # the paper's budget
    batch_size: int = 4  # chunks per step
    seq_len: int = 128  # source tokens per chunk
    lr: float = 1e-3  # relative step: a head moves about lr x its own RMS per step (train.make_optimizer)
    kl_weight: float = 1.0  # the paper's alpha: output alignment
    mse_weight: float = 1.0  # the paper's beta: internal alignment
    temperature: float = 2.0  # distillation temperature T
    top_k: int = 0  # 0 = exact KL over the whole shared vocabulary; k = top k + rest bucket (the paper's recipe)
    cache_mb: int = 2048  # budget for the teacher cache; x_S is sampled to fit
    init: str = "auto"  # ridge (both heads closed form), ridge-in (P_out = 0: the bare target), auto (the one
    #                     closer to the teacher), ridge-cartridge (fitted with the cartridge on: --paper-recipe)
    ridge: float = 1e-4  # ridge strength relative to the mean activation energy
    ridge_positions: int = 4096  # aligned positions of the first chunks the ridge start is fitted on
    loss: str = "kl+mse"  # the paper's ablations: kl, mse, kl+mse
    mse_detach: bool = False  # the MSE stops at x_T and trains P_in only (measured equal to the default)
    max_chunks: int = 300  # chunks of the corpus (0 = all; --corpus format writes this many)
    task: str = "arithmetic"  # the cartridge's task: its held-out prompts are measured, never trained on
    monitor: int = 32  # held-out task prompts whose teacher-student KL is logged (0 = none)
    monitor_every: int = 100  # steps between two task KL measurements
    log_every: int = 20  # steps between two log lines
    ckpt_every: int = 100  # steps between two checkpoints (for --resume)
    device: str = ""  # '' = cuda when available, else cpu
    dtype: str = ""  # '' = bf16 on cuda, fp32 on cpu
    seed: int = 0
    paper_recipe: bool = False  # the paper's recipe as first built here (PAPER_RECIPE); flags beside it win
    force: bool = False  # overwrite an existing run folder
    resume: bool = False  # continue an interrupted run from its last checkpoint
    demo: bool = False  # the demo on a toy world (demo.py); --out defaults to runs/demo


# --paper-recipe: general text (docstrings), the top-64 KL, the start fitted with the cartridge on, lr 1e-2
PAPER_RECIPE = {"corpus": "stdlib", "init": "ridge-cartridge", "lr": 1e-2, "top_k": 64, "max_chunks": 1000}
INITS = ("auto", "ridge", "ridge-in", "ridge-cartridge")
DTYPES = ("", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16")


def config_parser(defaults: bool = True, description: str = "") -> argparse.ArgumentParser:
    """One flag per Config field; with defaults=False a namespace holds only the flags given."""
    ap = argparse.ArgumentParser(usage="%(prog)s [--FLAG VALUE ...]  (each flag: its default; the Config dataclass "
                                 "in config.py says what it does)", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), f.default if defaults else argparse.SUPPRESS
        if f.type in (bool, "bool"):
            ap.add_argument(flag, action="store_true", default=default)
        else:
            ap.add_argument(flag, type=type(f.default), default=default, metavar="", help=repr(f.default))
    return ap


def parse_config(argv=None, description: str = "") -> Config:
    """Config from the command line: --paper-recipe's settings under the flags given beside it, --loss's terms."""
    ap = config_parser(description=description)
    cfg = Config(**vars(ap.parse_args(argv)))
    if cfg.paper_recipe:
        given = set(vars(config_parser(defaults=False).parse_args(argv)))  # the flags on the command line
        for name, value in PAPER_RECIPE.items():
            if name not in given:  # a flag given beside --paper-recipe wins (and config.json records it)
                setattr(cfg, name, value)
        kept = sorted(given & set(PAPER_RECIPE))
        print(f"--paper-recipe sets {', '.join(f'{k}={v}' for k, v in PAPER_RECIPE.items() if k not in given)}"
              + (f"; your {', '.join('--' + k.replace('_', '-') for k in kept)} kept" if kept else ""))
    problem = config_problem(cfg)
    if problem:  # one line, before any model is loaded or any file written
        raise SystemExit(f"error: {problem}")
    cfg.kl_weight = cfg.kl_weight if "kl" in cfg.loss else 0.0
    cfg.mse_weight = cfg.mse_weight if "mse" in cfg.loss else 0.0
    return cfg


def device_problem(device: str | None, dtype: str | None) -> str | None:
    """--device and --dtype (train.py, lora.py, evaluate.py): what is wrong in one line, or None."""
    device, dtype = device or "", dtype or ""
    if not (device in ("", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", device)):
        return f"--device {device!r}: should be '' (cuda when available), cpu, mps, cuda or cuda:N"
    if dtype not in DTYPES:
        return f"--dtype {dtype!r}: should be one of {', '.join(repr(d) for d in DTYPES)}"
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            return f"--device {device}: this machine has no CUDA GPU; should be '' or cpu"
    return None


def config_problem(cfg: Config) -> str | None:
    """What is wrong with a configuration, in one line naming the flag, its value and what would be right;
    None when every setting is in range. Paths and models are checked by train.check_inputs."""
    rules = [  # (flag, holds, what would be right)
        ("loss", cfg.loss in ("kl", "mse", "kl+mse"), "one of kl, mse, kl+mse"),
        ("init", cfg.init in INITS, f"one of {', '.join(INITS)}"),
        ("steps", cfg.steps >= 1, "at least 1"),
        ("batch-size", cfg.batch_size >= 1, "at least 1 chunk"),
        ("seq-len", cfg.seq_len >= 2, "at least 2 tokens"),
        ("lr", cfg.lr > 0 and math.isfinite(cfg.lr), "a number above 0, e.g. 1e-3"),
        ("kl-weight", cfg.kl_weight >= 0 and math.isfinite(cfg.kl_weight), "0 or more"),
        ("mse-weight", cfg.mse_weight >= 0 and math.isfinite(cfg.mse_weight), "0 or more"),
        ("temperature", cfg.temperature > 0 and math.isfinite(cfg.temperature), "a number above 0, e.g. 2"),
        ("top-k", cfg.top_k >= 0, "0 (the exact KL) or a number of tokens"),
        ("cache-mb", cfg.cache_mb >= 1, "at least 1 MB"),
        ("ridge", cfg.ridge > 0 and math.isfinite(cfg.ridge), "a number above 0, e.g. 1e-4"),
        ("ridge-positions", cfg.ridge_positions >= 1, "at least 1"),
        ("max-chunks", cfg.max_chunks >= (1 if cfg.corpus == "format" else 0),
         "a number above 0 (--corpus format writes that many samples)" if cfg.corpus == "format" else "0 (all) or more"),
        ("monitor", cfg.monitor >= 0, "0 (none) or more"),
        ("monitor-every", cfg.monitor_every >= 1, "at least 1"),
        ("log-every", cfg.log_every >= 1, "at least 1"),
        ("ckpt-every", cfg.ckpt_every >= 1, "at least 1"),
    ]
    for flag, holds, right in rules:
        if not holds:
            return f"--{flag} {getattr(cfg, flag.replace('-', '_'))!r}: should be {right}"
    if problem := device_problem(cfg.device, cfg.dtype):
        return problem
    weights = {"kl": cfg.kl_weight, "mse": cfg.mse_weight}
    if not any(weights[term] > 0 for term in cfg.loss.split("+")):
        return (f"--loss {cfg.loss} with --kl-weight {cfg.kl_weight} and --mse-weight {cfg.mse_weight}: nothing would "
                "train; give a term --loss keeps a weight above 0")
    return None
