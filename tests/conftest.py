"""Tiny random models and tiny tokenizers, built in code: no downloads, CPU, seconds."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's top-level files

from demo import byte_bpe, tiny_gemma, tiny_llama  # noqa: E402,F401  (the demo builds its models the same way)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: Ada has 12 apples and buys 7 more. How many apples does she have?",
    "Answer: 12 + 7 = 19. #### 19",
    "Return the number of items in a container, or raise an error if it is empty.",
    "Pack the values into a bytes object according to the format string.",
] * 4


def script(name: str):
    """A file of scripts/ imported as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_tokenizer(vocab_size: int, texts=TEXTS, eos: str = "<eos>"):
    """A fast byte-level BPE tokenizer trained on a few sentences, with offsets."""
    return byte_bpe(vocab_size, texts, eos)


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(0, 128, (2, 10))  # (B, T)


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """Folders for a tiny Llama source with a cartridge, a tiny Gemma-3 target, and a small corpus."""
    from lora import add_lora, lora_layers, save_lora
    root = tmp_path_factory.mktemp("pair")
    tok_S, tok_T = tiny_tokenizer(300), tiny_tokenizer(400)
    source, target = tiny_llama(layers=3, width=64, vocab=300), tiny_gemma(layers=2, width=48, vocab=400)
    source.save_pretrained(root / "source"), tok_S.save_pretrained(root / "source")
    target.save_pretrained(root / "target"), tok_T.save_pretrained(root / "target")
    add_lora(source, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    torch.manual_seed(0)
    for layer in lora_layers(source).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    save_lora(source, root / "cart")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over {i} lazy dogs; "
                                  f"Ada buys {i + 7} apples and returns the number of items." for i in range(40)))
    return root


def args(pair, out, *extra):
    """train.py flags for a run on the tiny pair: 12 steps, seconds."""
    return ["--source", str(pair / "source"), "--cartridge", str(pair / "cart"), "--target", str(pair / "target"),
            "--corpus", str(pair / "corpus.txt"), "--out", str(out), "--steps", "12", "--batch-size", "4",
            "--seq-len", "16", "--lr", "1e-2", "--log-every", "2", "--ckpt-every", "5", "--monitor", "4",
            "--monitor-every", "4", "--ridge-positions", "64", *extra]
