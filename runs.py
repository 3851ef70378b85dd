"""What a run writes and records: its folder (written under a temporary name, renamed when complete; what
--force and --resume may do), the provenance of its numbers (library versions, file hashes, the commit), and
where its memory goes (resident and peak memory, the heap trim, the breakdown train.py prints at the end).
"""
import ctypes
import gc
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from models import EMBEDDED_PACKAGES, resolve_model


# ----------------------------------------------------------------------------- the run folder

def write_json(path: Path, obj):
    """Write JSON to a temporary name, then rename it: never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def partial(out) -> Path:
    """Where a run lives until it is complete; renamed to its --out folder at the end."""
    return Path(str(out) + ".partial")


def check_run_folder(out, force: bool, resume: bool, ckpt_every: int):
    """Before any model is loaded or any file written: the run folder, and what --force and --resume would do."""
    out, ckpt = Path(out), partial(out) / "checkpoint.pt"
    if out.exists() and not force:
        raise FileExistsError(f"run folder {out} exists; pass --force to overwrite it or choose another --out")
    if resume and not ckpt.is_file():
        where = (f"{partial(out)} holds a run that stopped before its first checkpoint (one every {ckpt_every} "
                 "steps)") if partial(out).exists() else f"there is no interrupted run at {partial(out)}"
        raise FileNotFoundError(f"--resume: {where}; to start again, run without --resume"
                                + (" and with --force" if partial(out).exists() else ""))
    if not resume and partial(out).exists() and not force:
        if ckpt.is_file():
            raise FileExistsError(f"{partial(out)} holds an interrupted run with a checkpoint: pass --resume to "
                                  "continue it, or --force to start again")
        raise FileExistsError(f"{partial(out)} holds a run that stopped before its first checkpoint: pass --force "
                              "to start again")


def after_nan(run: Path, ckpt_every: int) -> str:
    """What to do after a NaN: the interrupted run folder keeps its last checkpoint, if one was written."""
    if (run / "checkpoint.pt").is_file():
        step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
        return f"{run} keeps the checkpoint of step {step}: --resume continues from it (try a lower --lr), --force starts again"
    return f"no checkpoint was written yet (one every {ckpt_every} steps): --force starts again"


PROGRESS_EVERY = 15  # seconds: a step shorter than this prints no progress; a longer one about this often
_last_progress = [0.0]


def progress(what: str, done: int, total: int, t0: float, unit: str = "") -> None:
    """One line on a long step (the teacher writing, a pass over the chunks, scoring): how far it is, and the
    time left if the rest goes as fast as what is done. Quiet for the first PROGRESS_EVERY seconds."""
    now = time.time()
    if now - t0 < PROGRESS_EVERY or (now - _last_progress[0] < PROGRESS_EVERY and done < total):
        return
    _last_progress[0] = now
    left = f", about {(now - t0) / done * (total - done) / 60:.1f} min left" if 0 < done < total else ""
    print(f"{what}: {done}/{total}{unit} in {(now - t0) / 60:.1f} min{left}", flush=True)


# ----------------------------------------------------------------------------- provenance

def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder) -> str | None:
    """One hash of the weight and tokenizer files of a model or adapter folder (names and contents); None for
    a Hugging Face id that is not a local folder."""
    if not Path(folder).is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.suffix == ".json" and path.is_file():  # where the folder was made is not what it holds
            record = {k: v for k, v in json.loads(path.read_text()).items()
                      if k not in ("base_model_name_or_path", "_name_or_path")}
            digest.update(path.name.encode() + json.dumps(record, sort_keys=True).encode())
        elif path.suffix in (".safetensors", ".bin", ".gguf", ".model") and path.is_file():
            digest.update(path.name.encode() + file_sha256(path).encode())
    return digest.hexdigest()


def provenance(models: dict, tokenizers: dict) -> dict:
    """What a run's numbers depend on beyond its flags: library versions (the GGUF conversion, the tokenizers'
    special ids and the stdlib corpus change with them), each model's files by hash and its special ids.
    models: {role: name}; tokenizers: {role: tokenizer}."""
    import platform
    from importlib.metadata import PackageNotFoundError, version
    record = {"python": platform.python_version(), "commit": git_commit(), "threads": torch.get_num_threads()}
    for package in ("torch", "transformers", "tokenizers", "safetensors", "gguf", *EMBEDDED_PACKAGES.values()):
        try:
            record[package] = version(package)
        except PackageNotFoundError:
            pass
    for role, name in models.items():
        tok = tokenizers[role]
        record[role] = {"name": name, "sha256": folder_sha256(resolve_model(name)),
                        **{k: getattr(tok, k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}}
    return record


def git_commit() -> str | None:
    """The code's commit, with '+' when tracked files differ from it; None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        changed = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance_differences(recorded: dict, current: dict) -> list[str]:
    """The entries of two provenance records that differ: 'transformers 4.57.1 -> 5.24.0', 'target sha256 ...'
    (not the commit: scoring with newer code is expected)."""
    out = []
    for key in sorted((set(recorded) | set(current)) - {"commit"}):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key} {k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b and a is not None and b is not None:
            out.append(f"{key}: {a} -> {b}")
    return out


# ----------------------------------------------------------------------------- memory

def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process from /proc (Linux); VmHWM is its peak since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_memory(collect: bool = True):
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim: without it the pages of
    the freed source model stay resident). collect=False: the trim alone, after each step."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, Windows): nothing to trim


def memory_breakdown(device: str, peak_mb: float, runtime_mb: float, target, cache_mb: float, n_heads: int) -> str:
    """The peak during training next to what the run holds on purpose: target weights, teacher cache (on the
    training device), heads with their gradients and two AdamW moments (fp32: 16 bytes per parameter). The rest
    is the step itself (activations kept for the backward pass, logits at the aligned positions) and, on the
    CPU, Python and its libraries."""
    target_mb = sum(p.numel() * p.element_size() for p in target.parameters()) / 2**20
    on_cpu = not device.startswith("cuda")
    parts = {"target": target_mb, "teacher cache": cache_mb, "heads with grads and AdamW state": 16 * n_heads / 2**20}
    held, runtime = sum(parts.values()), runtime_mb if on_cpu else 0.0
    listed = " + ".join(f"{name} {mb:.0f}" for name, mb in parts.items())
    python = f" + Python and libraries {runtime:.0f}" if on_cpu else ""
    return (f"memory: peak during training {peak_mb:.0f} MB ({'resident' if on_cpu else 'GPU allocated'}) = {listed} "
            f"({held:.0f} MB held on purpose; peak / held {peak_mb / held:.2f}){python} + the step's activations "
            f"and logits {peak_mb - held - runtime:.0f}")


def reset_peak_memory(device: str):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated, or peak resident memory of the process on the CPU, since the last reset."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else rss_mb("VmHWM")
