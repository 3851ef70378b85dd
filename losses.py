"""The objective CAST trains the heads on, hand-written (no F.kl_div):

    L = w_KL T^2 KL(p_teacher || p_student)                                 mean over aligned positions
      + w_MSE (1 / |sites|) sum_sites mean_{n,k} (P_in x_T - x_S)_{nk}^2 / Var(x_S)

on the positions where the source and target tokenizers end a token at the same character (align.py), the
KL over the vocabulary the two tokenizers share, the MSE over the cached sample of those positions (n) and the
d_in_S coordinates (k), Var(x_S) the variance of all the site's cached x_S entries (one number per site). The
teacher's logits are recomputed here (teacher_logits_at) from its final hidden states cached by
teacher.build_cache; the student's come from the target with the heads attached (cast.py). w_KL, w_MSE (the
paper's alpha and beta): --kl-weight, --mse-weight; --loss kl|mse|kl+mse switches one off (ablations).

Shapes: B batch, T tokens (in a formula T is the temperature), N aligned positions, d hidden size, V shared
vocabulary.
"""
import dataclasses

import torch
import torch.nn as nn

import cast
from data import pad_batch


# ----------------------------------------------------------------------------- logits over the shared vocabulary

def shared_logits(model: nn.Module, hidden: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) over the shared vocabulary from final hidden states (N, d): the LM head sliced to V rows."""
    weight = model.get_output_embeddings().weight[vocab_ids]  # (V, d)
    return lm_logits(hidden, weight, getattr(model.config, "final_logit_softcapping", None))


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap=None) -> torch.Tensor:
    """Final hidden states (N, d) times LM head rows (V, d), with the model's logit soft-capping if it has one."""
    logits = hidden.to(weight.dtype) @ weight.T  # (N, d) @ (d, V) -> (N, V)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


# ----------------------------------------------------------------------------- losses (hand-written)

