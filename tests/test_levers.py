"""The lever scripts' invariants on tiny models: factored heads compute what the heads they start from compute,
and are stored back exactly; the cartridge's effect is zero for a cartridge that changes nothing."""
import json

import torch

import cast
from conftest import script, tiny_gemma, tiny_llama
from lora import add_lora, lora_layers, read_adapter, save_lora

def heads_for(tmp_path):
    torch.manual_seed(0)
    source, target = tiny_llama(layers=2, width=32), tiny_gemma(layers=2, width=48)
    add_lora(source, ["q_proj", "v_proj"], r=4, alpha=8)
    for layer in lora_layers(source).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    save_lora(source, tmp_path / "cart")
    config, factors = read_adapter(tmp_path / "cart")
    kernels = cast.find_kernels(config, factors, source, target)
    return kernels, target


def test_factored_heads_compute_the_same_update_and_store_back_exactly(tmp_path):
    factored_heads = script("factored_heads")
    kernels, target = heads_for(tmp_path)
    heads = cast.make_heads(kernels, target)
    factored = torch.nn.ModuleList(factored_heads.FactoredHead(h, h.target_factors()[1]) for h in heads)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        with cast.attached(target, heads):
            full = target(ids).logits
        with cast.attached(target, factored):
            fact = target(ids).logits
    assert torch.allclose(full, fact, atol=1e-5)
    n_full, n_fact = sum(p.numel() for p in heads.parameters()), sum(p.numel() for p in factored.parameters())
    assert n_fact < n_full / 4  # r (d_in_T + d_out_T) against d_in_S d_in_T + d_out_S d_out_T
    with torch.no_grad():  # train-like change of the factors, then back into P_in, P_out
        for f in factored:
            f.A_T.add_(0.1 * torch.randn_like(f.A_T))
            f.B_T.add_(0.1 * torch.randn_like(f.B_T))
    stored = cast.make_heads(kernels, target)
    for f, h in zip(factored, stored):
        f.as_head(h)
        A_T, B_T = h.target_factors()
        assert torch.allclose(A_T, f.A_T, atol=1e-5) and torch.allclose(B_T, f.B_T, atol=1e-5)


def test_the_cartridge_effect_is_zero_for_a_cartridge_that_changes_nothing():
    effect_text = script("effect_text")
    from conftest import tiny_tokenizer
    tok = tiny_tokenizer(300)
    model = tiny_llama(layers=2, width=32, vocab=300)
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)  # B = 0: the cartridge changes nothing
    texts = ["The quick brown fox jumps over the lazy dog.", "Answer: 12 + 7 = 19. #### 19"]
    assert max(abs(s) for s in effect_text.effect(model, tok, texts, seq_len=32)) < 1e-6
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    scores = effect_text.effect(model, tok, texts, seq_len=32)
    assert all(s > 1e-4 for s in scores)
    assert all(layer.scale == layer.alpha / layer.r for layer in lora_layers(model).values())  # switched back on


def test_the_amplified_teacher_writes_the_plain_teachers_text_when_the_cartridge_changes_nothing():
    levers_toy = script("levers_toy")
    from conftest import tiny_tokenizer
    tok = tiny_tokenizer(300)
    model = tiny_llama(layers=2, width=32, vocab=300)
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)  # B = 0: log p_cart = log p_bare
    plain = levers_toy.write(model, tok, ["Question:"] * 3, 12, gain=0.0, seed=1)
    assert levers_toy.write(model, tok, ["Question:"] * 3, 12, gain=2.0, seed=1) == plain
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    assert levers_toy.write(model, tok, ["Question:"] * 3, 12, gain=2.0, seed=1) != \
        levers_toy.write(model, tok, ["Question:"] * 3, 12, gain=0.0, seed=1)


def test_repeated_rows_give_the_effect_weighted_mean():
    effect_weighted = script("effect_weighted")
    torch.manual_seed(0)
    pos = [torch.arange(5), torch.arange(3)]
    h = [torch.randn(5, 4), torch.randn(3, 4)]
    cache = {"pos_T": [p.clone() for p in pos], "h_teacher": [x.clone() for x in h]}
    effects = [torch.tensor([0.0, 0.1, 2.0, 0.3, 0.0]), torch.tensor([50.0, 0.2, 0.1])]
    copies = effect_weighted.weigh_by_repeating(cache, effects)
    mean = torch.cat(effects).mean()
    w = 1 + (torch.cat(effects) / mean).round().clamp(max=effect_weighted.MAX_COPIES)
    assert torch.equal(1 + copies, w.long()) and copies.max() == effect_weighted.MAX_COPIES
    for c in range(2):  # the first rows stay where they were; pos_T and h_teacher stay paired
        assert torch.equal(cache["pos_T"][c][: len(pos[c])], pos[c])
        assert torch.equal(cache["h_teacher"][c], h[c][cache["pos_T"][c]])
    row_value = torch.cat(h).sum(-1)  # any per-row quantity: its mean over the repeated rows is the weighted mean
    repeated = torch.cat([cache["h_teacher"][c].sum(-1) for c in range(2)])
    assert torch.allclose(repeated.mean(), (w * row_value).sum() / w.sum())


def test_the_effect_weighted_run_trains_and_records_its_weighting(pair, tmp_path, capsys):
    from conftest import args
    effect_weighted = script("effect_weighted")
    out = tmp_path / "weighted"
    effect_weighted.main(args(pair, out))
    assert "effect per aligned position" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "effect_weighted.py" in config["kl_weighting"] and (out / "lora" / "adapter_model.safetensors").is_file()
