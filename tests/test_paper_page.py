"""The dashboard's Paper page (AppTest, tiny model): a finished report, and a quick run."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import tiny_grid
from test_dashboard import (  # noqa: F401 (app_env: a fixture)
    app_env,
    charts,
    click,
    finish,
    goto,
    new_app,
    run,
)

from mlprune import plots, reproduce
from mlprune.models import cache_dir


@pytest.mark.usefixtures("app_env")
def test_paper_page_shows_a_finished_report(finished_report, monkeypatch):
    _, _, folder, report, _ = finished_report
    monkeypatch.setenv(reproduce.REPORT_ENV, str(folder))
    at = goto(run(new_app()), "5_Paper")
    claims = at.table[0].value
    assert list(claims.index) == [c["claim"] for c in report["claims"]]
    assert len(charts(at)) == len(plots.report_figures(report))
    assert not at.error


@pytest.mark.usefixtures("app_env")
def test_paper_page_says_when_there_is_no_report(tmp_path, monkeypatch):
    monkeypatch.setenv(reproduce.REPORT_ENV, str(tmp_path / "none"))
    at = goto(run(new_app()), "5_Paper")
    assert any("No reproduce report" in e.value for e in at.error)


@pytest.mark.usefixtures("app_env")
def test_paper_page_runs_the_quick_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "QUICK", replace(tiny_grid(tmp_path), methods=("magnitude",),
                                                    invert=False))
    monkeypatch.setenv(reproduce.REPORT_ENV, str(tmp_path / "none"))
    at = goto(run(new_app()), "5_Paper")
    at = finish(click(at, "Start the quick grid"), "paper_job")  # in a worker process
    assert any("Done" in s.value for s in at.success)
    mine = list((cache_dir() / "reproduce").glob("*/report.json"))
    assert len(mine) == 1
    assert len(at.dataframe) >= 1  # the new report is shown under the button


@pytest.mark.usefixtures("app_env")
def test_the_verdict_tab_shows_the_claims_and_one_figure_per_language(tmp_path, monkeypatch,
                                                                        corpus):
    from test_verdict import tiny_verdict_grid
    from tiny import byte_tokenizer, tiny_model

    from mlprune import verdict
    from mlprune.models import LoadedModel
    from mlprune.verdict_report import build_report, write_report

    grid = replace(tiny_verdict_grid(tmp_path), paper_langs=(), translation_patterns=())
    loaded = LoadedModel(tiny_model("llama"), byte_tokenizer(), "tiny-llama", "local")
    verdict.run(loaded, corpus, tmp_path / "v", grid, log=lambda line: None)
    report = build_report(tmp_path / "v", grid)
    write_report(report, tmp_path / "v")
    monkeypatch.setenv("MLPRUNE_VERDICT", str(tmp_path / "v"))
    monkeypatch.setenv(reproduce.REPORT_ENV, str(tmp_path / "none"))
    at = goto(run(new_app()), "5_Paper")
    claims = at.table[0].value
    assert list(claims.index) == [c["claim"] for c in report["claims"]]
    assert "beats the unpruned model" in claims.index[0]
    assert len(charts(at)) == len(report["curves"]) == 1
