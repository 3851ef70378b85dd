"""CAST: run a frozen source LoRA ("cartridge") inside a target model through linear heads. Everything one
training step computes is in this file; train.py runs the steps, lora.py holds the LoRA.

For every cartridge kernel (one source layer, one module role) CAST learns two heads:

    y_T = W_T x_T + P_out( s * B_S A_S ( P_in x_T ) )                     (the paper's mechanism)

    P_in: d_in_T -> d_in_S,  P_out: d_out_S -> d_out_T    trainable, no bias
    A_S: (r, d_in_S), B_S: (d_out_S, r), s                frozen, straight from the cartridge

Because the heads are linear the whole path is a rank-r LoRA on the target:

    A_T = A_S P_in  (r, d_in_T),   B_T = P_out B_S  (d_out_T, r)          (export)

The heads are trained so that the target with heads (the student) behaves as the source with its cartridge
(the teacher), on text that holds no task data:

    L = w_KL T^2 KL(p_teacher || p_heads)                                   mean over aligned positions
      + w_MSE (1 / |kernels|) sum_kernels mean_{n,k} (P_in x_T - x_S)_{nk}^2 / Var(x_S)

on the positions where the two tokenizers end a token at the same character (aligned_positions), the KL over
the tokens both vocabularies share (shared_vocab), the MSE over the cached sample of those positions (n) and
the d_in_S coordinates (k), Var(x_S) one number per kernel. x_S is the input of the kernel's source module in
the teacher, x_T that of its target module in the target with heads; p_heads is the target with heads' next-
token distribution. The weights w_KL and w_MSE are --kl-weight and --mse-weight. T: the temperature (2).

The file, in the order a step needs it: 1. kernels and the layer map; 2. heads and hooks; 3. alignment across
tokenizers; 4. the teacher cache (what train.build_cache keeps of the teacher); 5. the loss; 6. the ridge fit,
heads files and the export.

Shapes: B batch, T tokens (in a formula T is the temperature), N aligned positions, d hidden size, V shared
vocabulary, r rank. SmolLM2-135M -> Gemma-3-270M, q_proj, r = 8: P_in is (576, 640), P_out (1024, 576); A_T is
(8, 640), B_T (1024, 8).
"""
import contextlib
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data import pad_batch
from lora import PEFT_PREFIX, adapter_config, linear_names, write_adapter


# ----------------------------------------------------------------------------- 1. kernels and the layer map

def layer_map(n_source: int, n_target: int) -> list[int]:
    """Source layer i -> target layer j = round(i * (L_T - 1) / (L_S - 1)), rounding halves up."""
    if n_source == 1:
        return [0]
    return [math.floor(i * (n_target - 1) / (n_source - 1) + 0.5) for i in range(n_source)]


def layer_and_role(name: str) -> tuple[int, str]:
    """'model.layers.7.self_attn.q_proj' -> (7, 'q_proj')."""
    found = re.search(r"\.(\d+)\.", name)
    if found is None:
        raise ValueError(f"module {name} has no layer index; CAST maps modules inside numbered decoder layers")
    return int(found.group(1)), name.split(".")[-1]


@dataclass
class Kernel:
    """One frozen cartridge kernel and the target module it is moved to."""
    source_name: str  # e.g. model.layers.7.self_attn.q_proj
    target_name: str  # e.g. model.layers.4.self_attn.q_proj
    A_S: torch.Tensor  # (r, d_in_S)
    B_S: torch.Tensor  # (d_out_S, r)
    scale: float  # s = alpha / r, or alpha / sqrt(r) with rsLoRA


