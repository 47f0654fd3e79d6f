"""Where long work runs: in this process, in a worker process with its own model, or on Ray.

Long work (a sweep, a reproduce run) is described by plain values, so that another process
can run it from scratch: where the model comes from (:class:`ModelSource`), the corpus, the
settings, and where results go. Three runners take such work:

- :class:`LocalRunner` runs it here, on the caller's model (the command line's default);
- :class:`ProcessRunner` runs it in one worker process started for it (a fresh interpreter
  that loads its own copy of the model from the same source), so the caller's
  model, and the lock that guards it, stay free: the dashboard's live pages keep answering
  while a sweep runs. Progress streams back; cancelling kills the worker, which loses only
  the cell it had not finished (every finished row is already committed to the store);
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
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path

from mlprune import CACHE_ENV, MlpruneError, Progress, no_progress, pipeline
from mlprune.capture import Cancelled
from mlprune.corpus import ParallelCorpus
from mlprune.models import LoadedModel, load_model
from mlprune.pipeline import SWEEP_METHODS, PruneSpec
from mlprune.prompts import parse_pair
from mlprune.prune import check_sparsity
from mlprune.store import ResultStore

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
        if not self.methods or not self.sparsities or not self.pairs:
            raise MlpruneError("Pick at least one method, one sparsity and one direction.")
        unknown = [m for m in self.methods if m not in SWEEP_METHODS]
        if unknown:
            raise MlpruneError(f"Unknown sweep method {', '.join(unknown)}: use "
                               f"{', '.join(SWEEP_METHODS)}.")
        for s in self.sparsities:
            check_sparsity(s)
        for pair in self.pairs:
            parse_pair(pair)
        self.base.validate()
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


MAX_WORKERS_ENV = "MLPRUNE_MAX_WORKERS"  # how many worker processes may run at once
# A job whose owner (a browser tab's session) has been gone this long is cancelled: Streamlit
# keeps a disconnected session 2 minutes for a reconnect, so a job is ended exactly when its
# tab can no longer come back for it.
ORPHAN_S = 120.0
POLL_S = 0.5  # how often a job's thread looks at Cancel, its owner and its place in line


def max_workers() -> int:
    """The cap on concurrent worker processes: MLPRUNE_MAX_WORKERS, default 1 (each worker
    holds a whole copy of the model, and on a machine of a few cores two run no faster)."""
    raw = os.environ.get(MAX_WORKERS_ENV, "").strip()
    if not raw:
        return 1
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise MlpruneError(f"{MAX_WORKERS_ENV} must be a whole number of at least 1, "
                           f"not '{raw}'.")
    return n


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class WorkerPool:
    """At most ``size`` worker processes at once; the other jobs wait in line, first come
    first served, each told its place (its ``stage``)."""

    def __init__(self, size: int | None = None):
        self.size = max_workers() if size is None else size
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._running: list[Job] = []

    def running(self) -> int:
        """How many of its jobs have a worker now."""
        with self._cond:
            return len(self._running)

    def waiting(self) -> int:
        """How many of its jobs wait in line."""
        with self._cond:
            return len(self._waiting)

    def _tell_places(self) -> None:  # under the lock
        n = len(self._running)
        for i, job in enumerate(self._waiting):
            job.stage = (f"Queued: {_ordinal(i + 1)} in line behind {n} running "
                         f"job{'' if n == 1 else 's'}")

    def enter(self, job: Job, give_up: Callable[[], bool]) -> bool:
        """Wait in line until ``job`` may start a worker (True), or until ``give_up()``
        (False: it leaves the line)."""
        with self._cond:
            self._waiting.append(job)
            self._tell_places()
            try:
                while self._waiting[0] is not job or len(self._running) >= self.size:
                    if give_up():
                        return False
                    self._cond.wait(POLL_S)
                self._running.append(job)
                return True
            finally:
                self._waiting.remove(job)
                self._tell_places()
                self._cond.notify_all()

    def leave(self, job: Job) -> None:
        """``job``'s worker has ended: the next in line may start."""
        with self._cond:
            if job in self._running:
                self._running.remove(job)
            self._tell_places()
            self._cond.notify_all()

    def wake(self) -> None:
        """Let the jobs in line look at their state now (a Cancel)."""
        with self._cond:
            self._cond.notify_all()


_DEFAULT_POOL: WorkerPool | None = None
_DEFAULT_POOL_LOCK = threading.Lock()


def default_pool() -> WorkerPool:
    """The process's pool (every session of a dashboard shares it), made on first use with
    :func:`max_workers` places."""
    global _DEFAULT_POOL
    with _DEFAULT_POOL_LOCK:
        if _DEFAULT_POOL is None:
            _DEFAULT_POOL = WorkerPool()
        return _DEFAULT_POOL


_QUIET = object()  # no message within POLL_S


