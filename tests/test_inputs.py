"""Bad input stops with one line naming the flag, what it got and what would be right: before any model is loaded
or any file written. Also what a resume may change, the teacher's corpus count and the generation limit."""
import json

import pytest
import torch

import models
import evaluate
import lora
import train
from conftest import args
from test_train import interrupted_run


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load model weights fails the test: a bad input must stop before."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    for module in (train, evaluate, lora, models):
        monkeypatch.setattr(module, "load_model", refuse, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hugging Face id is looked up offline: a clear error, no retries


def one_line_error(call, *message):
    with pytest.raises(SystemExit) as exit_info:
        call()
    text = str(exit_info.value.code)
    assert exit_info.value.code != 0 and "\n" not in text and text.startswith("error: ")
    assert all(m in text for m in message), text
    return text


@pytest.mark.parametrize("change, message", [
    (["--temperature", "0"], ("--temperature 0.0: should be a number above 0",)),
    (["--batch-size", "0"], ("--batch-size 0: should be at least 1",)),
    (["--lr", "-1"], ("--lr -1.0: should be a number above 0",)),
    (["--lr", "nan"], ("--lr nan",)),
    (["--seq-len", "0"], ("--seq-len 0: should be at least 2",)),
    (["--steps", "0"], ("--steps 0: should be at least 1",)),
    (["--log-every", "0"], ("--log-every 0",)),
    (["--cache-mb", "0"], ("--cache-mb 0",)),
    (["--dtype", "fp8"], ("--dtype 'fp8': should be one of",)),
    (["--loss", "l1"], ("--loss 'l1': should be one of kl, mse, kl+mse",)),
    (["--kl-weight", "0", "--loss", "kl"], ("nothing would train",)),
    (["--target", "nosuch/model"], ("--target nosuch/model", "Hugging Face")),
    (["--target", "no-such-model"], ("unknown model 'no-such-model'",)),
    (["--cartridge", "/nonexistent/cart"], ("adapter_config.json not found",)),
    (["--corpus", "/nonexistent/corpus.txt"], ("corpus /nonexistent/corpus.txt not found",)),
    (["--task", "/nonexistent/task.jsonl"], ("task file /nonexistent/task.jsonl not found",)),
])
def test_train_refuses_bad_flags_before_any_work(pair, tmp_path, change, message, no_model_loads):
    one_line_error(lambda: train.main(args(pair, tmp_path / "run") + change), *message)
    assert list(tmp_path.iterdir()) == []


def test_a_cartridge_config_of_the_wrong_types_is_refused(pair, tmp_path, no_model_loads):
    import shutil
    shutil.copytree(pair / "cart", tmp_path / "cart")
    config = json.loads((tmp_path / "cart" / "adapter_config.json").read_text())
    (tmp_path / "cart" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": "8"}))
    one_line_error(lambda: train.main(args(pair, tmp_path / "run", "--cartridge", str(tmp_path / "cart"))),
                   "lora_alpha '8'", "a number lora_alpha")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cart"]


def test_lora_script_refuses_bad_flags_before_loading(pair, tmp_path, no_model_loads):
    base = ["--model", str(pair / "source"), "--out", str(tmp_path / "cart")]
    one_line_error(lambda: lora.main(base + ["--steps", "0"]), "--steps 0: should be at least 1")
    one_line_error(lambda: lora.main(base + ["--lr", "-1"]), "--lr -1.0: should be a number above 0")
    one_line_error(lambda: lora.main(base + ["--rank", "0"]), "--rank 0")
    one_line_error(lambda: lora.main(base + ["--device", "tpu"]), "--device 'tpu': should be")
    one_line_error(lambda: lora.main(["--model", "/missing", "--out", str(tmp_path / "cart")]), "unknown model '/missing'")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_bad_input_before_scoring(pair, tmp_path, no_model_loads):
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    (run / "heads.safetensors").write_bytes(b"")
    (run / "lora" / "adapter_config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"source": str(pair / "source"), "target": str(pair / "target"),
                                                 "cartridge": str(tmp_path / "gone")}))
    one_line_error(lambda: evaluate.main(["--run", str(run)]), "gone/adapter_config.json not found")
    one_line_error(lambda: evaluate.main(["--lora", str(pair / "cart"), "--model", "/missing"]), "unknown model '/missing'")
    one_line_error(lambda: evaluate.main(["--lora", str(pair / "cart"), "--model", str(pair / "source"),
                                          "--max-new-tokens", "-1"]), "--max-new-tokens -1")
    one_line_error(lambda: evaluate.main(["--run", str(run), "--dtype", "fp8"]), "--dtype 'fp8': should be one of")
    one_line_error(lambda: evaluate.main(["--run", str(run), "--out", "x.json"]), "--out x.json: --run writes")
    assert not (run / "eval.json").exists()


