"""The dashboard's long work, off the shared model: sweeps and reproduce runs in worker
processes (each with its own copy of the model), the results stores they fill, the earlier
sweeps a page can reopen, and results files measured elsewhere, opened read-only.

:func:`start_sweep` and :func:`start_reproduce` never touch the shared model or its lock, so
every page stays live while they run; only :func:`run_sweep` (in this process, for tests and
scripts) holds the lock for its whole length. Nothing here imports Streamlit.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from mlprune import MlpruneError, Progress, cache_dir, cache_name, no_progress, pipeline, runners
from mlprune.corpus import ParallelCorpus
from mlprune.holding import dense
from mlprune.models import LoadedModel
from mlprune.pipeline import PruneSpec
from mlprune.service import CAPTURE_BATCH
from mlprune.spec import SweepSpec
from mlprune.store import STORE_SUFFIXES, ResultStore, is_store

if TYPE_CHECKING:  # imported when a run starts: the reproduce grid is not needed before
    from mlprune import reproduce

# Extra columns for the sweep, by name: ``fn(loaded, method, sparsity) -> {column: value}``,
# called by ``pipeline.sweep(extra_eval=...)`` with the cell's masks applied. Zero-shot
# accuracy plugs in here; the Sweep page offers whatever is registered.
SWEEP_EXTRA_EVALS: dict[str, Callable[[LoadedModel, str, float], dict]] = {}
ZERO_SHOT_ITEMS = 20  # items per language per cell: ~30 s per task and cell on 2 CPU cores


class _ZeroShot:
    """A built-in zero-shot task as a sweep column set, built on first use (the task file is
    read then, not at import). Dense results are kept per model and reused by every method."""

    def __init__(self, task: str):
        self.task, self._eval = task, None

    def built(self):
        """The task's ``zeroshot.SweepEval`` (read on first use)."""
        if self._eval is None:
            from mlprune.zeroshot import sweep_eval

            self._eval = sweep_eval([self.task], limit=ZERO_SHOT_ITEMS, batch_size=CAPTURE_BATCH)
        return self._eval

    def __call__(self, loaded: LoadedModel, method: str, sparsity: float) -> dict:
        return self.built()(loaded, method, sparsity)


for _task in ("nli", "sentiment"):
    SWEEP_EXTRA_EVALS[f"zero-shot {_task}"] = _ZeroShot(_task)


# --------------------------------------------------------------------------- running a sweep


def run_sweep(loaded: LoadedModel, corpus: ParallelCorpus, *, methods: list[str],
              sparsities: list[float], pairs: list[str], base: PruneSpec, limit: int,
              out_csv: Path, progress: Progress = no_progress,
              should_stop: Callable[[], bool] | None = None,
              extra_eval: Callable[[LoadedModel, str, float], dict] | None = None) -> pd.DataFrame:
    """``pipeline.sweep`` in this process, under the model's lock for its whole length (it
    prunes the shared model cell by cell); ``out_csv`` a CSV or a results store. The
    dashboard uses :func:`start_sweep` instead, which leaves the shared model free."""
    SweepSpec(methods, sparsities, pairs, base).validate()  # the whole grid, before the lock
    store = out_csv if is_store(out_csv) else None
    with dense(loaded, "running a sweep", progress):
        rows = pipeline.sweep(loaded, corpus, methods=methods, sparsities=sparsities, pairs=pairs,
                              base=base, limit=limit, out_csv=None if store else out_csv,
                              store=store, batch_size=CAPTURE_BATCH, progress=progress,
                              should_stop=should_stop, extra_eval=extra_eval)
    return sweep_table(rows, methods, sparsities, pairs)


def sweep_tasks(names: list[str]) -> tuple[str, ...]:
    """The zero-shot tasks behind these registered extra evaluations: what a worker process
    rebuilds them from (an evaluation registered as a bare function cannot travel)."""
    tasks = []
    for name in names:
        found = SWEEP_EXTRA_EVALS.get(name)
        if not isinstance(found, _ZeroShot):
            raise MlpruneError(f"The extra evaluation '{name}' cannot run in a worker process; "
                               "only zero-shot tasks can.")
        tasks.append(found.task)
    return tuple(tasks)


