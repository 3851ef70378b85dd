"""data.py: corpus readers, the stdlib harvest, the task generator, answer extraction, model names."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import script, tiny_tokenizer
import data
from data import arithmetic_problems, chunk_texts, extract_answer, read_corpus, read_gsm8k, same_number, split_corpus, stdlib_docstrings
from models import resolve_model

ROOT = Path(__file__).resolve().parents[1]
CORE = ["models", "data", "runs", "lora", "cast", "evaluate", "demo", "train"]  # each may import only the ones before it
METHOD = ["lora", "cast", "train"]  # the design card's files: one training step is read in these three


def project_imports(module: str) -> set[str]:
    """The project modules a core file imports anywhere (top level or inside a function)."""
    import ast
    names = set()
    for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(CORE)


def test_import_graph_is_one_way():
    for ground in ("models", "data"):
        assert project_imports(ground) == set(), f"{ground}.py is the ground floor: it imports nothing of ours"
    assert project_imports("runs") <= {"models"}, "runs.py, a support module, imports no method file"
    top = sorted(p.stem for p in Path(__file__).resolve().parents[1].glob("*.py"))
    assert top == sorted(CORE), f"the top level is the design card's four files, three support modules and the demo: {top}"
    for i, module in enumerate(CORE):
        later = project_imports(module) - set(CORE[:i])
        assert not later, f"{module}.py imports {sorted(later)}, which come after it in {CORE} (a cycle or a " \
                          f"sideways import: move the shared code down)"


def test_corpus_readers(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n   \n\nThird.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "From JSON lines."}) + "\n\n" + json.dumps({"text": "Two."}))
    assert read_corpus(tmp_path / "a.txt") == ["First paragraph.", "Second paragraph.", "Third."]
    assert read_corpus(tmp_path / "b.jsonl") == ["From JSON lines.", "Two."]
    assert read_corpus(tmp_path) == ["First paragraph.", "Second paragraph.", "Third.", "From JSON lines.", "Two."]


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus .*missing.txt not found"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_corpus(tmp_path / "empty.txt")


def test_stdlib_harvest_is_prose_and_imports_nothing():
    code = ("import sys; import data; before = set(sys.modules); docs = data.stdlib_docstrings(max_chars=200_000); "
            "print(len(docs), sum(map(len, docs)), sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    n_docs, n_chars, new_modules = out.split(" ", 2)
    assert int(n_docs) > 50 and int(n_chars) >= 200_000
    assert new_modules.strip() == "[]"  # no module of the standard library was imported to read it
    docs = stdlib_docstrings(max_chars=100_000)
    assert docs == stdlib_docstrings(max_chars=100_000)  # deterministic
    assert all(len(d) >= 200 and " the " in " ".join(docs) for d in docs)


def test_split_and_chunks():
    docs = [f"Doc {i} says the quick brown fox jumps over the lazy dog." for i in range(20)]
    train, held = split_corpus(docs)
    assert len(held) == 1 and sorted(train + held) == sorted(docs) and split_corpus(docs) == (train, held)
    tok = tiny_tokenizer(300)
    chunks = chunk_texts(docs[:3], tok, max_tokens=5)
    assert "".join(chunks) == "".join(docs[:3])  # chunks cut the text, lose nothing
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 6 for c in chunks)  # boundary merges aside


def test_generator_is_deterministic_and_splits_are_disjoint():
    train, test = arithmetic_problems(500, "train"), arithmetic_problems(200, "test")
    assert train == arithmetic_problems(500, "train") and test == arithmetic_problems(200, "test")
    assert len({p["question"] for p in test}) == 200
    for p in train[:50]:
        work, answer = p["answer"].rsplit("\n#### ", 1)
        assert eval(work.split("\n")[-1].split(" = ")[0]) == int(answer)  # the worked answer is right


def test_splits_never_share_a_problem_whatever_is_asked_for():
    """Disjoint by construction, checked on the question text of every problem of every split's whole pool: the
    cartridge's training set once held a problem of the old test split ('Farid buys 12 bags with 5 apples...').
    Questions only: a computation can come back under another question (the next test)."""
    pools = {split: arithmetic_problems(data.POOLS[split][1], split) for split in data.SPLITS}
    questions = {split: {p["question"] for p in pools[split]} for split in data.SPLITS}
    assert all(len(questions[s]) == len(pools[s]) for s in data.SPLITS)
    assert not questions["train"] & questions["validation"] and not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    farid = "Farid buys 12 bags with 5 apples in each bag. How many apples does Farid buy?"
    assert farid in questions["train"] and farid not in questions["validation"] | questions["test"]
    assert arithmetic_problems(10, "validation") == pools["validation"][:10]  # a split's first n: a prefix
    with pytest.raises(ValueError, match="holds 4000"):
        arithmetic_problems(4001, "train")
    monitor = {p["question"] for p in data.monitor_problems("arithmetic", 32)}
    assert monitor <= questions["validation"] and not monitor & {p["question"] for p in pools["validation"][:1000]}


def test_a_gsm8k_file_splits_into_train_validation_and_test(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(50)))
    splits = {s: [p["question"] for p in data.task_problems(str(path), s, n_held=10)] for s in data.SPLITS}
    assert splits == {"train": [f"q{i}" for i in range(30)], "validation": [f"q{i}" for i in range(30, 40)],
                      "test": [f"q{i}" for i in range(40, 50)]}
    with pytest.raises(ValueError, match="has 50 rows; holding out 25 .* leaves none"):
        data.task_problems(str(path), "train", n_held=25)
    with pytest.raises(ValueError, match="at least one held-out row"):
        data.task_problems(str(path), "test", n_held=0)


def test_a_folders_hash_is_its_contents_not_where_it_was_made(tmp_path):
    from runs import folder_sha256
    folder = tmp_path / "cart"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": "/tmp/a.partial"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    first = folder_sha256(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": "/tmp/a"}))
    assert folder_sha256(folder) == first
    (folder / "adapter_model.safetensors").write_bytes(b"other weights")
    assert folder_sha256(folder) != first and folder_sha256(tmp_path / "missing") is None


@pytest.mark.parametrize("text, strict, flexible", [
    ("12 + 7 = 19\n#### 19", "19", "19"),
    ("#### -5", "-5", "-5"),
    ("The answer is 1,234.\n#### 1,234.", "1234", "1234"),
    ("#### 3.5 apples", "3.5", "3.5"),
    ("so we get 42 and then 17", None, "17"),
    ("I do not know.", None, None),
    ("#### 7\nbut later 9", "7", "9"),
    ("#### 7\n#### 9", "7", "9"),  # strict reads the first '####', as the harness does
    ("costs $1,200.", None, "1200"),
])
def test_answer_extraction(text, strict, flexible):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "flexible") == flexible


def test_same_number():
    assert same_number("19.0", "19") and same_number("1234", "1234") and not same_number(None, "3")
    assert not same_number("18", "19")


def test_gsm8k_reader(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    assert read_gsm8k(f) == [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]
    f.write_text(json.dumps({"q": "x"}) + "\n")
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        read_gsm8k(f)
    with pytest.raises(FileNotFoundError, match="nope.jsonl not found"):
        read_gsm8k(tmp_path / "nope.jsonl")


def test_model_names(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'smollm9'.*smollm2-135m"):
        resolve_model("smollm9")
    with pytest.raises(ValueError, match="unknown model './missing'"):
        resolve_model("./missing")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_rotated_twin_computes_the_same_function_with_other_weights(tmp_path, monkeypatch):
    """rotated:NAME is the model with its residual stream rotated: same logits, other weights and activations."""
    import models
    from conftest import tiny_gemma, tiny_llama, tiny_tokenizer
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(models, "CACHE", tmp_path / "cache")
    model = tiny_llama(layers=2, width=64, vocab=300)
    model.config.tie_word_embeddings = True  # SmolLM2 ties its embeddings: the twin must untie them
    model.lm_head.weight = model.model.embed_tokens.weight
    for layer in model.model.layers:  # norm scales that are not all ones, as in a trained model
        torch.nn.init.uniform_(layer.input_layernorm.weight, 0.5, 2.0)
        torch.nn.init.uniform_(layer.post_attention_layernorm.weight, 0.5, 2.0)
    model.save_pretrained(tmp_path / "original")
    tiny_tokenizer(300).save_pretrained(tmp_path / "original")
    folder = models.resolve_model(f"rotated:{tmp_path / 'original'}")
    twin = AutoModelForCausalLM.from_pretrained(folder).eval()  # an ordinary folder
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "original").eval()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(twin(ids).logits, original(ids).logits, atol=1e-4)
    q_twin, q_orig = twin.model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q_twin, q_orig, atol=1e-2)
    assert models.resolve_model(f"rotated:{tmp_path / 'original'}") == folder  # written once
    tiny_gemma().save_pretrained(tmp_path / "gemma")
    with pytest.raises(ValueError, match="rotated: supports llama, mistral, qwen2 models, not 'gemma3_text'"):
        models.resolve_model(f"rotated:{tmp_path / 'gemma'}")


def test_exact_twin_heads_carry_the_cartridge_onto_the_rotated_twin(tmp_path, monkeypatch):
    """The known answer of scripts/twin_heads.py: with its heads the twin computes what source + cartridge does."""
    import cast
    import models
    from conftest import tiny_llama, tiny_tokenizer
    from lora import add_lora, lora_layers, read_adapter, save_lora
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(models, "CACHE", tmp_path / "cache")
    twin_heads = script("twin_heads")
    source = tiny_llama(layers=2, width=64, vocab=300)
    for layer in source.model.layers:
        torch.nn.init.uniform_(layer.input_layernorm.weight, 0.5, 2.0)
        torch.nn.init.uniform_(layer.post_attention_layernorm.weight, 0.5, 2.0)
    source.save_pretrained(tmp_path / "source")
    tiny_tokenizer(300).save_pretrained(tmp_path / "source")
    twin = AutoModelForCausalLM.from_pretrained(models.resolve_model(f"rotated:{tmp_path / 'source'}")).eval()
    add_lora(source, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=4, alpha=8)
    for layer in lora_layers(source).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    save_lora(source, tmp_path / "cart")
    config, factors = read_adapter(tmp_path / "cart")
    heads = twin_heads.exact_twin_heads(cast.make_heads(cast.find_kernels(config, factors, source, twin), twin),
                                        AutoModelForCausalLM.from_pretrained(tmp_path / "source"))
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        teacher, bare = source(ids).logits, twin(ids).logits
        with cast.attached(twin, heads):
            student = twin(ids).logits
    assert torch.allclose(student, teacher, atol=1e-4) and not torch.allclose(bare, teacher, atol=1e-2)
    errors = twin_heads.relative_errors(heads, heads)
    assert all(e == (0.0, 0.0) for e in errors.values())


def test_rotated_twins_of_two_models_in_folders_of_one_name_differ(tmp_path, monkeypatch):
    import models
    from conftest import tiny_llama, tiny_tokenizer
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(models, "CACHE", tmp_path / "cache")
    for seed, parent in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        tiny_llama(layers=2, width=64, vocab=300).save_pretrained(tmp_path / parent / "model")
        tiny_tokenizer(300).save_pretrained(tmp_path / parent / "model")
    twin_a, twin_b = (models.resolve_model(f"rotated:{tmp_path / p / 'model'}") for p in ("a", "b"))
    assert twin_a != twin_b
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        original_b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model").eval()(ids).logits
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(twin_b).eval()(ids).logits, original_b, atol=1e-4)


def test_end_of_text_follows_the_models_config():
    """A GGUF conversion that names another end of text in the tokenizer than in the model's config (transformers
    5.17 on SmolLM2) is made to agree with the model."""
    from types import SimpleNamespace
    from models import agree_end_of_text
    tok = tiny_tokenizer(300)
    other = tok.convert_ids_to_tokens(5)
    agree_end_of_text(tok, SimpleNamespace(eos_token_id=5))
    assert tok.eos_token_id == 5 and tok.eos_token == other
    agree_end_of_text(tok, SimpleNamespace(eos_token_id=[7, 5]))  # one of several ends of text: kept
    assert tok.eos_token_id == 5
    agree_end_of_text(tok, SimpleNamespace(eos_token_id=[7, 8]))
    assert tok.eos_token_id == 7


def test_seen_computations_are_read_from_the_problems_text():
    """The test problems whose whole worked answer a training problem has too: 92 of the first 200, every
    multiplication among them (the README's 'seen' half); found by comparing the text, nothing else."""
    test, train = arithmetic_problems(200, "test"), {p["answer"] for p in arithmetic_problems(4000, "train")}
    seen = data.seen_in_training(test)
    assert seen == [p["answer"] in train for p in test] and sum(seen) == 92
    assert all(s for p, s in zip(test, seen) if " * " in p["answer"]) and sum(" * " in p["answer"] for p in test) == 39
    assert not any(p["question"] in {q["question"] for q in arithmetic_problems(4000, "train")} for p in test)


def test_seen_split_reads_each_rows_verdicts(tmp_path):
    """scripts/seen_split.py: a row's strict on the seen and unseen halves, from its per-problem verdicts."""
    module = script("seen_split")
    problems, seen = arithmetic_problems(200, "test"), data.seen_in_training(arithmetic_problems(200, "test"))
    each = "".join("1" if s else "0" for s in seen)  # right on exactly the seen half
    verdicts = module.right({"strict": 92 / 200, "strict_each": each}, problems)
    assert module.on(verdicts, seen) == 1.0 and module.on(verdicts, [not s for s in seen]) == 0.0
    with pytest.raises(SystemExit, match="do not give its recorded strict"):
        module.right({"strict": 0.5, "strict_each": each}, problems)
    assert module.right({"strict": 0.1, "outputs": ["#### 1"] * 5}, problems) is None  # five outputs kept: unknown
