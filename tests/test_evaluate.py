"""evaluate.py: scoring, confidence intervals, retention, the weight-space baseline."""
import json
import math
import re
import shutil

import pytest
import torch

import cast
from conftest import script, tiny_gemma, tiny_llama
from evaluate import retention, task_accuracy, weight_space_heads, wilson
from lora import add_lora, lora_layers, read_adapter, save_lora


class CharTokenizer:
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text):
        return {"input_ids": [2 + ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 2) for i in ids if i > 1)


class ScriptedModel(torch.nn.Module):
    """'Generates' a fixed continuation per prompt, so the scoring can be checked by hand."""

    def __init__(self, answers):
        super().__init__()
        self.weight, self.answers = torch.nn.Parameter(torch.zeros(1)), answers

    def generate(self, input_ids, **kw):
        tok = CharTokenizer()
        rows = [tok(self.answers.pop(0))["input_ids"] for _ in input_ids]
        width = max(map(len, rows))
        return torch.cat([input_ids, torch.tensor([r + [1] * (width - len(r)) for r in rows])], 1)


def test_task_accuracy_counts_strict_and_flexible():
    problems = [{"question": f"q{i}", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(4)]
    outputs = [" 0 + 1 = 1\n#### 1\n#### 5", " 1 + 1 = 2, so 2", " wrong\n#### 7", " 3 + 1 = 4\n#### 4.0\n\nQuestion: 9"]
    r = task_accuracy(ScriptedModel(outputs), CharTokenizer(), problems, batch_size=3)
    assert (r["strict"], r["flexible"]) == (0.5, 0.5)  # strict: the first '####'; flexible: the last number
    assert r["strict_ci"][0] < 0.5 < r["strict_ci"][1]
    assert r["outputs"] == [" 0 + 1 = 1\n#### 1\n#### 5", " 1 + 1 = 2, so 2", " wrong\n#### 7", " 3 + 1 = 4\n#### 4.0"]
    many = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(7)]
    r = task_accuracy(ScriptedModel([f" #### {i}" for i in range(7)]), CharTokenizer(), many, batch_size=3)
    assert r["outputs"] == [f" #### {i}" for i in range(7)]  # every answer is kept, to be read


def test_wilson_interval():
    lo, hi = wilson(130, 200)
    assert lo == pytest.approx(0.581, abs=1e-3) and hi == pytest.approx(0.713, abs=1e-3)
    assert wilson(0, 200)[0] == 0.0 and 0 < wilson(0, 200)[1] < 0.02
    assert wilson(200, 200)[1] == 1.0


def test_retention_two_ways():
    r = retention(0.45, 0.05, 0.55)
    assert r["paper"] == pytest.approx(0.45 / 0.55) and r["lift"] == pytest.approx(0.8)
    assert retention(0.3, 0.1, 0.0)["paper"] is None and retention(0.3, 0.1, 0.1)["lift"] is None


def kernels_and_heads(tmp_path, source, target):
    add_lora(source, ["q_proj", "o_proj", "down_proj"], r=4, alpha=8)
    torch.manual_seed(0)
    for layer in lora_layers(source).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    save_lora(source, tmp_path / "cart")
    config, factors = read_adapter(tmp_path / "cart")
    return cast.make_heads(cast.find_kernels(config, factors, source, target), target)


def test_weight_space_identity_gives_back_the_update(tmp_path):
    source, target = tiny_llama(layers=2), tiny_llama(layers=2)
    heads = weight_space_heads(kernels_and_heads(tmp_path, source, target), source, target)
    for h in heads:
        A_T, B_T = h.target_factors()
        assert torch.allclose(B_T @ A_T, h.B_S @ h.A_S, atol=1e-5)  # dW_T == dW_S


def test_weight_space_shapes_across_models(tmp_path):
    source, target = tiny_llama(layers=3, width=64), tiny_gemma(layers=2, width=48)
    heads = weight_space_heads(kernels_and_heads(tmp_path, source, target), source, target, k=16)
    for h in heads:
        module = target.get_submodule(h.target_name)
        A_T, B_T = h.target_factors()
        assert A_T.shape == (4, module.in_features) and B_T.shape == (module.out_features, 4)
        assert torch.linalg.matrix_rank(h.P_in.weight) <= 16