class Job:
    """Work for a worker process: its place in line, then its latest progress, its outcome,
    and a way to stop it. A thread waits for a free place in ``pool``, starts the worker
    (``launch``), hands the work over and follows its messages, so reading a job never
    blocks. Whatever happens (an unreadable message, a worker that dies, Cancel while some
    child of the worker still holds its socket, the owner gone), the job ends.

    ``owner`` says whether whoever started it is still there (a browser tab's session); once
    it has said no for ``orphan_after`` seconds, the job is cancelled, queued or running."""

    def __init__(self, launch: Callable[[], tuple[subprocess.Popen, Connection]], work: bytes,
                 *, pool: WorkerPool | None = None, owner: Callable[[], bool] | None = None,
                 orphan_after: float = ORPHAN_S):
        self.stage, self.fraction = "Waiting for a worker", 0.0
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.cancelled = False
        self.reason = "Cancelled"  # why it was cancelled, the start of its message
        self._launch, self._pool, self._owner = launch, pool, owner
        self._orphan_after, self._gone_since = orphan_after, None
        self._process: subprocess.Popen | None = None
        self._messages: Connection | None = None
        self._io = threading.Lock()  # the connection is closed, or shut down, by one side
        self._queued = True
        self._value, self._error = None, None
        self._done = threading.Event()
        threading.Thread(target=self._follow, args=(work,), daemon=True,
                         name="mlprune-job").start()

    @property
    def queued(self) -> bool:
        """Whether it still waits for a free worker place."""
        return self._queued and not self.done()

    @property
    def pid(self) -> int | None:
        """Its worker's process id (None before a worker started)."""
        return self._process.pid if self._process is not None else None

    def _orphaned(self) -> bool:
        """Whether its owner has been gone for ``orphan_after`` seconds (then: cancelled)."""
        if self._owner is None:
            return False
        try:
            here = bool(self._owner())
        except Exception:  # noqa: BLE001 - a failing check must not end someone's job
            here = True
        now = time.monotonic()
        if here:
            self._gone_since = None
        elif self._gone_since is None:
            self._gone_since = now
        elif now - self._gone_since >= self._orphan_after:
            self.cancel(reason="Cancelled: the browser tab that started it was closed")
            return True
        return False

    def _give_up(self) -> bool:
        return self.cancelled or self._orphaned()

    def _next(self):
        """The worker's next message; ``_QUIET`` when none came within POLL_S; None once it
        is gone (exited, killed, or its socket shut down by Cancel). A message that cannot be
        read (any receive error, or not a known message) raises MlpruneError: the job ends."""
        try:
            if not self._messages.poll(POLL_S):
                return _QUIET
            message = self._messages.recv()
        except (EOFError, OSError):
            return None
        except Exception as e:  # noqa: BLE001 - unpicklable, truncated, corrupted: all end it
            raise MlpruneError(f"The worker sent a message that could not be read "
                               f"({type(e).__name__}: {e}); the job was stopped. Finished "
                               "results are kept and a new run resumes where it "
                               "stopped.") from e
        kind = message[0] if isinstance(message, tuple) and message else None
        if (kind == "progress" and len(message) == 3) or (kind in ("done", "error")
                                                          and len(message) == 2):
            return message
        raise MlpruneError(f"The worker sent a message that could not be read ({message!r:.80});"
                           " the job was stopped. Finished results are kept and a new run "
                           "resumes where it stopped.")

    def _stopped(self) -> MlpruneError:
        if self.cancelled:
            return Cancelled(f"{self.reason}; finished results are kept and a new run resumes "
                             "where it stopped.")
        try:
            code = self._process.wait(timeout=5) if self._process is not None else None
        except subprocess.TimeoutExpired:
            code = None
        return MlpruneError(f"The worker process stopped (exit code {code}) before it "
                            "finished; finished results are kept and a new run resumes "
                            "where it stopped.")

    def _follow(self, work: bytes) -> None:
        clean = False  # the worker said its last word: let it exit by itself
        try:
            if self._pool is not None and not self._pool.enter(self, self._give_up):
                self._error = self._stopped()
                return
            self._queued = False
            self.stage, self.started = "Starting a worker process", time.perf_counter()
            with self._io:
                if self.cancelled:  # Cancel came between the queue and the start
                    self._error = self._stopped()
                    return
                self._process, self._messages = self._launch()
            try:
                self._messages.send_bytes(work)  # here: the worker reads it later
            except OSError:
                pass  # it died before reading: told below
            while True:
                self._orphaned()  # when gone: cancelled, and the loop ends on the socket's end
                message = self._next()
                if message is _QUIET:
                    continue
                if message is None:
                    self._error = self._stopped()
                    break
                kind, *payload = message
                if kind == "progress":
                    self.stage, self.fraction = payload
                    continue
                clean = True
                if kind == "done":
                    self._value = payload[0]
                else:
                    self._error = payload[0]
                break
        except BaseException as e:  # noqa: BLE001 - a job always ends, with what ended it
            self._error = e if isinstance(e, MlpruneError) else MlpruneError(
                f"The job failed: {type(e).__name__}: {e}")
        finally:
            self._end(clean)

    def _end(self, clean: bool) -> None:
        with self._io:
            if self._messages is not None:
                self._messages.close()
        if self._process is not None:
            try:
                self._process.wait(timeout=30 if clean else 0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._pool is not None:
            self._pool.leave(self)
        self.ended = time.perf_counter()
        self._done.set()

    @property
    def seconds(self) -> float:
        """How long it has run (or ran; while queued, how long it has waited)."""
        return (self.ended or time.perf_counter()) - self.started

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until it ends; whether it has."""
        return self._done.wait(timeout)

    @property
    def error(self) -> BaseException | None:
        """What stopped it (None while running or after success)."""
        return self._error if self.done() else None

    def result(self, timeout: float | None = None):
        """Its result, waiting for it; raises what stopped it."""
        if not self._done.wait(timeout):
            raise TimeoutError("The job is still running.")
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self, reason: str = "Cancelled") -> None:
        """Stop it now: a queued job leaves the line; a running worker is killed (its own
        model copy goes with it, and every row it finished is already committed) and its
        socket shut down, so the job ends as cancelled even if a child of the worker still
        holds that socket open."""
        if self.done():
            return
        if not self.cancelled:
            self.cancelled, self.reason = True, reason
        if self._pool is not None:
            self._pool.wake()
        with self._io:
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
            if self._messages is not None and not self._messages.closed:
                try:  # wakes a receive blocked mid-message: it reads an end
                    with socket.socket(fileno=os.dup(self._messages.fileno())) as end:
                        end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


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


def get_runner(name: str, loaded: LoadedModel | None = None):
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
