"""train.py end to end on tiny models saved to folders: two tokenizers, other depths and widths."""
import hashlib
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cast
import evaluate
import models
import runs
import train
from conftest import args, script, tiny_llama
from lora import add_lora, save_lora

ROOT = Path(__file__).resolve().parents[1]


def test_end_to_end_writes_outputs_and_the_loss_falls(pair, tmp_path):
    out = tmp_path / "run"
    train.main(args(pair, out))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "heads.safetensors", "log.jsonl", "lora"]
    assert not (tmp_path / "run.partial").exists()
    start, *log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8, 10, 12] and start["step"] == 0
    assert [r["step"] for r in log if "task_kl" in r] == [4, 8, 12] and start["task_kl_bare"] > 0
    assert log[-1]["loss"] < log[0]["loss"]
    assert json.loads((out / "config.json").read_text())["steps"] == 12
    heads = load_file(out / "heads.safetensors")
    assert len(heads) == 2 * 3 * 3  # (P_in, P_out) x 3 roles x 3 source layers
    assert set(json.loads((out / "lora" / "adapter_config.json").read_text())["target_modules"]) >= {
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}


def start_heads(monkeypatch, pair, out, *extra):
    """The heads as a run starts them (ridge start, --init's choice), written as a run's heads: fit does nothing."""
    monkeypatch.setattr(train, "fit", lambda *a, **k: None)
    train.main(args(pair, out, *extra))
    monkeypatch.undo()
    return load_file(out / "heads.safetensors")


@pytest.mark.parametrize("loss, extra", [("kl", ()), ("mse", ()), ("mse", ("--mse-detach",))])
def test_ablations_switch_one_term_off(pair, tmp_path, loss, extra, capsys, monkeypatch):
    """--loss kl or mse: the other term is 0 in every log line, and the heads train on the one kept. Every P_in
    moves; with the KL every P_out too; with the MSE alone the upstream P_out move through x_T (the target's
    activations that the MSE reads), and none with --mse-detach."""
    flags = ("--loss", loss, "--init", "ridge", *extra)
    start = start_heads(monkeypatch, pair, tmp_path / "start", *flags)
    train.main(args(pair, tmp_path / loss, *flags))
    log = [json.loads(line) for line in (tmp_path / loss / "log.jsonl").read_text().splitlines()][1:]
    off = "mse" if loss == "kl" else "kl"
    assert all(r[off] == 0 for r in log) and all(r[loss] > 0 for r in log)
    heads = load_file(tmp_path / loss / "heads.safetensors")
    moved = {k for k in heads if not torch.equal(heads[k], start[k])}
    p_in, p_out = {k for k in heads if "P_in" in k}, {k for k in heads if "P_out" in k}
    assert p_in <= moved
    if loss == "kl":
        assert p_out <= moved
    elif extra:
        assert not p_out & moved
    else:
        assert p_out & moved and p_out - moved
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if line.startswith("first batch"))
    assert float(first.split("kl without heads ")[1].split()[0]) > 0  # the yardstick is measured in both arms
    if loss == "kl":  # x_S only feeds the MSE: caching it anyway ran the real KL-only run out of memory
        assert "x_S kept at 0 aligned positions per chunk" in out and "mse off" in first


def interrupted_run(pair, out, *extra):
    """A run on the tiny pair stopped at step 9: after the step-5 checkpoint and the step-8 log line."""
    original = train.batch_chunks
    def interrupted(cfg, step, n_chunks):
        if step == 9:
            raise KeyboardInterrupt
        return original(cfg, step, n_chunks)
    train.batch_chunks = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(args(pair, out, *extra))
    finally:
        train.batch_chunks = original


def test_resume_gives_the_same_heads(pair, tmp_path):
    train.main(args(pair, tmp_path / "full"))
    interrupted_run(pair, tmp_path / "cut")
    assert (tmp_path / "cut.partial" / "checkpoint.pt").is_file() and not (tmp_path / "cut").exists()
    train.main(args(pair, tmp_path / "cut", "--resume"))
    full, resumed = load_file(tmp_path / "full" / "heads.safetensors"), load_file(tmp_path / "cut" / "heads.safetensors")
    assert all(torch.allclose(full[k], resumed[k], atol=1e-6) for k in full)
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("full", "cut")]
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]]  # steps 6 and 8 ran twice, logged once
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(*logs) if "loss" in a)


