"""The shared-prefix scoring path (one prefix pass per item, its KV cache reused by every
choice) against the plain path (every choice's whole sequence) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, byte_tokenizer, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from mlprune.capture import base_model
from mlprune.kernels import WeightMajorHead
from mlprune.zeroshot import TaskItem, score_items
from mlprune.zeroshot import scoring as sc

ITEMS = [
    # continuation: choices sharing their first tokens (' ', ' p'), of different lengths
    TaskItem("1", "en", "The film was great. It is", (" positive", " negative", " pretty good"), 0),
    TaskItem("2", "en", "Paris is in ", ("France", "Spain", "the moon"), 0),  # trailing space
    TaskItem("3", "en", "A much longer prompt, so that rows are padded to different widths:",
             (" yes", " no"), 1),
    TaskItem("4", "en", "x", ("a", "ab", "abc"), 2),  # choices that begin one another
    TaskItem("5", "en", "Answer:", ("A", "B", "C"), 1),  # single-token choices: prefix only
    TaskItem("6", "en", "Q:", (" abx", " aby"), 0),  # identical inputs, different targets
    TaskItem("7", "en", "Same", (" twice", " twice"), 0),
    # whole sequences: the prompt with its slot filled in, scored from BOS
    TaskItem("8", "en", "Le chat dort , right? {choice} , The cat sleeps", ("Yes", "Also", "No"), 0),
    TaskItem("9", "en", "", ("My grandmother keeps her letters in a wooden box.",
                             "My grandmother keeps her letters in a box wooden."), 0),
    TaskItem("10", "fr", "", ("Le chat dort.", "Dort le chat."), 0),  # nothing shared but BOS
    TaskItem("11", "de", "{choice} ist gut.", ("Das", "Dies"), 0),
]


def no_bos_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer without its BOS template, like BLOOM's and mGPT's: an empty
    context then starts from the BOS token that split_tokens adds."""
    tok = byte_tokenizer()
    tok.backend_tokenizer.post_processor = None
    return tok


class Calls:
    """The base model's forward calls: whether each got a cache, and its real new tokens."""

    def __init__(self, model):
        self.cached, self.tokens = [], 0
        self.handle = base_model(model).register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.cached.append(cache is not None and cache.get_seq_length() > 0)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        self.tokens += int(mask[:, -ids.shape[1]:].sum())


def assert_same(fast, plain, tol=1e-4):
    for f, p in zip(fast, plain, strict=True):
        assert f.item == p.item and f.n_tokens == p.n_tokens and f.n_bytes == p.n_bytes
        assert f.logprob == pytest.approx(p.logprob, abs=tol)
        for norm in ("token", "byte", "none"):
            assert f.predicted(norm) == p.predicted(norm)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_shared_prefix_equals_plain_path(arch, batch_size):
    model, tok = tiny_model(arch), byte_tokenizer()
    plain = score_items(model, tok, ITEMS, batch_size=batch_size, share_prefix=False)
    calls = Calls(model)
    try:
        fast = score_items(model, tok, ITEMS, batch_size=batch_size)
    finally:
        calls.handle.remove()
    assert any(calls.cached), "the shared path did not run"
    assert_same(fast, plain)


@pytest.mark.parametrize("arch", ["bloom", "gpt2"])
def test_tokenizer_without_bos(arch):
    model, tok = tiny_model(arch), no_bos_tokenizer()
    assert tok("ab")["input_ids"] == tok("ab", add_special_tokens=False)["input_ids"]
    assert_same(score_items(model, tok, ITEMS, batch_size=4),
                score_items(model, tok, ITEMS, batch_size=4, share_prefix=False))


def test_prefix_runs_once_and_head_sees_only_scored_positions(llama, tok):
    items = [it for it in ITEMS if len(it.choices) == 2]
    inputs = {it.id: [tuple(c + t)[:-1] for c, t in (sc.split_tokens(tok, *pair)
                                                   for pair in it.pairs())] for it in items}
    # two choices: a common prefix and two tails run every distinct input prefix once
    expected_tokens = sum(len({x[:p + 1] for x in xs for p in range(len(x))})
                          for xs in inputs.values())
    scored = set()
    for it in items:
        for context, text in it.pairs():
            ctx, cont = sc.split_tokens(tok, context, text)
            full = ctx + cont
            scored |= {(it.id, tuple(full[:p + 1])) for p in range(len(ctx) - 1, len(full) - 1)}
    positions = []
    hook = llama.lm_head.register_forward_hook(lambda m, a, o: positions.append(a[0].shape[1]))
    calls = Calls(llama)
    try:
        score_items(llama, tok, items, batch_size=8)
    finally:
        hook.remove()
        calls.handle.remove()
    assert calls.tokens == expected_tokens
    assert sum(positions) == len(scored)  # no prompt position but the last reaches the head


