"""Where long work runs: in this process, in a worker process with its own model, or on Ray.

Long work (a sweep, a reproduce run) is described by plain values, so that another process
can run it from scratch: where the model comes from (:class:`ModelSource`), the corpus, the
settings, and where results go. Three runners take such work:

- :class:`LocalRunner` runs it here, on the caller's model (the command line's default);
- :class:`ProcessRunner` runs it in one worker process started for it (a fresh interpreter
  that loads its own copy of the model from the same source), so the caller's
  model, and the lock that guards it, stay free: the dashboard's live pages keep answering
  while a sweep runs. Progress streams back; cancelling kills the worker, which loses only
  the cell it had not finished (every finished row is already committed to the store). The
  cap on workers and the handle on each (:class:`~mlprune.workers.WorkerPool`,
  :class:`~mlprune.workers.Job`) are :mod:`mlprune.workers`';
- :class:`RayRunner` (when ``ray`` is installed) sends each cell of a sweep to a Ray cluster
  as its own task, one GPU each where the cluster has GPUs, and commits the rows each task
  returns to the same store as they arrive.

A sweep's cell is one (pair, method) with its sparsities: one ranking serves them all, and
no cell needs another's results (a cell measures its own dense outputs for the p-values:
greedy decoding makes them the same wherever it runs). Every runner gives the same table.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path

from mlprune import CACHE_ENV, MlpruneError, Progress, no_progress, pipeline
from mlprune.capture import Cancelled
from mlprune.corpus import ParallelCorpus
from mlprune.models import LoadedModel, load_model
from mlprune.pipeline import PruneSpec
from mlprune.spec import SweepSpec
from mlprune.store import ResultStore
from mlprune.workers import (  # noqa: F401 (re-exported: the dashboard reaches them here)
    MAX_WORKERS_ENV,
    ORPHAN_S,
    POLL_S,
    Job,
    WorkerPool,
    default_pool,
    max_workers,
)

RUNNERS = ("local", "process", "ray")


@dataclass(frozen=True)
class ModelSource:
    """How to load the model a piece of work runs on: ``load_model``'s arguments."""

    spec: str | None = None  # hub id, folder, .gguf file; None: the embedded default
    dtype: str | None = None
    device: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def load(self, progress: Progress = no_progress) -> LoadedModel:
        """The model (the embedded one's conversion is cached, so a second load is quick)."""
        return load_model(self.spec, dtype=self.dtype, device=self.device,
                          trust_remote_code=self.trust_remote_code,
                          allow_pickle=self.allow_pickle, progress=progress)


@dataclass(frozen=True, eq=False)
class SweepJob:
    """A sweep as plain values (``pipeline.sweep``'s arguments), runnable anywhere.

    ``store`` is the results store its rows are committed to (None: kept in memory and
    returned). ``tasks`` are zero-shot tasks scored on every row (``zeroshot.sweep_eval``'s
    arguments: built-in names or JSONL paths, ``task_limit`` items per language).
    """

    model: ModelSource
    corpus: ParallelCorpus
    store: str | None
    methods: tuple[str, ...]
    sparsities: tuple[float, ...]
    pairs: tuple[str, ...]
    base: PruneSpec = field(default_factory=PruneSpec)
    limit: int | None = 16
    batch_size: int = 8
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    task_norm: str = "token"
    task_seed: int = 0

    def validate(self) -> SweepJob:
        """Check the grid here, before any worker starts (one clear sentence for bad input)."""
        SweepSpec(self.methods, self.sparsities, self.pairs, self.base).validate()
        return self

    def cells(self) -> list[SweepJob]:
        """One job per (pair, method), each with every sparsity: one ranking serves it."""
        return [replace(self, pairs=(pair,), methods=(method,))
                for pair in self.pairs for method in self.methods]

    def extra_eval(self):
        """The zero-shot ``extra_eval`` of ``tasks`` (None without tasks)."""
        if not self.tasks:
            return None
        from mlprune.protocol import get_protocol
        from mlprune.zeroshot import sweep_eval

        return sweep_eval(list(self.tasks), limit=self.task_limit, norm=self.task_norm,
                          batch_size=self.batch_size, seed=self.task_seed,
                          sample=get_protocol(self.base.protocol).task_sample)

    def run(self, loaded: LoadedModel, *, progress: Progress = no_progress,
            should_stop: Callable[[], bool] | None = None) -> list[dict]:
        """``pipeline.sweep`` on ``loaded`` (which must be this job's model)."""
        return pipeline.sweep(loaded, self.corpus, methods=list(self.methods),
                              sparsities=list(self.sparsities), pairs=list(self.pairs),
                              base=self.base, limit=self.limit, batch_size=self.batch_size,
                              progress=progress, should_stop=should_stop,
                              extra_eval=self.extra_eval(), store=self.store)


