"""The KL weighted by the cartridge's effect at each position (issue 34, lever 1, second half).

The default KL is a plain mean over the aligned positions, though the cartridge changes the source's next token
at few of them. Here each aligned position i of the training chunks gets the cartridge's own effect there,

    e_i = KL( p(source + cartridge) || p(source) )      over the shared vocabulary, temperature 1

(no task data: only the source and its cartridge), and the KL term weighs it by

    w_i = 1 + min(8, round(e_i / mean e))

half the default's uniform weight, half in proportion to the effect. The weights are made by repeating rows of
the teacher cache after the ridge start (position i appended w_i - 1 more times), so train.py trains unchanged:
the same steps, start, checkpoints and records. The task KL on held-out prompts is not weighted (the same measure as every run).

    python scripts/effect_weighted.py [train.py flags ...]
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import align  # noqa: E402
import losses  # noqa: E402
import teacher  # noqa: E402
import train  # noqa: E402
from config import parse_config  # noqa: E402
from data import write_json  # noqa: E402
from effect_text import cartridge_on  # noqa: E402
from memory import use_cores  # noqa: E402

MAX_COPIES = 8
build_cache, ridge_start = teacher.build_cache, train.ridge_start  # the default's, wrapped below


@torch.no_grad()
def position_effect(source, tok_S, tok_T, chunks: list[str], cache: dict) -> list[torch.Tensor]:
    """e_i for every aligned position of each training chunk, in the cache's row order: (N_c,) per chunk.
    The source's cartridge is loaded (build_cache loads it); its bare pass switches it off."""
    pad = tok_S.pad_token_id if tok_S.pad_token_id is not None else 0
    pos_S, ids_S = [], []
    for text in chunks[: cache["n_train"]]:
        s, t = tok_S(text, return_offsets_mapping=True), tok_T(text, return_offsets_mapping=True)
        pos_S.append(align.aligned_positions(s["offset_mapping"], t["offset_mapping"])[0])
        ids_S.append(s["input_ids"])
    head = cache["head_S"].to(next(source.parameters()).device)
    effects = [None] * len(ids_S)
    cartridge_on(source, False)
    for c, hidden, _ in teacher.forward_chunks(source, ids_S, pad):
        bare = losses.lm_logits(hidden[pos_S[c]].float(), head, cache["softcap_S"]).log_softmax(-1)  # (N_c, V)
        cart = losses.lm_logits(cache["h_teacher"][c].to(head.device), head, cache["softcap_S"]).log_softmax(-1)
        effects[c] = (cart.exp() * (cart - bare)).sum(-1).clamp_min(0).cpu()  # (N_c,)
    cartridge_on(source, True)
    return effects


def weigh_by_repeating(cache: dict, effects: list[torch.Tensor]) -> torch.Tensor:
    """Append each aligned row w_i - 1 more times to the chunk's pos_T and h_teacher: a mean over the rows is then
    the w-weighted mean. The first N_c rows stay where they were (x_rows, the MSE's rows, index them)."""
    mean = torch.cat(effects).mean().clamp_min(1e-12)
    copies = []
    for c, e in enumerate(effects):
        extra = (e / mean).round().clamp(max=MAX_COPIES).long()  # (N_c,)
        cache["pos_T"][c] = torch.cat([cache["pos_T"][c], cache["pos_T"][c].repeat_interleave(extra)])
        cache["h_teacher"][c] = torch.cat([cache["h_teacher"][c], cache["h_teacher"][c].repeat_interleave(extra, 0)])
        copies.append(extra)
    return torch.cat(copies)


def cache_with_effect(cfg, source, tok_S, tok_T, kernels, vocab_S, chunks, n_train):
    """build_cache, then the effect at its positions (while the source is still loaded)."""
    cache = build_cache(cfg, source, tok_S, tok_T, kernels, vocab_S, chunks, n_train)
    cache["effect"] = position_effect(source, tok_S, tok_T, chunks, cache)
    return cache


def weighted_after_ridge_start(cfg, target, heads, cache: dict, pad: int):
    """The ridge start on the plain rows (its source pairs are one per aligned position), then the weights."""
    ridge_start(cfg, target, heads, cache, pad)
    e = torch.cat(cache["effect"])
    top = e.sort(descending=True).values
    extra = weigh_by_repeating(cache, cache.pop("effect"))
    print(f"effect per aligned position: mean {e.mean():.4f}, median {e.median():.4f}, max {e.max():.3f} | top 10% "
          f"of positions hold {top[: max(1, len(e) // 10)].sum() / e.sum().clamp_min(1e-12):.0%} of it | weights "
          f"1 + copies: mean {1 + extra.float().mean():.2f}, {int((extra > 0).sum())} of {len(e)} positions repeated")


def main(argv=None):
    cfg = parse_config(argv, __doc__)
    use_cores()
    teacher.build_cache, train.ridge_start = cache_with_effect, weighted_after_ridge_start
    try:
        out = train.train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
    finally:
        teacher.build_cache, train.ridge_start = build_cache, ridge_start
    record = json.loads((out / "config.json").read_text())
    write_json(out / "config.json", {**record, "kl_weighting": f"1 + min({MAX_COPIES}, round(effect / mean effect))"
                                                               " by repeated rows (scripts/effect_weighted.py)"})


if __name__ == "__main__":
    main()