def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
            top_k: int = 0) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) at temperature T, mean over positions; both (N, V) logits over the
    shared vocabulary. top_k = 0: exact over all V tokens. top_k = k: over the teacher's top k tokens plus
    one bucket for the rest of the mass (the older, cheaper form; it hides changes in the tail)."""
    if len(teacher_logits) == 0:  # no aligned position: nothing to compare
        return student_logits.sum() * 0.0
    teacher_logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    student_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V), renormalised
    if top_k <= 0 or top_k >= teacher_logp.shape[-1]:
        # KL(p || q) = sum_i p_i (log p_i - log q_i)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # (N,)
        return temperature ** 2 * kl.mean()
    p_logp, ids = teacher_logp.topk(top_k, dim=-1)  # (N, k)
    q_logp = student_logp.gather(1, ids)  # (N, k)
    p_top = p_logp.exp()
    # rest bucket: log(1 - sum_k p)
    p_rest = (1 - p_top.sum(-1)).clamp_min(0)  # (N,)
    q_rest = torch.log1p(-q_logp.exp().sum(-1).clamp(max=1 - 1e-6))  # (N,)
    kl = (p_top * (p_logp - q_logp)).sum(-1)  # (N,)
    kl = kl + torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp_min(1e-30)) - q_rest), 0.0)
    return temperature ** 2 * kl.mean()


class BlockedKL(torch.autograd.Function):
    """kl_loss(teacher_logits, lm_logits(hidden, weight, softcap), T), exact, a block of rows at a time, the
    gradient for `hidden` made in the same pass: no (N, V) tensor outlives its block. Per row, q = softmax(s / T):

        d(T^2 KL) / ds = T (q - p),    s = c tanh(z / c)  =>  ds / dz = 1 - tanh(z / c)^2
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_logits, temperature: float, softcap=None, block: int = 64):
        n, total = hidden.shape[0], hidden.new_zeros((), dtype=torch.float32)
        grad = torch.zeros_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None  # (N, d)
        for i in range(0, n, block):
            s = lm_logits(hidden[i:i + block], weight, softcap).float()  # (b, V)
            log_q = torch.log_softmax(s / temperature, dim=-1)
            log_p = torch.log_softmax(teacher_logits[i:i + block].float() / temperature, dim=-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()  # KL(p || q) summed over the block's rows
            if grad is not None:
                ds = temperature * (log_q.exp() - p)  # (b, V)
                dz = ds * (1 - (s / softcap) ** 2) if softcap else ds
                grad[i:i + block] = dz.to(weight.dtype) @ weight  # (b, V) @ (V, d) -> (b, d)
        ctx.save_for_backward(grad)
        ctx.n, ctx.dtype = max(n, 1), hidden.dtype
        return temperature ** 2 * total / max(n, 1)  # no aligned position: nothing to compare, 0

    @staticmethod
    def backward(ctx, grad_out):
        grad, = ctx.saved_tensors  # d(T^2 KL) / d hidden of each row, before the mean over rows
        return (grad_out * grad / ctx.n).to(ctx.dtype), None, None, None, None, None


def shared_kl(model: nn.Module, hidden: torch.Tensor, vocab_ids: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """kl_loss(teacher_logits, shared_logits(model, hidden, vocab_ids), T), exact, in a fraction of the memory."""
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return BlockedKL.apply(hidden, model.get_output_embeddings().weight[vocab_ids], teacher_logits, temperature, softcap)


def mse_loss(projected: torch.Tensor, x_S: torch.Tensor, var_S: float) -> torch.Tensor:
    """mean_{n,k} (P_in x_T - x_S)_{nk}^2 / Var(x_S), both (M, d_in_S): the internal alignment of one site,
    scale-free across sites and models (1 for a P_in x_T no better than the mean of x_S)."""
    if projected.numel() == 0:  # no cached x_S in this batch: 0, with a gradient graph
        return projected.sum().float() * 0.0
    return ((projected.float() - x_S.float()) ** 2).mean() / var_S


# ----------------------------------------------------------------------------- one step's loss

@torch.no_grad()
def teacher_logits_at(cache: dict, chunk_ids: list[int], device) -> torch.Tensor:
    """The teacher's logits (N, V) over the shared vocabulary at the aligned positions of the chunks,
    recomputed from its cached final hidden states: one (N, d_S) @ (d_S, V) product."""
    h = torch.cat([cache["h_teacher"][c] for c in chunk_ids]).to(device)  # (N, d_S)
    return lm_logits(h, cache["head_S"].to(device), cache["softcap_S"])  # (N, V)


def cast_loss(cfg, target, heads, cache: dict, vocab_T, chunk_ids: list[int], backward: bool = False) -> dict:
    """L (the equation at the top) on the aligned positions of the chunks, cfg's weights (config.Config); cache
    is teacher.build_cache's. backward: L.backward() while the hooks are still attached."""
    device = next(target.parameters()).device
    ids, mask = pad_batch([cache["ids_T"][c].tolist() for c in chunk_ids], 0, device)  # (B, T), right-padded
    # The teacher first (no grad): its temporaries are freed before the student's activations exist.
    z_teacher = teacher_logits_at(cache, chunk_ids, vocab_T.device) if cfg.kl_weight > 0 else None  # (N, V)
    with cast.attached(target, heads, capture=cfg.mse_weight > 0):
        hidden = target.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, d_T)
        b_idx = torch.cat([torch.full_like(cache["pos_T"][c], b) for b, c in enumerate(chunk_ids)])  # (N,)
        t_idx = torch.cat([cache["pos_T"][c] for c in chunk_ids])  # (N,)
        kl = mse = hidden.new_zeros((), dtype=torch.float32)  # a term that is switched off stays 0
        if cfg.kl_weight > 0 and cfg.top_k:  # the paper's top-k + rest form, through autograd
            logits = shared_logits(target, hidden[b_idx, t_idx], vocab_T)  # (N, V): aligned rows, shared vocab
            kl = kl_loss(z_teacher, logits, cfg.temperature, cfg.top_k)
        elif cfg.kl_weight > 0:  # exact: kl_loss's value and gradient, a block of aligned rows at a time
            kl = shared_kl(target, hidden[b_idx, t_idx], vocab_T, z_teacher, cfg.temperature)
        if cfg.mse_weight > 0:
            # MSE = (1 / |sites|) sum_sites mean_{n,k} (P_in x_T - x_S)_{nk}^2 / Var(x_S), at the positions whose x_S
            # is cached. x_T, the target module's input, comes out of the target with the upstream heads attached,
            # so the MSE's gradient reaches the upstream P_in and P_out too; --mse-detach stops it at x_T
            xb = torch.cat([torch.full_like(cache["x_rows"][c], b) for b, c in enumerate(chunk_ids)])
            xt = torch.cat([cache["pos_T"][c][cache["x_rows"][c]] for c in chunk_ids])  # target positions with x_S
            xs = torch.cat([torch.arange(cache["x_start"][c], cache["x_start"][c + 1]) for c in chunk_ids])
            def x_T(h):  # (M, d_in_T) at the cached positions; detached, the MSE trains this P_in only
                return h.x_T[xb, xt].float().detach() if cfg.mse_detach else h.x_T[xb, xt].float()
            mse = sum(mse_loss(h.P_in(x_T(h)), cache["x_S"][h.source_name][xs].to(device),
                                    cache["var_S"][h.source_name]) for h in heads) / len(heads)
        loss = cfg.kl_weight * kl + cfg.mse_weight * mse
        if backward:
            loss.backward()
    return {"loss": loss, "kl": kl, "mse": mse}


@torch.no_grad()
def task_kl(cfg, target, heads, cache: dict, vocab_T) -> float:
    """Exact T^2 KL(teacher || student) on the held-out task prompts (measured only, never trained on)."""
    monitor, exact = list(range(cache["n_train"], len(cache["ids_T"]))), \
        dataclasses.replace(cfg, kl_weight=1.0, mse_weight=0.0, top_k=0)
    total = n = 0
    for i in range(0, len(monitor), 8):
        group = monitor[i:i + 8]
        positions = sum(len(cache["pos_T"][c]) for c in group)
        total += cast_loss(exact, target, heads, cache, vocab_T, group)["kl"].item() * positions
        n += positions
    return total / n if n else float("nan")
