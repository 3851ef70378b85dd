"""Tiny random models and tiny tokenizers, built in code: no downloads, CPU, seconds."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's top-level files

from transformers import Gemma3TextConfig, Gemma3ForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama(layers: int = 2, width: int = 64, vocab: int = 128, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def tiny_gemma(layers: int = 3, width: int = 48, vocab: int = 160, seed: int = 1) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                              sliding_window=16)
    return Gemma3ForCausalLM(config).eval()


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: Ada has 12 apples and buys 7 more. How many apples does she have?",
    "Answer: 12 + 7 = 19. #### 19",
    "Return the number of items in a container, or raise an error if it is empty.",
    "Pack the values into a bytes object according to the format string.",
] * 4


def tiny_tokenizer(vocab_size: int, texts=TEXTS, eos: str = "<eos>"):
    """A fast byte-level BPE tokenizer trained on a few sentences, with offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


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
