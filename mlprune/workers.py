"""Worker processes: how many may run at once, and a handle on each piece of work given to one.

:class:`WorkerPool` caps the worker processes of this server (each holds a whole copy of the
model) and keeps the rest of the work in line, first come first served, each job told its
place. :class:`Job` follows one piece of work from its place in line to its worker's last
message, and always ends: an unreadable message, a worker that dies, Cancel, or its owner (a
browser tab) gone for good. How a worker is started and what it runs is
:mod:`mlprune.runners`' (:class:`~mlprune.runners.ProcessRunner`); this module only needs a
function that starts one and returns it with its connection.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from mlprune import MlpruneError
from mlprune.capture import Cancelled

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
        """Whether it has ended (finished, failed or cancelled)."""
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
