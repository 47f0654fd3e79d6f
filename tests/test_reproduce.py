"""`mlprune reproduce` on a tiny model: the report's parts, strict JSON, resume, cancel."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import tiny_grid

from mlprune import pipeline, reproduce
from mlprune.capture import Cancelled


@pytest.fixture
def grid(tmp_path):
    return tiny_grid(tmp_path)


def test_report_has_every_part_and_is_strict_json(finished_report):
    loaded, grid, out, report, stages = finished_report
    assert [r["variant"] for r in report["table1"]] == [
        "dense", "wanda-mono 50%", "wanda-mt 50%", "magnitude 50%", "wanda-mt-inv 50%"]
    mt = next(r for r in report["table1"] if r["variant"] == "wanda-mt 50%")
    assert 0 <= mt["chrf_p_vs_wanda-mono"] <= 1 and mt["sparsity"] == pytest.approx(0.5)
    assert len(report["figure2"]["translating"]["layers"]) == loaded.model.config.num_hidden_layers + 1
    assert report["figure2"]["top"] == 20
    assert {"top_in_bottom", "top_in_top"} <= set(report["overlap"])
    block = report["zeroshot"]["tiny_task"]
    assert set(block["variants"]) == {"dense", *(f"{m} 50%" for m in grid.zeroshot_methods)}
    key = [c for c in block["comparisons"] if c.get("key")]
    assert len(key) == 1 and key[0]["a"] == "wanda-mono 50%" and key[0]["b"] == "wanda-mt 50%"
    claims = {c["claim"].split(":")[0] for c in report["claims"]}
    assert any("zero-shot" in c for c in claims) and any("translation better" in c for c in claims)
    text = (out / "report.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert "## Claims" in (out / "report.md").read_text()
    assert "plotly" in (out / "report.html").read_text()
    assert any(s.startswith("analysis") for s in stages) and stages[-1] == "report"
    assert "wanda-mt 50%: translation, prompt 2/2" in stages
    assert "wanda-mt 50%: zero-shot tiny_task, scoring" in stages


def test_a_finished_run_resumes_without_measuring_again(finished_report, corpus, monkeypatch):
    loaded, grid, out, first, _ = finished_report

    def fail(*a, **k):
        raise AssertionError("a finished cell was measured again")

    monkeypatch.setattr(reproduce, "evaluate_translation", fail)
    monkeypatch.setattr(pipeline, "prune", fail)  # reproduce prunes through cached_masks
    monkeypatch.setattr(reproduce.zs, "evaluate_task", fail)
    again = reproduce.run(loaded, corpus, out, grid)
    assert again["table1"] == first["table1"] and again["claims"] == first["claims"]


def test_cancel_keeps_finished_cells_and_a_torn_cell_is_measured_again(loaded, corpus, grid,
                                                                       tmp_path):
    grid = replace(grid, methods=("magnitude",), invert=False)  # no calibration: quicker
    out = tmp_path / "run"
    calls = {"n": 0}

    def stop_after_dense() -> bool:
        calls["n"] += 1
        return (out / "cells" / "translation" / "dense.json").is_file()

    with pytest.raises(Cancelled):
        reproduce.run(loaded, corpus, out, grid, should_stop=stop_after_dense)
    assert (out / "cells" / "translation" / "dense.json").is_file()
    assert not (out / "report.json").exists()
    (out / "cells" / "translation" / "dense.json").write_text('{"chrf": 1', encoding="utf-8")
    report = reproduce.run(loaded, corpus, out, grid)
    assert report["table1"][0]["variant"] == "dense" and "chrf" in report["table1"][0]


def test_the_command_line_runs_it(tiny_folder, corpus_file, tmp_path, grid, monkeypatch,
                                  capsys):
    from mlprune.cli import main

    monkeypatch.setattr(reproduce, "QUICK", replace(grid, methods=("magnitude",), invert=False))
    code = main(["reproduce", "--model", str(tiny_folder), "--corpus", str(corpus_file),
                 "--quick", "--out", str(tmp_path / "cli")])
    assert code == 0
    assert "## Claims" in capsys.readouterr().out
    assert (tmp_path / "cli" / "report.json").is_file()
    assert main(["reproduce", "--model", str(tiny_folder), "--task", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "x")]) == 2


def test_a_folder_refuses_cells_measured_with_other_settings(finished_report, corpus,
                                                             monkeypatch, tmp_path):
    import shutil

    from mlprune import MlpruneError

    loaded, grid, shared_out, first, _ = finished_report
    out = shutil.copytree(shared_out, tmp_path / "copy")  # other tests read the shared report
    with pytest.raises(MlpruneError, match="other settings"):
        reproduce.run(loaded, corpus, out, replace(grid, translation_limit=3))
    # fewer variants is fine: the cells it needs are all there, nothing is measured again
    monkeypatch.setattr(reproduce, "evaluate_translation", pytest.fail)
    fewer = reproduce.run(loaded, corpus, out, replace(grid, methods=("wanda-mt",), invert=False))
    assert [r["variant"] for r in fewer["table1"]] == ["dense", "wanda-mt 50%"]