def start_sweep(model_spec: str, corpus: ParallelCorpus, *, methods: list[str],
                sparsities: list[float], pairs: list[str], base: PruneSpec, limit: int,
                store: Path, extra: list[str],
                owner: Callable[[], bool] | None = None) -> runners.Job:
    """The sweep in a worker process with its own copy of the model ``model_spec`` (loaded
    as this process loaded it; the embedded model's conversion is cached), its rows
    committed to ``store`` as they are measured. Returns at once; the shared model and its
    lock are never touched, so every other page stays live while it runs. Workers are
    capped (``runners.MAX_WORKERS_ENV``): the job may wait in line first (its ``stage``
    says where); it is cancelled once ``owner()`` (the session that started it) has been
    gone for ``runners.ORPHAN_S``."""
    grid = SweepSpec(methods, [float(s) for s in sparsities], pairs, base).validate()
    job = runners.SweepJob(
        runners.ModelSource(model_spec), corpus, str(store), grid.methods, grid.sparsities,
        grid.pairs, grid.base, limit, CAPTURE_BATCH,
        tasks=sweep_tasks(extra), task_limit=ZERO_SHOT_ITEMS)
    return runners.ProcessRunner().start(job, owner=owner)


def start_reproduce(model_spec: str, corpus: ParallelCorpus, out: Path, grid: reproduce.Grid,
                    owner: Callable[[], bool] | None = None) -> runners.Job:
    """``reproduce.run`` of ``grid`` into ``out``, in a worker process with its own copy of
    the model (as :func:`start_sweep`: capped, queued, ended with its ``owner``). Returns at
    once; the job's result is the report."""
    from mlprune import reproduce

    work = runners.Call(runners.ModelSource(model_spec), reproduce.run, (corpus, out, grid),
                        {"batch_size": CAPTURE_BATCH})
    return runners.ProcessRunner().start(work, owner=owner)


def sweep_extra_eval(names: list[str]) -> Callable[[LoadedModel, str, float], dict] | None:
    """The registered extra evaluations of these names as one ``extra_eval`` (None if none)."""
    chosen = [SWEEP_EXTRA_EVALS[name] for name in names]
    if not chosen:
        return None

    def extra_eval(loaded: LoadedModel, method: str, sparsity: float) -> dict:
        row = {}
        for fn in chosen:
            row.update(fn(loaded, method, sparsity))
        return row

    if all(isinstance(fn, _ZeroShot) for fn in chosen):
        # what a results store keys on (pipeline.task_hash): the tasks, as a worker's
        # zero-shot evaluation of the same names (start_sweep) carries them
        built = [fn.built() for fn in chosen]
        extra_eval.tasks = [t for ev in built for t in ev.tasks]
        extra_eval.columns = [c for ev in built for c in ev.columns]
        extra_eval.norm = built[0].norm
    return extra_eval


# --------------------------------------------------------------------------- stores and results files


def sweep_table(rows: list[dict], methods: list[str], sparsities: list[float],
                pairs: list[str]) -> pd.DataFrame:
    """Rows of the chosen grid as a table (a resumed CSV may hold more)."""
    table = pd.DataFrame(rows, columns=None if rows else pipeline.SWEEP_COLUMNS)
    if table.empty:
        return table
    table["sparsity"] = table["sparsity"].astype(float)
    keep = (table["method"].isin(methods) & table["pair"].isin(pairs)
            & table["sparsity"].round(6).isin([round(float(s), 6) for s in sparsities]))
    return table[keep].sort_values(["pair", "method", "sparsity"]).reset_index(drop=True)


def read_results(path: Path) -> list[dict]:
    """Rows already measured in a results store or sweep CSV (empty when there is none)."""
    return pipeline.read_sweep_rows(path)


SWEEPS = "sweeps"  # the dashboard's results stores: cache_dir() / SWEEPS
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (name, id)


def dense_fingerprint(loaded: LoadedModel) -> str:
    """``pipeline.model_fingerprint`` of the shared model's dense weights (taken under its
    lock, so a session's masks never enter it), computed once per model object."""
    found = _FINGERPRINTS.get(loaded.model)
    if found is None or found[0] != loaded.name:
        with dense(loaded):
            found = _FINGERPRINTS[loaded.model] = (loaded.name,
                                                   pipeline.model_fingerprint(loaded))
    return found[1]