@pytest.mark.parametrize("change, message", [
    (["--target", "no-such-model"], "unknown model 'no-such-model'"),
    (["--cartridge", "/nonexistent/cart"], "adapter_config.json not found"),
    (["--corpus", "/nonexistent/corpus.txt"], "corpus /nonexistent/corpus.txt not found"),
    (["--loss", "l1"], "--loss 'l1': should be one of"),
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
    with pytest.raises(SystemExit, match=r"q_proj has A \(4, 32\), .* needs A \(4, 64\)"):
        train.main(args(pair, tmp_path / "run", "--cartridge", str(tmp_path / "other_cart")))
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="exists; pass --force"):
        train.main(args(pair, tmp_path / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "other_cart", "run"]
    assert list((tmp_path / "run").iterdir()) == []


def test_benchmark_runs_and_prints_ratios(pair, tmp_path, capsys):
    module = script("benchmark")
    module.benchmark(train.parse_config(args(pair, tmp_path / "run")))
    out = capsys.readouterr().out
    assert "cast step" in out and "| ratio" in out and "peak during CAST steps" in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def diverse_corpus(path):
    """Text that exercises every direction of the tiny models' activations, so that a ridge fit is determined."""
    import random
    from conftest import TEXTS
    words, rng = " ".join(TEXTS).split(), random.Random(0)
    path.write_text("\n\n".join(" ".join(rng.choice(words) if rng.random() < 0.8 else str(rng.randint(0, 999))
                                         for _ in range(40)) for _ in range(200)))
    return path


def missing_effect(pair, run) -> float:
    """KL(teacher || target + exported LoRA) / KL(teacher || bare target) on the test texts: the share of the
    cartridge's effect on the output that the transfer misses (0 = all of it carried, 1 = none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from conftest import TEXTS
    from lora import load_lora
    tok = AutoTokenizer.from_pretrained(pair / "source")
    batch = tok(TEXTS[:5], return_tensors="pt", padding=True)
    def logp(adapter=None):
        model = AutoModelForCausalLM.from_pretrained(pair / "source").eval()
        if adapter:
            load_lora(model, adapter)
        with torch.no_grad():
            return torch.log_softmax(model(**batch).logits, -1)[batch["attention_mask"].bool()]  # (N, V)
    teacher, base, student = logp(pair / "cart"), logp(), logp(run / "lora")
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1).mean().item()
    return kl(teacher, student) / kl(teacher, base)


def test_identity_pair_carries_the_whole_cartridge_and_stays_there(pair, tmp_path, capsys):
    """Source == target: the consistent ridge start is the identity, the first KL is 0, and 30 steps of
    training do not walk away from it (the step shrinks with the start's distance to the teacher: with the full
    step, lr 1e-2 here, 0.9% goes missing); the exported LoRA reproduces the cartridge's effect to within 0.1%."""
    corpus = diverse_corpus(tmp_path / "corpus.txt")
    train.main(args(pair, tmp_path / "run", "--target", str(pair / "source"), "--corpus", str(corpus),
                    "--steps", "30", "--ridge-positions", "1024", "--init", "ridge"))
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("first batch"))
    assert float(first.split("with ridge heads: kl ")[1].split()[0]) < 1e-4
    assert float(first.split("step factor ")[1].split()[0]) < 0.1
    assert missing_effect(pair, tmp_path / "run") < 1e-3


def test_start_fitted_against_the_cartridge_misses_part_of_it(pair, tmp_path, monkeypatch):
    """The older start (source side with its cartridge on) counts the upstream kernels twice."""
    corpus = diverse_corpus(tmp_path / "corpus.txt")
    start_heads(monkeypatch, pair, tmp_path / "run", "--target", str(pair / "source"), "--corpus", str(corpus),
                "--ridge-positions", "1024", "--init", "ridge-cartridge")
    assert missing_effect(pair, tmp_path / "run") > 0.05


def prepared(pair, tmp_path, *extra):
    """What train() holds before its first step: the teacher cache, the target and its ridge-started heads."""
    cfg = train.parse_config(args(pair, tmp_path / "run", *extra))
    kernels, vocab_T, cache, device, dtype = train.prepare(cfg)
    target, tok_T = train.load_model(cfg.target, device, dtype)
    heads = train.cast.make_heads(kernels, target).to(device)
    train.ridge_start(cfg, target, heads, cache, tok_T.pad_token_id)
    return cfg, target, vocab_T, cache, heads


def test_to_device_moves_every_float_tensor_a_step_reads(pair, tmp_path):
    """After the ridge start the cache's floating tensors (teacher states, x_S, head rows) go to the training
    device ('meta' stands in for a GPU); the index lists stay on the CPU, where they are built and read."""
    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        for child in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ():
            yield from tensors(child)
    cfg, target, vocab, cache, _ = prepared(pair, tmp_path)
    cache.ridge_x_S, cache.ridge_y_S = {}, {}  # as train() drops them
    cache.to("meta")
    floats = [t for t in tensors(vars(cache)) if t.is_floating_point()]
    assert len(floats) > 3 * 4 and all(t.device.type == "meta" for t in floats)
    assert all(t.device.type == "cpu" for t in tensors(vars(cache)) if not t.is_floating_point())


def test_teacher_logits_are_the_source_with_its_cartridge(pair, tmp_path):
    """The cached teacher, recomputed at a step, is the source + cartridge's own logits over the shared vocabulary."""
    from transformers import AutoModelForCausalLM
    from lora import load_lora
    cfg, target, vocab, cache, _ = prepared(pair, tmp_path, "--dtype", "fp32")
    source = AutoModelForCausalLM.from_pretrained(pair / "source")
    load_lora(source, pair / "cart")
    tok_S, tok_T = (train.load_model(str(pair / m))[1] for m in ("source", "target"))
    vocab_S, _ = cast.shared_vocab(tok_S, tok_T)
    chunks = [tok_T.decode(cache.ids_T[c], skip_special_tokens=True) for c in range(3)]
    for c, text in enumerate(chunks):
        enc_S, enc_T = tok_S(text, return_offsets_mapping=True), tok_T(text, return_offsets_mapping=True)
        pos_S, _ = cast.aligned_positions(enc_S["offset_mapping"], enc_T["offset_mapping"])
        with torch.no_grad():
            direct = source(torch.tensor([enc_S["input_ids"]])).logits[0, pos_S][:, vocab_S]  # (N, V)
        assert torch.allclose(cast.teacher_logits_at(cache, [c], "cpu"), direct, atol=1e-4)


def test_zero_effect_start_begins_at_the_bare_target_and_moves(pair, tmp_path, capsys, monkeypatch):
    """--init ridge-in: ridge P_in, P_out = 0, so the first KL is the bare target's; P_out still gets a step."""
    at_start = start_heads(monkeypatch, pair, tmp_path / "start", "--init", "ridge-in")
    capsys.readouterr()
    train.main(args(pair, tmp_path / "run", "--init", "ridge-in", "--steps", "4"))
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("first batch"))
    bare, start = float(first.split("without heads ")[1].split()[0]), float(first.split("kl ")[2].split()[0])
    assert bare > 0 and abs(start - bare) < 1e-6 * bare
    assert "step factor 1.000 (" in first  # the full step: the distance to the teacher is the bare target's
    heads = load_file(tmp_path / "run" / "heads.safetensors")
    p_out = [k for k in heads if "P_out" in k]
    assert p_out and all(at_start[k].abs().max() == 0 for k in p_out)
    assert all(heads[k].abs().max() > 0 for k in p_out)


