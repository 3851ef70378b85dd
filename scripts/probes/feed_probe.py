"""What a CAST step reads from the CPU-resident teacher cache at 7B sizes, timed on the CPU side alone.

    python scripts/probes/feed_probe.py

Shapes of scripts/scale_check.py's run on an H200 (commit b294653): 64 sites (q,v of 32 Llama-2 layers), x_S
4096 wide in fp16 at 124 positions per chunk of 32 chunks; the source's LM head over 19,175 shared tokens,
fp32; 77 aligned positions per chunk. Each step (train.cast_loss, teacher.teacher_logits at commit b294653; losses.py from 72d2b65) gathers the batch's
x_S rows of every site and copies head_S and the teacher's hidden states to the device. On a GPU that copy
also crosses PCIe from pageable memory; here only the CPU side (gather + one memcpy) is timed.
"""
import time

import torch

torch.manual_seed(0)
sites, width, rows_per_chunk, chunks, vocab, aligned = 64, 4096, 124, 32, 19175, 77
x_S = {s: torch.randn(rows_per_chunk * chunks, width).half() for s in range(sites)}
head_S = torch.randn(vocab, width)
h_teacher = [torch.randn(aligned, width) for _ in range(chunks)]
for batch in (4, 16):
    chunk_ids = list(range(batch))
    xs = torch.cat([torch.arange(c * rows_per_chunk, (c + 1) * rows_per_chunk) for c in chunk_ids])
    for name, fn in (("x_S rows, 64 sites", lambda: [x_S[s][xs].clone() for s in range(sites)]),
                     ("head_S copy", lambda: head_S.clone()),
                     ("h_teacher rows", lambda: torch.cat([h_teacher[c] for c in chunk_ids]).clone())):
        fn()
        t = time.perf_counter()
        for _ in range(5):
            out = fn()
        dt = (time.perf_counter() - t) / 5
        mb = sum(o.numel() * o.element_size() for o in (out if isinstance(out, list) else [out])) / 2**20
        print(f"batch {batch:2d} | {name:20s} | {mb:7.1f} MB | {dt * 1000:6.1f} ms on the CPU side")
