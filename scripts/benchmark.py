"""Benchmark: one CAST step against a plain forward+backward of the target on the same batch, and memory.

    python scripts/benchmark.py                     # the embedded default pair, 32 chunks (--max-chunks N for more)
    python scripts/benchmark.py --target NAME ...   # any train.py flag

Prints the time ratio (target: CAST step <= 1.25 x plain step) and the peak memory of the CAST steps
next to target + cache (target: <= 1.20 x). A measurement, not a test.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cast  # noqa: E402
from teacher import batch_of, target_pass  # noqa: E402
from train import Config, cast_loss, make_optimizer, parse_config, peak_memory_mb, prepare, reset_peak_memory, \
    rss_mb  # noqa: E402


def benchmark(cfg: Config, repeats: int = 5):
    """Time one CAST step against a plain forward+backward of the target (full vocabulary LM loss, gradients
    for every weight) on the same batch, and the memory that training adds to target + cache."""
    runtime_mb = rss_mb()
    target, tok_T, kernels, vocab_T, cache, device = prepare(cfg)
    heads = cast.make_heads(kernels, target).to(device)
    target_pass(cfg, target, heads, cache, tok_T.pad_token_id or 0)
    opt = make_optimizer(cfg, heads)
    chunk_ids = list(range(cfg.batch_size))
    ids, mask = batch_of(cache, chunk_ids, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def cast_step():
        out = cast_loss(cfg, target, heads, cache, vocab_T, chunk_ids)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    def plain_step():
        target.requires_grad_(True)
        target(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        target.zero_grad(set_to_none=True)
        target.requires_grad_(False)

    def timed(fn):
        fn()  # warm-up
        sync()
        t = time.time()
        for _ in range(repeats):
            fn()
        sync()
        return (time.time() - t) / repeats
    before_mb = rss_mb()
    reset_peak_memory(device)
    t_cast = timed(cast_step)
    peak_mb = peak_memory_mb(device) - (0 if device.startswith("cuda") else runtime_mb)
    t_plain = timed(plain_step)
    target_mb = sum(p.numel() * p.element_size() for p in target.parameters()) / 2**20
    base_mb = target_mb if device.startswith("cuda") else target_mb + cache["size_mb"]  # the cache stays on the CPU
    tokens = int(mask.sum())
    print(f"benchmark | batch {cfg.batch_size} x {ids.shape[1]} target tokens | device {device}")
    print(f"cast step {t_cast:.3f}s | plain target fwd+bwd {t_plain:.3f}s | ratio {t_cast / t_plain:.2f} "
          f"(target <= 1.25) | {tokens / t_cast:.0f} tok/s")
    heads_mb = 16 * sum(p.numel() for p in heads.parameters()) / 2**20  # fp32 weights + grads + 2 AdamW moments
    print(f"memory: target {target_mb:.0f} MB + cache {cache['size_mb']:.0f} MB + heads with grads and AdamW state "
          f"{heads_mb:.0f} MB | peak during CAST steps {peak_mb:.0f} MB (process RSS {before_mb:.0f} MB before the "
          f"steps, Python and libraries excluded) | ratio to target + cache {peak_mb / base_mb:.2f} (target <= 1.20)")


if __name__ == "__main__":
    benchmark(parse_config(["--max-chunks", "32"] + sys.argv[1:]))  # a later --max-chunks wins
