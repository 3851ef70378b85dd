"""The machine a run uses: its threads, and where its memory goes (resident and peak memory, the heap trim,
the breakdown train.py prints at the end). It imports nothing of this project."""
import ctypes
import gc
import os
from pathlib import Path

import torch


def use_cores() -> int:
    """One torch thread per core this process may use: OMP_NUM_THREADS when set, else the CPU affinity (so
    `taskset -c 0 python train.py --demo` runs on one core). More threads than free cores thrash."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # not on macOS
    n = int(os.environ.get("OMP_NUM_THREADS") or cores or 1)
    torch.set_num_threads(max(n, 1))
    return torch.get_num_threads()


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
