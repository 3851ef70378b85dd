"""lora.py: the invariants of a LoRA layer and the PEFT file layout."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llama
from lora import LoRALinear, add_lora, finetune_lora, load_lora, lora_layers, merge_lora, read_adapter, save_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def randomise_B(model, seed=0):
    """B starts at zero; give it values so the LoRA path does something."""
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)


def test_output_unchanged_at_init(ids):
    model = tiny_llama()
    before = model(ids).logits
    add_lora(model, TARGETS, r=4, alpha=8)
    assert torch.equal(model(ids).logits, before)


def test_wraps_by_suffix_and_freezes_the_rest():
    model = tiny_llama(layers=2)
    names = add_lora(model, ["q_proj", "down_proj"], r=4, alpha=8)
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)


def test_regex_target_modules_match_whole_name():
    model = tiny_llama(layers=2)
    names = add_lora(model, r"model\.layers\.1\.self_attn\.(q|v)_proj", r=2, alpha=2)
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_scale_plain_and_rslora():
    base = torch.nn.Linear(8, 8)
    assert LoRALinear(base, r=4, alpha=8).scale == 2.0
    assert LoRALinear(base, r=4, alpha=8, use_rslora=True).scale == 4.0


def test_lora_forward_is_the_equation():
    layer = LoRALinear(torch.nn.Linear(6, 5), r=3, alpha=6)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4, 6)
    W, b, A, B = layer.base.weight, layer.base.bias, layer.lora_A.weight, layer.lora_B.weight
    expected = x @ W.T + b + 2.0 * (x @ A.T @ B.T)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_base_weights_bit_identical_after_an_optimizer_step(ids):
    model = tiny_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, TARGETS, r=4, alpha=8)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids).logits.pow(2).mean().backward()
    opt.step()
    after = {n.replace(".base.", "."): p for n, p in model.named_parameters() if ".lora_" not in n}
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[n], frozen[n]) for n in frozen)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_merged_equals_unmerged(ids):
    model = tiny_llama()
    add_lora(model, TARGETS + ["gate_proj"], r=4, alpha=8)
    randomise_B(model)
    unmerged = model(ids).logits
    merge_lora(model)
    assert not lora_layers(model)
    assert torch.allclose(model(ids).logits, unmerged, atol=1e-5)


def test_save_load_round_trip_is_exact(tmp_path, ids):
    model = tiny_llama()
    add_lora(model, TARGETS, r=4, alpha=8, use_rslora=True)
    randomise_B(model)
    expected = model(ids).logits
    save_lora(model, tmp_path / "cart", base_model_name_or_path="tiny-llama")
    fresh = tiny_llama()
    load_lora(fresh, tmp_path / "cart")
    assert torch.equal(fresh(ids).logits, expected)


def test_peft_layout(tmp_path):
    model = tiny_llama(layers=2)
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=16)
    save_lora(model, tmp_path / "cart", base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "cart" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 16, False)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["bias"] == "none" and config["lora_dropout"] == 0.0
    assert config["base_model_name_or_path"] == "tiny-llama"
    tensors = load_file(tmp_path / "cart" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 4)  # 2 kv heads x 16
    assert len(tensors) == 2 * 2 * 2


def test_loads_keys_with_peft_adapter_name(tmp_path, ids):
    """Older PEFT files keep the adapter name in the key (`lora_A.default.weight`)."""
    model = tiny_llama()
    add_lora(model, ["q_proj"], r=2, alpha=4)
    randomise_B(model)
    save_lora(model, tmp_path / "cart")
    path = tmp_path / "cart" / "adapter_model.safetensors"
    save_file({k.replace(".weight", ".default.weight"): v for k, v in load_file(path).items()}, path)
    fresh = tiny_llama()
    load_lora(fresh, tmp_path / "cart")
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_unknown_module_name_lists_the_models_linears():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\].*'down_proj'.*'q_proj'"):
        add_lora(tiny_llama(), ["q_proj", "qkv_proj"])


def test_shape_mismatch_names_the_module(tmp_path):
    model = tiny_llama(width=64)
    add_lora(model, ["q_proj"], r=2, alpha=4)
    save_lora(model, tmp_path / "cart")
    with pytest.raises(ValueError, match=r"lora_A of model\.layers\.0\.self_attn\.q_proj has shape \(2, 64\)"):
        load_lora(tiny_llama(width=32), tmp_path / "cart")


def test_module_missing_in_model_names_it(tmp_path):
    model = tiny_llama(layers=3)
    add_lora(model, ["q_proj"], r=2, alpha=4)
    save_lora(model, tmp_path / "cart")
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.q_proj"):
        load_lora(tiny_llama(layers=2), tmp_path / "cart")


def test_missing_file_names_the_file(tmp_path):
    (tmp_path / "cart").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(tiny_llama(), tmp_path / "cart")


def test_save_refuses_to_overwrite_without_force(tmp_path):
    model = tiny_llama()
    add_lora(model, ["q_proj"], r=2, alpha=4)
    save_lora(model, tmp_path / "cart")
    with pytest.raises(FileExistsError, match="--force"):
        save_lora(model, tmp_path / "cart")
    save_lora(model, tmp_path / "cart", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cart"]  # no temp folder left behind


class CharTokenizer:
    """Characters as tokens: enough for finetune_lora's batching."""
    eos_token_id, pad_token_id = 1, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [2 + (ord(c) % 120) for c in text]}


