"""How much of the skill survived the transfer: retention against a LoRA retrained on the target.

    python evaluate.py --run runs/smollm2-to-gemma3 [--retrained DIR] [--task arithmetic|FILE.jsonl] [--n 200]
    python evaluate.py --run RUN --split test         # the final table: the test split, scored once
    python evaluate.py --lora DIR --model NAME        # one LoRA (a cartridge) against its base model

Rows, on the same problems (the validation split unless --split test) with greedy decoding: the two base
models, the teacher (source + cartridge), the target + a LoRA retrained on the task (the denominator), the
target + CAST heads (hooks) and + the exported LoRA (they must agree), and a data-free weight-space baseline.
eval.json records the split, a hash of its problems, versions and model hashes. Retention, two ways:
    paper:          acc(CAST) / acc(retrained)
    lift:           (acc(CAST) - acc(target base)) / (acc(retrained) - acc(target base))
"""
import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch

import cast
import lora
from data import answer_batch, extract_answer, pad_batch, prompt, same_number, task_problems
from lora import load_lora, read_adapter
from models import check_model, default_device_dtype, device_problem, load_model, resolve_model, use_cores
from runs import folder_sha256, progress, provenance, provenance_differences, write_json


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
    """Greedy continuations, batched with left padding, cut where a new question would start."""
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    outputs, t0 = [], time.time()
    for i in range(0, len(prompts), batch_size):
        rows = [tokenizer(p)["input_ids"] for p in prompts[i:i + batch_size]]
        ids, mask = pad_batch(rows, pad, device, left=True)  # (B, T)
        width = ids.shape[1]
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)  # (B, T + new)
        for row in out[:, width:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(text.split("\n\n")[0].split("Question:")[0])
        if len(prompts) > batch_size:
            progress("answers generated", len(outputs), len(prompts), t0)
    return outputs


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: honest at 0 and 1, unlike the normal approximation."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def answer_nll(model, tokenizer, problems: list[dict], batch_size: int = 16) -> float:
    """Mean negative log-likelihood per token of the reference answers (worked steps + '#### n' + EOS)."""
    device, total, count = next(model.parameters()).device, 0.0, 0
    for i in range(0, len(problems), batch_size):
        pairs = [(prompt(p["question"]), " " + p["answer"]) for p in problems[i:i + batch_size]]
        ids, labels, mask = answer_batch(tokenizer, pairs, device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)  # (B, T-1, V)
        target, keep = labels[:, 1:], labels[:, 1:] != -100  # (B, T-1)
        total -= logp.gather(-1, target.clamp_min(0)[..., None])[..., 0][keep].sum().item()
        count += keep.sum().item()
    return total / count


ARITHMETIC_NEW_TOKENS = 48  # the generated answers run to 27 tokens in SmolLM2 and in Gemma-3: room to spare
MARGIN_NEW_TOKENS = 16  # beyond a task file's longest training answer


def new_tokens_limit(task: str, tokenizer, n_held: int = 200) -> int:
    """How many tokens a model may write per answer: 48 for the generated arithmetic, else the longest answer of
    the task file's training rows in this tokenizer plus a margin (GSM8K solutions run past 48, more so under
    a tokenizer that writes one token per digit). The scored split's own answers are not read for it."""
    if task == "arithmetic":
        return ARITHMETIC_NEW_TOKENS
    answers = [" " + p["answer"] for p in task_problems(task, "train", None, n_held)]
    return max(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]) + MARGIN_NEW_TOKENS


def task_accuracy(model, tokenizer, problems: list[dict], max_new_tokens: int = 48, batch_size: int = 32) -> dict:
    """Strict and flexible exact match (with 95% CIs and problem by problem, '1' right, '0' wrong, so two runs
    on the same problems can be compared pair by pair), tokens/s of generation, and every output (a run's
    mistakes can be read, not only counted)."""
    start = time.time()
    outputs = generate(model, tokenizer, [prompt(p["question"]) for p in problems], max_new_tokens, batch_size)
    seconds = time.time() - start
    refs = [extract_answer(p["answer"], "strict") for p in problems]
    result = {"n": len(problems), "max_new_tokens": max_new_tokens,
              "gen_tok_s": sum(len(tokenizer(o)["input_ids"]) for o in outputs) / seconds}
    for mode in ("strict", "flexible"):
        right = [same_number(extract_answer(o, mode), r) for o, r in zip(outputs, refs)]
        result[mode], result[mode + "_ci"] = sum(right) / len(problems), wilson(sum(right), len(problems))
        result[mode + "_each"] = "".join("1" if ok else "0" for ok in right)
    result["outputs"] = outputs
    return result


