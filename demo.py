"""The demo: the whole pipeline on a toy world built in code (`python train.py --demo`).

No downloads, 2 CPU cores, well under 2 GB. The toy world is short sentences about people, things and
places (the general text) and one skill, which the cartridge teaches: counting.

    Question: Ada sees 7 dogs near the park. How many dogs?
    Answer: #### 7

The demo builds a tiny Llama source with its own byte-level BPE tokenizer, pretrains it for a few seconds on
the toy text, fine-tunes a LoRA cartridge on the skill (lora.py), and moves the cartridge with CAST
(train.py) onto two targets, scoring each with evaluate.py, exactly as a real run does:

  1. known answer: the source in disguise: another model class (Qwen2), its residual stream rotated by a
     random orthogonal Q, its vocabulary renumbered. An exact linear map between the two exists (the heads
     must find Q; the shared vocabulary must undo the renumbering), so CAST should carry the whole skill.
  2. a different model: a tiny Gemma-3 (3 layers x 64) with its own tokenizer, pretrained on the same toy text. No exact
     linear map exists. This is the real pair's situation (SmolLM2 -> Gemma-3), where CAST carries
     about a fifth of the skill (README).
"""
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch

import evaluate
import lora
from models import rotate_residual

NAMES = ["Ada", "Bob", "Cy", "Dee", "Eve", "Fay"]
THINGS = ["dogs", "cats", "apples", "boats", "cups", "kites"]
PLACES = ["park", "shop", "lake", "barn", "hill"]


# ----------------------------------------------------------------------------- tiny models, built in code

