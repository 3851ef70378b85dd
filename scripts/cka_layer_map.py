"""A layer map chosen by the models, not by depth: each source layer goes to the target layer whose hidden states on
the teacher's text are most similar by linear CKA (as LoRASuite maps layers between same-family models).

    python scripts/cka_layer_map.py train [train.py flags] [--cka-chunks 64]   # the run, + layer_map.json
    python scripts/cka_layer_map.py evaluate --run RUN [evaluate.py flags]    # scores it with its map

cast.layer_map sends source layer i to target layer round(i (L_T - 1) / (L_S - 1)). Here, on the first
--cka-chunks chunks of the run's own text (the teacher's, as train.py would write or read it), both bare models
run once; at the aligned positions, X_i (N, d_S) is the output of source layer i and Y_j (N, d_T) that of target
layer j, both centred over the positions, and

    CKA(X, Y) = |Y^T X|_F^2 / ( |X^T X|_F |Y^T Y|_F )        (linear CKA: 1 for maps equal up to a rotation and scale)

and source layer i goes to argmax_j CKA(X_i, Y_j). The map is written to the run folder (layer_map.json, with the
CKA matrix) and read back by `evaluate`.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cast  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from data import chunk_texts, read_corpus, split_corpus  # noqa: E402
from models import default_device_dtype, load_model  # noqa: E402


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA of two sets of features on the same N positions: X (N, d_X), Y (N, d_Y)."""
    X, Y = X.double() - X.double().mean(0), Y.double() - Y.double().mean(0)
    return ((Y.T @ X).norm() ** 2 / ((X.T @ X).norm() * (Y.T @ Y).norm())).item()


@torch.no_grad()
def layer_states(model, tok, chunks: list[str], positions: list[list[int]]) -> list[torch.Tensor]:
    """Each decoder layer's output (its hidden state) at the given positions of each chunk: L tensors (N, d)."""
    per_layer = None
    for text, pos in zip(chunks, positions):
        ids = torch.tensor([tok(text)["input_ids"]], device=next(model.parameters()).device)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]  # L x (1, T, d), embeddings left out
        rows = [h[0, pos].float().cpu() for h in hidden]
        per_layer = rows if per_layer is None else [torch.cat([a, b]) for a, b in zip(per_layer, rows)]
    return per_layer


def cka_map(cfg: train.Config, n_chunks: int) -> tuple[list[int], list[list[float]]]:
    """The map source layer -> target layer by CKA on the run's first n_chunks chunks, and the CKA matrix."""
    device, dtype = default_device_dtype(cfg.device or None, cfg.dtype or None)
    source, tok_S = load_model(cfg.source, device, dtype)
    if cfg.corpus == "format":
        chunks, _ = train.teacher_corpus(cfg, cfg.max_chunks, tok_S, device, dtype)
    else:
        chunks = chunk_texts(split_corpus(read_corpus(cfg.corpus))[0], tok_S, cfg.seq_len)
    chunks = chunks[:n_chunks]
    target, tok_T = load_model(cfg.target, device, dtype)
    pairs = [cast.aligned_positions(tok_S(c, return_offsets_mapping=True)["offset_mapping"],
                                    tok_T(c, return_offsets_mapping=True)["offset_mapping"]) for c in chunks]
    X = layer_states(source, tok_S, chunks, [p[0] for p in pairs])
    Y = layer_states(target, tok_T, chunks, [p[1] for p in pairs])
    matrix = [[linear_cka(x, y) for y in Y] for x in X]  # (L_S, L_T)
    return [max(range(len(row)), key=row.__getitem__) for row in matrix], matrix


def use_layer_map(mapping: list[int]):
    """Make find_kernels (train.py and evaluate.py) send source layer i to target layer mapping[i]."""
    def layer_map(n_source: int, n_target: int) -> list[int]:
        if len(mapping) != n_source or max(mapping) >= n_target:
            raise ValueError(f"the CKA map {mapping} is for another pair of models")
        return list(mapping)
    cast.layer_map = layer_map


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "evaluate"):
        raise SystemExit("usage: python scripts/cka_layer_map.py train|evaluate [flags of train.py|evaluate.py]")
    command, flags = argv[0], argv[1:]
    if command == "train":
        n_chunks = 64
        if "--cka-chunks" in flags:
            i = flags.index("--cka-chunks")
            n_chunks = int(flags[i + 1])
            del flags[i:i + 2]
        cfg = train.parse_config(flags, train.__doc__)
        train.check_inputs(cfg)
        mapping, matrix = cka_map(cfg, n_chunks)
        print(f"CKA layer map {mapping} (by depth: {cast.layer_map(len(mapping), len(matrix[0]))})", flush=True)
        use_layer_map(mapping)
        out = train.main(flags)
        (out / "layer_map.json").write_text(json.dumps({"map": mapping, "cka_chunks": n_chunks, "cka": matrix}))
    else:
        run = Path(flags[flags.index("--run") + 1]) if "--run" in flags else None
        if run is None or not (run / "layer_map.json").is_file():
            raise SystemExit("error: --run RUN: a run folder written by `scripts/cka_layer_map.py train` (it holds "
                             "layer_map.json)")
        use_layer_map(json.loads((run / "layer_map.json").read_text())["map"])
        evaluate.main(flags)


if __name__ == "__main__":
    main()
