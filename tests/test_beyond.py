"""The methods beyond the paper in the sweep, in `mlprune reproduce` (optional variants a
finished folder accepts), on the command line, and in the Prune page's per-layer figure."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pandas as pd
import pytest
from conftest import EN, FR

from mlprune import MlpruneError, pipeline, plots, reproduce
from mlprune.cli import build_parser, spec_from_args
from mlprune.corpus import ParallelCorpus
from mlprune.pipeline import SWEEP_METHODS, PruneSpec, prune, sweep


def test_the_sweep_compares_mixes_owl_and_m_wanda(loaded):
    corpus = ParallelCorpus(pd.DataFrame({"en": EN, "fr": FR, "de": FR[::-1]}), "three")
    methods = ["wanda-pooled", "wanda-owl", "m-wanda", "m-wanda-no-cwl"]
    rows = sweep(loaded, corpus, methods=methods, sparsities=[0.5], pairs=["fr-en"], limit=1,
                 base=PruneSpec(samples=2))
    assert [r["method"] for r in rows] == methods
    for r in rows:
        assert 0.45 < r["sparsity_reached"] <= 0.5 and 0 <= r["chrf_p_vs_dense"] <= 1
    assert {f"m-wanda-no-{p}" for p in ("variance", "cwl", "prob")} <= set(SWEEP_METHODS)


def test_reproduce_adds_variants_beyond_the_paper_to_a_finished_folder(finished_report, corpus,
                                                                      monkeypatch, tmp_path):
    loaded, grid, shared_out, first, _ = finished_report
    out = shutil.copytree(shared_out, tmp_path / "copy")
    made = []
    real_prune = pipeline.prune  # what reproduce's cached masks call when a variant is new
    monkeypatch.setattr(pipeline, "prune",
                        lambda *a, **k: made.append(a[2].label) or real_prune(*a, **k))
    report = reproduce.run(loaded, corpus, out, replace(grid, beyond=("wanda-owl",)))
    assert made == ["wanda-mt-owl"]  # only the new variant is measured
    row = next(r for r in report["table1"] if r["variant"] == "wanda-owl 50%")
    assert 0 <= row["chrf_p_vs_wanda-mt"] <= 1 and 0 <= row["chrf_p_vs_wanda-mono"] <= 1
    comps = report["zeroshot"]["tiny_task"]["comparisons"]
    assert any(c["a"] == "wanda-mt 50%" and c["b"] == "wanda-owl 50%" for c in comps)
    assert "Beyond the paper, against wanda-mt" in reproduce.markdown(report)
    assert "Beyond the paper" not in reproduce.markdown(first)
    assert reproduce.QUICK.beyond == () and reproduce.FULL.beyond == ()  # never slower by default
    with pytest.raises(MlpruneError, match="Unknown variant"):
        replace(grid, beyond=("wanda-best",)).variants()


def test_the_command_line_takes_the_new_fields_and_beyond():
    parser = build_parser()
    args = parser.parse_args(["prune", "--out", "x", "--allocation", "owl",
                              "--allocation-range", "0.1", "--outlier-threshold", "7",
                              "--method", "m-wanda", "--calibration", "pooled",
                              "--mwanda-parts", "variance,prob", "--variance-weight", "0.5"])
    spec = spec_from_args(args)
    assert (spec.allocation, spec.allocation_range, spec.outlier_threshold) == ("owl", 0.1, 7.0)
    assert spec.mwanda.parts == {"variance", "prob"} and spec.mwanda.variance_weight == 0.5
    args = parser.parse_args(["reproduce", "--beyond", "all"])
    assert args.beyond == "all"


def test_the_per_layer_figure_shows_target_and_allocation(loaded, corpus):
    masks = prune(loaded, corpus, PruneSpec(allocation="owl", allocation_range=0.1,
                                            outlier_threshold=2.0, samples=2,
                                            mode="one-shot")).masks
    fig = plots.sparsity_figure(masks)
    traces = {t.name: t for t in fig.data}
    per_layer = masks.meta["allocation"]["per_layer"]
    assert list(traces["allocated (owl)"].y) == [per_layer[str(k)] for k in traces["target"].x]
    assert set(traces["target"].y) == {0.5}
    assert "owl allocation" in fig.layout.title.text
    flat = plots.sparsity_figure(prune(loaded, corpus, PruneSpec(samples=2, mode="one-shot")).masks)
    assert not any(t.name.startswith("allocated") for t in flat.data)