def tiny_llama(layers: int = 2, width: int = 64, vocab: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def tiny_gemma(layers: int = 3, width: int = 48, vocab: int = 160, seed: int = 1, heads: int = 2, window: int = 16):
    """Gemma-3's layers attend within a sliding window (every sixth layer sees everything): keep `window` longer
    than a task prompt, or the answer cannot see the number it needs. Scores are scaled by 1/sqrt(head_dim), as in
    Gemma-3-270M (query_pre_attn_scalar = head_dim)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=16,
                              query_pre_attn_scalar=16, max_position_embeddings=256, sliding_window=window)
    return Gemma3ForCausalLM(config).eval()


def byte_bpe(vocab_size: int, texts: list[str], eos: str = "<eos>"):
    """A fast byte-level BPE tokenizer trained on `texts`, with offsets (what CAST's alignment needs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


@torch.no_grad()
def disguise(model, tokenizer, seed: int = 0):
    """The same function with other weights, another class and other token ids: (Qwen2 twin, its tokenizer).
    Llama weights load into Qwen2 unchanged (Qwen2's q/k/v biases are set to 0), the residual stream is rotated
    (models.rotate_residual), and token i becomes token perm[i]: rows of the embedding and LM head move with it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    c = model.config
    twin = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters, tie_word_embeddings=False)).eval()
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(name.endswith("_proj.bias") for name in missing), (missing, unexpected)
    for name in missing:
        twin.get_parameter(name).zero_()
    rotate_residual(twin, seed)
    perm = torch.randperm(c.vocab_size, generator=torch.Generator().manual_seed(seed))  # old id i -> new id perm[i]
    for weight in (twin.model.embed_tokens.weight, twin.lm_head.weight):
        weight[perm] = weight.clone()  # (V, d): row i moves to row perm[i]
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["vocab"] = {piece: int(perm[i]) for piece, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["id"] = int(perm[added["id"]])
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    twin.config.eos_token_id = twin.config.pad_token_id = tok.eos_token_id
    return twin, tok


# ----------------------------------------------------------------------------- the toy world

def toy_sentence(rng: random.Random) -> tuple[str, int, str]:
    """(a sentence of the toy world, the number it states or 0, the things it is about)."""
    n, name, other, thing, place = rng.randint(2, 9), *rng.sample(NAMES, 2), rng.choice(THINGS), rng.choice(PLACES)
    text, count = rng.choice([
        (f"{name} sees {n} {thing} near the {place}.", n), (f"There are {n} {thing} at the {place}.", n),
        (f"{name} walks to the {place} and finds {n} {thing}.", n), (f"The {place} is quiet today.", 0),
        (f"{name} likes {thing} more than {rng.choice(THINGS)}.", 0),
        (f"Question: Where is {name}?\nAnswer: {name} is at the {place} with {other}.", 0)])
    return text, count, thing


def toy_world(folder: Path, n_docs: int = 400, n_train: int = 600, n_test: int = 100, seed: int = 0) -> list[str]:
    """Write corpus.txt (general toy text: headed notes, never a counting question) and task.jsonl (counting
    problems, all different: n_train, then n_test for validation, n_test for test); return the corpus documents."""
    rng = random.Random(seed)
    docs = [f"#### Day {d}\n" + " ".join(toy_sentence(rng)[0] for _ in range(6)) for d in range(n_docs)]
    rows, seen = [], set()
    while len(rows) < n_train + 2 * n_test:  # train, validation, test
        text, count, thing = toy_sentence(rng)
        question = f"{text} How many {thing}?"
        if count and question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": f"#### {count}"})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n\n".join(docs))
    (folder / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return docs


def pretrain(model, tokenizer, docs: list[str], steps: int, lr: float = 3e-3, seed: int = 0):
    """Next-token training on the toy text: an untrained tiny model cannot learn a skill from a LoRA."""
    rows = [tokenizer(d)["input_ids"][:64] for d in docs]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = [rows[i] for i in torch.randint(len(rows), (16,), generator=gen)]
        length = min(map(len, batch))
        ids = torch.tensor([r[:length] for r in batch])  # (16, T)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return loss.item()


# ----------------------------------------------------------------------------- the demo

def run(out, transfer, force: bool = False, quick: bool = False) -> dict:
    """Build the toy world and the three tiny models, make the cartridge, transfer it onto both targets and score
    both; `transfer(argv)` is train.py's run (passed in: train.py imports this file). `quick` shrinks every
    count for the test suite. Returns {leg: eval.json}."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"demo folder {out} exists; pass --force to overwrite it or choose another --out")
    n = dict(docs=60, train=48, test=16, pretrain=20, lora=20, steps=6) if quick else \
        dict(docs=400, train=600, test=100, pretrain=400, lora=600, steps=300)
    start, work = time.time(), Path(str(out) + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    world, models = work / "world", work / "models"
    docs = toy_world(world, n["docs"], n["train"], n["test"])
    task = str(world / "task.jsonl")
    tok_S = byte_bpe(300, docs[: len(docs) // 2])
    tok_G = byte_bpe(360, docs[len(docs) // 2:])  # another vocabulary, learnt from other text
    source, gemma = tiny_llama(2, 64, len(tok_S)), tiny_gemma(3, 64, len(tok_G), heads=4, window=128)
    loss_S, loss_G = pretrain(source, tok_S, docs, n["pretrain"]), pretrain(gemma, tok_G, docs, n["pretrain"])
    twin, tok_twin = disguise(source, tok_S)
    for name, model, tok in (("source", source, tok_S), ("twin", twin, tok_twin), ("gemma", gemma, tok_G)):
        model.save_pretrained(models / name)
        tok.save_pretrained(models / name)
    print(f"demo: toy world {len(docs)} documents, {n['train']} + {n['test']} + {n['test']} counting problems "
          f"(train, validation, test) | pretrained "
          f"source (Llama 2 x 64) loss {loss_S:.2f}, gemma (Gemma-3 3 x 64) loss {loss_G:.2f} | twin: Qwen2, "
          f"rotated, renumbered | {time.time() - start:.0f}s", flush=True)
    lora_args = ["--task", task, "--n-held", str(n["test"]), "--steps", str(n["lora"]), "--lr", "3e-3"]
    lora.main(["--model", str(models / "source"), "--out", str(work / "cartridge"), *lora_args])
    results = {}
    for leg, target in (("known-answer", "twin"), ("different", "gemma")):
        print(f"\n==== leg {leg}: source -> {target} ({time.time() - start:.0f}s)", flush=True)
        retrained = str(work / f"retrained-{target}")
        lora.main(["--model", str(models / target), "--out", retrained, *lora_args])
        transfer(["--source", str(models / "source"), "--cartridge", str(work / "cartridge"),
                  "--target", str(models / target), "--corpus", str(world / "corpus.txt"), "--task", task,
                  "--out", str(work / leg), "--steps", str(n["steps"]), "--seq-len", "64", "--max-chunks", "0",
                  "--monitor", "16", "--monitor-every", "100", "--log-every", "50", "--cache-mb", "256"])
        evaluate.main(["--run", str(work / leg), "--retrained", retrained, "--task", task, "--n", str(n["test"]), "--n-held", str(n["test"])])
        results[leg] = json.loads((work / leg / "eval.json").read_text())
    shutil.rmtree(out, ignore_errors=True)  # only reached with force (checked above)
    os.replace(work, out)
    for record in out.rglob("*.json"):  # configs name the folders they used: point them at the final ones
        record.write_text(record.read_text().replace(str(work), str(out)))
    print(f"\n==== the demo in one table ({time.time() - start:.0f}s; everything is in {out})\n")
    print(summary(results))
    return results


def summary(results: dict) -> str:
    """One row per leg: strict accuracy of each model on the held-out problems, and CAST's retention."""
    rows = ["teacher (source + cartridge)", "target base", "target + retrained LoRA", "target + CAST (exported)",
            "target + weight-space"]
    lines = ["| leg | teacher | target | retrained on the target | CAST (exported LoRA) | weight-space | "
             "retention strict: paper / lift |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for leg, r in results.items():
        ret = r["target + CAST (exported)"]["retention"]["strict"]
        lines.append(f"| {leg} | " + " | ".join(f"{r[row]['strict']:.2f}" for row in rows) +
                     f" | {evaluate.percent(ret['paper'])} / {evaluate.percent(ret['lift'])} |")
    return "\n".join(lines)