def find_kernels(config: dict, factors: dict, source: nn.Module, target: nn.Module) -> list[Kernel]:
    """Pair each cartridge kernel with its target module (same role, mapped layer), checking every shape."""
    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    source_linears = {n: source.get_submodule(n) for n in linear_names(source)}
    target_sites = {layer_and_role(n): n for n in linear_names(target) if re.search(r"\.\d+\.", n)}
    target_roles = sorted({role for _, role in target_sites})
    mapping = layer_map(source.config.num_hidden_layers, target.config.num_hidden_layers)
    kernels = []
    for name in sorted(factors, key=lambda n: (layer_and_role(n), n)):
        A, B = factors[name]["A"], factors[name]["B"]
        if name not in source_linears:
            raise ValueError(f"the cartridge has a kernel for {name}, which the source model lacks; "
                             "was it made for another source model?")
        base = source_linears[name]
        base = getattr(base, "base", base)  # a LoRALinear wraps the nn.Linear
        if A.shape != (r, base.in_features) or B.shape != (base.out_features, r):
            raise ValueError(f"the cartridge's {name} has A {tuple(A.shape)}, B {tuple(B.shape)}; the source model "
                             f"needs A {(r, base.in_features)}, B {(base.out_features, r)}")
        layer, role = layer_and_role(name)
        if role not in target_roles:
            raise ValueError(f"the cartridge adapts '{role}', which the target model lacks; "
                             f"the target's module roles are {target_roles}")
        kernels.append(Kernel(name, target_sites[(mapping[layer], role)], A.float(), B.float(), scale))
    return kernels


# ----------------------------------------------------------------------------- 2. heads and hooks

class Head(nn.Module):
    """P_in and P_out around one frozen kernel (A_S, B_S, s)."""

    def __init__(self, kernel: Kernel, d_in_T: int, d_out_T: int):
        super().__init__()
        d_in_S, d_out_S = kernel.A_S.shape[1], kernel.B_S.shape[0]
        self.source_name, self.target_name, self.scale = kernel.source_name, kernel.target_name, kernel.scale
        self.P_in = nn.Linear(d_in_T, d_in_S, bias=False)  # weight (d_in_S, d_in_T)
        self.P_out = nn.Linear(d_out_S, d_out_T, bias=False)  # weight (d_out_T, d_out_S)
        self.register_buffer("A_S", kernel.A_S.clone())  # (r, d_in_S), frozen: buffers get no gradient
        self.register_buffer("B_S", kernel.B_S.clone())  # (d_out_S, r)
        self.x_T = None  # the target module input of the last forward, kept for the MSE when capturing

    def target_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # A_T = A_S P_in,  B_T = P_out B_S
        A_T = self.A_S @ self.P_in.weight  # (r, d_in_S) @ (d_in_S, d_in_T) -> (r, d_in_T)
        B_T = self.P_out.weight @ self.B_S  # (d_out_T, d_out_S) @ (d_out_S, r) -> (d_out_T, r)
        return A_T, B_T

    def map_in(self, x_T: torch.Tensor) -> torch.Tensor:
        """P_in x_T: (..., d_in_T) -> (..., d_in_S), what the MSE compares with the source's x_S."""
        return self.P_in(x_T)

    def forward(self, x_T: torch.Tensor) -> torch.Tensor:  # x_T: (B, T, d_in_T)
        # delta_T = P_out( s * B_S A_S (P_in x_T) ) = s * B_T (A_T x_T): the same numbers, rank-r cost per token
        A_T, B_T = self.target_factors()
        return self.scale * (x_T @ A_T.T) @ B_T.T  # (B,T,d_in_T) -> (B,T,r) -> (B,T,d_out_T)


def make_heads(kernels: list[Kernel], target: nn.Module) -> nn.ModuleList:
    """One Head per kernel, sized by its target module; P_in and P_out start as nn.Linear's random init."""
    modules = [target.get_submodule(k.target_name) for k in kernels]
    return nn.ModuleList(Head(k, m.in_features, m.out_features) for k, m in zip(kernels, modules))


@contextlib.contextmanager
def attached(target: nn.Module, heads: nn.ModuleList, capture: bool = False):
    """Forward hooks that add each head's delta_T to its target module's output; removed on exit (the target
    is then exactly as it was). With capture, each head keeps its input x_T."""
    def hook_for(head):
        def hook(module, args, output):
            x_T = args[0]
            if capture:
                head.x_T = x_T
            return output + head(x_T.to(head.A_S.dtype)).to(output.dtype)
        return hook
    handles = [target.get_submodule(h.target_name).register_forward_hook(hook_for(h)) for h in heads]
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        for head in heads:
            head.x_T = None