def test_logits_budget_bounds_the_head_in_both_forms(monkeypatch, llama, tok):
    reference = score_items(llama, tok, ITEMS, batch_size=4, share_prefix=False)
    # a hooked head is called as a module, on the full vocabulary: one position at a time
    sizes = []
    hook = llama.lm_head.register_forward_hook(lambda m, a, o: sizes.append(tuple(a[0].shape[:2])))
    try:
        tight = score_items(llama, tok, ITEMS, batch_size=4, max_logits_mb=0)
    finally:
        hook.remove()
    assert sizes and all(s == (1, 1) for s in sizes)
    assert_same(tight, reference)
    # a bare head is read in vocabulary blocks (here 64 rows: 259 = 4 x 64 + 3)
    monkeypatch.setattr(sc, "_VOCAB_BLOCK", 64)
    weight, linear, blocks = llama.lm_head.weight, torch.nn.functional.linear, []

    def watched(x, w, b=None):
        if w.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
            blocks.append((x.shape[0], w.shape[0]))
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", watched)
    assert_same(score_items(llama, tok, ITEMS, batch_size=4), reference)
    assert {w for _, w in blocks} == {64, 3} and max(n for n, _ in blocks) > 1
    blocks.clear()
    assert_same(score_items(llama, tok, ITEMS, batch_size=4, max_logits_mb=0), reference)
    assert blocks and all(n == 1 for n, _ in blocks)


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt2"])
def test_head_passes_over_several_batches(monkeypatch, arch, tok):
    model = tiny_model(arch)
    reference = score_items(model, tok, ITEMS, batch_size=2, share_prefix=False)
    monkeypatch.setattr(sc, "_HEAD_ROWS", 7)  # the head runs every batch or two, not once
    passes = []
    head = sc._head_logprobs
    monkeypatch.setattr(sc, "_head_logprobs", lambda *a: (passes.append(a[2].shape[0]), head(*a)))
    assert_same(score_items(model, tok, ITEMS, batch_size=2), reference)
    assert len(passes) > 2 and all(n >= 7 for n in passes[:-1])


def test_mlprunes_fast_head_is_read_in_blocks_too(llama, tok):
    reference = score_items(llama, tok, ITEMS, share_prefix=False)
    llama.lm_head.__class__ = WeightMajorHead  # what load_model makes of a large CPU head
    assert sc._plain_linear(llama.lm_head)
    assert_same(score_items(llama, tok, ITEMS), reference)
    hook = llama.lm_head.register_forward_pre_hook(lambda m, a: None)
    assert not sc._plain_linear(llama.lm_head)  # a hooked head is called, not read
    hook.remove()


def test_sliding_window_items_longer_than_it_take_the_plain_path(tok):
    cfg = tiny_config("gemma3_text")
    cfg.sliding_window = 16
    cfg.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert sc._sliding_window(model) == 16
    # items 3, 8 and 9 span more than 16 tokens; the others fit
    calls = Calls(model)
    try:
        fast = score_items(model, tok, ITEMS, batch_size=3)
    finally:
        calls.handle.remove()
    assert any(calls.cached) and not all(calls.cached)
    assert_same(fast, score_items(model, tok, ITEMS, batch_size=3, share_prefix=False))
    long_only = [ITEMS[2], ITEMS[8]]
    calls = Calls(model)
    try:
        score_items(model, tok, long_only)
    finally:
        calls.handle.remove()
    assert not any(calls.cached)


def test_unlisted_architectures_take_the_plain_path(monkeypatch, llama, tok):
    monkeypatch.setattr(sc, "_SHARED_TYPES", frozenset())
    calls = Calls(llama)
    seen = []
    try:
        scored = score_items(llama, tok, ITEMS, progress=lambda stage, f: seen.append(f))
    finally:
        calls.handle.remove()
    assert not any(calls.cached) and seen[-1] == pytest.approx(1.0)
    monkeypatch.undo()
    assert_same(scored, score_items(llama, tok, ITEMS))


def test_progress_reaches_one_on_the_shared_path(llama, tok):
    seen = []
    score_items(llama, tok, ITEMS, batch_size=2, progress=lambda stage, f: seen.append((stage, f)))
    assert seen[-1] == ("scoring", pytest.approx(1.0))
    assert [f for _, f in seen] == sorted(f for _, f in seen)
