"""The paper's nonlinear map: heads with a small residual MLP beside P_in (and with --out-mlp, one beside P_out too),
hooks only (a reference solution of LAB.md's one-week assignment; instructors remove this file from the students'
copy).

    python scripts/nonlinear_heads.py train [train.py flags] [--width 64] [--mlp-step 1] [--out-mlp]  # + nonlinear.json
    python scripts/nonlinear_heads.py evaluate --run RUN [evaluate.py flags]   # scores it with its MLPs
    python scripts/nonlinear_heads.py share --run RUN [--chunks 16]   # how large the MLPs grew -> RUN/mlp_share.json

The paper's abstract calls CAST "a direct, nonlinear mapping between the activation manifolds"; cast.Head is
linear. Here each head reads

    u = P_in x_T + MLP(x_T),   MLP(x) = W_2 GELU(W_1 x + b_1) + b_2      W_1: (width, d_in_T), W_2: (d_in_S, width)
    delta_T = s * P_out B_S A_S u

with W_2 and b_2 zero at the start, so a run starts where the linear heads start (the ridge start) and the MLP
only adds what the loss asks for. With --out-mlp the output side is nonlinear as well:

    y_S = s * B_S A_S u,   delta_T = P_out y_S + MLP_out(y_S),   MLP_out(y) = V_2 GELU(V_1 y)
                                                            V_1: (width, d_out_S), V_2: (d_out_T, width), V_2 = 0 at the start

without biases, so MLP_out(0) = 0: where the cartridge adds nothing, the head adds nothing. The MSE compares u
with x_S (Head.map_in). Each MLP matrix steps relative to its head's P_in (MLP_out's: its P_out; a zero matrix has
no size of its own to step by), times --mlp-step. `share` measures how large the MLP grew, ||MLP(x_T)|| /
||P_in x_T|| (and ||MLP_out(y_S)|| / ||P_out y_S||) on the run's own text with its heads attached: after 300 steps on the
embedded pair, about 1% (median over the heads) at --mlp-step 1 and 8% at --mlp-step 10 (results/levers/
nonlinear_c58c0_s300, nonlinear_step10_c58c0_s300); with --out-mlp --mlp-step 10, MLP_out reaches 2.5 times
P_out y_S (nonlinear_out_step10_c58c0_s300). None of the three scored beyond noise of the linear heads. A nonlinear map cannot be folded into A_T = A_S P_in: the
run's exported LoRA (lora/) keeps the linear part only, so its "exported" row scores the linear part, and the
row that measures the nonlinear heads is "target + CAST (hooks)".
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cast  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402

WIDTH = 64  # hidden units of each head's MLP


class NonlinearHead(cast.Head):
    """cast.Head with a residual MLP beside P_in: u = P_in x_T + MLP(x_T); with out_mlp, one beside P_out too."""

    def __init__(self, kernel: cast.Kernel, d_in_T: int, d_out_T: int, width: int = WIDTH, out_mlp: bool = False):
        super().__init__(kernel, d_in_T, d_out_T)
        self.mlp = nn.Sequential(nn.Linear(d_in_T, width), nn.GELU(), nn.Linear(width, kernel.A_S.shape[1]))
        nn.init.zeros_(self.mlp[2].weight)  # the start is the linear head's
        nn.init.zeros_(self.mlp[2].bias)
        self.mlp_out = None
        if out_mlp:  # no biases: MLP_out(0) = 0
            d_out_S = kernel.B_S.shape[0]
            self.mlp_out = nn.Sequential(nn.Linear(d_out_S, width, bias=False), nn.GELU(),
                                         nn.Linear(width, d_out_T, bias=False))
            nn.init.zeros_(self.mlp_out[2].weight)

    def map_in(self, x_T: torch.Tensor) -> torch.Tensor:  # (..., d_in_T) -> (..., d_in_S)
        return self.P_in(x_T) + self.mlp(x_T)

    def cartridge_output(self, x_T: torch.Tensor) -> torch.Tensor:  # (..., d_in_T) -> (..., d_out_S)
        # y_S = s * B_S A_S u: the cartridge's own output, in the source's space
        return self.scale * (self.map_in(x_T) @ self.A_S.T) @ self.B_S.T  # (..., r) @ (r, d_out_S)

    def forward(self, x_T: torch.Tensor) -> torch.Tensor:  # (B, T, d_in_T) -> (B, T, d_out_T)
        y_S = self.cartridge_output(x_T)  # (B, T, d_out_S)
        return self.P_out(y_S) + (self.mlp_out(y_S) if self.mlp_out is not None else 0)


def use_nonlinear_heads(width: int = WIDTH, mlp_step: float = 1.0, out_mlp: bool = False):
    """Make train.py and evaluate.py build NonlinearHeads (cast.make_heads) and step their MLPs relative to
    P_in (MLP_out: P_out), times mlp_step (train.step_sizes). cast.save_heads and load_heads already write and read
    every parameter of a head."""
    def make_heads(kernels, target):
        modules = [target.get_submodule(k.target_name) for k in kernels]
        return nn.ModuleList(NonlinearHead(k, m.in_features, m.out_features, width, out_mlp)
                             for k, m in zip(kernels, modules))

    linear_sizes = train.step_sizes

    def step_sizes(heads):
        sizes = dict(zip((id(p) for p in heads.parameters()), linear_sizes(heads)))
        for h in heads:
            for p in h.mlp.parameters():
                sizes[id(p)] = mlp_step * sizes[id(h.P_in.weight)]
            for p in (h.mlp_out.parameters() if h.mlp_out is not None else ()):
                sizes[id(p)] = mlp_step * sizes[id(h.P_out.weight)]
        return [sizes[id(p)] for p in heads.parameters()]

    cast.make_heads, train.step_sizes = make_heads, step_sizes


@torch.no_grad()
def mlp_share(run: Path, texts: list[str]) -> dict:
    """||MLP(x_T)|| / ||P_in x_T|| for each head, over the target's inputs x_T on the texts (`share` reads the
    run's own, teacher_text.jsonl) with the heads attached: how much of u the nonlinear part is. Heads with
    MLP_out add "out_median", "out_max", "out_each": ||MLP_out(y_S)|| / ||P_out y_S||, the same for delta_T."""
    cfg = json.loads((run / "config.json").read_text())
    source, _ = train.load_model(cfg["source"], "cpu", torch.float32)
    target, tok_T = train.load_model(cfg["target"], "cpu", torch.float32)
    heads, _ = evaluate.run_heads(run, source, target)
    sums = torch.zeros(4, len(heads))  # rows: ||MLP||^2, ||P_in||^2, ||MLP_out||^2, ||P_out||^2, each head
    with cast.attached(target, heads, capture=True):
        for text in texts:
            ids = tok_T(text, return_tensors="pt").input_ids[:, :cfg["seq_len"]]  # (1, T)
            target(input_ids=ids)
            for i, h in enumerate(heads):  # h.x_T: (1, T, d_in_T), this chunk's input to the head's module
                sums[0, i] += h.mlp(h.x_T).pow(2).sum()
                sums[1, i] += h.P_in(h.x_T).pow(2).sum()
                if h.mlp_out is not None:
                    y_S = h.cartridge_output(h.x_T)  # (1, T, d_out_S)
                    sums[2, i] += h.mlp_out(y_S).pow(2).sum()
                    sums[3, i] += h.P_out(y_S).pow(2).sum()
    result = {"chunks": len(texts)}
    sides = [("", 0)] + ([("out_", 2)] if heads[0].mlp_out is not None else [])
    for prefix, row in sides:
        share = (sums[row] / sums[row + 1]).sqrt()  # (heads,)
        result |= {prefix + "median": share.median().item(), prefix + "max": share.max().item(),
                   prefix + "each": [round(v, 6) for v in share.tolist()]}
    return result


def take_flag(flags: list[str], name: str, default, kind):
    """Remove `name VALUE` from flags and return VALUE as kind (default when absent)."""
    if name not in flags:
        return default
    i = flags.index(name)
    try:
        value = kind(flags[i + 1])
    except (IndexError, ValueError):
        raise SystemExit(f"error: {name} needs a {kind.__name__} value, as in {name} {default}") from None
    del flags[i:i + 2]
    return value


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "evaluate", "share"):
        raise SystemExit("usage: python scripts/nonlinear_heads.py train|evaluate|share [flags of train.py|evaluate.py]")
    command, flags = argv[0], argv[1:]
    if command == "train":
        width, mlp_step = take_flag(flags, "--width", WIDTH, int), take_flag(flags, "--mlp-step", 1.0, float)
        out_mlp = "--out-mlp" in flags
        flags = [f for f in flags if f != "--out-mlp"]
        if width < 1:
            raise SystemExit(f"error: --width {width}: should be at least 1")
        if not mlp_step > 0:
            raise SystemExit(f"error: --mlp-step {mlp_step}: should be above 0 (1: the MLP steps like its P_in)")
        use_nonlinear_heads(width, mlp_step, out_mlp)
        out = train.main(flags)
        beside = "beside P_in and P_out" if out_mlp else "beside P_in"
        (out / "nonlinear.json").write_text(json.dumps({"width": width, "mlp_step": mlp_step, "mlp": beside,
                                                        "export": "linear part"}))
    else:
        run = Path(flags[flags.index("--run") + 1]) if "--run" in flags else None
        if run is None or not (run / "nonlinear.json").is_file():
            raise SystemExit("error: --run RUN: a run folder written by `scripts/nonlinear_heads.py train` (it holds "
                             "nonlinear.json)")
        recorded = json.loads((run / "nonlinear.json").read_text())
        use_nonlinear_heads(recorded["width"], out_mlp=recorded["mlp"] == "beside P_in and P_out")
        if command == "evaluate":
            evaluate.main(flags)
            return
        chunks = take_flag(flags, "--chunks", 16, int)
        if chunks < 1 or not (run / "teacher_text.jsonl").is_file():
            raise SystemExit(f"error: share --run {run} --chunks {chunks}: a run folder with teacher_text.jsonl, and "
                             "--chunks at least 1")
        lines = (run / "teacher_text.jsonl").read_text().splitlines()[:chunks]
        share = mlp_share(run, [json.loads(line)["text"] for line in lines])
        (run / "mlp_share.json").write_text(json.dumps(share))
        print(f"MLP share of u over {share['chunks']} chunks of {run}/teacher_text.jsonl: median "
              f"{share['median']:.4f}, largest {share['max']:.4f} (||MLP(x_T)|| / ||P_in x_T||, each head)")
        if "out_median" in share:
            print(f"MLP_out share of delta_T: median {share['out_median']:.4f}, largest {share['out_max']:.4f} "
                  "(||MLP_out(y_S)|| / ||P_out y_S||, each head)")


if __name__ == "__main__":
    main()
