"""The verdict grid on a tiny model: every cell measured once, resumable, refused on another
model, and a report whose claims start with pruned-vs-dense and carry their statistics."""

from __future__ import annotations

import json

import pytest
from conftest import REPRODUCE_TASK
from tiny import byte_tokenizer, tiny_model

from mlprune import MlpruneError, verdict
from mlprune import zeroshot as zs
from mlprune.models import LoadedModel
from mlprune.verdict_report import build_report, markdown, write_report


def tiny_verdict_grid(folder) -> verdict.VerdictGrid:
    task = folder / "tiny_task.jsonl"
    task.write_text("".join(json.dumps(line) + "\n" for line in REPRODUCE_TASK),
                    encoding="utf-8")
    return verdict.VerdictGrid(langs=("fr",), sparsities=(0.2, 0.5), seeds=(0, 1), samples=2,
                               tasks=(str(task),), wide=("wanda-mono-en",), paper_langs=("fr",),
                               paper_samples=2, translation_patterns=("0.5",),
                               translation_limit=2)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("verdict")
    loaded = LoadedModel(tiny_model("llama"), byte_tokenizer(), "tiny-llama", "local")
    grid, lines = tiny_verdict_grid(folder), []
    done = verdict.run(loaded, corpus, folder / "run", grid, batch_size=4, log=lines.append)
    assert done["measured"] == done["total"] == len(grid.cells())
    report = build_report(folder / "run", grid)
    write_report(report, folder / "run")
    return loaded, grid, folder / "run", report, lines


def test_every_cell_is_measured_and_the_log_estimates_the_time_left(finished):
    _, grid, out, report, lines = finished
    cells = list(verdict.iter_cells(out))
    assert len(cells) == len(grid.cells()) == report["cells"]["expected"]
    assert lines[0].startswith(f"verdict: {len(cells)} cells")
    assert "analysis" in lines[1] and all("left ~" in line for line in lines[2:])
    assert len(lines) == len(cells) + 1
    # the headline curve: each calibration seed gives its own masks at each sparsity
    mt = [c for c in cells if c["variant"]["method"] == "wanda-mt"
          and c["variant"]["protocol"] == "one-shot" and c["evaluation"].endswith(":fr")]
    assert {(c["variant"]["pattern"], c["variant"]["seed"]) for c in mt} == {
        (p, s) for p in ("0.2", "0.5") for s in (0, 1)}
    assert {round(c["sparsity_reached"], 1) for c in mt} == {0.2, 0.5}
    # seeds are independent draws: two seeds of one method give different masks
    a, b = (next(c for c in mt if c["variant"]["seed"] == s and c["variant"]["pattern"] == "0.5")
            for s in (0, 1))
    assert [i["logprob"] for i in a["items"]] != [i["logprob"] for i in b["items"]]