def sweep_store(loaded: LoadedModel, corpus: ParallelCorpus, *, limit: int, samples: int,
                shots: int, extra: list[str]) -> Path:
    """The results store of a dashboard sweep, in the user's cache folder, named from the
    model's fingerprint, the corpus's hash and every setting that changes what a row means:
    the same sweep on a reloaded page (or in another session) finds its rows again and
    resumes; concurrent writers are safe (one transaction per row)."""
    what = json.dumps([dense_fingerprint(loaded), pipeline.corpus_hash(corpus), limit, samples,
                       shots, sorted(extra), ZERO_SHOT_ITEMS])
    name = hashlib.sha256(what.encode()).hexdigest()[:20]
    # the model's name only helps a reader (user text: made harmless); the hash identifies it
    return cache_dir() / SWEEPS / f"{cache_name(loaded.name, 32)}-{name}.sqlite"


def recent_sweeps(loaded: LoadedModel, corpus: ParallelCorpus, count: int = 10) -> list[dict]:
    """The dashboard's earlier sweeps of this model and corpus (by fingerprint and hash, as
    their stores recorded them), newest first: ``{"path", "rows", "settings"}`` each, at most
    ``count``. Stores are read only; one that cannot be read is left out."""
    folder = cache_dir() / SWEEPS
    model, data = dense_fingerprint(loaded), pipeline.corpus_hash(corpus)
    found = []
    paths = []
    for path in folder.glob("*.sqlite") if folder.is_dir() else []:
        try:
            paths.append((path.stat().st_mtime, path))
        except OSError:
            continue  # removed meanwhile
    for _, path in sorted(paths, reverse=True):
        try:
            store = ResultStore(path, readonly=True)
            settings, rows = store.settings(), len(store)
        except MlpruneError:
            continue
        if settings and settings.get("model_fingerprint") == model \
                and settings.get("corpus_hash") == data and rows:
            found.append({"path": path, "rows": rows, "settings": settings})
            if len(found) == count:
                break
    return found


def sweep_config(found: dict) -> dict:
    """The Sweep page's settings that reopen an earlier sweep (one of :func:`recent_sweeps`):
    its methods, sparsities and directions (from its rows), held-out size, calibration
    prompts, shots and zero-shot tasks (from its settings)."""
    rows, settings = read_results(found["path"]), found["settings"]
    spec, columns = settings.get("spec", {}), set(settings.get("extra", []))
    extra = [name for name, fn in SWEEP_EXTRA_EVALS.items()
             if isinstance(fn, _ZeroShot) and f"{fn.task}_acc_non_en" in columns]
    return {"methods": list(dict.fromkeys(r["method"] for r in rows)),
            "sparsities": sorted({float(r["sparsity"]) for r in rows}),
            "pairs": list(dict.fromkeys(r["pair"] for r in rows)),
            "limit": settings.get("limit"), "samples": spec.get("samples"),
            "shots": spec.get("shots"), "extra": extra}


def results_files(path: str | Path) -> list[Path]:
    """The results a path names: the file itself, or a folder's results stores and CSV
    files, newest first (raises MlpruneError when there are none)."""
    path = Path(path).expanduser()
    kinds = (*STORE_SUFFIXES, ".csv")
    if path.is_dir():
        found = sorted((p for p in path.iterdir() if p.suffix.lower() in kinds and p.is_file()),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        if not found:
            raise MlpruneError(f"{path} holds no results file (.sqlite, .db or .csv).")
        return found
    if not path.is_file():
        raise MlpruneError(f"No results file or folder at {path}.")
    if path.suffix.lower() not in kinds:
        raise MlpruneError(f"{path.name} is not a results file: open a .sqlite, .db or .csv "
                           "file, or a folder of them.")
    return [path]


def open_results(path: str | Path) -> tuple[pd.DataFrame, dict | None]:
    """A results file as it is, measured elsewhere (another run, a worker, a Ray cluster):
    every row as a table, and the settings a store recorded (None for a CSV). Viewing only:
    the file is never changed (a store is opened read-only), and a file that is not a sweep's
    results is refused (MlpruneError)."""
    path = results_files(path)[0]
    store = ResultStore(path, readonly=True) if is_store(path) else None
    rows = store.rows() if store is not None else read_results(path)
    table = pd.DataFrame(rows, columns=None if rows else pipeline.SWEEP_COLUMNS)
    if not table.empty:
        table = table.sort_values(["pair", "method", "sparsity"]).reset_index(drop=True)
    return table, store.settings() if store is not None else None
