"""The README's tables and figures, read from the committed records in results/ (nothing is typed in by hand).

    pip install matplotlib          # an optional extra, not a core requirement
    python scripts/plot.py          # prints the tables, writes results/figures/task_kl.png and retention.png

A row names its run folder. Its CAST score, and where the folder has them the teacher's and the weight-space
baseline's, come from that folder's eval.json. Every row is divided by the LoRA retrained on its target at the
learning rate chosen on the validation split (results/retrained_tuning/<target>-chosen.json), scored on the
row's split: its tuning record on validation, results/final/retrained-<target>.json on test (a row's own
retrained cell is the LoRA it was scored beside, perhaps an earlier choice). Retention's interval is CAST's
95% Wilson interval over that denominator's point value. A row that names several folders (the same recipe
trained with other seeds or cartridges) shows the mean over its cartridges of each one's mean over its runs and,
in brackets, the lowest and highest run; in the figure each run is a dot and the whisker spans the runs' own 95%
intervals.
"""
import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"

# (group, pair, recipe, run folder (or a tuple of one recipe's seeds), a run of the same pair whose eval.json fills
# the rows the run's own lacks: the teacher and the weight-space baseline depend on the pair and the cartridge only,
# not on the heads)
ROWS = [
    ("CAST", "SmolLM2 -> Gemma-3", "default", ("final/forward_seed0", "final/forward_seed1", "final/forward_seed2",
                                             "final/forward", "final/forward_cartridge1_seed0",
                                             "final/forward_cartridge2_seed0"), None),
    ("CAST", "SmolLM2 -> Gemma-3", "default", "levers/default_c58c0_s1000", None),
    ("CAST", "Gemma-3 -> SmolLM2", "default, teacher with `<bos>` (03f622b)", (
        "bos_check/reverse_seed0", "bos_check/reverse_cartridge1_seed0", "bos_check/reverse_cartridge2_seed0"), None),
    ("CAST", "Gemma-3 -> SmolLM2", "default, teacher without `<bos>` (before 03f622b)", (
        "final/reverse", "final/reverse_cartridge1_seed0"), None),
    ("CAST", "SmolLM2 -> Gemma-3", "the paper's recipe", "final/forward_paper", None),
    ("CAST", "Gemma-3 -> SmolLM2", "the paper's recipe", "final/reverse_paper", None),
    ("control", "SmolLM2 -> SmolLM2", "default (identity)", "final/identity", None),
    ("control", "SmolLM2 -> rotated SmolLM2", "default (known answer)", "final/twin", None),
    ("ceiling", "SmolLM2 -> Gemma-3", "not CAST: task text, 300 steps", "ceiling_paper_s300", "paper_s300"),
]
KL_RUNS = {"identity": "final/identity", "rotated twin": "final/twin",
           "SmolLM2 -> Gemma-3": "final/forward_seed0", "Gemma-3 -> SmolLM2 (teacher without <bos>)": "final/reverse",
           "Gemma-3 -> SmolLM2 (with <bos>)": "bos_check/reverse_cartridge1_seed0",
           "SmolLM2 -> Gemma-3, the paper's recipe": "final/forward_paper",
           "Gemma-3 -> SmolLM2, the paper's recipe": "final/reverse_paper"}


def load(folder: str, name: str):
    return json.loads((RESULTS / folder / name).read_text())


def strict(row: dict | None) -> tuple[float, tuple[float, float]] | None:
    return None if row is None else (row["strict"], tuple(row["strict_ci"]))


def tuned_denominator(name: str, split: str) -> dict:
    """A tuned retrained LoRA's scores on a split (name: a target, or target-r16 for rank 16): on validation its
    tuning record, on test its one test evaluation (results/final/retrained-<name>.json, written by
    `scripts/final_table.sh denominators`)."""
    chosen = load("retrained_tuning", f"{name}-chosen.json")
    if split == "validation":
        return load("retrained_tuning", f"{name}-lr{chosen['lr']:g}.json")["model + LoRA"]
    record = load("final", f"retrained-{name}.json")
    if record["lora"] != chosen["adapter"]:
        raise SystemExit(f"results/final/retrained-{name}.json scored {record['lora']}, but the rate chosen on "
                         f"validation is {chosen['adapter']}: bash scripts/final_table.sh denominators")
    return record["model + LoRA"]