def test_the_report_states_the_headline_claim_first_with_its_statistics(finished):
    _, grid, out, report, _ = finished
    first = report["claims"][0]
    assert "beats the unpruned model" in first["claim"]
    assert first["n"] == 6 and first["seeds"] == [1, 2]  # the fr items of the task; dense: 1
    assert first["ci"][0] <= first["effect"] <= first["ci"][1]
    assert 0 < first["p_value"] <= 1 and first["detectable"] >= 0
    rows = report["comparisons"]["mt_vs_dense"]
    assert [r["pattern"] for r in rows] == ["0.2", "0.5"]
    assert all(r["p_holm"] >= r["p_value"] for r in rows)  # Holm only ever raises p
    assert report["grid"]["seeds"] == [0, 1] and report["grid"]["langs"] == ["fr"]
    assert report["items_per_language"][grid.tasks[0]]["fr"] == 6
    curve = report["curves"]["fr"]["methods"]["wanda-mt"]
    assert [p["sparsity"] for p in curve] == [0.2, 0.5] and set(curve[0]["seeds"]) == {0, 1}
    assert report["translation"]["table"] and report["comparisons"]["paper_protocol"]
    shared = [c for c in report["claims"] if "shared across" in c["claim"]]
    assert len(shared) == 0  # one calibration language: no pair of directions to compare
    assert report["analysis"]["measures"]["top_in_top"]["n_seeds"] == 2
    text = (out / "report.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert "| claim |" in markdown(report)


def test_the_report_is_recomputed_from_the_cells_alone(finished):
    _, grid, out, report, _ = finished
    again = json.loads(zs.strict_json(build_report(out, grid)))
    assert again["claims"] == json.loads(zs.strict_json(report["claims"]))


def test_a_finished_grid_resumes_without_measuring_again(finished, corpus, monkeypatch):
    loaded, grid, out, _, _ = finished

    def fail(*a, **k):
        raise AssertionError("a finished cell was measured again")

    monkeypatch.setattr(verdict, "_measure", fail)
    monkeypatch.setattr(verdict, "rank", fail)
    lines = []
    verdict.run(loaded, corpus, out, grid, log=lines.append)
    assert lines == ["verdict: 0 cells to measure in " + str(out)]


def test_a_deleted_cell_alone_is_measured_again(finished, corpus):
    loaded, grid, out, _, _ = finished
    victim = verdict.Cells(out).path("wanda-mt_fr_0.2_s1_one-shot", f"zs:{grid.tasks[0]}:fr")
    before = victim.read_bytes()
    victim.unlink()
    lines = []
    verdict.run(loaded, corpus, out, grid, log=lines.append)
    assert len(lines) == 2 and "wanda-mt fr 20% seed 1" in lines[1]
    # the same calibration draw gives the same masks: the cell comes back as it was
    assert json.loads(victim.read_bytes())["items"] == json.loads(before)["items"]


def test_another_model_is_refused_naming_what_differs(finished, corpus):
    _, grid, out, _, _ = finished
    other = LoadedModel(tiny_model("llama", seed=1), byte_tokenizer(), "tiny-llama", "local")
    with pytest.raises(MlpruneError, match="another model"):
        verdict.run(other, corpus, out, grid)


def test_bad_grids_are_refused_in_one_sentence():
    with pytest.raises(MlpruneError, match="non-English"):
        verdict.VerdictGrid(langs=("en",)).validate()
    with pytest.raises(MlpruneError, match="outside"):
        verdict.VerdictGrid(sparsities=(0.0,)).validate()
    with pytest.raises(MlpruneError, match="Unknown variant"):
        verdict.VerdictGrid(wide=("nope",)).validate()


def test_the_full_grid_runs_the_headline_first_and_names_every_cell_once():
    grid = verdict.FULL
    phases = [j.phase for j in grid.jobs()]
    assert phases[0] == "dense" and phases[1] == "curve"
    assert phases.index("wide") > max(i for i, p in enumerate(phases) if p == "curve")
    cells = grid.cells()
    assert len(cells) == len({(v.id, e) for v, e in cells})
    # every calibration language is evaluated in itself, at every sparsity and seed
    own = {(v.method, v.lang, v.pattern, v.seed) for v, e in cells
           if v.method in ("wanda-mt", "wanda-mono") and v.protocol == "one-shot"
           and e.startswith("zs:") and e.endswith(":" + v.lang)}
    assert len(own) == 2 * 4 * 4 * 3


def test_the_readme_section_says_what_was_measured_and_what_is_still_running(finished):
    from mlprune.verdict_report import readme_section

    _, grid, _, report, _ = finished
    text = readme_section(report, ["assets/verdict_fr.png"])
    first_row = next(line for line in text.splitlines() if line.startswith("| Pruning with"))
    assert "beats the unpruned model" in first_row and "(fr)" in first_row
    n = report["cells"]["expected"]
    assert f"{n} of {n} cells measured**." in text and "still running" not in text
    assert "![verdict_fr](assets/verdict_fr.png)" in text
    partial = {**report, "cells": {**report["cells"], "expected": n + 5}}
    assert "the grid is still running" in readme_section(partial)


def test_the_command_line_puts_a_users_task_through_the_grid_and_its_claims(
        tiny_folder, corpus_file, tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from mlprune.cli import main

    task = tiny_verdict_grid(tmp_path).tasks[0]
    tiny = replace(tiny_verdict_grid(tmp_path), tasks=(), sparsities=(0.5,), seeds=(0,), wide=(),
                   paper_langs=())
    monkeypatch.setattr(verdict, "QUICK", tiny)
    out = tmp_path / "cli"
    code = main(["verdict", "--model", str(tiny_folder), "--corpus", str(corpus_file), "--quick",
                 "--task", task, "--out", str(out), "--batch-size", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["items_per_language"][task]["fr"] == 6  # the user's task, scored in fr
    assert report["claims"][0]["claim"] in printed  # the claims table starts the report
    assert main(["verdict", "--model", str(tiny_folder), "--task", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "x")]) == 2


def test_a_powered_null_says_which_gain_it_rules_out_and_a_small_grid_does_not():
    from mlprune.reports.verdict import _claim
    from mlprune.verdict_report import claims_rows

    def comparison(diff, low, high, p, detectable):
        return {"diff": diff, "ci_low": low, "ci_high": high, "p_value": p, "mean_a": 0.8,
                "mean_b": 0.8 + diff, "detectable_diff": detectable, "n_items": 1360}

    powered = _claim("c", "yes", comparison(0.004, -0.005, 0.013, 0.87, 0.014))
    small = _claim("c", "yes", comparison(0.025, -0.01, 0.06, 0.17, 0.051))
    found = _claim("c", "yes", comparison(0.03, 0.01, 0.05, 0.01, 0.014))
    rows = claims_rows({"claims": [powered, small, found]})
    assert powered["holds"] is None and powered["gain_ruled_out_above"] == 0.013
    assert rows[0]["holds here"] == "not found: a gain over +1.3 is ruled out"
    assert small["gain_ruled_out_above"] is None and rows[1]["holds here"] == "cannot tell"
    assert found["gain_ruled_out_above"] is None and rows[2]["holds here"] == "yes"
