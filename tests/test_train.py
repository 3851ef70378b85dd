"""train.py end to end on tiny models saved to folders: two tokenizers, other depths and widths."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import args, tiny_llama
from lora import add_lora, save_lora

ROOT = Path(__file__).resolve().parents[1]


def test_end_to_end_writes_outputs_and_the_loss_falls(pair, tmp_path):
    out = tmp_path / "run"
    train.main(args(pair, out))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "heads.safetensors", "log.jsonl", "lora"]
    assert not (tmp_path / "run.partial").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8, 10, 12]
    assert log[-1]["loss"] < log[0]["loss"]
    assert json.loads((out / "config.json").read_text())["steps"] == 12
    heads = load_file(out / "heads.safetensors")
    assert len(heads) == 2 * 3 * 3  # (P_in, P_out) x 3 roles x 3 source layers
    assert set(json.loads((out / "lora" / "adapter_config.json").read_text())["target_modules"]) >= {
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_ablations_switch_one_term_off(pair, tmp_path, loss, capsys):
    train.main(args(pair, tmp_path / loss, "--loss", loss))
    log = [json.loads(line) for line in (tmp_path / loss / "log.jsonl").read_text().splitlines()]
    off = "mse" if loss == "kl" else "kl"
    assert all(r[off] == 0 for r in log) and all(r[loss] > 0 for r in log)
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if line.startswith("first batch"))
    assert float(first.split("kl without heads ")[1].split()[0]) > 0  # the yardstick is measured in both arms
    if loss == "kl":  # x_S only feeds the MSE: caching it anyway ran the real KL-only run out of memory
        assert "x_S kept at 0 aligned positions per chunk" in out and "mse off" in first


def test_resume_gives_the_same_heads(pair, tmp_path):
    train.main(args(pair, tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):  # interrupt after the step-5 checkpoint
        original = train.cast_loss
        calls = {"n": 0}
        def interrupted(*a, **k):
            calls["n"] += 1
            if calls["n"] == 8:
                raise KeyboardInterrupt
            return original(*a, **k)
        train.cast_loss = interrupted
        try:
            train.main(args(pair, tmp_path / "cut"))
        finally:
            train.cast_loss = original
    assert (tmp_path / "cut.partial" / "checkpoint.pt").is_file() and not (tmp_path / "cut").exists()
    train.main(args(pair, tmp_path / "cut", "--resume"))
    full, resumed = load_file(tmp_path / "full" / "heads.safetensors"), load_file(tmp_path / "cut" / "heads.safetensors")
    assert all(torch.allclose(full[k], resumed[k], atol=1e-6) for k in full)


@pytest.mark.parametrize("change, message", [
    (["--target", "no-such-model"], "unknown model 'no-such-model'"),
    (["--cartridge", "/nonexistent/cart"], "adapter_config.json not found"),
    (["--corpus", "/nonexistent/corpus.txt"], "corpus /nonexistent/corpus.txt not found"),
    (["--loss", "l1"], "--loss is one of"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(pair, tmp_path, change, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(args(pair, tmp_path / "run") + change)  # argparse: the last value of a flag wins
    assert exit_info.value.code != 0 and message in str(exit_info.value.code) + capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus_and_foreign_cartridge_and_existing_run(pair, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(SystemExit, match="holds no text"):
        train.main(args(pair, tmp_path / "run", "--corpus", str(empty)))
    other = tiny_llama(layers=3, width=32, vocab=300)
    add_lora(other, ["q_proj"], r=4, alpha=8)
    save_lora(other, tmp_path / "other_cart")
    with pytest.raises(SystemExit, match=r"q_proj has shape \(4, 32\), the model needs \(4, 64\)"):
        train.main(args(pair, tmp_path / "run", "--cartridge", str(tmp_path / "other_cart")))
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="exists; pass --force"):
        train.main(args(pair, tmp_path / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "other_cart", "run"]
    assert list((tmp_path / "run").iterdir()) == []


def test_benchmark_runs_and_prints_ratios(pair, tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.benchmark(train.parse_config(args(pair, tmp_path / "run")))
    out = capsys.readouterr().out
    assert "cast step" in out and "| ratio" in out and "peak during CAST steps" in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
