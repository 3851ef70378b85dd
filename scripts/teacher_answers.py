"""Does the teacher know the answers on the target's side? (A diagnostic for the cross-family failure.)

    python scripts/teacher_answers.py --retrained DIR [train.py flags: --source, --cartridge, --target, --task, ...]

On held-out task texts (`--monitor` problems, never trained on) it takes every aligned target position whose
next target token lies in the answer (" #### n" and the worked lines) and is in the shared vocabulary, and
reports, for each distribution there, the mean NLL of that next token and how often it is the top-1 token:
the delta teacher (the default), the paper's teacher (source + cartridge), the bare target and the target
with the LoRA retrained on it (`--retrained`), all over the shared vocabulary. A student trained by CAST can
at best copy its teacher: if the teacher does not know the answers, no head will.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cast  # noqa: E402
import teacher  # noqa: E402
from data import load_model  # noqa: E402
from task import monitor_problems, prompt  # noqa: E402
from lora import load_lora  # noqa: E402
from train import parse_config  # noqa: E402


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--retrained", default="", help="the LoRA retrained on the target (PEFT layout); optional")
    args, train_flags = ap.parse_known_args()
    cfg = parse_config(train_flags + ["--init", "random", "--teacher", "delta", "--loss", "kl", "--force"])
    target, tok_T, kernels, vocab_T, cache, device = teacher.prepare(cfg)
    teacher.target_pass(cfg, target, torch.nn.ModuleList(), cache, tok_T.pad_token_id or 0)
    index = {t: i for i, t in enumerate(vocab_T.tolist())}  # target token id -> column of the shared vocabulary
    problems = monitor_problems(cfg.task, cfg.monitor)
    rows = {"delta teacher": [], "paper teacher": [], "bare target": [], "target + retrained LoRA": []}
    lora_model = None
    if args.retrained:
        lora_model, _ = load_model(cfg.target, device, cfg.dtype or None)
        load_lora(lora_model, args.retrained)
    n_answer = 0
    for k, c in enumerate(range(cache["n_train"], len(cache["ids_T"]))):
        text = prompt(problems[k]["question"]) + " " + problems[k]["answer"]
        enc = tok_T(text, return_offsets_mapping=True)
        ids = cache["ids_T"][c].tolist()
        assert enc["input_ids"] == ids, "the cache tokenised another text"
        answer_start = len(prompt(problems[k]["question"]))
        n_answer += sum(1 for s, e in enc["offset_mapping"] if s >= answer_start and e > s)
        pos = cache["pos_T"][c].tolist()
        keep = [(r, index[ids[p + 1]]) for r, p in enumerate(pos) if p + 1 < len(ids)
                and enc["offset_mapping"][p + 1][0] >= answer_start and ids[p + 1] in index]
        if not keep:
            continue
        r_idx, y = torch.tensor([r for r, _ in keep]), torch.tensor([v for _, v in keep], device=device)
        z = {"delta teacher": teacher.teacher_logits(cfg, target, cache, vocab_T, [c]),
             "paper teacher": teacher.teacher_logits(dataclasses.replace(cfg, teacher="paper"), target, cache, vocab_T, [c]),
             "bare target": cast.shared_logits(target, cache["h_target"][c].to(device), vocab_T)}
        if lora_model is not None:
            hidden = lora_model.base_model(input_ids=torch.tensor([ids], device=device)).last_hidden_state[0]  # (T, d)
            z["target + retrained LoRA"] = cast.shared_logits(lora_model, hidden[pos], vocab_T)
        for name, logits in z.items():
            logp = torch.log_softmax(logits[r_idx].float(), -1)  # (n, V)
            rows[name].append((-logp[torch.arange(len(y)), y], logp.argmax(-1) == y))
    print(f"{sum(len(v[0]) for v in rows['delta teacher'])} answer tokens scored (aligned, next token shared) of "
          f"{n_answer} answer tokens in {len(problems)} held-out task texts")
    for name, parts in rows.items():
        if parts:
            nll, top1 = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            print(f"{name:24s} | next-token NLL {nll.mean():.3f} | top-1 {top1.float().mean():.3f}")


if __name__ == "__main__":
    main()
