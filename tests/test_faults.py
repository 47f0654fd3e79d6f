"""Faults leave nothing behind: an interrupted calibration leaves the model dense, finished
work is saved as it is produced, and a sweep killed mid-way resumes to the same table.
(Interrupted export and a cancelled sweep: test_evaluate_export.py, test_dashboard.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from mlprune.capture import capture
from mlprune.pipeline import PruneSpec, cached_capture, calibrate, read_sweep_rows, sweep
from mlprune.prompts import translation_prompts
from mlprune.prune import applied_masks, sequential_stats


@pytest.mark.parametrize("after_layer", [0, 1])
def test_interrupted_sequential_calibration_leaves_the_model_dense(after_layer):
    model, tok = tiny_model("llama", layers=3), byte_tokenizer()
    texts = ["one text", "two texts here"]
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    stats = capture(model, tok, texts)

    def ctrl_c(stage, fraction):
        if stage == f"layer {after_layer + 1}/3":  # layer 0 pruned, or layers 0 and 1 (the set was extended)
            assert len(applied_masks(model).modules) == 7 * (after_layer + 1)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sequential_stats(model, tok, texts, stats, method="wanda", sparsity=0.5, progress=ctrl_c)
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())
    assert applied_masks(model) is None


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


def test_a_row_torn_by_a_crash_is_dropped_and_measured_again(tmp_path, loaded, corpus):
    kwargs = dict(methods=["magnitude"], sparsities=[0.0, 0.5], pairs=["fr-en"], limit=2,
                  base=PruneSpec(samples=2))
    full = sweep(loaded, corpus, out_csv=tmp_path / "full.csv", **kwargs)
    lines = (tmp_path / "full.csv").read_text().splitlines(keepends=True)
    torn = tmp_path / "torn.csv"
    torn.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed mid-write
    written = torn.read_bytes()
    assert len(read_sweep_rows(torn)) == 1 and torn.read_bytes() == written  # reading: no change
    resumed = sweep(loaded, corpus, out_csv=torn, **kwargs)  # resuming drops the torn row
    assert [r["chrf"] for r in resumed] == pytest.approx([r["chrf"] for r in full])
    assert torn.read_text().count("\n") == 3


def _sweep_command(model, corpus_file, csv) -> list[str]:
    return [sys.executable, "-c", "import sys; from mlprune.cli import main; sys.exit(main())",
            "sweep", "--model", str(model), "--corpus", str(corpus_file), "--methods",
            "magnitude,random", "--sparsities", "0,0.3,0.6", "--limit", "2", "--samples", "2",
            "--csv", str(csv)]


def _rows(csv) -> int:
    return csv.read_text().count("\n") - 1 if csv.is_file() else 0


def test_a_sweep_killed_mid_way_resumes_to_the_same_table(tmp_path, tiny_folder, corpus_file):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full, killed = tmp_path / "full.csv", tmp_path / "killed.csv"
    from mlprune.cli import main

    assert main(_sweep_command(tiny_folder, corpus_file, full)[3:]) == 0  # uninterrupted
    proc = subprocess.Popen(_sweep_command(tiny_folder, corpus_file, killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _rows(killed) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no handler runs: as a power cut or the OOM killer
    proc.wait()
    done = _rows(killed)
    assert 2 <= done < 6, "the kill should land mid-way"
    subprocess.run(_sweep_command(tiny_folder, corpus_file, killed), env=env, check=True,
                   capture_output=True, timeout=300)
    a, b = (pd.read_csv(p).sort_values(["method", "sparsity"]).reset_index(drop=True)
            for p in (full, killed))
    assert len(b) == 6
    pd.testing.assert_frame_equal(a, b, rtol=1e-5)
