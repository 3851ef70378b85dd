"""Scoring a model on a task with greedy decoding: strict and flexible exact match."""
import torch

from data import extract_answer, prompt, same_number


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
    """Greedy continuations, batched with left padding, cut where a new question would start."""
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    outputs = []
    for i in range(0, len(prompts), batch_size):
        rows = [tokenizer(p)["input_ids"] for p in prompts[i:i + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)  # (B, T)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)  # (B, T + new)
        for row in out[:, width:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(text.split("\n\n")[0].split("Question:")[0])
    return outputs


def task_accuracy(model, tokenizer, problems: list[dict], max_new_tokens: int = 48, batch_size: int = 32) -> dict:
    """Fraction of problems whose strict / flexible answer equals the reference's `#### <number>`."""
    outputs = generate(model, tokenizer, [prompt(p["question"]) for p in problems], max_new_tokens, batch_size)
    refs = [extract_answer(p["answer"], "strict") for p in problems]
    scores = {mode: [same_number(extract_answer(o, mode), r) for o, r in zip(outputs, refs)]
              for mode in ("strict", "flexible")}
    return {"strict": sum(scores["strict"]) / len(problems), "flexible": sum(scores["flexible"]) / len(problems),
            "n": len(problems), "outputs": outputs, "correct": scores}
