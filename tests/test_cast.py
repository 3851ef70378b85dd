"""cast.py: mechanism, export, alignment across tokenizers, the losses, ridge init, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from cast import (BlockedKL, aligned_positions, attached, captured, export_lora, find_kernels, kl_loss, layer_map,
                  make_heads, mse_loss, offsets, ridge_fit, shared_kl, shared_logits, shared_vocab)
from conftest import TEXTS, tiny_gemma, tiny_llama, tiny_tokenizer
from lora import add_lora, load_lora, lora_layers, read_adapter, save_lora

ROLES = ["q_proj", "v_proj", "o_proj", "down_proj"]


def cartridge(tmp_path, source, roles=ROLES, r=4, seed=0):
    """A random (non-zero) cartridge for `source`, saved and read back as (config, factors)."""
    add_lora(source, roles, r=r, alpha=2 * r)
    torch.manual_seed(seed)
    for layer in lora_layers(source).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    save_lora(source, tmp_path / "cart", force=True)
    return read_adapter(tmp_path / "cart")


def set_identity(heads):
    for head in heads:
        torch.nn.init.eye_(head.P_in.weight)
        torch.nn.init.eye_(head.P_out.weight)


def test_layer_map_examples():
    assert layer_map(30, 18) == [round(i * 17 / 29 + 1e-9) for i in range(30)]
    assert layer_map(3, 2) == [0, 1, 1]  # 0.5 rounds up
    assert layer_map(2, 3) == [0, 2]
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(1, 5) == [0]


def test_identity_pair_reproduces_source_with_cartridge(tmp_path, ids):
    source = tiny_llama(layers=2)
    config, factors = cartridge(tmp_path, source)
    teacher = source(ids).logits
    target = tiny_llama(layers=2)  # the same weights, without the cartridge
    heads = make_heads(find_kernels(config, factors, source, target), target)
    set_identity(heads)
    before = target(ids).logits
    with attached(target, heads):
        student = target(ids).logits
    assert torch.allclose(student, teacher, atol=1e-5)
    assert not torch.allclose(before, teacher, atol=1e-3)  # the cartridge does change the outputs
    assert torch.equal(target(ids).logits, before)  # detached: exactly the original model


def test_ridge_fit_recovers_identity_and_a_linear_map(tmp_path):
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (8, 64))
    with torch.no_grad(), captured(model, ["model.layers.1.self_attn.q_proj"]) as store:
        model(ids)
    x = store["model.layers.1.self_attn.q_proj"][0].flatten(0, 1)  # (B*T, 64)
    W = ridge_fit(x, x, ridge=1e-6)
    assert (W - torch.eye(64)).abs().max() < 1e-3
    y = x @ torch.randn(64, 32)
    assert (ridge_fit(x, y, ridge=1e-6) @ x.T - y.T).abs().max() < 1e-2 * y.abs().max()  # recovers a linear map


@pytest.mark.parametrize("n_source, n_target", [(3, 2), (2, 3)])
def test_hooks_equal_exported_lora(tmp_path, n_source, n_target):
    source, target = tiny_llama(layers=n_source, width=64), tiny_gemma(layers=n_target, width=48)
    config, factors = cartridge(tmp_path, source)
    heads = make_heads(find_kernels(config, factors, source, target), target)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ids = torch.randint(0, 160, (2, 12))
    with torch.no_grad():
        base = target(ids).logits
        with attached(target, heads):
            hooked = target(ids).logits
        export_lora(heads, tmp_path / "exported")
        load_lora(target, tmp_path / "exported")
        exported = target(ids).logits
    assert not torch.allclose(hooked, base, atol=1e-3)
    assert torch.allclose(hooked, exported, atol=1e-5)


def test_only_heads_change_after_an_optimizer_step(tmp_path, ids):
    source, target = tiny_llama(layers=3), tiny_gemma(layers=2)
    config, factors = cartridge(tmp_path, source)
    heads = make_heads(find_kernels(config, factors, source, target), target)
    frozen = {n: p.detach().clone() for n, p in target.named_parameters()}
    kernels = {n: b.clone() for n, b in heads.named_buffers()}
    head_params = {n: p.detach().clone() for n, p in heads.named_parameters()}
    target.requires_grad_(False)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-2)
    with attached(target, heads, capture=True):
        logits = target(ids).logits
        mse = sum(mse_loss(h.P_in(h.x_T), torch.randn(*h.x_T.shape[:2], h.P_in.out_features), 1.0) for h in heads)
    (logits.pow(2).mean() + mse).backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in target.named_parameters())
    assert all(torch.equal(b, kernels[n]) for n, b in heads.named_buffers())
    assert all(not torch.equal(p, head_params[n]) for n, p in heads.named_parameters())


def test_kl_matches_torch_reference():
    torch.manual_seed(0)
    teacher_logits, student_logits, T = torch.randn(6, 30) * 3, torch.randn(6, 30) * 3, 2.0
    ours = kl_loss(teacher_logits, student_logits, T)  # exact over all 30 tokens
    teacher_logp, student_logp = torch.log_softmax(teacher_logits / T, -1), torch.log_softmax(student_logits / T, -1)
    reference = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean") * T ** 2
    assert torch.allclose(ours, reference, atol=1e-5)
    # top-k teacher: the KL between the (k + 1)-bucket distributions
    ours_k = kl_loss(teacher_logits, student_logits, T, top_k=5)
    top_ids = teacher_logp.topk(5, dim=-1).indices
    def buckets(logp):
        top = logp.gather(1, top_ids)
        return torch.cat([top, torch.log1p(-top.exp().sum(-1, keepdim=True))], -1)
    reference_k = F.kl_div(buckets(student_logp), buckets(teacher_logp), log_target=True,
                           reduction="batchmean") * T ** 2
    assert torch.allclose(ours_k, reference_k, atol=1e-5)
    assert 0 < ours_k < ours  # the buckets hide part of the difference
    assert torch.allclose(kl_loss(teacher_logits, student_logits, T, top_k=30), ours)  # k = V is exact


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_blocked_kl_has_kl_loss_value_and_gradient(softcap):
    """The KL a training step uses (blocks of rows, its gradient written by hand) against kl_loss through autograd."""
    torch.manual_seed(0)
    model = tiny_llama()
    model.config.final_logit_softcapping = softcap
    vocab, teacher_logits = torch.tensor([3, 17, 99, 4, 50, 7]), torch.randn(37, 6) * 3
    hidden = torch.randn(37, 64, requires_grad=True)
    reference = kl_loss(teacher_logits, shared_logits(model, hidden, vocab), 2.0)
    reference_grad, = torch.autograd.grad(reference, hidden)
    blocked = BlockedKL.apply(hidden, model.lm_head.weight[vocab], teacher_logits, 2.0, softcap, 8)  # 5 blocks
    blocked_grad, = torch.autograd.grad(3.0 * blocked, hidden)  # an upstream factor reaches the gradient
    assert torch.allclose(blocked, reference, atol=1e-5) and reference > 0
    assert torch.allclose(blocked_grad, 3.0 * reference_grad, atol=1e-6)
    assert torch.allclose(shared_kl(model, hidden, vocab, teacher_logits, 2.0), reference, atol=1e-5)


def test_kl_is_zero_when_teacher_equals_student():
    logits = torch.randn(4, 20)
    assert kl_loss(logits, logits + 3.0, 1.5).abs() < 1e-6  # a constant shift is the same distribution
    assert kl_loss(logits, logits, 1.5, top_k=3).abs() < 1e-6


def test_mse_matches_torch_reference():
    a, b = torch.randn(10, 7), torch.randn(10, 7) * 2
    assert torch.allclose(mse_loss(a, b, b.var().item()), F.mse_loss(a, b) / b.var(), atol=1e-6)


def test_shared_logits_slice_the_lm_head():
    model = tiny_llama()
    hidden = torch.randn(5, 64)
    vocab = torch.tensor([3, 17, 99])
    assert torch.allclose(shared_logits(model, hidden, vocab), model.lm_head(hidden)[:, vocab], atol=1e-6)


def test_alignment_pairs_are_the_equal_end_offsets():
    tok_S, tok_T = tiny_tokenizer(300), tiny_tokenizer(600)
    text = "Return the number of apples, or raise an error; Ada buys 19 stickers."
    off_S, off_T = offsets(tok_S, text), offsets(tok_T, text)
    assert len(off_S) != len(off_T)  # the two tokenizers split the text differently
    idx_S, idx_T = aligned_positions(off_S, off_T)
    ends_S, ends_T = [e for _, e in off_S], [e for _, e in off_T]
    assert [ends_S[i] for i in idx_S] == [ends_T[j] for j in idx_T]
    assert set(ends_S[i] for i in idx_S) == set(ends_S) & set(ends_T)
    assert 0 < len(idx_S) < len(off_S)
    same_S, same_T = aligned_positions(off_S, off_S)
    assert same_S == same_T == list(range(len(off_S)))  # identical tokenizers: every position


def test_shared_vocab_round_trips_strings():
    tok_S, tok_T = tiny_tokenizer(300), tiny_tokenizer(600)
    ids_S, ids_T = shared_vocab(tok_S, tok_T)
    *ids_S, eos_S = ids_S.tolist()
    *ids_T, eos_T = ids_T.tolist()
    assert [tok_S.decode([i]) for i in ids_S] == [tok_T.decode([j]) for j in ids_T]
    # every whole-character token of the smaller vocabulary is also in the larger one (same training text)
    whole = [i for i in range(1, len(tok_S)) if "\ufffd" not in tok_S.decode([i])]  # lone UTF-8 bytes decode to U+FFFD
    assert ids_S == whole
    full_S, full_T = shared_vocab(tok_S, tok_S)
    assert torch.equal(full_S, full_T) and full_S.tolist() == whole + [0]  # identical tokenizers: the whole vocabulary


def test_end_of_text_is_shared_by_role_not_by_string():
    """The student must learn where an answer ends: end of text pairs with end of text, whatever its name."""
    tok_S, tok_T = tiny_tokenizer(300, eos="<|im_end|>"), tiny_tokenizer(400, eos="<eos>")
    ids_S, ids_T = shared_vocab(tok_S, tok_T)
    assert (tok_S.eos_token_id, tok_T.eos_token_id) in list(zip(ids_S.tolist(), ids_T.tolist()))
    assert ids_S.tolist().count(tok_S.eos_token_id) == 1 and ids_T.tolist().count(tok_T.eos_token_id) == 1


def byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer like Gemma's: byte tokens <0x..> decode to the same text as the ordinary
    tokens '\n', ' ' and '7', which are what it writes."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    pieces = ["<unk>", "<eos>", "<0x0A>", "<0x20>", "<0x37>", "\n", " ", "7", "#", "##", "####", "a"]
    merges = [("#", "#"), ("##", "##")]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_shared_vocab_keeps_the_id_a_tokenizer_writes():
    """Gemma's byte-fallback tokens decode like its digits, space and newline: those strings must stay shared,
    paired with the ids the tokenizer writes (dropping them as ambiguous hid 81% of the answer tokens)."""
    tok_T, tok_S = byte_fallback_tokenizer(), tiny_tokenizer(300, texts=["a 7 a\n####7"])
    assert tok_T.decode([2]) == tok_T.decode([5]) == "\n" and tok_T("\n 7")["input_ids"] == [5, 6, 7]
    ids_S, ids_T = shared_vocab(tok_S, tok_T)
    pairs = {tok_T.decode([j]): j for j in ids_T.tolist()}
    assert pairs["\n"] == 5 and pairs[" "] == 6 and pairs["7"] == 7 and pairs["####"] == 10
    assert not {2, 3, 4} & set(ids_T.tolist())  # no byte token is paired


def test_tokenizer_without_offsets_is_a_clear_error():
    class SlowTokenizer:
        is_fast = False
    with pytest.raises(ValueError, match="fast tokenizer"):
        offsets(SlowTokenizer(), "some text")


def test_cartridge_module_missing_in_target_is_named(tmp_path):
    source = tiny_llama(layers=2)
    config, factors = cartridge(tmp_path, source, roles=["q_proj"])
    target = tiny_gemma(layers=2)
    renamed = {n.replace("q_proj", "qkv_proj"): f for n, f in factors.items()}
    source.get_submodule("model.layers.0.self_attn").qkv_proj = torch.nn.Linear(64, 64, bias=False)
    source.get_submodule("model.layers.1.self_attn").qkv_proj = torch.nn.Linear(64, 64, bias=False)
    with pytest.raises(ValueError, match=r"'qkv_proj'.*target's module roles are \[.*'q_proj'"):
        find_kernels(config, renamed, source, target)


def test_cartridge_for_another_source_is_a_clear_error(tmp_path):
    config, factors = cartridge(tmp_path, tiny_llama(layers=2, width=64))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj has A \(4, 128\).*needs A \(4, 64\)"):
        find_kernels(config, factors, tiny_llama(layers=2, width=32), tiny_gemma())
    with pytest.raises(ValueError, match=r"model\.layers\.0\..*source model lacks"):
        find_kernels(config, {"model.layers.0.foo.q_proj": factors["model.layers.0.self_attn.q_proj"]},
                     tiny_llama(layers=2), tiny_gemma())


def test_texts_fixture_is_tokenised_by_both():
    tok = tiny_tokenizer(300)
    assert all(len(offsets(tok, t)) > 3 for t in TEXTS)


def test_heads_file_round_trip_and_mismatch(tmp_path):
    from cast import load_heads, save_heads
    source, target = tiny_llama(layers=3), tiny_gemma(layers=2)
    config, factors = cartridge(tmp_path, source)
    heads = make_heads(find_kernels(config, factors, source, target), target)
    save_heads(heads, tmp_path / "heads.safetensors", {"source": "tiny"})
    fresh = make_heads(find_kernels(config, factors, source, target), target)
    load_heads(fresh, tmp_path / "heads.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(heads.parameters(), fresh.parameters()))
    other = make_heads(find_kernels(config, factors, source, tiny_gemma(layers=3)), tiny_gemma(layers=3))
    with pytest.raises(ValueError, match="other kernels"):
        load_heads(other, tmp_path / "heads.safetensors")


def word_tokenizer(style: str):
    """A tiny fast tokenizer of one of three kinds, over the words 'the', 'cat', 'a', each at a word's start
    and inside a word: 'metaspace' (Llama-2 / Mistral: '▁the', a decoder that strips the leading space),
    'byte' (GPT-2 / SmolLM2: 'Ġthe') or 'gemma' ('▁the', spaces kept)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    mark = "Ġ" if style == "byte" else "▁"
    words = ["the", "cat", "a"]
    vocab = {"<unk>": 0, "<eos>": 1, **{w: 2 + i for i, w in enumerate(words)},
             **{mark + w: 5 + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##"))
    if style == "byte":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.mark.parametrize("style_S, style_T", [("metaspace", "byte"), ("byte", "metaspace"), ("gemma", "byte"),
                                              ("metaspace", "gemma")])
def test_shared_vocab_pairs_a_words_start_with_a_words_start(style_S, style_T):
    """A SentencePiece decoder that strips the leading space decodes '▁the' alone as 'the': paired by that
    string it lands on the other tokenizer's mid-word 'the'. Pairs must be start-start and middle-middle."""
    tok_S, tok_T = word_tokenizer(style_S), word_tokenizer(style_T)
    ids_S, ids_T = shared_vocab(tok_S, tok_T)
    pairs = {tok_S.convert_ids_to_tokens(i): tok_T.convert_ids_to_tokens(j) for i, j in zip(ids_S.tolist(), ids_T.tolist())}
    mark_S, mark_T = ("Ġ" if style == "byte" else "▁" for style in (style_S, style_T))
    words = ["the", "cat", "a"]
    assert pairs == {**{w: w for w in words}, **{mark_S + w: mark_T + w for w in words}, "<eos>": "<eos>"}
