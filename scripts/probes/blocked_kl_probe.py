"""The KL of one step at the embedded pair's shapes (500 aligned positions, 46,032 shared tokens, d_T 640,
d_S 576), random numbers: peak resident memory through autograd (kl_loss) and blocked (shared_kl), 1 thread."""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import torch, time
torch.set_num_threads(1)
import losses
from memory import rss_mb, reset_peak_memory, free_memory
N, V, dT, dS, VT = 500, 46032, 640, 576, 262144
W_T = torch.randn(VT, dT) * 0.02; W_S = torch.randn(V, dS) * 0.02
vocab = torch.randperm(VT)[:V]
h_S = torch.randn(N, dS)
class M(torch.nn.Module):
    def __init__(s): super().__init__(); s.e = torch.nn.Embedding(VT, dT); s.e.weight.data = W_T; s.config = type("c", (), {})()
    def get_output_embeddings(s): return s.e
m = M().requires_grad_(False)
print("through autograd (kl_loss):")
for trial in range(3):
    free_memory(); base = rss_mb(); reset_peak_memory("cpu")
    hidden = torch.randn(N, dT, requires_grad=True)
    t = time.time()
    with torch.no_grad(): zt = losses.lm_logits(h_S, W_S)
    after_teacher = rss_mb("VmHWM") - base
    s = losses.shared_logits(m, hidden, vocab)
    loss = losses.kl_loss(zt, s, 2.0)
    fwd = rss_mb("VmHWM") - base
    loss.backward()
    print(f"teacher {after_teacher:.0f} MB | forward peak {fwd:.0f} MB | fwd+bwd peak {rss_mb('VmHWM') - base:.0f} MB | {time.time()-t:.2f}s")
    del hidden, s, loss, zt
print("blocked (shared_kl):")
for trial in range(3):
    free_memory(); base = rss_mb(); reset_peak_memory("cpu")
    hidden = torch.randn(N, dT, requires_grad=True)
    t = time.time()
    with torch.no_grad(): zt = losses.lm_logits(h_S, W_S)
    loss = losses.shared_kl(m, hidden, vocab, zt, 2.0)
    fwd = rss_mb("VmHWM") - base
    loss.backward()
    print(f"forward peak {fwd:.0f} MB | fwd+bwd peak {rss_mb('VmHWM') - base:.0f} MB | {time.time()-t:.2f}s")
    del hidden, loss, zt