def test_auto_start_takes_the_start_closer_to_the_teacher(pair, tmp_path, capsys, monkeypatch):
    """--init auto keeps both ridge heads where they start closer to the teacher than the bare target (the identity
    pair: exact, first KL 0), and the zero-effect start where they start further away."""
    corpus = diverse_corpus(tmp_path / "corpus.txt")
    start_heads(monkeypatch, pair, tmp_path / "run", "--target", str(pair / "source"), "--corpus", str(corpus),
                "--ridge-positions", "1024", "--init", "auto")
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("--init auto")).endswith("-> ridge")
    first = next(line for line in lines if line.startswith("first batch"))
    assert float(first.split("kl ")[2].split()[0]) < 1e-4 < float(first.split("without heads ")[1].split()[0])
    cfg, target, vocab_T, cache, heads = prepared(pair, tmp_path / "2", "--init", "auto")
    with torch.no_grad():
        for h in heads:
            h.P_out.weight.mul_(100.0)  # a start far from the teacher
    assert train.choose_start(cfg, target, heads, cache, vocab_T, tmp_path)["start"] == "ridge-in"
    assert all(h.P_out.weight.abs().max() == 0 for h in heads)  # the zero-effect start: the bare target


def test_format_corpus_is_the_teacher_answering_its_own_questions_once(pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "CACHE", tmp_path / "cache")
    flags = ("--corpus", "format", "--steps", "2", "--max-chunks", "6")
    train.main(args(pair, tmp_path / "a", *flags))
    written = list((tmp_path / "cache" / "teacher-corpus").glob("*.jsonl"))
    texts = [json.loads(line)["text"] for line in written[0].read_text().splitlines()]
    assert len(written) == 1 and "written by the teacher" in capsys.readouterr().out
    assert texts and all(re.match(r"Question: [^\n]+\nAnswer:", t) for t in texts)
    kept = [json.loads(line)["text"] for line in (tmp_path / "a" / "teacher_text.jsonl").read_text().splitlines()]
    provenance = json.loads((tmp_path / "a" / "config.json").read_text())["provenance"]
    assert len(kept) == len(texts) and all(k and t.startswith(k[:8]) for k, t in zip(kept, texts))
    assert hashlib.sha256(json.dumps(kept).encode()).hexdigest() == provenance["chunks_sha256"]  # what it trained on
    train.main(args(pair, tmp_path / "b", *flags))
    assert "written by the teacher" not in capsys.readouterr().out  # the second run reads the same file