def test_code_r2_is_one_for_exact_heads_and_less_for_others():
    from conftest import TEXTS, tiny_tokenizer
    code_r2 = script("code_r2").code_r2
    tok = tiny_tokenizer(300)
    source, target = tiny_llama(layers=2, vocab=300), tiny_llama(layers=2, vocab=300)  # the same weights
    add_lora(source, ["q_proj", "v_proj"], r=4, alpha=8)
    for layer in lora_layers(source).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    heads = cast.make_heads([cast.Kernel(n, n, l.lora_A.weight.detach(), l.lora_B.weight.detach(), l.scale)
                             for n, l in lora_layers(source).items()], target)
    for h in heads:  # the identity: the student reads exactly what the teacher reads, upstream kernels included
        torch.nn.init.eye_(h.P_in.weight)
        torch.nn.init.eye_(h.P_out.weight)
    r2 = code_r2(source, tok, target, tok, heads, TEXTS[:3])
    assert len(r2) == 4 and all(abs(v - 1) < 1e-5 for v in r2.values())
    torch.nn.init.normal_(heads[2].P_in.weight, std=0.1)
    r2 = code_r2(source, tok, target, tok, heads, TEXTS[:3])
    assert r2[heads[2].source_name] < 0.5 and abs(r2[heads[0].source_name] - 1) < 1e-5  # layer 0 q: upstream of it


def test_evaluate_cli_on_a_tiny_run(pair, tmp_path, capsys, monkeypatch):
    """End to end: a tiny run, a 'retrained' LoRA, the table; hooks and export generate the same text."""
    import train
    import evaluate
    from conftest import args
    train.main(args(pair, tmp_path / "run", "--dtype", "fp32"))  # hooks = export to 1e-4 in fp32, not in bf16
    retrained = tiny_gemma(layers=2, width=48, vocab=400)
    add_lora(retrained, ["q_proj"], r=2, alpha=4)
    save_lora(retrained, tmp_path / "retrained")
    evaluate.main(["--run", str(tmp_path / "run"), "--retrained", str(tmp_path / "retrained"), "--n", "6",
                   "--dtype", "fp32"])
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    hooks, export = results["target + CAST (hooks)"], results["target + CAST (exported)"]
    assert hooks["outputs"] == export["outputs"] and hooks["strict"] == export["strict"]
    assert len(hooks["strict_each"]) == 6 and hooks["strict_each"].count("1") / 6 == hooks["strict"]
    assert abs(hooks["nll"] - export["nll"]) < 1e-4
    assert {"source base", "target base", "teacher (source + cartridge)", "target + retrained LoRA",
            "target + weight-space"} <= set(results)
    r2 = script("code_r2").main(["--run", str(tmp_path / "run"), "--n", "3"])  # what the kernels read, on task texts
    assert len(r2) == 9 and all(v <= 1 for v in r2.values()) and (tmp_path / "run" / "code_r2.json").is_file()
    assert "| target + CAST (exported) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="config.json not found; --run takes a folder written by train.py"):
        evaluate.main(["--run", str(tmp_path)])
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    # --skip-baselines: only the run's own rows, for a pair whose baselines are scored elsewhere
    evaluate.main(["--run", str(tmp_path / "copy"), "--retrained", str(tmp_path / "retrained"), "--n", "6",
                   "--skip-baselines"])
    results = json.loads((tmp_path / "copy" / "eval.json").read_text())
    assert set(results) == {"split", "changed_inputs", "provenance", "provenance_changes", "target + CAST (hooks)",
                            "target + CAST (exported)", "hooks_vs_export_tok_s"}
    assert results["target + CAST (hooks)"]["max_new_tokens"] == 48 and results["split"]["max_new_tokens"] == 0
    assert "scored target base" not in capsys.readouterr().out
    assert results["split"]["split"] == "validation" and len(results["split"]["sha256"]) == 64
    assert results["provenance"]["target"]["sha256"] == json.loads((tmp_path / "copy" / "config.json").read_text())[
        "provenance"]["target"]["sha256"]
    # the test split is other problems; a run whose models or cartridge changed on disk is refused before any
    # scoring, unless --allow-changed (eval.json records what changed); other libraries are warned about
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    config["provenance"]["target"]["sha256"], config["provenance"]["transformers"] = "0" * 64, "0.0.1"
    (tmp_path / "copy" / "config.json").write_text(json.dumps(config))
    before = (tmp_path / "copy" / "eval.json").read_text()
    test_args = ["--run", str(tmp_path / "copy"), "--retrained", str(tmp_path / "retrained"), "--n", "6",
                 "--skip-baselines", "--split", "test"]
    with pytest.raises(SystemExit, match=r"target sha256: 000000000000\.\.\. -> .*--allow-changed"):
        evaluate.main(test_args)
    assert (tmp_path / "copy" / "eval.json").read_text() == before and "scored" not in capsys.readouterr().out
    evaluate.main(test_args + ["--allow-changed"])
    record = json.loads((tmp_path / "copy" / "eval.json").read_text())
    test_split = record["split"]
    assert test_split["split"] == "test" and test_split["sha256"] != results["split"]["sha256"]
    assert len(record["changed_inputs"]) == 1 and record["changed_inputs"][0].startswith("target sha256: 0000")
    out = capsys.readouterr().out
    assert "warning: " in out and "target sha256: 0000" in out and "transformers: 0.0.1 ->" in out
    config["provenance"]["target"]["sha256"] = record["provenance"]["target"]["sha256"]  # the files as they are
    (tmp_path / "copy" / "config.json").write_text(json.dumps(config))
    # heads that make the target write nothing at all (an end of text first): scored, not a division by zero
    monkeypatch.setattr(evaluate, "generate", lambda model, tokenizer, prompts, *a: [""] * len(prompts))
    monkeypatch.chdir(tmp_path)  # --skip-baselines scores no denominator, so none is trained into ./cartridges
    evaluate.main(["--run", str(tmp_path / "copy"), "--n", "6", "--skip-baselines"])
    results = json.loads((tmp_path / "copy" / "eval.json").read_text())
    assert results["target + CAST (exported)"]["strict"] == 0 and results["hooks_vs_export_tok_s"] is None
    assert not (tmp_path / "cartridges").exists()


