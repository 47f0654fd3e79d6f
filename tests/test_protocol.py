"""The paper protocol: EOS separators as token ids, output_hidden_states numbering, the paper's
overlap measure, the authors' padded statistics, and a spec that is the CLI's only source."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from tiny import ARCHITECTURES, byte_tokenizer, tiny_model

from mlprune import MlpruneError
from mlprune.capture import ActivationStats, capture, prompt_ids
from mlprune.cli import PRUNE_FIELDS, build_parser, spec_from_args
from mlprune.corpus import ParallelCorpus
from mlprune.features import overlap
from mlprune.models import linear_modules
from mlprune.pipeline import PRESETS, PruneSpec, calibrate
from mlprune.prompts import translation_prompts

TEXTS = ["Hello there, friend.", "Bonjour tout le monde, ça va ?", "short"]


def test_eos_separators_are_token_ids_and_typed_eos_stays_text(corpus, tok):
    table = corpus.table.copy()
    table["fr"] = table["fr"] + " <eos> (typed)"  # a user typed the marker into every sentence
    ps = translation_prompts(ParallelCorpus(table, "typed"), "fr", "en", shots=3, samples=4,
                             seed=1, separator="eos")
    ids = prompt_ids(tok, ps)
    eos = tok.eos_token_id
    for lines, seq in zip(ps.segments, ids):
        assert len(lines) == 6  # 3 shots x (source, target)
        assert seq.count(eos) == len(lines)  # one inserted EOS per line, and no other
        assert seq[-1] == eos
        # between EOS ids, each line's text round-trips exactly, "<eos>" included as text
        pieces, current = [], []
        for t in seq[1:]:  # after BOS
            if t == eos:
                pieces.append(tok.decode(current))
                current = []
            else:
                current.append(t)
        assert pieces == lines
    assert any("<eos>" in line for lines in ps.segments for line in lines)
    # the texts shown to people carry the marker where the EOS ids go
    assert ps.texts[0] == "".join(f"{line}<eos>" for line in ps.segments[0])


def test_newline_prompts_are_unchanged_by_the_separator_option(corpus):
    a = translation_prompts(corpus, "fr", "en", shots=2, samples=3, seed=0)
    assert a.segments is None and all(t.count("\n") == 4 for t in a.texts)
    with pytest.raises(MlpruneError):
        translation_prompts(corpus, "fr", "en", separator="tab")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_paper_numbering_equals_output_hidden_states(arch, tok):
    model = tiny_model(arch)
    stats = capture(model, tok, TEXTS, batch_size=2)
    names, rows = stats.layer_view("hidden_states")
    expected = torch.zeros_like(rows)
    for text in TEXTS:
        with torch.no_grad():
            out = model(**tok([text], return_tensors="pt"), output_hidden_states=True)
        assert len(out.hidden_states) == rows.shape[0] == stats.n_layers + 1
        for i, h in enumerate(out.hidden_states):
            expected[i] += h[0].float().norm(dim=0)
    torch.testing.assert_close(rows, expected / len(TEXTS), rtol=1e-4, atol=1e-4)
    assert names[0] == "embed" and names[-1] == "final_norm"
    assert names[1] == "layers.0.resid_post"
    # the clean view is each layer's output, which output_hidden_states shows shifted by one
    # (and, for the last layer, before the final norm)
    torch.testing.assert_close(stats.layer_view("sites")[1][:-1], rows[1:-1])


def test_top_in_bottom_overlap_hand_worked():
    # 10 dims, one layer. top-20% = 2 dims; bottom-20% = 2 dims.
    a = ActivationStats(torch.tensor([[9., 8, 1, 2, 3, 4, 5, 6, 0.5, 7]]), {}, 1, 1)
    b = ActivationStats(torch.tensor([[0.1, 9, 8, 7, 6, 5, 4, 3, 0.2, 2]]), {}, 1, 1)
    row = overlap(a, b, 0.2).iloc[0]
    # top(a) = {0, 1}; top(b) = {1, 2}; bottom(b) = {0, 8}
    assert row.top_in_top == pytest.approx(1 / 2)
    assert row.jaccard == pytest.approx(1 / 3)
    assert row.top_in_bottom == pytest.approx(1 / 2)  # dim 0: a's largest, b's smallest
    assert overlap(a, a, 0.5).iloc[0].top_in_bottom == 0  # a set never overlaps itself so
    with pytest.raises(MlpruneError):
        overlap(a, b, 0.6)


def test_pad_to_statistics_equal_the_authors_formula(tok):
    """The authors' WrappedGPT: each prompt padded to N and run alone with no padding mask;
    scaler_row is the running mean over prompts of ||X_j||^2 over all N positions."""
    model = tiny_model("llama")
    n = 24
    stats = capture(model, tok, TEXTS, batch_size=2, pad_to=n)
    infos = linear_modules(model)
    scaler = {name: torch.zeros(info.in_features) for name, info in infos.items()}
    seen = {"n": 0}

    def hook(name):
        def fn(module, args):
            inp = args[0].reshape(-1, args[0].shape[-1]).t().float()
            k = seen["n"]
            scaler[name] *= k / (k + 1)
            scaler[name] += torch.norm(inp, p=2, dim=1) ** 2 / (k + 1)
        return fn

    handles = [info.module.register_forward_pre_hook(hook(name)) for name, info in infos.items()]
    try:
        for text in TEXTS:
            ids = tok([text], padding="max_length", max_length=n, truncation=True,
                      return_tensors="pt").input_ids
            with torch.no_grad():
                model.model(input_ids=ids)  # no attention mask, as prepare_calibration_input
            seen["n"] += 1
    finally:
        for h in handles:
            h.remove()
    assert stats.n_tokens == len(TEXTS) * n
    for name in infos:
        torch.testing.assert_close(stats.input_sqnorms[name] / stats.n_prompts, scaler[name],
                                   rtol=1e-4, atol=1e-5)
    # without padding the statistics differ (the padding is what pad_to adds)
    clean = capture(model, tok, TEXTS, batch_size=2)
    assert not torch.allclose(clean.input_sqnorms["layers.0.attn.q"],
                              stats.input_sqnorms["layers.0.attn.q"])
    with pytest.raises(MlpruneError):
        capture(model, tok, TEXTS, pad_to=10_000)


def test_paper_preset_calibrates_on_eos_separated_prompts(loaded, corpus):
    spec = PruneSpec.preset("paper", samples=3, mode="one-shot")
    assert spec.protocol == "paper" and spec.separator == "eos"
    calib = calibrate(loaded, corpus, spec)
    assert calib.prompts.segments is not None and calib.stats.meta["separator"] == "eos"
    clean = calibrate(loaded, corpus, PruneSpec(samples=3, mode="one-shot"))
    assert clean.prompts.segments is None
    assert not torch.equal(clean.stats.hidden_norms, calib.stats.hidden_norms)


def test_cli_flags_are_the_spec_fields_with_the_spec_defaults():
    parser = build_parser()
    assert set(PRUNE_FIELDS) == {f.name for f in fields(PruneSpec)}
    args = parser.parse_args(["prune", "--out", "x"])
    assert spec_from_args(args) == PruneSpec()
    for f in fields(PruneSpec):  # every flag says the spec's default in its help
        action = next(a for a in parser._subparsers._group_actions[0].choices["prune"]._actions
                      if a.dest == f.name)
        assert action.default is None and f"(default: {f.default})" in action.help
    args = parser.parse_args(["prune", "--out", "x", "--protocol", "paper"])
    assert spec_from_args(args) == PruneSpec.preset("paper")
    assert args.samples == PRESETS["paper"]["samples"]  # the namespace carries the spec's values
    args = parser.parse_args(["prune", "--out", "x", "--preset", "interactive", "--samples", "3"])
    assert spec_from_args(args) == PruneSpec.preset("interactive", samples=3)
    for command in ("analyze", "sweep", "eval"):
        args = parser.parse_args([command])
        spec = spec_from_args(args)
        assert (args.shots, args.samples, args.seed) == (spec.shots, spec.samples, spec.seed) \
            == (PruneSpec().shots, PruneSpec().samples, PruneSpec().seed)
    with pytest.raises(MlpruneError):
        spec_from_args(parser.parse_args(["prune", "--out", "x", "--protocol", "nope"]))


def test_protocol_and_padding_are_recorded_in_the_report(loaded, corpus, tmp_path):
    from dataclasses import asdict

    from mlprune.export import build_report
    from mlprune.pipeline import prune

    spec = PruneSpec.preset("paper", samples=2, pad_to=40, sparsity=0.3)
    result = prune(loaded, corpus, spec)
    report = build_report(loaded, result.masks, spec=asdict(spec))
    assert report["spec"]["protocol"] == "paper" and report["spec"]["pad_to"] == 40
    assert result.calibration.stats.meta["pad_to"] == 40


def test_byte_tokenizer_has_eos():  # the fixtures the tests above rely on
    assert byte_tokenizer().eos_token_id is not None