def test_long_steps_print_their_progress(pair, tmp_path, monkeypatch, capsys):
    """The teacher writing its text, the passes over the chunks and the scoring each print how far they are and
    the time left (here with no quiet start: runs.PROGRESS_EVERY = 0)."""
    monkeypatch.setattr(train, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(runs, "PROGRESS_EVERY", 0)
    train.main(args(pair, tmp_path / "a", "--corpus", "format", "--steps", "2", "--max-chunks", "20"))
    out = capsys.readouterr().out
    for step in ("teacher's text, round 1: questions written: ", "teacher's text: answers written: ",
                 "teacher pass: "):
        assert re.search(re.escape(step) + r"\d+/\d+( chunks)? in [\d.]+ min", out), step
    assert re.search(r"teacher pass: 8/\d+ chunks in [\d.]+ min, about [\d.]+ min left", out)
    evaluate.generate(*train.load_model(str(pair / "source")), ["Question: 1 + 1?\nAnswer:"] * 5, 2, batch_size=2)
    assert "answers generated: 5/5" in capsys.readouterr().out


def test_sampled_continuations_start_with_their_prompt_and_follow_the_seed():
    from conftest import TEXTS, tiny_tokenizer
    tok, model = tiny_tokenizer(300), tiny_llama(layers=2, width=64, vocab=300).eval()
    tok.pad_token = tok.eos_token
    prompts = TEXTS[:5]  # of several lengths: one batch per length
    a = train.sample(model, tok, prompts, new_tokens=6, seed=1)
    b = train.sample(model, tok, prompts, new_tokens=6, seed=1)
    c = train.sample(model, tok, prompts, new_tokens=6, seed=2)
    assert a == b and a != c and len(a) == len(prompts)
    assert all(text.startswith(p) for text, p in zip(a, prompts))


def test_the_teacher_writes_behind_the_bos_its_tokenizer_adds(pair):
    """sample() feeds each prompt as the tokenizer encodes it for the cartridge's training and scoring: with a
    <bos> where the tokenizer adds one (Gemma-3's does; without it Gemma-3 writes markup, not questions)."""
    from tokenizers import processors
    from conftest import tiny_tokenizer
    tok = tiny_tokenizer(300)
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    model, fed = tiny_llama(layers=2, width=64, vocab=len(tok)).eval(), []
    generate = model.generate
    def spy(input_ids, **kwargs):
        fed.append(input_ids)  # (B, prompt length)
        return generate(input_ids=input_ids, **kwargs)
    model.generate = spy
    texts = train.sample(model, tok, ["Question:"] * 3, new_tokens=4)
    assert [row[0] for batch in fed for row in batch.tolist()] == [tok.bos_token_id] * 3
    assert all(text.startswith("Question:") for text in texts)  # the <bos> is not in the text
    # a text written without the <bos> is not read from the cache for a tokenizer that adds one
    cfg = train.Config(source="s", cartridge=str(pair / "cart"))
    with_bos = train.teacher_text_key(cfg, 8, tok)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert tok("Question:")["input_ids"][0] != tok.bos_token_id and train.teacher_text_key(cfg, 8, tok) != with_bos


def test_paper_recipe_is_one_flag():
    cfg = train.parse_config(["--paper-recipe"])
    assert (cfg.corpus, cfg.init, cfg.lr, cfg.top_k, cfg.max_chunks) == ("stdlib", "ridge-cartridge", 1e-2, 64, 1000)
    assert train.parse_config(["--paper-recipe", "--max-chunks", "300"]).max_chunks == 300
    assert (train.Config.corpus, train.Config.init) == ("format", "auto")


def test_memory_breakdown_adds_up():
    """The printed parts and the rest sum to the peak; on a GPU the cache is a part (it moves there), Python is not."""
    import re
    model = tiny_llama(layers=2)
    target_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    n_heads = 2**20  # 16 MB of heads state
    line = runs.memory_breakdown("cpu", 5000, 300, model, 1000, n_heads)
    numbers = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)", line.split("=", 1)[1])]
    target, cache, heads, held, ratio, runtime, rest = numbers
    assert (target, cache, heads) == (round(target_mb), 1000, 16) and held == round(target_mb + 1016)
    assert abs(target + cache + heads + runtime + rest - 5000) <= 2 and abs(ratio - 5000 / (target_mb + 1016)) < 0.01
    gpu = runs.memory_breakdown("cuda", 500, 300, model, 1000, n_heads)
    assert "teacher cache 1000" in gpu and "Python" not in gpu and f"{round(target_mb + 1016)} MB held" in gpu