def test_evaluate_scores_a_lora_on_its_model(pair, capsys):
    """`--lora DIR --model NAME`: the base model and the model + LoRA, without a run folder; flags checked first."""
    import evaluate
    results = evaluate.main(["--lora", str(pair / "cart"), "--model", str(pair / "source"), "--n", "4"])
    assert set(results) == {"split", "lora", "provenance", "base model", "model + LoRA"}
    assert results["base model"]["nll"] != results["model + LoRA"]["nll"]  # the cartridge changes the source
    assert "scored model + LoRA" in capsys.readouterr().out
    for wrong in (["--lora", str(pair / "cart")], ["--run", "x", "--lora", str(pair / "cart"), "--model", "m"], []):
        with pytest.raises(SystemExit, match="pass --run RUN"):
            evaluate.main(wrong)
    with pytest.raises(SystemExit, match="adapter_config.json not found"):
        evaluate.main(["--lora", str(pair), "--model", str(pair / "source")])


def test_paired_comparison_counts_the_problems_two_runs_disagree_on(tmp_path):
    """scripts/paired.py: discordant counts and the exact McNemar p-value, refused across different problems."""
    paired = script("paired")
    assert paired.mcnemar(0, 0) == 1.0 and paired.mcnemar(3, 3) == 1.0
    assert paired.mcnemar(5, 0) == paired.mcnemar(0, 5) == 2 / 2 ** 5  # all five disagreements one way
    assert abs(paired.mcnemar(2, 8) - 2 * sum(math.comb(10, i) for i in range(8, 11)) / 2 ** 10) < 1e-12
    for name, each, sha in (("a", "1100110000", "s"), ("b", "1011111111", "s"), ("c", "1011111111", "t")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(
            {"split": {"sha256": sha}, "target + CAST (hooks)": {"strict_each": each}}))
    r = paired.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert (r["n"], r["both"], r["only_a"], r["only_b"]) == (10, 3, 1, 6)
    with pytest.raises(SystemExit, match="different problems"):
        paired.main([str(tmp_path / "a"), str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="no 'flexible_each'"):
        paired.main([str(tmp_path / "a"), str(tmp_path / "b"), "--mode", "flexible"])


def records_in(tmp_path, monkeypatch):
    """scripts/plot.py reading records written into tmp_path: (the module, a writer of one JSON record, a score)."""
    plot = script("plot")
    monkeypatch.setattr(plot, "RESULTS", tmp_path)

    def write(path, record):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(record))
    return plot, write, lambda s: {"strict": s, "strict_ci": [s - 0.05, s + 0.05]}