@dataclass(frozen=True, eq=False)
class Call:
    """Any long call ``fn(loaded, *args, progress=..., should_stop=..., **kwargs)`` as plain
    values, ``fn`` a module-level function (it travels to a worker by its import name), e.g.
    ``Call(source, reproduce.run, (corpus, out, grid))``."""

    model: ModelSource
    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def run(self, loaded: LoadedModel, *, progress: Progress = no_progress,
            should_stop: Callable[[], bool] | None = None):
        """``fn``'s result on ``loaded`` (which must be this call's model)."""
        return self.fn(loaded, *self.args, progress=progress, should_stop=should_stop,
                       **self.kwargs)


# --------------------------------------------------------------------------- in this process


class LocalRunner:
    """In this process: on ``loaded`` when given (the caller's model), else on a model loaded
    from the work's source. Whoever shares ``loaded`` with others holds its lock around this."""

    def __init__(self, loaded: LoadedModel | None = None):
        self.loaded = loaded

    def run(self, work, progress: Progress = no_progress,
            should_stop: Callable[[], bool] | None = None):
        """The work's result (a sweep's rows), measured here."""
        if isinstance(work, SweepJob):
            work.validate()
        loaded = self.loaded or work.model.load(progress)
        return work.run(loaded, progress=progress, should_stop=should_stop)


# --------------------------------------------------------------------------- a worker process


