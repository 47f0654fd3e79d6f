"""Many users on one dashboard: worker processes are capped and queued with a visible
position, a job whose tab is gone is cancelled, a tab waiting for the shared model is told
what holds it, one interactive action is bounded, and a job always ends (an unreadable
message from its worker, or Cancel while something still holds the worker's socket).

Most worker tests use a stand-in worker (a few lines of plain Python speaking the worker's
protocol) so they take milliseconds; the two that prove the receive path use the real
``python -m mlprune.runners``.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from mlprune import MlpruneError, holding, runners, service
from mlprune.capture import Cancelled
from mlprune.pipeline import PruneSpec
from mlprune.prompts import analysis_prompts
from mlprune.runners import Call, ModelSource, ProcessRunner

TESTS = Path(__file__).resolve().parent
ONE_SHOT = PruneSpec(mode="one-shot", samples=2)

# A stand-in worker: reads its work (a flag file's path), says "working", and finishes once
# the flag file exists. A python without torch starts in ~50 ms.
FAKE_WORKER = """
import os, pickle, sys, time
from multiprocessing.connection import Connection
c = Connection(int(sys.argv[-1]))
flag = pickle.loads(c.recv_bytes())
c.send(("progress", "working", 0.5))
while not os.path.exists(flag):
    time.sleep(0.02)
c.send(("done", flag))
"""
BAD_SHAPE_WORKER = """
import sys, time
from multiprocessing.connection import Connection
c = Connection(int(sys.argv[-1]))
c.recv_bytes()
c.send("not a (kind, ...) tuple")
time.sleep(60)
"""


def fake_runner(script: str = FAKE_WORKER, **kw) -> ProcessRunner:
    class Fake(ProcessRunner):
        command = (sys.executable, "-c", script)

    return Fake(**kw)


def until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def gone(pid: int | None) -> bool:
    return pid is not None and not Path(f"/proc/{pid}").exists()


# --------------------------------------------------------------------------- real workers


@dataclass(frozen=True)
class NoModel(ModelSource):
    """A source whose "model" is None: the real worker runs a test function at once."""

    def load(self, progress=None):
        return None


def send_garbage(loaded, *, progress, should_stop):
    """In the worker: one framed message that is not a pickle, then stay alive."""
    os.write(int(sys.argv[-1]), struct.pack("!i", 7) + b"garbage")
    time.sleep(120)


def hold_the_socket(loaded, *, progress, should_stop, pid_file):
    """In the worker: a child that inherits the worker's socket and outlives it."""
    child = subprocess.Popen(["sleep", "120"], pass_fds=(int(sys.argv[-1]),))
    Path(pid_file).write_text(str(child.pid))
    progress("holding on", 0.5)
    time.sleep(120)