def test_a_table_row_of_seeds_shows_their_mean_and_range(tmp_path, monkeypatch, capsys):
    """scripts/plot.py: a row naming one recipe's seeds prints the mean CAST score and the lowest and highest seed,
    and refuses folders whose settings differ in more than the seed."""
    plot, write, score = records_in(tmp_path, monkeypatch)
    write("retrained_tuning/t-chosen.json", {"lr": 1e-3, "adapter": "cartridges/t"})
    write("final/retrained-t.json", {"lora": "cartridges/t", "model + LoRA": score(0.5)})
    for seed, s in enumerate((0.1, 0.2, 0.15)):
        write(f"final/fwd_seed{seed}/config.json", {"source": "s", "target": "t", "steps": 9, "lr": 1e-3,
                                                    "seed": seed, "out": f"runs/final/fwd_seed{seed}"})
        write(f"final/fwd_seed{seed}/eval.json", {"split": {"split": "test"}, "target + CAST (exported)": score(s)})
    seeds = ("final/fwd_seed0", "final/fwd_seed1", "final/fwd_seed2")
    monkeypatch.setattr(plot, "ROWS", [("CAST", "s -> t", "default", seeds, None)])
    (row,) = plot.table_rows()
    assert abs(row["cast"][0] - 0.15) < 1e-12 and row["cast"][1] == (0.1, 0.2)
    assert abs(row["retention"] - 0.3) < 1e-12 and row["retention_ci"] == (0.2, 0.4)
    plot.print_table([row])
    printed = capsys.readouterr().out
    assert "| mean 0.150 (3 seeds: 0.100-0.200) | 30% (3 seeds: 20%-40%) |" in printed
    assert "`results/final/fwd_seed{0,1,2}/`" in printed
    # a rank-16 denominator tuned too: the better on validation divides, the other is printed beside it
    write("retrained_tuning/t-lr0.001.json", {"model + LoRA": {**score(0.4), "nll": 0.5}})
    write("retrained_tuning/t-r16-chosen.json", {"lr": 5e-4, "adapter": "cartridges/t-r16"})
    write("retrained_tuning/t-r16-lr0.0005.json", {"model + LoRA": {**score(0.45), "nll": 0.6}})
    write("final/retrained-t-r16.json", {"lora": "cartridges/t-r16", "model + LoRA": score(0.4)})
    (row,) = plot.table_rows()
    assert abs(row["retention"] - 0.15 / 0.4) < 1e-12  # rank 16 won on validation, so it divides on test too
    plot.print_table([row])
    assert "| 0.400 (rank 16; rank 8: 0.500) |" in capsys.readouterr().out
    write("final/fwd_seed2/config.json", {"source": "s", "target": "t", "steps": 9, "lr": 2e-3, "seed": 2,
                                          "out": "runs/final/fwd_seed2"})
    with pytest.raises(AssertionError, match="final/fwd_seed2 is not final/fwd_seed0's recipe: .'lr'."):
        plot.table_rows()


def test_a_table_row_of_cartridges_averages_each_cartridges_mean(tmp_path, monkeypatch, capsys):
    """scripts/plot.py: runs on several cartridges (told apart by the hash config.json records) give the mean over
    the cartridges of each one's mean over its seeds, the range of all runs and of the teachers, and a line that
    splits the spread between cartridges and seeds."""
    plot, write, score = records_in(tmp_path, monkeypatch)
    write("retrained_tuning/t-chosen.json", {"lr": 1e-3, "adapter": "cartridges/t"})
    write("final/retrained-t.json", {"lora": "cartridges/t", "model + LoRA": score(0.5)})
    runs = {"fwd_seed0": ("aaaa1111", 0.1, 0.6), "fwd_seed1": ("aaaa1111", 0.2, None), "fwd_c1": ("bbbb2222", 0.3, 0.7)}
    for name, (cartridge, s, teacher) in runs.items():
        write(f"final/{name}/config.json", {"source": "s", "target": "t", "steps": 9, "lr": 1e-3, "seed": 0,
                                             "out": name, "provenance": {"cartridge_sha256": cartridge + "ff"}})
        write(f"final/{name}/eval.json", {"split": {"split": "test"}, "target + CAST (exported)": score(s),
                                          **({"teacher (source + cartridge)": score(teacher)} if teacher else {})})
    monkeypatch.setattr(plot, "ROWS", [("CAST", "s -> t", "default", tuple(f"final/{n}" for n in runs), None)])
    (row,) = plot.table_rows()
    assert abs(row["cast"][0] - (0.15 + 0.3) / 2) < 1e-12 and row["cast"][1] == (0.1, 0.3)  # not (0.1+0.2+0.3)/3
    plot.print_table([row])
    printed = capsys.readouterr().out
    assert ("| 0.600-0.700 | 0.500 | mean 0.225 (2 cartridges, 3 runs; range 0.100-0.300, not an interval) | 45% "
            "(range 20%-60%) |") in printed
    assert ("strict by cartridge: aaaa1111 0.150 (2 seeds), bbbb2222 0.300; standard deviation 0.106 between the "
            "cartridges' means, 0.071 between the seeds of one cartridge (from 2 cartridges and 2 seeds") in printed


