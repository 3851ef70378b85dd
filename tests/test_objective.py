"""The objective as the README writes it is the one the code computes: the MSE term's value and its gradient paths."""
import dataclasses

import pytest
import torch

import cast
from test_train import prepared


def test_mse_is_the_mean_square_over_the_variance_of_each_sites_x_S(pair, tmp_path):
    """MSE term = mean over sites of  mean_{n, k} (P_in x_T - x_S)^2_{nk} / Var(x_S),  Var(x_S) the variance of all
    the site's cached x_S entries (one number per site). With P_in = 0 each site's term is mean(x_S^2) / Var(x_S),
    computed here from the cache alone."""
    cfg, target, vocab_T, cache, heads = prepared(pair, tmp_path, "--loss", "mse")
    with torch.no_grad():
        for h in heads:
            h.P_in.weight.zero_()
    chunks = [0, 1, 2]
    rows = torch.cat([torch.arange(cache.x_start[c], cache.x_start[c + 1]) for c in chunks])
    expected = []
    for h in heads:
        x_S = cache.x_S[h.source_name].float()  # (all cached positions, d_in_S)
        assert cache.var_S[h.source_name] == pytest.approx(x_S.var().item(), rel=1e-6)
        expected.append((x_S[rows] ** 2).mean() / x_S.var())
    variances = [cache.var_S[h.source_name] for h in heads]
    assert max(variances) > 2 * min(variances)  # the division matters: the sites' scales differ
    mse = cast.cast_loss(cfg, target, heads, cache, vocab_T, chunks)["mse"]
    assert mse.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


@pytest.mark.parametrize("detach", [False, True])
def test_the_mse_gradient_reaches_the_heads_the_readme_says(pair, tmp_path, detach):
    """With the KL off: the MSE's gradient reaches each site's own P_in; through x_T (the target's activations,
    which the upstream heads shape) it also reaches upstream P_out, unless x_T is detached (--mse-detach)."""
    extra = ("--mse-detach",) if detach else ()
    cfg, target, vocab_T, cache, heads = prepared(pair, tmp_path, "--loss", "mse", "--init", "ridge", *extra)
    cast.cast_loss(cfg, target, heads, cache, vocab_T, [0, 1, 2, 3], backward=True)
    grad = lambda p: 0.0 if p.grad is None else p.grad.abs().max().item()
    assert all(grad(h.P_in.weight) > 0 for h in heads)
    reached = {h.source_name: grad(h.P_out.weight) > 0 for h in heads}
    last = [h.source_name for h in heads if h.target_name.endswith(f"layers.{target.config.num_hidden_layers - 1}.mlp.down_proj")]
    assert last and len(last) < len(heads)
    if detach:
        assert not any(reached.values())
    else:  # upstream P_out reached; the last module's P_out shapes no x_T that the MSE reads
        assert any(reached.values()) and not any(reached[n] for n in last)
