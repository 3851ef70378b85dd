"""On-policy text: the student writes the answers the teacher is asked about (issue 34, lever 3).

Round 0 trains on the default text (`--corpus format`: the teacher writes questions in the cartridge's prompt
format and answers them). Before each later round the student (target + heads) answers the same questions,
greedily, as evaluate.py asks them; the teacher (source + cartridge) is cached again on question + the
student's own answer, and the heads go on training, one optimizer and one cosine schedule over all rounds. So
the student is shown the teacher's distribution on its own mistakes (GKD, arXiv 2306.13649), not only on the
teacher's text. No task problem or answer is read. Writes a run folder that evaluate.py scores.

    python scripts/on_policy.py --rounds 3 [train.py flags ...]     (--steps: all rounds together)
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cast  # noqa: E402
import evaluate  # noqa: E402
import losses  # noqa: E402
import teacher  # noqa: E402
import train  # noqa: E402
from config import parse_config  # noqa: E402
from data import check_run_folder, load_model, partial, resolve_model, write_json  # noqa: E402
from memory import free_memory, peak_memory_mb, reset_peak_memory, use_cores  # noqa: E402


def student_text(cfg, target, tok_T, heads, prompts: list[str], run: Path, round_: int) -> str:
    """The student's greedy answers to the questions, as text for the teacher: a .jsonl corpus file."""
    t0 = time.time()
    with cast.attached(target, heads):
        answers = evaluate.generate(target, tok_T, prompts, max_new_tokens=cfg.seq_len // 2)
    path = run / f"student_round{round_}.jsonl"
    path.write_text("".join(json.dumps({"text": p + a}) + "\n" for p, a in zip(prompts, answers)))
    print(f"round {round_}: the student answered {len(prompts)} questions in {time.time() - t0:.0f}s "
          f"| first: {(prompts[0] + answers[0])[:160]!r}", flush=True)
    return str(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args, rest = ap.parse_known_args(argv)
    cfg = parse_config(rest)
    if cfg.corpus != "format":
        raise SystemExit("error: on-policy rounds ask the teacher's own questions: use --corpus format")
    use_cores()
    check_run_folder(cfg.out, cfg.force, False, cfg.ckpt_every)
    torch.manual_seed(cfg.seed)
    # round 0: the default pipeline's start (train.train's steps 1-3)
    kernels, vocab_T, cache, device, dtype = train.prepare(cfg)
    target, tok_T = load_model(cfg.target, device, dtype)
    heads = cast.make_heads(kernels, target).to(device)
    train.ridge_start(cfg, target, heads, cache, tok_T.pad_token_id or 0)
    del cache["ridge_x_S"], cache["ridge_y_S"]
    from transformers import AutoTokenizer
    tok_S = AutoTokenizer.from_pretrained(resolve_model(cfg.source))
    questions = [t.partition("\nAnswer:")[0] for t in teacher.teacher_corpus(cfg, cfg.max_chunks, tok_S, "cpu", dtype)[0]]
    prompts = [q + "\nAnswer:" for q in questions if q.startswith("Question:")]
    run = partial(cfg.out)
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    opt = train.make_optimizer(cfg, heads)
    record = train.choose_start(cfg, target, heads, cache, vocab_T, opt, run)
    (run / "log.jsonl").write_text(json.dumps({**record, "rounds": args.rounds}) + "\n")
    write_json(run / "config.json", {**dataclasses.asdict(cfg), "on_policy_rounds": args.rounds,
                                     "provenance": cache["provenance"]})
    sched = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))  # train.fit's, over all rounds
    per_round, t0 = math.ceil(cfg.steps / args.rounds), time.time()
    reset_peak_memory(device)
    for round_ in range(args.rounds):
        if round_:
            corpus = student_text(cfg, target, tok_T, heads, prompts, run, round_)
            _, _, cache, _, _ = train.prepare(dataclasses.replace(cfg, corpus=corpus, max_chunks=0))
            del cache["ridge_x_S"], cache["ridge_y_S"]
            free_memory()
        for step in range(round_ * per_round + 1, min((round_ + 1) * per_round, cfg.steps) + 1):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * group["lr_scale"] * sched(step - 1)
            opt.zero_grad(set_to_none=True)
            out = losses.cast_loss(cfg, target, heads, cache, vocab_T, train.batch_chunks(cfg, step, cache["n_train"]),
                                   backward=True)
            if not torch.isfinite(out["loss"]):
                raise SystemExit(f"error: the loss is {out['loss'].item()} at step {step}")
            opt.step()
            free_memory(collect=False)
            if step % cfg.log_every == 0 or step == min((round_ + 1) * per_round, cfg.steps):
                rec = {"step": step, "round": round_, **{k: round(v.item(), 5) for k, v in out.items()},
                       "elapsed_s": round(time.time() - t0, 1)}
                if step % cfg.monitor_every == 0 or step == min((round_ + 1) * per_round, cfg.steps):
                    rec["task_kl"] = round(losses.task_kl(cfg, target, heads, cache, vocab_T), 5)
                print(json.dumps(rec), flush=True)
                with open(run / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
    print(f"{time.time() - t0:.0f}s training and writing | peak {peak_memory_mb(device):.0f} MB")
    cast.save_heads(heads, run / "heads.safetensors", {"source": cfg.source, "target": cfg.target,
                                                        "cartridge": cfg.cartridge, "on_policy_rounds": str(args.rounds)})
    cast.export_lora(heads, run / "lora", base_model_name_or_path=cfg.target, force=True)
    shutil.rmtree(cfg.out, ignore_errors=True)
    os.replace(run, cfg.out)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