def test_finetune_trains_lora_only_on_answer_tokens():
    torch.manual_seed(0)
    model = tiny_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, TARGETS, r=4, alpha=8)
    pairs = [(f"Q{i}:", f" {i % 3}") for i in range(12)]
    losses = finetune_lora(model, CharTokenizer(), pairs, steps=100, batch_size=8, lr=1e-2, log_every=1000)
    # a random tiny model's small LM head bounds its logits, so the loss cannot reach 0; it must fall clearly
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.7
    after = {n.replace(".base.", "."): p for n, p in model.named_parameters() if ".lora_" not in n}
    assert all(torch.equal(after[n], frozen[n]) for n in frozen)
    from data import answer_batch
    ids, labels, mask = answer_batch(CharTokenizer(), [("Q1:", " 7"), ("Q12:", " 8")], "cpu")
    assert labels[0].tolist() == [-100, -100, -100, ids[0, 3].item(), ids[0, 4].item(), 1, -100]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 1, 0]


def test_lora_script_makes_a_cartridge_without_scoring_it(pair, tmp_path, capsys):
    """`python lora.py`: fine-tune and save in the PEFT layout; scoring is evaluate.py's job; no silent overwrite."""
    import lora
    argv = ["--model", str(pair / "source"), "--out", str(tmp_path / "cart"), "--steps", "2", "--batch-size", "2",
            "--n-train", "8", "--rank", "2", "--targets", "q_proj"]
    lora.main(argv)
    config, factors = read_adapter(tmp_path / "cart")
    assert config["r"] == 2 and len(factors) == 3  # q_proj of the tiny source's 3 layers
    assert "python evaluate.py --lora" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists; pass --force"):
        lora.main(argv)


def test_truncated_or_inconsistent_cartridge_is_a_clear_error(tmp_path):
    model = tiny_llama()
    add_lora(model, ["q_proj"], r=4, alpha=8)
    save_lora(model, tmp_path / "cart")
    weights = tmp_path / "cart" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read .* truncated or corrupted"):
        read_adapter(tmp_path / "cart")
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_adapter(tmp_path / "cart")
    weights.write_bytes(data)
    config = json.loads((tmp_path / "cart" / "adapter_config.json").read_text())
    (tmp_path / "cart" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match=r"says r = 8, but .*q_proj has lora_A \(4, 64\)"):
        read_adapter(tmp_path / "cart")
    (tmp_path / "cart" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_adapter(tmp_path / "cart")