def test_a_run_takes_one_thread_per_core_it_may_use(monkeypatch):
    """OMP_NUM_THREADS wins; without it, the cores of the process's affinity (taskset), not the machine's."""
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert models.use_cores() == 1 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(models.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
        assert models.use_cores() == 3
    finally:
        torch.set_num_threads(before)


def test_step_factor_is_bounded_and_says_why():
    """sqrt(KL_start / KL_bare), clipped to [GAP_MIN, 1]: an exact start's KL is rounding noise, sometimes below 0."""
    assert train.step_factor(-1.5e-9, 0.3)[0] == train.GAP_MIN and "exact" in train.step_factor(-1.5e-9, 0.3)[1]
    assert train.step_factor(0.0, 0.3)[0] == train.GAP_MIN
    assert train.step_factor(0.03, 0.3)[0] == pytest.approx(0.1 ** 0.5)
    assert train.step_factor(0.5, 0.3) == (1.0, "the start is no closer to the teacher than the bare target: full step")
    assert train.step_factor(0.0, 0.0)[0] == 1.0
    with pytest.raises(FloatingPointError, match="not finite"):
        train.step_factor(float("nan"), 0.3)


@pytest.mark.parametrize("twin", [False, True])
def test_exact_starts_run_to_the_end(pair, tmp_path, monkeypatch, twin, capsys):
    """Source == target, or its rotated twin, with the default start (auto): the start is
    exact, its step factor is floored and printed, and the run ends with its outputs written."""
    monkeypatch.setattr(models, "CACHE", tmp_path / "cache")
    target = f"rotated:{pair / 'source'}" if twin else str(pair / "source")
    corpus = diverse_corpus(tmp_path / "corpus.txt")
    train.main(args(pair, tmp_path / "run", "--target", target, "--init", "auto",
                    "--corpus", str(corpus), "--ridge-positions", "1024"))
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["start"] == "ridge" and start["kl_first_batch"] < 1e-4 * start["kl_first_batch_bare"]
    assert start["step_gap"] == train.GAP_MIN and "exact" in start["step_gap_reason"]
    assert "step factor " in capsys.readouterr().out and (tmp_path / "run" / "lora" / "adapter_config.json").is_file()


def nan_at(step_of_nan):
    """A cast_loss that returns NaN from the given step on (the loss of step k is computed once, at step k)."""
    original, calls = cast.cast_loss, {"steps": 0}
    def loss(cfg, target, heads, cache, vocab_T, chunk_ids, backward=False):
        out = original(cfg, target, heads, cache, vocab_T, chunk_ids, backward)
        if backward:
            calls["steps"] += 1
            if calls["steps"] >= step_of_nan:
                out["loss"] = out["loss"] * float("nan")
        return out
    return loss


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(cast, "cast_loss", nan_at(7))
    with pytest.raises(SystemExit, match=r"the loss is nan at step 7 .* checkpoint of step 5: --resume continues"):
        train.main(args(pair, tmp_path / "run"))
    assert torch.load(tmp_path / "run.partial" / "checkpoint.pt", weights_only=True)["step"] == 5
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="interrupted run with a checkpoint: pass --resume"):
        train.main(args(pair, tmp_path / "run"))
    train.main(args(pair, tmp_path / "run", "--resume"))
    assert (tmp_path / "run" / "heads.safetensors").is_file() and not (tmp_path / "run.partial").exists()


