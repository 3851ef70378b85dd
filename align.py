"""Alignment across tokenizers: which positions, and which tokens, two models share.

The source and the target cut the same text into different tokens. CAST compares them only where both have
read exactly the same characters: positions whose tokens end at the same character offset
(`aligned_positions`). Their next-token distributions are compared over the tokens both vocabularies
spell the same way (`shared_vocab`), with end of text paired by role. It imports nothing of this project.
"""
import torch


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