def retention(acc: float, acc_base: float, acc_retrained: float) -> dict:
    """The paper's ratio and the lift-normalised ratio (None where the denominator is 0)."""
    return {"paper": acc / acc_retrained if acc_retrained else None,
            "lift": (acc - acc_base) / (acc_retrained - acc_base) if acc_retrained != acc_base else None}


# ----------------------------------------------------------------------------- weight-space baseline

@torch.no_grad()
def weight_space_heads(heads, source, target, k: int = 0):
    """A data-free baseline in the spirit of Cross-LoRA, written as fixed CAST heads.

    Each source update dW_S = B_S A_S is expressed in the top-k singular bases of its source base weight
    (W_S = U_S S_S V_S^T) and re-expressed in those of the target module (W_T = U_T S_T V_T^T):
        dW_T = U_T (U_S^T dW_S V_S) V_T^T,  i.e.  P_in = V_S V_T^T (d_in_S, d_in_T),  P_out = U_T U_S^T
    Same model in and out with full k gives back dW_S exactly. Unlike Cross-LoRA, the bases are
    matched by singular-value rank only (no learned or Frobenius-optimal alignment between them)."""
    for h in heads:
        W_S = source.get_submodule(h.source_name)
        W_S = getattr(W_S, "base", W_S).weight.float()  # (d_out_S, d_in_S)
        W_T = target.get_submodule(h.target_name).weight.float()  # (d_out_T, d_in_T)
        U_S, _, Vh_S = torch.linalg.svd(W_S)  # full bases: U_S (d_out_S, d_out_S), Vh_S (d_in_S, d_in_S)
        U_T, _, Vh_T = torch.linalg.svd(W_T)
        k_in, k_out = min(len(Vh_S), len(Vh_T)), min(len(U_S), len(U_T))  # k <= 0: as many as both have
        if k > 0:
            k_in, k_out = min(k, k_in), min(k, k_out)
        h.P_in.weight.copy_(Vh_S[:k_in].T @ Vh_T[:k_in])  # (d_in_S, k) @ (k, d_in_T)
        h.P_out.weight.copy_(U_T[:, :k_out] @ U_S[:, :k_out].T)  # (d_out_T, k) @ (k, d_out_S)
    return heads


# ----------------------------------------------------------------------------- the table

def run_heads(run: Path, source, target):
    """The CAST heads of a run, rebuilt from its cartridge and heads.safetensors."""
    cfg = json.loads((run / "config.json").read_text())
    config, factors = read_adapter(cfg["cartridge"])
    heads = cast.make_heads(cast.find_kernels(config, factors, source, target), target)
    cast.load_heads(heads, run / "heads.safetensors")
    return heads.to(next(target.parameters()).device), cfg


def score(model, tokenizer, problems, label: str, results: dict, **extra) -> dict:
    """One row of the table: accuracy (at the split record's generation limit, or the task's for this tokenizer),
    answer NLL."""
    split = results["split"]
    row = task_accuracy(model, tokenizer, problems,
                        split["max_new_tokens"] or new_tokens_limit(split["task"], tokenizer, split["n_held"]))
    row["nll"] = answer_nll(model, tokenizer, problems)
    row.update(extra)
    results[label] = row
    print(f"scored {label:28s} | strict {row['strict']:.3f} | flexible {row['flexible']:.3f} | nll {row['nll']:.3f} "
          f"| {row['gen_tok_s']:.1f} tok/s", flush=True)
    return row


def retrained_folder(model: str, task: str, lr: float, rank: int = 8) -> Path:
    """Where a LoRA retrained on a model lives, by task, rank (8 unnamed) and learning rate (scripts/tune_retrained.py
    writes it)."""
    suffix = ("" if task == "arithmetic" else f"-{Path(task).stem}") + ("" if rank == 8 else f"-r{rank}")
    return Path("cartridges") / "tuned" / f"{Path(model).name}{suffix}-lr{lr:g}"


def changed_inputs(cfg: dict) -> list[str]:
    """The run's cartridge and models whose files differ from the hashes its config.json recorded: the heads were
    trained against those weights, not these ('cartridge_sha256: 91e3... -> 8852...')."""
    recorded, changed = cfg.get("provenance", {}), []
    now = {"cartridge_sha256": folder_sha256(cfg["cartridge"])}
    for role in ("source", "target"):
        now[f"{role} sha256"] = folder_sha256(resolve_model(cfg[role]))
    was = {"cartridge_sha256": recorded.get("cartridge_sha256"),
           **{f"{role} sha256": recorded.get(role, {}).get("sha256") for role in ("source", "target")}}
    for key, value in now.items():
        if was[key] and value and was[key] != value:
            changed.append(f"{key}: {was[key][:12]}... -> {value[:12]}...")
    return changed


