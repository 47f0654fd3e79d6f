"""Issue 6: bad input, faults and safety. (Two-session isolation lives in test_dashboard.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import byte_tokenizer, save_tiny, tiny_model

from mlprune import MlpruneError
from mlprune.capture import capture, encode
from mlprune.evaluate import generate
from mlprune.models import linear_modules, load_model
from mlprune.pipeline import PruneSpec, cached_capture, calibrate
from mlprune.prompts import translation_prompts
from mlprune.prune import Pattern, Ranking, row_order, sequential_stats

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


# ----------------------------------------------------------------------------- faults


def test_interrupted_sequential_calibration_leaves_the_model_dense():
    model, tok = tiny_model("llama"), byte_tokenizer()
    texts = ["one text", "two texts here"]
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    stats = capture(model, tok, texts)

    def ctrl_c(done, total):
        if done == 1:  # after layer 0 was pruned
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sequential_stats(model, tok, texts, stats, method="wanda", sparsity=0.5, progress=ctrl_c)
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())
    assert getattr(model, "_mlprune_applied", None) is None


def test_calibration_is_saved_when_done_and_reused(loaded, corpus, monkeypatch):
    import mlprune.pipeline as pipeline
    from mlprune.models import cache_dir

    prompts = translation_prompts(corpus, "fr", "en", samples=3)
    first = cached_capture(loaded, prompts)
    assert list((cache_dir() / "stats").glob("mt_fr-en-*.safetensors"))
    monkeypatch.setattr(pipeline, "capture", lambda *a, **k: pytest.fail("captured twice"))
    again = calibrate(loaded, corpus, PruneSpec(pair="fr-en", samples=3))
    assert torch.equal(again.stats.hidden_norms, first.hidden_norms)


def test_a_damaged_cache_entry_is_recaptured(loaded, corpus):
    from mlprune.models import cache_dir

    prompts = translation_prompts(corpus, "fr", "en", samples=2)
    stats = cached_capture(loaded, prompts)
    for path in (cache_dir() / "stats").glob("*.safetensors"):
        path.write_bytes(b"garbage")
    assert torch.equal(cached_capture(loaded, prompts).hidden_norms, stats.hidden_norms)


# ----------------------------------------------------------------------------- models


def test_a_model_too_large_is_refused_before_loading(tmp_path, monkeypatch):
    import mlprune.models as models

    folder = save_tiny(tmp_path / "m")
    monkeypatch.setattr(models, "available_memory", lambda: 1000)
    monkeypatch.setattr(models, "_from_pretrained", lambda *a, **k: pytest.fail("tried to load"))
    with pytest.raises(MlpruneError, match="GiB of memory is available"):
        load_model(str(folder))


def test_remote_code_stays_off_unless_asked(tmp_path, monkeypatch):
    import transformers

    folder = save_tiny(tmp_path / "m")
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(folder))
    load_model(str(folder), trust_remote_code=True)
    assert seen == [False, True]


def test_only_safetensors_are_written(tmp_path, loaded, corpus):
    from mlprune.export import build_report, export_pruned
    from mlprune.pipeline import prune

    result = prune(loaded, corpus, PruneSpec(pair="fr-en", samples=2, mode="one-shot"))
    out = export_pruned(loaded, result.masks, tmp_path / "o", build_report(loaded, result.masks))
    suffixes = {p.suffix for p in out.iterdir()}
    assert ".bin" not in suffixes and ".pt" not in suffixes and ".pkl" not in suffixes


def test_streamlit_config_is_private():
    from pathlib import Path

    import tomllib

    config = tomllib.loads((Path(__file__).parents[1] / ".streamlit" / "config.toml").read_text())
    assert config["browser"]["gatherUsageStats"] is False
    assert config["server"]["address"] in ("localhost", "127.0.0.1")
    assert config["server"]["fileWatcherType"] == "none"


def test_linear_modules_cover_every_prunable_weight():
    model = tiny_model("bloom")
    names = {i.path for i in linear_modules(model).values()}
    expected = {n.rsplit(".", 1)[0] for n, p in model.named_parameters()
                if n.endswith("weight") and p.dim() == 2 and ".h." in n}
    assert names == expected
