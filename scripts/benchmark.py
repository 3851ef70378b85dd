"""Benchmark: one CAST step against two plain steps of the target on the same batch, and memory.

    python scripts/benchmark.py                     # the embedded default pair, 32 chunks (--max-chunks N for more)
    python scripts/benchmark.py --target NAME ...   # any train.py flag
    python scripts/benchmark.py --cache-on-cpu      # the teacher cache left on the CPU, copied over at each step
    python scripts/benchmark.py --profile           # also: where each step's time goes, operator by operator

Prints the time and peak-memory ratios of a CAST step to (1) a plain target step computing the same logits
(the aligned positions, the shared vocabulary, the same teacher KL, gradients for every target weight; goal
<= 1.10x) and (2) a plain full-vocabulary LM forward+backward; and the peak memory of the CAST steps next to
target + cache (goal <= 1.20x). A measurement, not a test.
"""
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cast  # noqa: E402
from runs import peak_memory_mb, reset_peak_memory, rss_mb  # noqa: E402
import train  # noqa: E402
from data import pad_batch  # noqa: E402
from cast import cast_loss  # noqa: E402
from train import Config, make_optimizer, parse_config  # noqa: E402


def benchmark(cfg: Config, repeats: int = 5, cache_on_cpu: bool = False, profile: bool = False):
    """Time one CAST step against a plain forward+backward of the target (full vocabulary LM loss, gradients
    for every weight) on the same batch, and the memory that training adds to target + cache. cache_on_cpu:
    as before commit 07844c3, each step copies what it reads of the teacher cache to the device (a GPU A/B).
    profile: then the operators that take each step's time (torch.profiler; the GPU's time on a GPU)."""
    runtime_mb = rss_mb()
    kernels, vocab_T, cache, device, dtype = train.prepare(cfg)  # as train.train does, up to its first step
    target, tok_T = train.load_model(cfg.target, device, dtype)
    heads = cast.make_heads(kernels, target).to(device)
    train.ridge_start(cfg, target, heads, cache, tok_T.pad_token_id or 0)
    cache.ridge_x_S, cache.ridge_y_S = {}, {}  # as in training
    if not cache_on_cpu:
        cache.to(device)
    opt = make_optimizer(heads, train.step_sizes(heads))
    chunk_ids = list(range(cfg.batch_size))
    kl_only = dataclasses.replace(cfg, kl_weight=1.0, mse_weight=0.0)
    ids, mask = pad_batch([cache.ids_T[c].tolist() for c in chunk_ids], 0, device)  # (B, T), as cast_loss pads
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def cast_step(update: bool = True):
        opt.zero_grad(set_to_none=True)
        cast_loss(cfg, target, heads, cache, vocab_T, chunk_ids, backward=True)
        if update:
            opt.step()

    def plain_sliced_step():  # the same logits and KL with no heads, the gradient into every target weight
        target.requires_grad_(True)
        cast_loss(kl_only, target, torch.nn.ModuleList(), cache, vocab_T, chunk_ids)["loss"].backward()
        target.zero_grad(set_to_none=True)
        target.requires_grad_(False)

    def plain_step():
        target.requires_grad_(True)
        target(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        target.zero_grad(set_to_none=True)
        target.requires_grad_(False)

    def timed(fn):
        """(seconds per step, peak memory during the steps in MB, Python and libraries excluded on the CPU)."""
        fn()  # warm-up
        sync()
        reset_peak_memory(device)
        t = time.time()
        for _ in range(repeats):
            fn()
        sync()
        return (time.time() - t) / repeats, peak_memory_mb(device) - (0 if device.startswith("cuda") else runtime_mb)
    before_mb = rss_mb()
    # Plain steps first: on the CPU a peak can only be reset to the current resident size, which keeps what
    # earlier steps left with the allocator, so the CAST steps, measured last, carry that bias against them.
    t_sliced, peak_sliced_mb = timed(plain_sliced_step)
    t_plain, peak_plain_mb = timed(plain_step)
    t_no_update, _ = timed(lambda: cast_step(update=False))
    t_cast, peak_mb = timed(cast_step)
    target_mb = sum(p.numel() * p.element_size() for p in target.parameters()) / 2**20
    on_device_mb = 0 if cache_on_cpu and device.startswith("cuda") else cache.size_mb  # the cache in the peak
    base_mb = target_mb + on_device_mb
    tokens = int(mask.sum())
    print(f"benchmark | batch {cfg.batch_size} x {ids.shape[1]} target tokens | device {device} | teacher cache "
          f"on {'the CPU' if cache_on_cpu else device}")
    print(f"cast step {t_cast:.3f}s ({tokens / t_cast:.0f} tok/s), peak {peak_mb:.0f} MB | without the heads' AdamW "
          f"update {t_no_update:.3f}s")
    print(f"plain target step, same logits and KL: {t_sliced:.3f}s, peak {peak_sliced_mb:.0f} MB | ratio cast / plain: "
          f"time {t_cast / t_sliced:.2f}, memory {peak_mb / peak_sliced_mb:.2f} (goal <= 1.10)")
    print(f"plain target LM step, full vocabulary: {t_plain:.3f}s, peak {peak_plain_mb:.0f} MB | ratio cast / plain: "
          f"time {t_cast / t_plain:.2f}, memory {peak_mb / peak_plain_mb:.2f}")
    heads_mb = 16 * sum(p.numel() for p in heads.parameters()) / 2**20  # fp32 weights + grads + 2 AdamW moments
    print(f"memory: target {target_mb:.0f} MB + cache {cache.size_mb:.0f} MB + heads with grads and AdamW state "
          f"{heads_mb:.0f} MB | peak during CAST steps {peak_mb:.0f} MB (process RSS {before_mb:.0f} MB before the "
          f"steps, Python and libraries excluded) | ratio to target + cache + heads state "
          f"{peak_mb / (base_mb + heads_mb):.2f} (goal <= 1.20)")
    if profile:
        from torch.profiler import ProfilerActivity, profile as profiled
        on_gpu = device.startswith("cuda")
        key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        for name, fn in (("cast step", cast_step), ("cast step without the AdamW update", lambda: cast_step(False)),
                         ("plain target step, same logits and KL", plain_sliced_step)):
            with profiled(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu) as prof:
                for _ in range(2):
                    fn()
                sync()
            calls = sum(e.count for e in prof.key_averages()) // 2  # each launches work; nested ones included
            print(f"profile | {name} | 2 steps, {calls} operator calls per step | operators by {key}")
            print(prof.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    argv, own = sys.argv[1:], ("--cache-on-cpu", "--profile")
    benchmark(parse_config(["--max-chunks", "32"] + [a for a in argv if a not in own]),  # a later --max-chunks wins
              cache_on_cpu="--cache-on-cpu" in argv, profile="--profile" in argv)
