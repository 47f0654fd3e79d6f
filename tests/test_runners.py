"""The results store (SQLite: one transaction per row, no duplicates, kill-safe, concurrent
writers) and the runners (in process, in a worker process, on Ray): the same table from each."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlprune import MlpruneError
from mlprune.capture import Cancelled
from mlprune.pipeline import PruneSpec, read_sweep_rows, sweep
from mlprune.runners import LocalRunner, ModelSource, ProcessRunner, SweepJob, get_runner
from mlprune.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]


def row(i: int, **extra) -> dict:
    return {"pair": "fr-en", "method": "magnitude", "sparsity": i / 1000, "pattern":
            "unstructured", "chrf": 10.0 + i, "n": 2, "chrf_p_vs_dense": None, **extra}


def same_table(a: list[dict], b: list[dict]) -> None:
    """Two sweep tables with the same cells and the same numbers (to float32 noise)."""
    def key(r):
        return r["pair"], r["method"], float(r["sparsity"]), r["pattern"]

    a, b = sorted(a, key=key), sorted(b, key=key)
    assert [key(r) for r in a] == [key(r) for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for col, va in ra.items():
            vb = rb[col]
            if isinstance(va, float) or isinstance(vb, float):
                assert va == pytest.approx(vb, rel=1e-5, nan_ok=True), (key(ra), col)
            else:
                assert va == vb, (key(ra), col)


# --------------------------------------------------------------------------- the store


def test_rows_come_back_as_written_once_per_cell_and_export_as_csv(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    assert store.rows() == [] and len(store) == 0
    assert store.add(row(0)) is True
    assert store.add(row(0, chrf=99.0)) is False  # the same cell again: ignored
    store.add(row(1, chrf=np.float32(12.5), n=np.int64(3), nli_acc_fr=float("nan")))
    rows = store.rows()
    assert [r["chrf"] for r in rows] == [10.0, 12.5]
    assert rows[0]["nli_acc_fr"] is None  # a column added after the row was written
    assert rows[1]["nli_acc_fr"] is None and rows[1]["n"] == 3  # NaN stored as NULL
    assert store.columns() == [*row(0), "nli_acc_fr"]
    assert read_sweep_rows(tmp_path / "r.sqlite") == rows  # pipeline reads stores too
    assert read_sweep_rows(tmp_path / "none.sqlite") == []
    csv = store.export_csv(tmp_path / "r.csv")
    assert read_sweep_rows(csv) == rows
    with pytest.raises(MlpruneError, match="needs a value for pair"):
        store.add({"method": "x", "sparsity": 0.1, "pattern": "unstructured"})


def test_a_store_keeps_the_settings_of_its_rows(tmp_path):
    store = ResultStore(tmp_path / "r.db")
    assert store.settings() is None
    store.claim({"model": "m", "limit": 4})
    store.claim({"model": "m", "limit": 4})  # the same again: fine
    with pytest.raises(MlpruneError, match=r"another limit \(4, not 8\)"):
        store.claim({"model": "m", "limit": 8})
    assert store.settings() == {"model": "m", "limit": 4}
    (tmp_path / "not.sqlite").write_text("pair,method\n")
    with pytest.raises(MlpruneError, match="is not a results store"):
        ResultStore(tmp_path / "not.sqlite")


def test_a_cell_that_fails_leaves_exactly_the_finished_rows(tmp_path, loaded, corpus):
    kwargs = dict(methods=["magnitude"], sparsities=[0.0, 0.3, 0.6], pairs=["fr-en"], limit=1,
                  base=PruneSpec(samples=2))
    full = sweep(loaded, corpus, store=tmp_path / "full.sqlite", **kwargs)
    calls = []

    def failing_second(loaded, method, sparsity):
        calls.append(sparsity)
        if len(calls) == 2:
            raise RuntimeError("the machine went away mid-cell")
        return {}

    with pytest.raises(RuntimeError):
        sweep(loaded, corpus, store=tmp_path / "cut.sqlite", extra_eval=failing_second, **kwargs)
    cut = ResultStore(tmp_path / "cut.sqlite")
    assert [r["sparsity"] for r in cut.rows()] == [0.0]
    again = sweep(loaded, corpus, store=cut, out_csv=tmp_path / "cut.csv", **kwargs)
    same_table(again, full)
    assert len(cut) == 3 and read_sweep_rows(tmp_path / "cut.csv") == cut.rows()


WRITER = """
import sys
from mlprune.store import ResultStore
store = ResultStore(sys.argv[1])
for i in range(int(sys.argv[2]), int(sys.argv[3])):
    store.add({"pair": "fr-en", "method": "magnitude", "sparsity": i / 1000,
               "pattern": "unstructured", "chrf": 10.0 + i, "text": "x" * 2000})