@contextlib.contextmanager
def captured(model: nn.Module, names: list[str]):
    """Record each named module's input and output on every forward: {name: (x (B, T, d_in), y (B, T, d_out))}."""
    store = {}
    def hook_for(name):
        def hook(module, args, output):
            store[name] = (args[0], output)
        return hook
    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- 3. alignment across tokenizers
# The source and the target cut the same text into different tokens. CAST compares them only where both have
# read exactly the same characters: positions whose tokens end at the same character offset. Their next-token
# distributions are compared over the tokens both vocabularies spell the same way, end of text paired by role.

def offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character (start, end) of every token; needs a fast (Rust) tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} gives no offset mappings; CAST aligns tokens by character "
                         "offsets and needs a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))")
    return tokenizer(text, return_offsets_mapping=True)["offset_mapping"]


def aligned_positions(offsets_S, offsets_T) -> tuple[list[int], list[int]]:
    """Positions (i in source, j in target) whose tokens end at the same character: both models
    have read exactly the same text there. Special tokens (empty spans) never align."""
    def last_index_per_end(offs):
        ends = {}
        for i, (start, end) in enumerate(offs):
            if end > start:
                ends[end] = i  # pieces of one character share its end; the last piece has read all of it
        return ends
    ends_S, ends_T = last_index_per_end(offsets_S), last_index_per_end(offsets_T)
    common = sorted(set(ends_S) & set(ends_T))
    return [ends_S[e] for e in common], [ends_T[e] for e in common]


SPECIAL_ROLES = ("eos_token",)  # special tokens with a clear counterpart: end of text ends an answer in both models


def first_token(tok) -> tuple[list[int], str]:
    """The id list and text of the token 'a' encodes to: the fixed token other tokens are decoded behind."""
    prefix = tok("a", add_special_tokens=False)["input_ids"][:1]
    return prefix, tok.decode(prefix, clean_up_tokenization_spaces=False)


def token_texts(tok) -> list[str]:
    """The text each token id writes after another token: ' the' for byte-level 'Ġthe' and for SentencePiece
    '▁the', 'the' for a piece inside a word. Decoding a token alone is not enough: SentencePiece decoders of
    the Llama-2 / Mistral kind strip a leading space, so '▁the' alone decodes to 'the', the text of a
    mid-word piece. Decoded behind a fixed first token (the one 'a' encodes to), the space stays."""
    prefix, prefix_text = first_token(tok)
    texts = tok.batch_decode([prefix + [i] for i in range(len(tok))], clean_up_tokenization_spaces=False)
    return [t[len(prefix_text):] if t.startswith(prefix_text) else "" for t in texts]