@pytest.fixture
def importable_tests(monkeypatch):
    """The worker imports this module (its functions travel by import name)."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))


@pytest.mark.usefixtures("importable_tests")
def test_an_unreadable_message_ends_the_job_with_an_error():
    """Before: the follower thread died on the UnpicklingError; the job said "running"
    forever and its worker lived on."""
    job = ProcessRunner().start(Call(NoModel(), send_garbage))
    try:
        assert job.wait(60), f"still running: {job.stage}"
        with pytest.raises(MlpruneError, match="could not be read"):
            job.result()
        pid = getattr(job, "pid", None)
        assert pid is None or until(lambda: gone(pid), 10)  # the worker was ended too
    finally:
        job.cancel()


@pytest.mark.usefixtures("importable_tests")
def test_cancel_ends_a_job_even_while_something_holds_its_socket(tmp_path):
    """Before: Cancel killed the worker, but its child kept the socket open, so the receive
    never saw an end and the job stayed "running" after Cancel."""
    pid_file = tmp_path / "child.pid"
    job = ProcessRunner().start(Call(NoModel(), hold_the_socket, (),
                                     {"pid_file": str(pid_file)}))
    try:
        assert until(lambda: job.stage == "holding on" or job.done(), 60), job.stage
        assert not job.done(), job.error
        job.cancel()
        assert job.wait(10), "Cancel did not end the job"
        assert isinstance(job.error, Cancelled)
    finally:
        job.cancel()
        if pid_file.is_file():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_message_of_the_wrong_shape_ends_the_job_with_an_error():
    job = fake_runner(BAD_SHAPE_WORKER, pool=runners.WorkerPool(1)).start("x")
    assert job.wait(20), job.stage
    assert isinstance(job.error, MlpruneError) and "could not be read" in str(job.error)
    assert until(lambda: gone(job.pid), 10)


# --------------------------------------------------------------------------- cap and queue


def test_workers_are_capped_and_the_rest_wait_in_line_with_their_position(tmp_path):
    pool = runners.WorkerPool(1)
    runner = fake_runner(pool=pool)
    flags = [tmp_path / f"flag{i}" for i in range(3)]
    jobs = [runner.start(str(f)) for f in flags]
    try:
        assert until(lambda: jobs[0].stage == "working"), jobs[0].stage
        assert until(lambda: jobs[2].stage == "Queued: 2nd in line behind 1 running job")
        assert jobs[1].stage == "Queued: 1st in line behind 1 running job"
        assert jobs[1].queued and jobs[2].queued and not jobs[0].queued
        assert jobs[1].pid is None and jobs[2].pid is None  # no model copy for them yet
        assert (pool.running(), pool.waiting()) == (1, 2)
        jobs[1].cancel()  # leaves the line at once, never having started
        assert jobs[1].wait(5) and isinstance(jobs[1].error, Cancelled)
        assert jobs[1].pid is None
        assert until(lambda: jobs[2].stage == "Queued: 1st in line behind 1 running job")
        flags[0].touch()
        assert jobs[0].result(10) == str(flags[0])
        assert until(lambda: jobs[2].stage == "working")  # the next in line starts
        flags[2].touch()
        assert jobs[2].result(10) == str(flags[2])
        assert (pool.running(), pool.waiting()) == (0, 0)
    finally:
        for j in jobs:
            j.cancel()


def test_the_cap_is_a_setting(monkeypatch):
    monkeypatch.delenv(runners.MAX_WORKERS_ENV, raising=False)
    assert runners.max_workers() == 1  # each worker is a whole model copy
    monkeypatch.setenv(runners.MAX_WORKERS_ENV, "3")
    assert runners.max_workers() == 3
    monkeypatch.setenv(runners.MAX_WORKERS_ENV, "0")
    with pytest.raises(MlpruneError, match="MLPRUNE_MAX_WORKERS"):
        runners.max_workers()


def test_a_job_whose_tab_is_gone_is_cancelled_running_or_queued(tmp_path):
    pool = runners.WorkerPool(1)
    runner = fake_runner(pool=pool, orphan_after=0.3)
    alive = {"a": True, "b": True}
    never = str(tmp_path / "never")
    a = runner.start(never, owner=lambda: alive["a"])
    b = runner.start(never, owner=lambda: alive["b"])
    try:
        assert until(lambda: a.stage == "working"), a.stage
        assert b.queued
        alive["b"] = False  # its tab closed while it waited: it leaves the line
        assert b.wait(10) and isinstance(b.error, Cancelled) and "tab" in str(b.error)
        assert b.pid is None
        time.sleep(0.5)
        assert not a.done()  # its owner is still there
        alive["a"] = False
        assert a.wait(10) and isinstance(a.error, Cancelled) and "tab" in str(a.error)
        assert until(lambda: gone(a.pid), 10)  # its model copy went with it
        assert (pool.running(), pool.waiting()) == (0, 0)
    finally:
        a.cancel()
        b.cancel()


def test_the_owner_check_follows_the_streamlit_session(monkeypatch):
    from streamlit.runtime import Runtime
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from mlprune import ui

        st.session_state["owner"] = ui.session_owner()

    at = AppTest.from_function(page).run()
    owner = at.session_state["owner"]
    assert owner() is True  # no server (a test, a bare run): nobody to lose

    class Server:
        active = True

        def is_active_session(self, session_id: str) -> bool:
            return self.active

    server = Server()
    monkeypatch.setattr(Runtime, "_instance", server)
    assert owner() is True
    server.active = False  # the browser tab closed
    assert owner() is False


# --------------------------------------------------------------------------- the shared model


def test_a_waiting_tab_is_told_what_holds_the_model(loaded, corpus):
    shared = service.Shared()
    inside, release = threading.Event(), threading.Event()

    def calibrating(stage: str, fraction: float) -> None:  # holds the lock until told
        inside.set()
        release.wait(20)

    a = threading.Thread(target=shared.make_ranking, args=(loaded, corpus, ONE_SHOT),
                         kwargs={"progress": calibrating})
    a.start()
    seen: list[str] = []
    try:
        assert inside.wait(30)
        text = holding.waiting_text(loaded)
        assert text and re.fullmatch(r"Waiting: another tab is calibrating wanda-mt "
                                     r"\(started \d+ s ago\)", text), text
        b = threading.Thread(target=shared.dense_generations,
                             args=(loaded, ["French: Bonjour.\nEnglish:"], 4),
                             kwargs={"progress": lambda s, f: seen.append(s)})
        b.start()
        assert until(lambda: any(s.startswith("Waiting: another tab is calibrating wanda-mt")
                                 for s in seen), 10), seen
    finally:
        release.set()
        a.join(60)
    b.join(60)
    assert not b.is_alive() and holding.waiting_text(loaded) is None


def test_one_interactive_action_is_bounded_with_a_clear_message(loaded, corpus):
    shared = service.Shared()
    n = service.MAX_CALIBRATION_PROMPTS + 1
    with pytest.raises(MlpruneError, match=rf"at most {n - 1} calibration prompts.*asked for {n}"):
        shared.make_ranking(loaded, corpus, replace(ONE_SHOT, samples=n))
    n = service.MAX_SCORED_SENTENCES + 1
    with pytest.raises(MlpruneError, match=rf"at most {n - 1} held-out sentences.*asked for {n}"):
        shared.translation_scores(loaded, corpus, "fr-en", None, shots=2, limit=n)
    n = service.MAX_NEW_TOKENS + 1
    with pytest.raises(MlpruneError, match=rf"at most {n - 1} new tokens.*asked for {n}"):
        shared.dense_generations(loaded, ["Hello"], n)
    many = service.MAX_GENERATION_PROMPTS + 1
    with pytest.raises(MlpruneError, match=rf"at most {many - 1} prompts"):
        shared.dense_generations(loaded, [f"p{i}" for i in range(many)], 4)
    per_set = service.MAX_CAPTURE_PROMPTS // 2 + 1
    sets = analysis_prompts(corpus, ["fr-en", "en-fr"], [], shots=1, samples=per_set, seed=0)
    with pytest.raises(MlpruneError, match=r"at most \d+ prompts to capture"):
        shared.capture(loaded, sets)


# --------------------------------------------------------------------------- the pages


@pytest.fixture
def app_env(monkeypatch, tiny_folder, corpus_file):
    monkeypatch.setenv(service.MODEL_ENV, str(tiny_folder))
    monkeypatch.setenv(service.CORPUS_ENV, str(corpus_file))
    return tiny_folder


@pytest.fixture
def busy_worker(tmp_path):
    """The process's worker slot taken by another session's job until the test ends."""
    flag = tmp_path / "release"
    job = fake_runner().start(str(flag))
    assert until(lambda: job.stage == "working"), job.stage
    yield job
    flag.touch()
    job.cancel()


def progress_texts(at) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


@pytest.mark.usefixtures("app_env", "busy_worker")
def test_the_sweep_page_shows_its_place_in_line_and_cancel_leaves_it():
    from test_dashboard import click, goto, new_app, run

    at = goto(run(new_app()), "4_Sweep")
    at.multiselect(key="w.sw_methods").set_value(["magnitude"])
    at.multiselect(key="w.sw_sparsities").set_value([0.0])
    run(at)
    click(at, "Run 1 cells")
    job = at.session_state["sweep_job"].job
    assert job.queued and job.pid is None
    assert any("Queued: 1st in line behind 1 running job" in t for t in progress_texts(at)), \
        progress_texts(at)
    click(at, "Cancel")
    assert job.wait(5) and isinstance(job.error, Cancelled) and job.pid is None


@pytest.mark.usefixtures("app_env", "busy_worker")
def test_the_paper_page_shows_its_place_in_line(tmp_path, monkeypatch):
    from test_dashboard import click, goto, new_app, run

    from mlprune import reproduce

    monkeypatch.setenv(reproduce.REPORT_ENV, str(tmp_path / "none"))
    at = goto(run(new_app()), "5_Paper")
    click(at, "Start the quick grid")
    job = at.session_state["paper_job"]
    assert job.queued
    assert any("Queued: 1st in line behind 1 running job" in t for t in progress_texts(at)), \
        progress_texts(at)
    click(at, "Cancel")
    assert job.wait(5) and isinstance(job.error, Cancelled) and job.pid is None