def denominators(target: str) -> tuple[str, str | None]:
    """The target's tuned retrained LoRAs, the better on validation first (strict, then answer NLL): rank 8 and,
    where it was tuned (and scored on test), rank 16, the rank of the forward export; (name, None) with one."""
    names = [target] + [f"{target}-r16"] * (RESULTS / "final" / f"retrained-{target}-r16.json").is_file()
    if len(names) == 1:
        return target, None
    score = lambda n: (tuned_denominator(n, "validation")["strict"], -tuned_denominator(n, "validation")["nll"])
    best, other = sorted(names, key=score, reverse=True)
    return best, other


def table_rows() -> list[dict]:
    out = []
    for group, pair, recipe, folders, also in ROWS:
        seeds = tuple(f for f in (folders if isinstance(folders, tuple) else (folders,)) if (RESULTS / f).is_dir())
        folder = seeds[0]  # the baselines (teacher, weight-space, retrained) do not depend on the seed
        ev, cfg = load(folder, "eval.json"), load(folder, "config.json")
        # the runs of one recipe: the same settings but the seed, the cartridge and the run folder (a run may have
        # been resumed from its checkpoint or written over with --force: neither changes what it trains)
        for other in seeds[1:]:
            c = load(other, "config.json")
            differ = [k for k in set(c) & set(cfg) - {"seed", "out", "cartridge", "provenance", "resume", "force"}
                      if c[k] != cfg[k]]
            assert not differ, f"{other} is not {folder}'s recipe: {differ}"
        # each cartridge (by its hash) with its runs; its first run scored its teacher and weight-space baseline
        cartridges = {}
        for f in seeds:
            recorded = load(f, "config.json").get("provenance", {}).get("cartridge_sha256") or "unrecorded"
            cartridges.setdefault(recorded[:8], []).append(f)
        own = set(ev)  # the rows this run scored itself; the others are marked † in the table
        if also:
            assert [load(also, "config.json")[k] for k in ("source", "target")] == [cfg["source"], cfg["target"]]
            ev = {**load(also, "eval.json"), **ev}
        target = cfg["target"]
        # a run scored before the splits were made disjoint (commit 00cdb8f) has no split record: its 200
        # held-out problems were the validation split's but one; it is divided by the validation denominator
        split = ev.get("split", {}).get("split", "validation")
        split_label = split if "split" in ev else "held-out 200 (199 in validation)"
        if target.startswith("rotated:"):  # no LoRA of the source fits its rotated twin: read against the teacher
            retrained, denominator = strict(ev.get("teacher (source + cartridge)")), "teacher"
        else:  # the LoRA retrained at the rate chosen on validation (the better rank there), on the row's split
            best, other = denominators(target)
            retrained, denominator = strict(tuned_denominator(best, split)), best
            if other and split in ("test", "validation"):
                denominator = f"{best}, beside {other} {tuned_denominator(other, split)['strict']:.3f}"
        weight_space = ev.get("target + weight-space")
        cast_score = strict(ev["target + CAST (exported)"])
        each = [strict(load(f, "eval.json")["target + CAST (exported)"]) for f in seeds]  # (score, interval) a seed
        if len(seeds) > 1:  # the mean over the cartridges of each one's mean over its seeds, and the lowest and
            scores = [score for score, _ in each]  # highest run in place of the interval
            by_cartridge = [[s for f, (s, _) in zip(seeds, each) if f in runs] for runs in cartridges.values()]
            means = [sum(s) / len(s) for s in by_cartridge]
            cast_score = (sum(means) / len(means), (min(scores), max(scores)))
        teacher = strict(ev.get("teacher (source + cartridge)"))
        baselines = {h: load(runs[0], "eval.json") for h, runs in cartridges.items()}
        out.append(dict(group=group, pair=pair, recipe=recipe, folders=seeds, steps=cfg["steps"], split=split_label,
                        cartridges=cartridges,
                        teachers=[b["teacher (source + cartridge)"]["strict"] for b in baselines.values()
                                  if "teacher (source + cartridge)" in b],
                        weight_spaces=[b["target + weight-space"]["strict"] for b in baselines.values()
                                       if "target + weight-space" in b],
                        cast=cast_score, teacher=teacher, retrained=retrained, denominator=denominator,
                        weight_space=strict(weight_space), borrowed={k for k in ev if k not in own},
                        retention=cast_score[0] / retrained[0],
                        retention_ci=tuple(c / retrained[0] for c in cast_score[1]),
                        seeds_retention=[(score / retrained[0], tuple(c / retrained[0] for c in ci))
                                         for score, ci in each]))
    return out