def evaluate_run(run: Path, problems, args) -> dict:
    """Every row for one run folder, on the same problems (--skip-baselines: only the run's own two rows)."""
    cfg = json.loads((run / "config.json").read_text())
    device, dtype = default_device_dtype(args.device or None, args.dtype or None)
    results = {"split": split_record(args, problems), "changed_inputs": args.changed_inputs}
    baselines = not args.skip_baselines
    source, tok_S = load_model(cfg["source"], device, dtype)
    if baselines:
        score(source, tok_S, problems, "source base", results)
    target, tok_T = load_model(cfg["target"], device, dtype)
    if baselines:
        score(target, tok_T, problems, "target base", results)
    results["provenance"] = provenance({"source": cfg["source"], "target": cfg["target"]},
                                       {"source": tok_S, "target": tok_T})
    results["provenance"]["cartridge_sha256"] = folder_sha256(cfg["cartridge"])
    results["provenance_changes"] = provenance_differences(cfg.get("provenance", {}), results["provenance"])
    for line in results["provenance_changes"]:
        print(f"warning: {run} was trained with other models or libraries: {line}", flush=True)
    heads, _ = run_heads(run, source, target)
    with cast.attached(target, heads):
        hooked = score(target, tok_T, problems, "target + CAST (hooks)", results)
    if baselines:
        baseline = weight_space_heads(cast.make_heads(_kernels(heads), target), source, target)
        with cast.attached(target, baseline.to(device)):
            score(target, tok_T, problems, "target + weight-space", results)
        load_lora(source, cfg["cartridge"])
        score(source, tok_S, problems, "teacher (source + cartridge)", results)
    del source
    exported, _ = load_model(cfg["target"], device, dtype)
    load_lora(exported, run / "lora")
    export_row = score(exported, tok_T, problems, "target + CAST (exported)", results)
    speeds = hooked["gen_tok_s"], export_row["gen_tok_s"]  # 0 tok/s when the student writes nothing at all
    results["hooks_vs_export_tok_s"] = speeds[0] / speeds[1] if speeds[1] else None
    if baselines and args.retrained != "none":
        retrained, _ = load_model(cfg["target"], device, dtype)
        load_lora(retrained, args.retrained)
        score(retrained, tok_T, problems, "target + retrained LoRA", results)
    base, full = results.get("target base"), results.get("target + retrained LoRA")
    for label in ("target + CAST (hooks)", "target + CAST (exported)", "target + weight-space"):
        if full and label in results:
            results[label]["retention"] = {m: retention(results[label][m], base[m], full[m])
                                           for m in ("strict", "flexible")}
    return results


def evaluate_lora(args, problems) -> dict:
    """`--lora DIR --model NAME`: the base model and the model + LoRA on the same problems, printed (and written
    to --out if given)."""
    device, dtype = default_device_dtype(args.device or None, args.dtype or None)
    model, tokenizer = load_model(args.model, device, dtype)
    results = {"split": split_record(args, problems), "lora": args.lora,
               "provenance": provenance({"model": args.model}, {"model": tokenizer})}
    results["provenance"]["lora_sha256"] = folder_sha256(args.lora)
    if not args.skip_baselines:
        score(model, tokenizer, problems, "base model", results)
    load_lora(model, args.lora)
    score(model, tokenizer, problems, "model + LoRA", results)
    if args.out:
        write_json(Path(args.out), results)
    return results