def test_a_resume_with_other_settings_is_refused(pair, tmp_path):
    """Interrupted at step 9, then resumed: with another learning rate and corpus, refused (each flag named); with
    more steps, resumed (the steps taken are the same)."""
    interrupted_run(pair, tmp_path / "cut")
    corpus = tmp_path / "other.txt"
    corpus.write_text("Another text entirely, about other things and other numbers like 5 and 6.\n\n" * 20)
    text = one_line_error(lambda: train.main(args(pair, tmp_path / "cut", "--resume", "--lr", "0.5", "--corpus",
                                                  str(corpus))), "--lr 0.01 -> 0.5", "--corpus")
    assert "--steps 12" not in text and (tmp_path / "cut.partial" / "checkpoint.pt").is_file()
    train.main(args(pair, tmp_path / "cut", "--resume", "--steps", "14"))
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["steps"] == 14


def test_the_teacher_asks_again_until_n_questions_are_kept(pair, tmp_path, monkeypatch, capsys):
    """--corpus format: questions the teacher leaves empty are asked for again (a bounded number of rounds); the
    counts are printed and recorded; a corpus under half of --max-chunks is refused."""
    monkeypatch.setattr(train, "CACHE", tmp_path / "cache")
    real = train.sample
    def half_empty(model, tokenizer, prompts, new_tokens, seed=0, **kwargs):
        if all(p == "Question:" for p in prompts):  # the question round: every other question left empty
            return [p + ("\n" if i % 2 else " What is a list?\n") for i, p in enumerate(prompts)]
        return real(model, tokenizer, prompts, new_tokens, seed, **kwargs)
    monkeypatch.setattr(train, "sample", half_empty)
    train.main(args(pair, tmp_path / "a", "--corpus", "format", "--steps", "2", "--max-chunks", "6"))
    record = json.loads((tmp_path / "a" / "config.json").read_text())["provenance"]
    assert record["teacher_corpus"] == {"asked": 6 + 3 + 1, "questions": 6, "samples": 6} and record["chunks"] == 6
    assert "asked 10 questions, kept 6, 6 samples" in capsys.readouterr().out
    monkeypatch.setattr(train, "sample", lambda model, tok, prompts, *a, **k: [p + "\n" for p in prompts]
                        if all(p == "Question:" for p in prompts) else real(model, tok, prompts, *a, **k))
    with pytest.raises(SystemExit, match=r"the teacher wrote a question in 0 of 64 tries.*under half"):
        train.main(args(pair, tmp_path / "b", "--corpus", "format", "--steps", "2", "--max-chunks", "16"))
    assert not (tmp_path / "b").exists()


def test_the_generation_limit_fits_the_task(tmp_path):
    """48 new tokens for the generated arithmetic; for a task file, its longest training answer plus a margin (the
    validation and test rows' answers are not read for it)."""
    from transformers import AutoTokenizer
    from conftest import tiny_tokenizer
    tok = tiny_tokenizer(300)
    rows = [{"question": f"q{i}", "answer": "step " * (5 if i < 4 else 60) + f"#### {i}"} for i in range(6)]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    longest = max(len(tok(" " + r["answer"], add_special_tokens=False)["input_ids"]) for r in rows[:4])
    assert evaluate.new_tokens_limit("arithmetic", tok) == 48
    assert evaluate.new_tokens_limit(str(path), tok, n_held=1) == longest + evaluate.MARGIN_NEW_TOKENS
