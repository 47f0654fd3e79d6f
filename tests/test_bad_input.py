"""Bad input gets one clear sentence and computes nothing wrong: awkward text, oversized
input, models that do not fit, and property tests of the mask builders. (Bad corpora:
test_corpus_prompts.py; bad model folders and files: test_models.py; bad parameters on the
command line: test_evaluate_export.py; in the dashboard: test_dashboard.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import byte_tokenizer, save_tiny, tiny_model

from mlprune import MlpruneError
from mlprune.capture import capture, encode
from mlprune.evaluate import generate
from mlprune.models import load_model
from mlprune.prune import Pattern, Ranking, row_order

# ----------------------------------------------------------------------------- mask builders


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 6), m=st.sampled_from([2, 4, 8]),
       n_frac=st.floats(0.01, 0.99), sparsity=st.floats(0, 0.999), seed=st.integers(0, 2**16),
       n_protected=st.integers(0, 5))
def test_mask_builders_are_exact(rows, groups, m, n_frac, sparsity, seed, n_protected):
    n_in = groups * m
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(rows, n_in, generator=g)
    protected = torch.zeros(n_in, dtype=torch.bool)
    protected[torch.randperm(n_in, generator=g)[: min(n_protected, n_in)]] = True
    ranking = Ranking({"w": row_order(score, protected)}, {"w": protected})
    # unstructured: each row prunes exactly min(int(s * in), unprotected) of its lowest scores
    masks = ranking.masks(sparsity)
    keep = masks.keep("w")
    k = min(int(n_in * sparsity), n_in - int(protected.sum()))
    assert ((~keep).sum(dim=1) == k).all()
    assert keep[:, protected].all()
    if k:
        worst_pruned = score.masked_fill(keep, -1).max(dim=1).values
        best_kept = score.masked_fill(~keep | protected, 2).min(dim=1).values
        assert (worst_pruned <= best_kept).all()
    # N:M: exactly n pruned per group, the lowest unprotected first
    n = max(1, min(m - 1, round(n_frac * m)))
    keep = ranking.masks(0, Pattern(n, m)).keep("w").view(rows, groups, m)
    assert ((~keep).sum(dim=-1) == n).all()
    prot_groups = protected.view(groups, m).sum(dim=-1)
    for j in range(groups):
        if prot_groups[j] <= m - n:  # room for the pattern without touching protected columns
            assert keep[:, j][:, protected.view(groups, m)[j]].all()


# ----------------------------------------------------------------------------- awkward text

awkward = st.lists(st.sampled_from([
    "مرحبا بالعالم", "שלום עולם", "👋🌍 emoji ✨", "<eos><bos><pad>", "\x00\x07\x1b[31m", "\u202e reversed",
    "日本語のテキスト", "tab\tand\rreturn", " ", "\ufeffBOM",
]), min_size=1, max_size=4).map("".join)


@settings(max_examples=20, deadline=None)
@given(text=awkward)
def test_awkward_prompts_are_plain_text(text):
    model, tok = _tiny
    ids = encode(tok, [text])[0]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids[1:]
    assert tok.decode(ids[1:]) == text  # nothing interpreted, nothing lost
    stats = capture(model, tok, [text, "plain"])
    assert torch.isfinite(stats.hidden_norms).all()
    assert len(generate(model, tok, [text], max_new_tokens=3)) == 1


_tiny = (tiny_model("llama"), byte_tokenizer())


def test_sentences_longer_than_the_context_are_truncated():
    model, tok = tiny_model("gpt2"), byte_tokenizer()  # n_positions = 512
    stats = capture(model, tok, ["x" * 2000, "short"])
    assert stats.n_tokens == 512 + len(encode(tok, ["short"])[0])


# ----------------------------------------------------------------------------- models


def test_a_model_too_large_is_refused_before_loading(tmp_path, monkeypatch):
    import mlprune.models as models

    folder = save_tiny(tmp_path / "m")
    monkeypatch.setattr(models, "available_memory", lambda: 1000)
    monkeypatch.setattr(models, "_from_pretrained", lambda *a, **k: pytest.fail("tried to load"))
    with pytest.raises(MlpruneError, match="GiB of memory is available"):
        load_model(str(folder))