def _portable(error: BaseException) -> BaseException:
    """The error itself when it can travel back to the parent, else a readable stand-in."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable error becomes one sentence
        return MlpruneError(f"The worker failed: {type(error).__name__}: {error}")


def _this_mlprune_first() -> str:
    """PYTHONPATH that makes a child import this very mlprune (a checkout, not an install)."""
    here = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)


def serve(fd: int) -> None:
    """A worker process's whole life (``python -m mlprune.runners FD``): read the work from
    the connection on file descriptor ``fd``, load the model, run the work, send back its
    progress and outcome. If the parent goes away, the next send fails and the worker ends."""
    messages = Connection(fd)

    def progress(stage: str, fraction: float) -> None:
        messages.send(("progress", stage, float(fraction)))

    try:
        work = messages.recv()
        loaded = work.model.load(lambda s, f: progress(f"worker: {s}", f))
        messages.send(("done", work.run(loaded, progress=progress)))
    except (BrokenPipeError, EOFError, ConnectionError):
        pass  # the parent is gone: nobody to tell
    except BaseException as e:  # noqa: BLE001 - everything else goes back to the parent
        if not isinstance(e, MlpruneError):
            traceback.print_exc()  # the details, in the server's log
        messages.send(("error", _portable(e)))


class ProcessRunner:
    """In one worker process started for each piece of work: a fresh interpreter
    (``python -m mlprune.runners``) that loads its own copy of the model from the work's
    source. (Not multiprocessing's spawn: under Streamlit, ``__main__`` is the app script,
    which spawn would run again in the child.) At most ``pool.size`` workers run at once
    (default: the process's :func:`default_pool`); other work waits in line."""

    command: tuple[str, ...] = (sys.executable, "-m", "mlprune.runners")  # + the socket's fd

    def __init__(self, pool: WorkerPool | None = None, orphan_after: float = ORPHAN_S):
        self.pool, self.orphan_after = pool, orphan_after

    def _launch(self) -> tuple[subprocess.Popen, Connection]:
        mine, theirs = socket.socketpair()
        with mine, theirs:
            process = subprocess.Popen(
                [*self.command, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": _this_mlprune_first()})
            return process, Connection(os.dup(mine.fileno()))

    def start(self, work, owner: Callable[[], bool] | None = None) -> Job:
        """Queue the work for a worker and return at once; ``owner`` says whether whoever
        started it is still there (see :class:`Job`)."""
        if isinstance(work, SweepJob):
            work.validate()
        payload = pickle.dumps(work)  # fails here, plainly, for work that cannot travel
        return Job(self._launch, payload, pool=self.pool or default_pool(), owner=owner,
                   orphan_after=self.orphan_after)

    def run(self, work, progress: Progress = no_progress,
            should_stop: Callable[[], bool] | None = None):
        """Start the work in a worker and wait for its result, passing its progress on."""
        job = self.start(work)
        try:
            shown = None
            while not job.wait(0.2):
                if (job.stage, job.fraction) != shown:
                    shown = job.stage, job.fraction
                    progress(*shown)
                if should_stop is not None and should_stop():
                    job.cancel()
        except BaseException:  # Ctrl-C in the parent: the worker goes too
            job.cancel()
            raise
        return job.result()


# --------------------------------------------------------------------------- Ray


_LOADED: dict[ModelSource, LoadedModel] = {}  # a Ray worker's model, kept between its tasks


def _cell_rows(cell: SweepJob) -> tuple[dict, list[dict]]:
    """One cell, measured in a Ray worker: (settings, rows), the rows not committed anywhere."""
    import ray

    source = cell.model
    if source.device is None and ray.get_gpu_ids():
        source = replace(source, device="cuda")
    if source not in _LOADED:
        _LOADED.clear()
        _LOADED[source] = source.load()
    loaded = _LOADED[source]
    rows = replace(cell, store=None).run(loaded)
    settings = pipeline.sweep_settings(loaded, cell.base, cell.limit, cell.extra_eval(),
                                       corpus=cell.corpus)
    return settings, rows


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise MlpruneError("The Ray runner needs Ray: pip install 'mlprune[ray]'.") from e
    return ray


class RayRunner:
    """On Ray: one task per cell (a GPU each where the cluster has GPUs), each returning its
    rows, committed to the job's store as they arrive. Connects to ``address`` (default:
    RAY_ADDRESS, else a local Ray started here) unless Ray is already initialised."""

    def __init__(self, address: str | None = None, **init):
        self.address, self.init = address, init

    def run(self, job: SweepJob, progress: Progress = no_progress,
            should_stop: Callable[[], bool] | None = None) -> list[dict]:
        """The store's rows once every cell is measured (only the cells not measured yet are
        sent)."""
        job.validate()
        if job.store is None:
            raise MlpruneError("The Ray runner needs a results store to commit rows to.")
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address or os.environ.get("RAY_ADDRESS"),
                     include_dashboard=False, **self.init)
        store = ResultStore(job.store)
        done = {(r["pair"], r["method"], float(r["sparsity"])) for r in store.rows()
                if r["pattern"] == "unstructured"}
        cells = []
        for cell in job.cells():
            todo = tuple(s for s in cell.sparsities
                         if (cell.pairs[0], cell.methods[0], float(s)) not in done)
            if todo:
                cells.append(replace(cell, sparsities=todo))
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        # the worker imports this mlprune, and writes its caches where this process does
        env = {"PYTHONPATH": _this_mlprune_first()}
        if os.environ.get(CACHE_ENV):
            env[CACHE_ENV] = os.environ[CACHE_ENV]
        task = ray.remote(_cell_rows).options(num_gpus=gpus, num_cpus=1, max_retries=1,
                                              runtime_env={"env_vars": env})
        pending = {task.remote(cell): cell for cell in cells}
        finished = 0
        progress(f"{len(cells)} cells sent to Ray", 0.0)
        try:
            while pending:
                if should_stop is not None and should_stop():
                    raise Cancelled("Sweep cancelled; finished rows are kept.")
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    cell = pending.pop(ref)
                    settings, rows = ray.get(ref)
                    store.claim(settings)
                    for row in rows:
                        store.add(row)
                    finished += 1
                    progress(f"{cell.pairs[0]} {cell.methods[0]}", finished / len(cells))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        return store.rows()


def get_runner(name: str, loaded: LoadedModel | None = None
               ) -> LocalRunner | ProcessRunner | RayRunner:
    """The runner of this name (``local`` runs on ``loaded`` when given)."""
    if name == "local":
        return LocalRunner(loaded)
    if name == "process":
        return ProcessRunner()
    if name == "ray":
        _import_ray()
        return RayRunner()
    raise MlpruneError(f"Unknown runner '{name}': use {', '.join(RUNNERS)}.")


if __name__ == "__main__":  # a worker process of ProcessRunner
    from mlprune.runners import serve as _serve  # the module's own name, not __main__'s

    _serve(int(sys.argv[1]))