def test_a_run_that_stopped_before_its_first_checkpoint_says_force(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(cast, "cast_loss", nan_at(2))
    with pytest.raises(SystemExit, match="at step 2 .* no checkpoint was written yet .* --force starts again"):
        train.main(args(pair, tmp_path / "run"))
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="stopped before its first checkpoint: pass --force"):
        train.main(args(pair, tmp_path / "run"))
    with pytest.raises(SystemExit, match="--resume: .* stopped before its first checkpoint .* without --resume and with --force"):
        train.main(args(pair, tmp_path / "run", "--resume"))
    with pytest.raises(SystemExit, match="--resume: there is no interrupted run"):
        train.main(args(pair, tmp_path / "other", "--resume"))
    train.main(args(pair, tmp_path / "run", "--force"))
    assert (tmp_path / "run" / "heads.safetensors").is_file()


def test_paper_recipe_leaves_the_flags_given_beside_it():
    cfg = train.parse_config(["--paper-recipe", "--corpus", "X", "--lr=3e-4", "--init", "ridge", "--top-k", "0"])
    assert (cfg.corpus, cfg.lr, cfg.init, cfg.top_k, cfg.max_chunks) == ("X", 3e-4, "ridge", 0, 1000)


def test_config_records_versions_model_hashes_and_the_corpus(pair, tmp_path):
    train.main(args(pair, tmp_path / "run"))
    record = json.loads((tmp_path / "run" / "config.json").read_text())["provenance"]
    assert record["torch"] == torch.__version__ and "transformers" in record
    assert len(record["source"]["sha256"]) == 64 and record["source"]["sha256"] != record["target"]["sha256"]
    assert record["target"]["eos_token_id"] is not None and len(record["cartridge_sha256"]) == 64
    assert record["chunks"] > 0 and len(record["chunks_sha256"]) == 64
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert (record["commit"] or "").rstrip("+") == ("" if head.returncode else head.stdout.strip())  # where known