def sd(values: list[float]) -> float:
    """The sample standard deviation (n - 1)."""
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def spread(r: dict) -> str:
    """How a row of several cartridges spreads: each cartridge's mean strict over its runs, the standard deviation
    between those means and between the seeds of one cartridge."""
    strict_of = lambda f: load(f, "eval.json")["target + CAST (exported)"]["strict"]
    means = {h: [strict_of(f) for f in runs] for h, runs in r["cartridges"].items()}
    parts = [f"{h} {sum(v) / len(v):.3f}" + (f" ({len(v)} seeds)" if len(v) > 1 else "") for h, v in means.items()]
    within = [sd(v) for v in means.values() if len(v) > 1]
    between = f"standard deviation {sd([sum(v) / len(v) for v in means.values()]):.3f} between the cartridges' means"
    if not within:  # one run a cartridge: nothing to set the cartridges' spread against
        return (f"Spread of the {r['pair']} {r['recipe']} row ({r['split']}), strict by cartridge: {', '.join(parts)}; "
                f"{between} (from {len(means)} cartridges, one run each).")
    return (f"Spread of the {r['pair']} {r['recipe']} row ({r['split']}), strict by cartridge: {', '.join(parts)}; "
            f"{between}, " + ", ".join(f"{w:.3f}" for w in within) + " between the seeds of one cartridge "
            f"(from {len(means)} cartridges and {', '.join(str(len(v)) for v in means.values() if len(v) > 1)} seeds: "
            "too few values to compare the two).")


