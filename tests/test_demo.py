"""The demo: its disguised twin is the source's exact function, and the whole demo runs end to end."""
import torch

import demo


def test_disguised_twin_is_the_same_function_in_another_class_with_other_weights_and_ids():
    texts = ["#### Day 1\nAda sees 7 dogs near the park. The lake is quiet today."] * 3
    tok = demo.byte_bpe(300, texts)
    source = demo.tiny_llama(2, 64, len(tok))
    twin, tok_twin = demo.disguise(source, tok, seed=3)
    assert type(twin).__name__ == "Qwen2ForCausalLM"
    text = "Question: Ada sees 7 dogs near the park. How many dogs?\nAnswer: #### 7"
    ids, ids_twin = tok(text)["input_ids"], tok_twin(text)["input_ids"]
    assert ids != ids_twin and tok.convert_ids_to_tokens(ids) == tok_twin.convert_ids_to_tokens(ids_twin)
    assert tok_twin.eos_token_id != tok.eos_token_id and tok_twin.eos_token == tok.eos_token
    with torch.no_grad():
        logits = source(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
        logits_twin = twin(input_ids=torch.tensor([ids_twin])).logits[0]  # (T, V), columns renumbered
    perm = torch.tensor([tok_twin.convert_tokens_to_ids(t) for t in tok.convert_ids_to_tokens(range(len(tok)))])
    torch.testing.assert_close(logits_twin[:, perm], logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(twin.model.layers[0].self_attn.q_proj.weight, source.model.layers[0].self_attn.q_proj.weight)


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    import train
    results = demo.run(tmp_path / "demo", lambda argv: train.train(train.parse_config(argv)), quick=True)
    assert set(results) == {"known-answer", "different"}
    for leg in results:
        for f in ("eval.json", "config.json", "heads.safetensors", "lora/adapter_config.json"):
            assert (tmp_path / "demo" / leg / f).is_file()
    assert not (tmp_path / "demo.partial").exists()
    records = list((tmp_path / "demo").rglob("*.json"))
    assert records and not any("demo.partial" in r.read_text() for r in records)  # configs name the final folders
    # the known-answer leg carries the cartridge: the quick demo's problems are too few and its models too small
    # for a right answer (strict 0 in every row), so it is read on the answers' likelihood: CAST closes at least
    # 90% of the gap between the bare target and the teacher (95% when written), hooks and export alike
    known = results["known-answer"]
    rows = ("target base", "teacher (source + cartridge)", "target + CAST (exported)")
    base, teacher, cast = (known[row]["nll"] for row in rows)
    carried = (base - cast) / (base - teacher)
    assert carried > 0.9, (base, teacher, cast)
    assert known["target + CAST (hooks)"]["outputs"] == known["target + CAST (exported)"]["outputs"]
    different = results["different"]  # no exact map: still closer to the teacher than the bare target
    assert different["target + CAST (exported)"]["nll"] < different["target base"]["nll"]
    printed = capsys.readouterr().out
    assert "| known-answer |" in printed and "| different |" in printed
    assert "score it" not in printed  # a command naming demo.partial/ would fail once the folder is renamed


def test_demo_refuses_settings_it_would_ignore(tmp_path):
    import pytest
    import train
    with pytest.raises(SystemExit, match=r"--demo takes only --out and --force, not \['steps'\]"):
        train.main(["--demo", "--steps", "5", "--out", str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists() and not (tmp_path / "demo.partial").exists()