@pytest.mark.parametrize("corpus", [
    "\n\n".join(["word"] * 40),  # one-token documents
    "\n\n".join(f"東京の天気は晴れです。{i} 🙂🚀 Ünïcödé ∑ → ∞ — naïve café {i}" for i in range(30)),  # many bytes per character
])
def test_unusual_corpora_train_or_fail_clearly(pair, tmp_path, corpus):
    (tmp_path / "corpus.txt").write_text(corpus)
    train.main(args(pair, tmp_path / "run", "--corpus", str(tmp_path / "corpus.txt")))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log[1:])


def test_a_truncated_cartridge_stops_the_run_before_anything_is_written(pair, tmp_path):
    import shutil
    shutil.copytree(pair / "cart", tmp_path / "cart")
    weights = tmp_path / "cart" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SystemExit, match="truncated or corrupted"):
        train.main(args(pair, tmp_path / "run", "--cartridge", str(tmp_path / "cart")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cart"]


@pytest.mark.parametrize("steps", ["30", "10"])  # a NaN gradient at a checkpoint step, or at the last step
def test_heads_made_nan_by_a_gradient_are_never_checkpointed(pair, tmp_path, monkeypatch, steps):
    original, calls = cast.cast_loss, {"steps": 0}
    def loss(cfg, target, heads, cache, vocab_T, chunk_ids, backward=False):
        out = original(cfg, target, heads, cache, vocab_T, chunk_ids, backward)
        calls["steps"] += backward
        if calls["steps"] == 10 and backward:  # a finite loss, a NaN gradient
            next(heads.parameters()).grad.fill_(float("nan"))
        return out
    monkeypatch.setattr(cast, "cast_loss", loss)
    with pytest.raises(SystemExit, match=r"heads are not finite after step 10; .* checkpoint of step 5"):
        train.main(args(pair, tmp_path / "run", "--steps", steps))
    assert torch.load(tmp_path / "run.partial" / "checkpoint.pt", weights_only=True)["step"] == 5
    assert not (tmp_path / "run").exists()


def test_nonlinear_heads_start_as_the_linear_heads_and_train_their_mlp(pair, tmp_path, monkeypatch):
    """scripts/nonlinear_heads.py (LAB.md's assignment): each head's MLP starts at zero, so the head computes the
    linear head's delta; with an MLP, the delta is s * P_out B_S A_S (P_in x + MLP(x)); a run trains the MLP (it steps
    relative to P_in, times --mlp-step), writes it into heads.safetensors and evaluate rebuilds it; `share` measures
    the MLP's output against P_in's."""
    nonlinear = script("nonlinear_heads")
    from lora import read_adapter
    monkeypatch.setattr(cast, "make_heads", cast.make_heads)  # use_nonlinear_heads replaces them: undone after
    monkeypatch.setattr(train, "step_sizes", train.step_sizes)
    source, tok = train.load_model(str(pair / "source"))
    target, _ = train.load_model(str(pair / "target"))
    config, factors = read_adapter(pair / "cart")
    kernels = cast.find_kernels(config, factors, source, target)
    linear, mlp = cast.make_heads(kernels, target), None
    nonlinear.use_nonlinear_heads(width=8)
    mlp = cast.make_heads(kernels, target)
    mlp.load_state_dict(linear.state_dict(), strict=False)  # the same P_in, P_out
    x = torch.randn(2, 5, linear[0].P_in.weight.shape[1])
    assert torch.allclose(mlp[0](x), linear[0](x), atol=1e-6)
    torch.nn.init.normal_(mlp[0].mlp[2].weight)
    h = mlp[0]
    expected = h.scale * (h.P_in(x) + h.mlp(x)) @ h.A_S.T @ (h.P_out.weight @ h.B_S).T
    assert torch.allclose(h(x), expected, atol=1e-5) and not torch.allclose(h(x), linear[0](x), atol=1e-3)
    out = nonlinear.main(["train", *args(pair, tmp_path / "run", "--steps", "4"), "--width", "8"]) or tmp_path / "run"
    assert json.loads((out / "nonlinear.json").read_text())["width"] == 8
    saved = load_file(out / "heads.safetensors")
    assert saved["0.mlp.2.weight"].shape == (h.A_S.shape[1], 8) and saved["0.mlp.2.weight"].abs().sum() > 0
    heads, _ = evaluate.run_heads(out, source, target)
    assert torch.equal(heads[0].mlp[2].weight, saved["0.mlp.2.weight"])
    nonlinear.use_nonlinear_heads(width=8, mlp_step=3.0)  # --mlp-step: the MLP's step is 3 x its P_in's
    sizes = dict(zip(map(id, heads.parameters()), train.step_sizes(heads)))
    assert sizes[id(heads[1].mlp[2].weight)] == pytest.approx(3 * sizes[id(heads[1].P_in.weight)])
    assert sizes[id(heads[1].P_out.weight)] == pytest.approx(heads[1].P_out.weight.pow(2).mean().sqrt().item())
    share = nonlinear.mlp_share(out, ["a b c d e f", "g h i j"])  # ||MLP(x)|| / ||P_in x||: > 0 once trained
    assert share["chunks"] == 2 and len(share["each"]) == len(heads) and 0 < share["median"] <= share["max"] < 1
    assert "out_median" not in share
    # --out-mlp: delta_T = P_out y_S + MLP_out(y_S), y_S = s B_S A_S u; MLP_out starts at zero and maps 0 to 0
    nonlinear.use_nonlinear_heads(width=8, out_mlp=True)
    both = cast.make_heads(kernels, target)
    both.load_state_dict(linear.state_dict(), strict=False)
    assert torch.allclose(both[0](x), linear[0](x), atol=1e-6)
    h = both[0]
    torch.nn.init.normal_(h.mlp_out[2].weight)
    y_S = h.scale * h.P_in(x) @ h.A_S.T @ h.B_S.T
    assert torch.allclose(h(x), h.P_out(y_S) + h.mlp_out(y_S), atol=1e-5) and not torch.allclose(h(x), linear[0](x))
    assert h.mlp_out(torch.zeros_like(y_S)).abs().max() == 0
    run = nonlinear.main(["train", *args(pair, tmp_path / "both", "--steps", "4"), "--width", "8", "--out-mlp"]) \
        or tmp_path / "both"
    assert json.loads((run / "nonlinear.json").read_text())["mlp"] == "beside P_in and P_out"
    heads, _ = evaluate.run_heads(run, source, target)
    assert heads[0].mlp_out[2].weight.abs().sum() > 0
    sizes = dict(zip(map(id, heads.parameters()), train.step_sizes(heads)))
    assert sizes[id(heads[1].mlp_out[0].weight)] == pytest.approx(sizes[id(heads[1].P_out.weight)])
    nonlinear.use_nonlinear_heads(width=8)  # `share` rebuilds the heads as nonlinear.json records them
    (run / "teacher_text.jsonl").write_text(json.dumps({"text": "a b c d e f"}) + "\n")  # the tiny run has none
    nonlinear.main(["share", "--run", str(run), "--chunks", "1"])
    share = json.loads((run / "mlp_share.json").read_text())
    assert 0 < share["out_median"] <= share["out_max"] < 1 and len(share["out_each"]) == len(heads)


def test_cka_layer_map_sends_each_layer_of_a_model_to_itself(pair, tmp_path, monkeypatch):
    """scripts/cka_layer_map.py: linear CKA is 1 for features equal up to a rotation and a scale, so a model against
    itself maps every layer to itself; a run with the map records it and evaluate rebuilds the same kernels."""
    cka = script("cka_layer_map")
    monkeypatch.setattr(cast, "layer_map", cast.layer_map)  # use_layer_map replaces it: undone after
    X = torch.randn(50, 6)
    Q = torch.linalg.qr(torch.randn(6, 6))[0]
    assert cka.linear_cka(X, 3 * X @ Q) == pytest.approx(1.0) and cka.linear_cka(X, torch.randn(50, 6)) < 0.9
    flags = args(pair, tmp_path / "run", "--target", str(pair / "source"), "--steps", "2")
    mapping, matrix = cka.cka_map(train.parse_config(flags), 8)
    assert mapping == list(range(len(matrix))) and len(matrix) == len(matrix[0])
    out = cka.main(["train", *flags, "--cka-chunks", "8"]) or tmp_path / "run"
    assert json.loads((out / "layer_map.json").read_text())["map"] == mapping