def print_table(rows: list[dict]) -> None:
    """Two tables of seven columns: CAST between the two architectures, then the controls and the ceiling. A row's
    name gives its pair, its recipe and the split it was scored on."""
    tables = [("CAST: pair, recipe, split", ("CAST",)), ("control or ceiling: pair, recipe, split", ("control", "ceiling"))]
    for n, (title, groups) in enumerate(tables):
        if n:
            print()
        print(f"| {title} | teacher | retrained on the target | CAST strict (95% CI) | retention | "
              "weight-space (SVD) | records |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in (r for r in rows if r["group"] in groups):
            (c, (lo, hi)), ws, te = r["cast"], r["weight_space"], r["teacher"]
            mark = lambda row: " †" if row in r["borrowed"] else ""  # scored by the row's `also` run
            ref = "none fits" if r["denominator"] == "teacher" else f"{r['retrained'][0]:.3f}"
            if ", beside " in r["denominator"]:  # two ranks tuned: the better on validation, the other beside it
                best, other = r["denominator"].split(", beside ")
                rank = lambda name: "rank 16" if name.endswith("-r16") else "rank 8"
                ref += f" ({rank(best)}; {rank(other.split()[0])}: {other.split()[1]})"
            retention = f"{r['retention']:.0%}" + (" of the teacher" if r["denominator"] == "teacher" else "")
            teacher_cell = f"{te[0]:.3f}{mark('teacher (source + cartridge)')}" if te else "not scored"
            ws_cell = f"{ws[0]:.3f}{mark('target + weight-space')}" if ws else "not scored"
            seeds = r["folders"]
            if len(r["cartridges"]) > 1:  # several cartridges, each with its runs: the mean and the range of all
                cast_cell = (f"mean {c:.3f} ({len(r['cartridges'])} cartridges, {len(seeds)} runs; range "
                             f"{lo:.3f}-{hi:.3f}, not an interval)")
                retention += " (range {:.0%}-{:.0%})".format(*r["retention_ci"])
                span = lambda values: f"{min(values):.3f}" + (f"-{max(values):.3f}" if max(values) > min(values) else "")
                teacher_cell, ws_cell = (span(v) if v else "not scored" for v in (r["teachers"], r["weight_spaces"]))
                where = "`, `".join(f"results/{f}/" for f in seeds)
                for parent in {f.rsplit("/", 1)[0] for f in seeds}:  # a folder's parent named once
                    where = where.replace(f"`, `results/{parent}/", "`, `")
                print(f"| {r['pair']}, {r['recipe']}, {r['split']} | {teacher_cell} | {ref} | {cast_cell} | "
                      f"{retention} | {ws_cell} | `{where}` |")
                continue
            if len(seeds) > 1:  # results/final/forward_seed{0,1,2}/
                stem = seeds[0].rstrip("0123456789")
                cast_cell = f"mean {c:.3f} ({len(seeds)} seeds: {lo:.3f}-{hi:.3f})"
                retention += " ({} seeds: {:.0%}-{:.0%})".format(len(seeds), *r["retention_ci"])
                where = stem + "{" + ",".join(f[len(stem):] for f in seeds) + "}"
            else:
                cast_cell, where = f"{c:.3f} ({lo:.2f}-{hi:.2f})", seeds[0]
            name = ("" if r["group"] == "CAST" else f"{r['group']}: ") + f"{r['pair']}, {r['recipe']}, {r['split']}"
            print(f"| {name} | {teacher_cell} | {ref} | {cast_cell} | {retention} | {ws_cell} | `results/{where}/` |")
        for i, r in enumerate(r for r in rows if r["group"] in groups and len(r["cartridges"]) > 1):
            print("\n" * (i == 0) + "- " + spread(r))  # a list: one line a row


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, folder in KL_RUNS.items():
        log = [json.loads(line) for line in (RESULTS / folder / "log.jsonl").read_text().splitlines()]
        points = [(e["step"], e["task_kl"]) for e in log if "task_kl" in e]
        ax.plot(*zip(*points), marker="o", markersize=3, label=f"{label} ({folder})")
    ax.set(yscale="log", xlabel="step", ylabel="task KL, teacher || student",
           title="KL on 32 held-out task prompts (never trained on)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "task_kl.png", dpi=120)

    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    labels = [f"{r['pair']}\n{r['recipe'].rstrip('*')} ({r['split']}"
              + (f", {len(r['cartridges'])} cartridges, {len(r['folders'])} runs)" if len(r["folders"]) > 1 else ")")
              for r in rows]
    values = [100 * r["retention"] for r in rows]
    # a row of several runs: each run a dot, the bar's whisker spans the runs' own 95% intervals (lowest to highest)
    spans = [(min(ci[0] for _, ci in r["seeds_retention"]), max(ci[1] for _, ci in r["seeds_retention"]))
             for r in rows]
    errors = [[100 * (r["retention"] - lo) for r, (lo, hi) in zip(rows, spans)],
              [100 * (hi - r["retention"]) for r, (lo, hi) in zip(rows, spans)]]
    colours = {"CAST": "tab:blue", "control": "tab:grey", "ceiling": "tab:orange"}
    ax.barh(range(len(rows)), values, xerr=errors, color=[colours[r["group"]] for r in rows], capsize=3)
    for i, r in enumerate(rows):
        if len(r["seeds_retention"]) > 1:
            ax.plot([100 * point for point, _ in r["seeds_retention"]], [i] * len(r["seeds_retention"]), "k.")
    ax.axvspan(85, 95, color="tab:green", alpha=0.15, label="the paper's 85-95%")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="strict retention, % (95% interval of CAST's accuracy)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "retention.png", dpi=120)
    print(f"wrote {out / 'task_kl.png'} and {out / 'retention.png'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "figures"))
    ap.add_argument("--table-only", action="store_true", help="print the table, draw nothing (no matplotlib)")
    args = ap.parse_args(argv)
    rows = table_rows()
    print_table(rows)
    if not args.table_only:
        plot(rows, Path(args.out))


if __name__ == "__main__":
    main()