"""


def writer(path, start: int, stop: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(start), str(stop)],
                            cwd=ROOT)


def test_a_writer_killed_mid_way_leaves_only_whole_rows(tmp_path):
    path = tmp_path / "killed.sqlite"
    proc = writer(path, 0, 100_000)
    deadline = time.monotonic() + 60
    while (not path.is_file() or len(ResultStore(path)) < 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler runs: as the OOM killer or a power cut
    proc.wait()
    rows = ResultStore(path).rows()
    assert 20 <= len(rows) < 100_000
    assert [r["chrf"] for r in rows] == [10.0 + i for i in range(len(rows))]  # whole, in order
    assert all(r["text"] == "x" * 2000 for r in rows)
    ResultStore(path).add(row(999_999))  # and the file takes new rows


def test_two_writers_at_once_give_the_union_without_duplicates(tmp_path):
    path = tmp_path / "shared.sqlite"
    ResultStore(path)
    procs = [writer(path, 0, 60), writer(path, 30, 90)]
    for p in procs:
        assert p.wait(120) == 0
    rows = ResultStore(path).rows()
    assert sorted(r["sparsity"] for r in rows) == [i / 1000 for i in range(90)]


# --------------------------------------------------------------------------- the runners


def job(folder, corpus, store, **changes) -> SweepJob:
    settings = dict(methods=("magnitude", "random"), sparsities=(0.0, 0.5), pairs=("fr-en",),
                    base=PruneSpec(samples=2), limit=2)
    return SweepJob(ModelSource(str(folder)), corpus, str(store), **{**settings, **changes})


@pytest.fixture(scope="module")
def local_table(tiny_folder, corpus, tmp_path_factory):
    """The tiny sweep measured in this process: the table every runner must give."""
    store = tmp_path_factory.mktemp("local") / "local.sqlite"
    rows = LocalRunner().run(job(tiny_folder, corpus, store))
    assert len(rows) == 4 and all(not math.isnan(r["chrf"]) for r in rows)
    return rows


def test_a_worker_process_gives_the_same_table(local_table, tiny_folder, corpus, tmp_path):
    stages = []
    rows = ProcessRunner().run(job(tiny_folder, corpus, tmp_path / "p.sqlite"),
                               progress=lambda s, f: stages.append((s, f)))
    same_table(rows, local_table)
    same_table(ResultStore(tmp_path / "p.sqlite").rows(), local_table)
    assert any(s.startswith("worker: ") for s, _ in stages)  # the load, streamed back
    assert stages[-1] == ("fr-en random 0.50", 1.0)


def test_a_cancelled_worker_keeps_its_finished_rows(tiny_folder, corpus, tmp_path):
    store = tmp_path / "c.sqlite"
    sparsities = tuple(s / 10 for s in range(10))
    started = ProcessRunner().start(job(tiny_folder, corpus, store, sparsities=sparsities))
    deadline = time.monotonic() + 120
    while (not store.is_file() or len(ResultStore(store)) < 2) and time.monotonic() < deadline:
        assert not started.done(), started.error
        time.sleep(0.05)
    started.cancel()
    with pytest.raises(Cancelled):
        started.result(30)
    kept = ResultStore(store).rows()
    assert 2 <= len(kept) < 20
    time.sleep(0.5)
    assert ResultStore(store).rows() == kept  # the worker is gone: nothing more is written


def test_bad_input_is_refused_before_a_worker_starts_and_a_workers_error_comes_back(
        tiny_folder, corpus, tmp_path):
    with pytest.raises(MlpruneError, match="Unknown sweep method obs"):
        ProcessRunner().start(job(tiny_folder, corpus, tmp_path / "x.sqlite", methods=("obs",)))
    with pytest.raises(MlpruneError, match="at least one method"):
        LocalRunner().run(job(tiny_folder, corpus, tmp_path / "x.sqlite", methods=()))
    with pytest.raises(MlpruneError, match="Unknown runner 'gpu'"):
        get_runner("gpu")
    missing = job(tmp_path / "no-model", corpus, tmp_path / "x.sqlite")
    started = ProcessRunner().start(missing)
    with pytest.raises(MlpruneError, match="No model folder"):
        started.result(120)


def test_ray_gives_the_same_table(local_table, tiny_folder, corpus, tmp_path):
    ray = pytest.importorskip("ray")
    from mlprune.runners import RayRunner

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        store = tmp_path / "ray.sqlite"
        done = []
        rows = RayRunner().run(job(tiny_folder, corpus, store),
                               progress=lambda s, f: done.append(f))
        same_table(rows, local_table)
        assert done[-1] == 1.0
        # a second run finds every cell measured and sends nothing
        assert RayRunner().run(job(tiny_folder, corpus, store)) == rows
    finally:
        ray.shutdown()


def test_the_sweep_command_runs_in_a_worker_into_a_store(tiny_folder, corpus_file, tmp_path,
                                                         capsys):
    from mlprune.cli import main

    common = ["sweep", "--model", str(tiny_folder), "--corpus", str(corpus_file), "--methods",
              "magnitude", "--sparsities", "0,0.5", "--limit", "2", "--samples", "2"]
    assert main([*common, "--runner", "process", "--csv", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].split()[-2:] == ["chrf_p_vs_dense", "bleu_p_vs_dense"]
    store = ResultStore(tmp_path / "s.sqlite")  # beside the CSV, which is its export
    assert len(store) == 2 and read_sweep_rows(tmp_path / "s.csv") == store.rows()
    assert f"wrote {tmp_path / 's.sqlite'}" in out.err
    assert main([*common, "--store", str(tmp_path / "s.csv")]) == 2
    assert "--store takes a .sqlite or .db file" in capsys.readouterr().err
    # the local runner resumes the same store (nothing left to measure) ...
    assert main([*common, "--store", str(tmp_path / "s.sqlite")]) == 0
    assert ResultStore(tmp_path / "s.sqlite").rows() == store.rows()
    capsys.readouterr()
    # ... and refuses to mix in rows measured with other settings
    assert main([*common, "--store", str(tmp_path / "s.sqlite"), "--limit", "3"]) == 2
    assert "holds rows measured with another limit (2, not 3)" in capsys.readouterr().err
    # ... nor rows of the same model in another precision
    assert main([*common, "--store", str(tmp_path / "s.sqlite"), "--dtype", "bfloat16"]) == 2
    assert "holds rows measured with another dtype (None, not 'bfloat16')" in \
        capsys.readouterr().err
