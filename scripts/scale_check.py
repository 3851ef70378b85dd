"""The benchmark at 7B sizes, with random weights: does a CAST step fit on one GPU, and how fast is it.

    python scripts/scale_check.py                      # Llama-2-7B's shapes -> Mistral-7B's, a q,v cartridge of rank 16
    python scripts/scale_check.py --layers 2 --div 32  # the same recipe at toy sizes (a minute on a CPU)
    python scripts/scale_check.py --cache-on-cpu       # the teacher cache left on the CPU (scripts/benchmark.py)
    python scripts/scale_check.py --profile            # also the operators that take each step's time

No download: the two models are built from their configs with random weights (on the GPU when there is one),
the tokenizers are byte-level BPEs trained on the standard library's docstrings, and the cartridge is random.
Then scripts/benchmark.py measures as it does for the embedded pair (train.py's default flags, docstring chunks;
any further flag is passed on). Times and memory mean what they mean there; no score means anything here.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402
from benchmark import benchmark  # noqa: E402
from data import stdlib_docstrings  # noqa: E402
from models import default_device_dtype  # noqa: E402
from demo import byte_bpe  # noqa: E402
from lora import add_lora, lora_layers, save_lora  # noqa: E402
from train import parse_config  # noqa: E402


def configs(layers: int, div: int):
    """Llama-2-7B and Mistral-7B as published (widths divided by `div`, `layers` layers)."""
    from transformers import LlamaConfig, MistralConfig
    source = LlamaConfig(vocab_size=32000, hidden_size=4096 // div, intermediate_size=11008 // div,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    target = MistralConfig(vocab_size=32000, hidden_size=4096 // div, intermediate_size=14336 // div,
                           num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                           max_position_embeddings=4096, sliding_window=4096, tie_word_embeddings=False)
    return source, target


def random_model(folder, device, dtype):
    """What data.load_model returns, with random weights built from the folder's config.json on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    return model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--div", type=int, default=1, help="divide every width by this (1 = 7B)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cache-on-cpu", action="store_true", help="copy the cache's rows to the GPU at each step")
    parser.add_argument("--profile", action="store_true", help="the operators that take each step's time")
    args, rest = parser.parse_known_args(argv)
    device, dtype = default_device_dtype()
    root = Path(tempfile.mkdtemp(prefix="cast-7b-"))
    docs = stdlib_docstrings()
    for name, config, vocab in zip(("source", "target"), configs(args.layers, args.div), (32000, 30000)):
        config.save_pretrained(root / name)  # config only: the weights are made on the device
        byte_bpe(vocab, docs).save_pretrained(root / name)  # two vocabularies, so positions must be aligned
    source, _ = random_model(root / "source", device, dtype)
    add_lora(source, ["q_proj", "v_proj"], r=args.rank, alpha=2 * args.rank)
    for layer in lora_layers(source).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    save_lora(source, root / "cart")
    del source
    train.load_model = lambda name, device=None, dtype=None: random_model(name, *default_device_dtype(device, dtype))
    print(f"scale check | {args.layers} layers, widths / {args.div} | {device} {dtype} | folders in {root}")
    benchmark(parse_config(["--source", str(root / "source"), "--cartridge", str(root / "cart"),
                            "--target", str(root / "target"), "--corpus", "stdlib", "--max-chunks", "32",
                            "--out", str(root / "run"), *rest]), cache_on_cpu=args.cache_on_cpu,
              profile=args.profile)


if __name__ == "__main__":
    main()