def shared_vocab(tokenizer_S, tokenizer_T) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (V,) in each vocabulary of the token strings both share, compared as the text each token writes
    (token_texts), so that 'Ġ' and '▁' space markers agree and a word's start never pairs with its middle.
    Special tokens are paired by role (end of text <-> end of text), never by string; other special tokens
    are left out."""
    def table(tok):
        special = set(tok.all_special_ids)
        prefix, prefix_text = first_token(tok)
        ids = {}
        for i, s in enumerate(token_texts(tok)):
            if i not in special and s and "\ufffd" not in s:
                ids.setdefault(s, []).append(i)
        kept = {}
        for s, i in ids.items():
            if len(i) > 1:  # Gemma's byte-fallback <0x0A> and its '\n' token, likewise ' ' and the digits:
                alone = tok(s, add_special_tokens=False)["input_ids"]  # keep the id the tokenizer writes, alone or
                behind = tok(prefix_text + s, add_special_tokens=False)["input_ids"]  # behind 'a' (a SentencePiece
                behind = behind[len(prefix):] if behind[:len(prefix)] == prefix else []  # tokenizer adds a space)
                i = next(([w[0]] for w in (alone, behind) if len(w) == 1 and w[0] in i), [])
            if len(i) == 1:
                kept[s] = i[0]
        return kept
    table_S, table_T = table(tokenizer_S), table(tokenizer_T)
    common = sorted(set(table_S) & set(table_T), key=table_S.get)
    ids_S, ids_T = [table_S[s] for s in common], [table_T[s] for s in common]
    for role in SPECIAL_ROLES:
        i_S, i_T = getattr(tokenizer_S, role + "_id", None), getattr(tokenizer_T, role + "_id", None)
        if i_S is not None and i_T is not None:
            ids_S.append(i_S)
            ids_T.append(i_T)
    return torch.tensor(ids_S), torch.tensor(ids_T)


# ----------------------------------------------------------------------------- 4. the teacher cache

@dataclass
class TeacherCache:
    """What train.build_cache keeps of the teacher (source + cartridge) for the loss and the ridge start. Chunks
    0 .. n_train - 1 are trained on; the chunks after them are held-out task prompts, only measured (task_kl).
    Per chunk c: T_c target tokens, N_c aligned positions, m_c of them with x_S kept. d_S: the source's hidden
    size; d_in_S, d_out_S: a kernel's source module's input and output widths; V: the shared vocabulary.

    ids_T      chunk -> the target's token ids (T_c,)
    pos_T      chunk -> the target positions of its aligned tokens (N_c,)
    h_teacher  chunk -> the teacher's final hidden states at those positions (N_c, d_S), fp32: each step
               recomputes the teacher's exact logits over V from them (teacher_logits_at)
    head_S     the source LM head's rows of the shared vocabulary (V, d_S); softcap_S its logit soft-cap or None
    x_rows     training chunk -> which of its aligned positions keep x_S (m_c,), indices into pos_T[c]
    x_start    (n_train + 1,): chunk c's rows of x_S are x_S[name][x_start[c] : x_start[c + 1]]
    x_S        a kernel's source module name -> that module's input in the teacher (m_1 + ... + m_n_train, d_in_S),
               fp16
    var_S      the same name -> Var(x_S), over all its cached entries
    ridge_x_S, ridge_y_S   the same name -> the bare source's input (N, d_in_S) and output (N, d_out_S) at the aligned
               positions of the first ridge_chunks chunks, one tensor per chunk (the ridge start; then dropped)
    """
    ids_T: list
    pos_T: list
    h_teacher: list
    head_S: torch.Tensor
    softcap_S: float | None
    x_rows: list
    x_start: torch.Tensor
    x_S: dict
    var_S: dict
    ridge_x_S: dict
    ridge_y_S: dict
    n_train: int
    ridge_chunks: int
    n_aligned: int  # aligned positions of the training chunks
    n_tokens_S: int  # source tokens of the training chunks
    n_tokens_T: int  # target tokens of the training chunks
    size_mb: float = 0.0  # what the steps read: hidden states, x_S, head rows
    chunks: list = field(default_factory=list)  # the training text (train.prepare)
    provenance: dict = field(default_factory=dict)  # what the run's numbers depend on (train.prepare)

    def aligned(self, chunk_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch row, target position) of every aligned position of a batch of chunks: (N,), (N,)."""
        rows = torch.cat([torch.full_like(self.pos_T[c], b) for b, c in enumerate(chunk_ids)])
        return rows, torch.cat([self.pos_T[c] for c in chunk_ids])

    def with_x_S(self, chunk_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch row, target position, x_S row) of every position of a batch whose x_S is cached: (M,) each."""
        rows = torch.cat([torch.full_like(self.x_rows[c], b) for b, c in enumerate(chunk_ids)])
        positions = torch.cat([self.pos_T[c][self.x_rows[c]] for c in chunk_ids])
        cached = torch.cat([torch.arange(self.x_start[c], self.x_start[c + 1]) for c in chunk_ids])
        return rows, positions, cached

    def to(self, device) -> "TeacherCache":
        """Move what each step reads to the training device, once, after the ridge start (whose pairs stay on the
        CPU and are dropped): the teacher's hidden states, x_S and the source's LM head rows. Copied from CPU
        memory at every step they cost a GPU step about 0.3 GB of head rows and, with 4 chunks, 0.25 GB of x_S
        at 7B sizes (results/step_feed/). The index lists stay on the CPU. On the CPU nothing moves."""
        self.h_teacher = [h.to(device) for h in self.h_teacher]
        self.x_S = {n: x.to(device) for n, x in self.x_S.items()}
        self.head_S = self.head_S.to(device)
        return self


# ----------------------------------------------------------------------------- 5. the loss
# logits over the shared vocabulary

def shared_logits(model: nn.Module, hidden: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) over the shared vocabulary from final hidden states (N, d): the LM head sliced to V rows."""
    weight = model.get_output_embeddings().weight[vocab_ids]  # (V, d)
    return lm_logits(hidden, weight, getattr(model.config, "final_logit_softcapping", None))


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap=None) -> torch.Tensor:
    """Final hidden states (N, d) times LM head rows (V, d), with the model's logit soft-capping if it has one."""
    logits = hidden.to(weight.dtype) @ weight.T  # (N, d) @ (d, V) -> (N, V)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