def test_tuning_the_denominator_on_a_gsm8k_file(pair, tmp_path, monkeypatch):
    """scripts/tune_retrained.py with --task FILE: each rate's LoRA and record carry the file's name (where
    evaluate.py looks for its denominator), scored on the file's validation rows, and the choice is one of them."""
    tune = script("tune_retrained")
    monkeypatch.chdir(tmp_path)  # it writes cartridges/tuned/ where it runs
    task = tmp_path / "mini.jsonl"
    task.write_text("\n".join(json.dumps({"question": f"Ada has {i} apples and buys 2. How many?",
                                          "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}) for i in range(30)))
    tune.main(["--model", str(pair / "source"), "--task", str(task), "--n-held", "4", "--targets", "q_proj",
               "--steps", "2", "--n", "4", "--lr", "1e-3", "2e-3", "4e-3", "--out", "tuning"])
    name = "source-mini"  # the model folder's name, then the task file's
    chosen = json.loads((tmp_path / "tuning" / f"{name}-chosen.json").read_text())
    assert chosen["lr"] in (1e-3, 2e-3, 4e-3) and chosen["chosen_on"]["split"] == "validation"
    assert chosen["adapter"] == f"cartridges/tuned/{name}-lr{chosen['lr']:g}"
    record = json.loads((tmp_path / "tuning" / f"{name}-lr0.002.json").read_text())
    assert record["split"]["task"] == str(task) and record["split"]["n"] == 4
    adapter = json.loads((tmp_path / chosen["adapter"] / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["q_proj"]


def test_reading_the_answers_beyond_the_count(tmp_path):
    """scripts/answers.py: form, operands, operation, arithmetic and distance of each answer, from an eval.json
    that keeps every output; one that keeps fewer is refused."""
    from data import task_problems
    answers = script("answers")
    problems = task_problems("arithmetic", "test", 3)
    second = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)", problems[1]["answer"])
    wrong_op = {"+": "-", "-": "+", "*": "+", "/": "*"}[second[2]]
    outputs = [" " + problems[0]["answer"],  # the reference itself: every check right
               f" {second[1]} {wrong_op} {second[3]} = 7\n#### 7",  # the question's numbers, another operation
               " I do not know"]  # no expression, no number
    record = {"split": {"task": "arithmetic", "split": "test", "n": 3, "n_held": 200},
              "target + CAST (exported)": {"outputs": outputs}}
    (tmp_path / "eval.json").write_text(json.dumps(record))
    r = answers.main([str(tmp_path / "eval.json")])
    assert (r["form"], r["operands"], r["operation"], r["right"], r["no_number"]) == (2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3)
    assert answers.read(outputs[1], problems[1])["operation"] is False
    record["target + CAST (exported)"]["outputs"] = outputs[:2]
    (tmp_path / "eval.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="keeps 2 of its 3 outputs"):
        answers.main([str(tmp_path / "eval.json")])
    texts = ["Question: 2 and 3?\nAnswer: 2 + 3 = 5\n#### 5", "Question: 9 = 4 x 2?\nAnswer: 4 x 2 = 9",
             "Question: how many?\nAnswer: `def f(): return 1`"]  # the question's expression is not counted
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    r = answers.main(["--text", str(tmp_path / "text.jsonl")])
    assert (r["marker"], r["expression"], r["expression_right"], r["op +"], r["op *"], r["code"], r["how_many"]) \
        == (1, 2, 1, 1, 1, 1, 1)