def split_record(args, problems) -> dict:
    """Which problems were scored: the split, their number and a hash of their text (two records with the same
    hash scored the same problems)."""
    text = json.dumps([[p["question"], p["answer"]] for p in problems])
    return {"task": args.task, "split": args.split, "n": len(problems), "n_held": args.n_held,
            "max_new_tokens": args.max_new_tokens, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _kernels(heads):
    return [cast.Kernel(h.source_name, h.target_name, h.A_S.cpu(), h.B_S.cpu(), h.scale) for h in heads]


def percent(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def table(results: dict) -> str:
    lines = ["| model | strict (95% CI) | flexible (95% CI) | answer NLL | retention strict: paper / lift | tok/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    order = ["source base", "teacher (source + cartridge)", "target base", "target + retrained LoRA",
             "target + CAST (hooks)", "target + CAST (exported)", "target + weight-space"]
    for label in [o for o in order if o in results]:
        r = results[label]
        ret = r.get("retention", {}).get("strict")
        lines.append(f"| {label} | {r['strict']:.3f} ({r['strict_ci'][0]:.2f}-{r['strict_ci'][1]:.2f}) | "
                     f"{r['flexible']:.3f} ({r['flexible_ci'][0]:.2f}-{r['flexible_ci'][1]:.2f}) | {r['nll']:.3f} | "
                     f"{percent(ret['paper']) + ' / ' + percent(ret['lift']) if ret else ''} | {r['gen_tok_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="", help="a run folder written by train.py")
    ap.add_argument("--lora", default="", help="instead of --run: score this LoRA (PEFT layout) on --model")
    ap.add_argument("--model", default="", help="the base model of --lora (alias, folder or Hugging Face id)")
    ap.add_argument("--retrained", default="", help="LoRA retrained on the target (PEFT layout): the denominator; "
                    "default: cartridges/tuned/<target>-lr<lr>, made with lora.py if missing, at the lr chosen "
                    "on validation for an embedded model (lora.RETRAINED_LR); 'none': no retention")
    ap.add_argument("--task", default="arithmetic", help="'arithmetic' or a GSM8K-format .jsonl file")
    ap.add_argument("--split", default="validation", choices=("validation", "test"),
                    help="validation: for choosing recipes; test: the final table, scored once")
    ap.add_argument("--n", type=int, default=200, help="problems of the split (its first n)")
    ap.add_argument("--n-held", type=int, default=200, help="a GSM8K file's rows held out for each of validation and "
                    "test (as given to lora.py)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="tokens a model may write per answer; 0: what fits "
                    f"the task (arithmetic: {ARITHMETIC_NEW_TOKENS}; a file: its longest training answer in the "
                    f"model's tokens + {MARGIN_NEW_TOKENS})")
    ap.add_argument("--allow-changed", action="store_true", help="score a run even though its cartridge or a model "
                    "differs from what config.json recorded (eval.json lists the changes)")
    ap.add_argument("--out", default="", help="with --lora: write the scores to this JSON file")
    ap.add_argument("--skip-baselines", action="store_true", help="score only the run's own rows (hooks, export): "
                    "for a pair whose base, teacher, retrained and weight-space rows are in another eval.json")
    ap.add_argument("--device", default="")
    ap.add_argument("--dtype", default="")
    args = ap.parse_args(argv)
    use_cores()
    if bool(args.run) == bool(args.lora) or bool(args.lora) != bool(args.model):
        raise SystemExit("error: pass --run RUN, or --lora DIR with --model NAME")
    try:  # every input checked before any model is loaded or any file written
        if args.n < 1:
            raise ValueError(f"--n {args.n}: should be at least 1 problem")
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens}: should be 0 (what fits the task) or more")
        if args.n_held < 1:
            raise ValueError(f"--n-held {args.n_held}: should be at least 1")
        if args.out and args.run:
            raise ValueError(f"--out {args.out}: --run writes its scores to RUN/eval.json; --out is for --lora")
        if problem := device_problem(args.device, args.dtype):
            raise ValueError(problem)
        problems = task_problems(args.task, args.split, args.n, args.n_held)
        if args.lora:
            read_adapter(args.lora)
            check_model(args.model)
            return evaluate_lora(args, problems)
        run = Path(args.run)
        for f in ("config.json", "heads.safetensors", "lora/adapter_config.json"):
            if not (run / f).is_file():
                raise FileNotFoundError(f"{run / f} not found; --run takes a folder written by train.py")
        cfg = json.loads((run / "config.json").read_text())
        read_adapter(cfg["cartridge"])  # the heads were trained around this cartridge's kernels
        check_model(cfg["source"], "the run's source")
        check_model(cfg["target"], "the run's target")
        if args.retrained not in ("", "none"):
            read_adapter(args.retrained)
        args.changed_inputs = changed_inputs(cfg)
        if args.changed_inputs and not args.allow_changed:
            raise ValueError(f"{run} was trained against other files than those on disk now "
                             f"({'; '.join(args.changed_inputs)}): its heads would be scored with weights they never "
                             "saw; restore them, train again, or pass --allow-changed (eval.json records the changes)")
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if not args.retrained and not args.skip_baselines:  # the denominator: the task trained on the target
        target = json.loads((run / "config.json").read_text())["target"]
        lr = lora.RETRAINED_LR.get(target, 2e-3)  # chosen on the validation split for the embedded models
        args.retrained = str(retrained_folder(target, args.task, lr))
        if not Path(args.retrained).exists():
            print(f"no --retrained LoRA: making {args.retrained} with lora.py (once)")
            lora.main(["--model", target, "--task", args.task, "--out", args.retrained, "--n-held", str(args.n_held),
                       "--lr", str(lr)])
    results = evaluate_run(run, problems, args)
    write_json(run / "eval.json", results)
    print(f"\n## {run}\n\n{table(results)}\n")
    return results


if __name__ == "__main__":
    main()