# the two terms, hand-written (no F.kl_div)

def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
            top_k: int = 0) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_heads) at temperature T, mean over positions; both (N, V) logits over the
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
    """mean_{n,k} (P_in x_T - x_S)_{nk}^2 / Var(x_S), both (M, d_in_S): the internal alignment of one kernel,
    scale-free across kernels and models (1 for a P_in x_T no better than the mean of x_S)."""
    if projected.numel() == 0:  # no cached x_S in this batch: 0, with a gradient graph
        return projected.sum().float() * 0.0
    return ((projected.float() - x_S.float()) ** 2).mean() / var_S


# one step's loss

@torch.no_grad()
def teacher_logits_at(cache: TeacherCache, chunk_ids: list[int], device) -> torch.Tensor:
    """The teacher's logits (N, V) over the shared vocabulary at the aligned positions of the chunks,
    recomputed from its cached final hidden states: one (N, d_S) @ (d_S, V) product."""
    h = torch.cat([cache.h_teacher[c] for c in chunk_ids]).to(device)  # (N, d_S)
    return lm_logits(h, cache.head_S.to(device), cache.softcap_S)  # (N, V)


def cast_loss(cfg, target, heads, cache: TeacherCache, vocab_T, chunk_ids: list[int], backward: bool = False) -> dict:
    """L (the equation at the top of this file) on a batch of chunks, with cfg's weights (train.Config).
    backward: L.backward() while the hooks are still attached. Returns the loss and its two terms."""
    device = next(target.parameters()).device
    ids, mask = pad_batch([cache.ids_T[c].tolist() for c in chunk_ids], 0, device)  # (B, T), right-padded
    # The teacher first (no grad): its temporaries are freed before the target's activations exist.
    z_teacher = teacher_logits_at(cache, chunk_ids, vocab_T.device) if cfg.kl_weight > 0 else None  # (N, V)
    with attached(target, heads, capture=cfg.mse_weight > 0):
        hidden = target.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, d_T)
        kl = mse = hidden.new_zeros((), dtype=torch.float32)  # a term that is switched off stays 0
        if cfg.kl_weight > 0:
            # KL = T^2 KL(p_teacher || p_heads), mean over the aligned positions
            rows, positions = cache.aligned(chunk_ids)  # (N,), (N,)
            h_heads = hidden[rows, positions]  # (N, d_T): the target with heads at the aligned positions
            if cfg.top_k:  # the paper's top-k + rest form, through autograd
                kl = kl_loss(z_teacher, shared_logits(target, h_heads, vocab_T), cfg.temperature, cfg.top_k)
            else:  # exact: kl_loss's value and gradient, a block of aligned rows at a time
                kl = shared_kl(target, h_heads, vocab_T, z_teacher, cfg.temperature)
        if cfg.mse_weight > 0:
            # MSE = (1 / |kernels|) sum_kernels mean_{n,k} (P_in x_T - x_S)_{nk}^2 / Var(x_S), at the positions whose
            # x_S is cached. x_T, the target module's input, comes out of the target with the upstream heads
            # attached, so the MSE's gradient reaches the upstream P_in and P_out too; --mse-detach stops it at x_T
            rows, positions, cached = cache.with_x_S(chunk_ids)  # (M,) each: batch row, target position, x_S row
            def inputs_T(h):  # x_T (M, d_in_T) at those positions; detached, the MSE trains this P_in only
                x = h.x_T[rows, positions].float()
                return x.detach() if cfg.mse_detach else x
            mse = sum(mse_loss(h.map_in(inputs_T(h)), cache.x_S[h.source_name][cached].to(device),
                               cache.var_S[h.source_name]) for h in heads) / len(heads)
        loss = cfg.kl_weight * kl + cfg.mse_weight * mse
        if backward:
            loss.backward()
    return {"loss": loss, "kl": kl, "mse": mse}


@torch.no_grad()
def task_kl(cfg, target, heads, cache: TeacherCache, vocab_T) -> float:
    """Exact T^2 KL(teacher || target with heads) on the held-out task prompts (measured only, never trained on)."""
    monitor = list(range(cache.n_train, len(cache.ids_T)))
    exact = dataclasses.replace(cfg, kl_weight=1.0, mse_weight=0.0, top_k=0)
    total = n = 0
    for i in range(0, len(monitor), 8):
        group = monitor[i:i + 8]
        positions = sum(len(cache.pos_T[c]) for c in group)
        total += cast_loss(exact, target, heads, cache, vocab_T, group)["kl"].item() * positions
        n += positions
    return total / n if n else float("nan")


# ---------------------------------------------------------------------------- 6. ridge fit, heads files, export


def save_heads(heads: nn.ModuleList, path, metadata: dict):
    """Every head's parameters (P_in and P_out: "{i}.P_in.weight", ...), each kernel's identity in the file's
    metadata; written, then renamed."""
    tensors = {f"{i}.{name}": p.detach().float().contiguous().cpu()
               for i, h in enumerate(heads) for name, p in h.named_parameters()}
    kernels = [{"source": h.source_name, "target": h.target_name, "scale": h.scale, "rank": h.A_S.shape[0]}
               for h in heads]
    save_file(tensors, f"{path}.tmp", metadata={"kernels": json.dumps(kernels), **metadata})
    os.replace(f"{path}.tmp", path)


def load_heads(heads: nn.ModuleList, path):
    """Load the parameters saved by save_heads into heads built for the same kernels (checked by name)."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        saved = [(k["source"], k["target"]) for k in json.loads(f.metadata()["kernels"])]
    if saved != [(h.source_name, h.target_name) for h in heads]:
        raise ValueError(f"{path} holds heads for other kernels than this cartridge and target pair")
    for i, h in enumerate(heads):
        for name, p in h.named_parameters():
            p.data.copy_(tensors[f"{i}.{name}"])


def ridge_fit(X: torch.Tensor, Y: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """W (d_Y, d_X) minimising |X W^T - Y|^2 + lam |W|^2 with lam = ridge * mean eigenvalue of X^T X / N."""
    X, Y = X.double(), Y.double()  # (N, d_X), (N, d_Y)
    gram = X.T @ X / len(X)  # (d_X, N) @ (N, d_X) -> (d_X, d_X)
    lam = ridge * gram.diagonal().mean()
    # W^T = (X^T X / N + lam I)^-1 X^T Y / N
    W_T = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=X.dtype), X.T @ Y / len(X))  # (d_X, d_Y)
    return W_T.T.float()


def export_lora(heads: nn.ModuleList, out_dir, base_model_name_or_path: str = "", force: bool = False):
    """Write the translated cartridge as an ordinary LoRA for the target (PEFT layout). Kernels on one target
    module are concatenated along the rank, and zero-padded to r = r_S * (most kernels on a module), so one
    lora_alpha = s * r keeps every kernel's scale s (exact)."""
    by_module = {}
    for head in heads:
        A_T, B_T = head.target_factors()
        by_module.setdefault(head.target_name, []).append((A_T.detach(), B_T.detach()))
    scales = {head.scale for head in heads}
    if len(scales) != 1:
        raise ValueError(f"kernels with different scales {sorted(scales)} cannot share one LoRA file")
    r_S = heads[0].A_S.shape[0]
    r = r_S * max(len(pairs) for pairs in by_module.values())
    tensors = {}
    for name, pairs in by_module.items():
        A = torch.cat([a for a, _ in pairs])  # (n * r_S, d_in_T)
        B = torch.cat([b for _, b in pairs], dim=1)  # (d_out_T, n * r_S)
        A = torch.cat([A, A.new_zeros(r - len(A), A.shape[1])])  # (r, d_in_T)
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1)  # (d_out_T, r)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous().cpu()
    config = adapter_config(r, scales.pop() * r, sorted(by_module), False, base_model_name_or_path)
    return write_adapter(out_dir, config, tensors, force)
