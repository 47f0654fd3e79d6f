"""The dashboard in headless Chromium on the embedded model: features -> prune -> compare.

Starts ``streamlit run app.py`` on a free loopback port, drives Debian's /usr/bin/chromium
with Playwright, checks the side-by-side outputs are on the page, measures how long a move
of the sparsity slider takes to show the first token of the new pruned output (it streams)
and the whole of it, checks that a second tab's Compare answers while the first tab's sweep
runs (in its worker process), and saves a screenshot of every page to artifacts/screenshots/
(MLPRUNE_SCREENSHOTS moves it; MLPRUNE_ASSETS=1 also copies them to assets/ for the README).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.real]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(os.environ.get("MLPRUNE_SCREENSHOTS", ROOT / "artifacts" / "screenshots"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
LOAD_S = 300  # the first start converts the embedded GGUF (~2 min on 2 cores)
WORK_S = 240  # a capture, a ranking or a small sweep on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def builtin_corpus_present() -> bool:
    return (ROOT / "mlprune" / "data" / "parallel.tsv").is_file()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``streamlit run app.py`` on a free loopback port, the embedded model by default."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MLPRUNE_MODEL", None)  # the embedded default, as a user gets it
    # A cache of its own, sharing only the converted model: sweeps are found again by model,
    # corpus and settings, so an earlier run's finished sweep would end this one at once.
    from mlprune import cache_dir

    cache = tmp_path_factory.mktemp("server-cache")
    if (cache_dir() / "gguf").is_dir():
        (cache / "gguf").symlink_to(cache_dir() / "gguf", target_is_directory=True)
    env["MLPRUNE_CACHE"] = str(cache)
    if not builtin_corpus_present():  # an install without the corpus file: use the tests'
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import EN, FR

        path = tmp_path_factory.mktemp("corpus") / "enfr.tsv"
        path.write_text("en\tfr\n" + "".join(f"{e}\t{f}\n" for e, f in zip(EN, FR)), "utf-8")
        env["MLPRUNE_CORPUS"] = str(path)
    log = (tmp_path_factory.mktemp("server") / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"streamlit did not start; see {log.name}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def page(server):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        tab = browser.new_page(viewport={"width": 1440, "height": 1000})
        tab.set_default_timeout(WORK_S * 1000)
        tab.goto(server)
        yield tab
        browser.close()


def shoot(page, name: str) -> Path:
    """Screenshot of the whole page. Streamlit scrolls inside its main section, not the
    document, so the window is made as tall as that section's content for the picture."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(1500)  # figures reach their final height
    size = page.viewport_size
    height = page.evaluate("""() => {
        const main = document.querySelector('[data-testid="stMain"]');
        return main ? main.scrollHeight : document.body.scrollHeight; }""")
    page.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]),
                                                                   6000)})
    page.wait_for_timeout(1200)  # plotly redraws at the new size
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    page.set_viewport_size(size)
    print(f"screenshot: {path}")
    return path


def go(page, title: str) -> None:
    """Follow the sidebar link to a page (a new URL would start a new session)."""
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()


class Clock:
    """Prints how long each step took, so a slow CI run shows where the time went."""

    def __init__(self):
        self.last = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        print(f"{step}: {now - self.last:.1f} s")
        self.last = now

    def skip(self) -> None:
        """Leave out what follows (screenshots) from the next step's time."""
        self.last = time.perf_counter()


def compare_in_a_new_tab(page, server: str, text: str, running=None) -> float:
    """In a second tab, Compare continues a free text no one asked for before (so nothing is
    cached: the shared model must generate it); the seconds from sending the text to the new
    dense output. With ``running``, the first tab's sweep must still run when it answers."""
    from playwright.sync_api import expect

    second = page.context.browser.new_page()  # a new tab is a new Streamlit session
    second.set_default_timeout(WORK_S * 1000)
    try:
        second.goto(server)
        second.get_by_text("Hidden size").wait_for(timeout=LOAD_S * 1000)
        go(second, "Compare")
        dense = second.locator('.mlp-out[data-kind="dense"]').first
        dense.wait_for()
        second.get_by_text("Free text", exact=True).click()
        box = second.get_by_label("Free text (the model continues it to the end of the line)")
        box.fill(text)
        # the switch to free text reruns the page: its output settles before the clock starts
        before, seen = None, dense.inner_text()
        while before != seen:
            before = seen
            second.wait_for_timeout(1000)
            seen = dense.inner_text()
        start = time.perf_counter()
        box.press("Control+Enter")  # a text area sends its value on Ctrl+Enter
        expect(dense).not_to_have_text(before, timeout=WORK_S * 1000)
        seconds = time.perf_counter() - start
        assert dense.inner_text().strip()
        if running is not None:
            assert running.count() > 0, "the sweep ended before the second tab's Compare answered"
        return seconds
    finally:
        second.close()


def test_features_prune_compare_on_the_embedded_model(page, server):
    clock = Clock()
    # Home: the embedded model loads (converted once, then cached) and shows its facts.
    page.get_by_text("Hidden size").wait_for(timeout=LOAD_S * 1000)
    page.get_by_text("de-quantized from 4-bit").first.wait_for()
    clock("home (model loaded)")
    shoot(page, "home")
    clock.skip()

    # Features: one capture, then the figures and the detected set.
    go(page, "Features")
    page.get_by_role("button", name="Run capture").click()
    page.get_by_text("Detected dimensions", exact=True).wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    clock("features (capture)")
    shoot(page, "features")
    clock.skip()

    # Prune: rank once, then the slider re-prunes and the live preview follows.
    go(page, "Prune")
    page.get_by_role("button", name="Calibrate and rank").click()
    page.locator('.mlp-out[data-kind="pruned"]').wait_for()
    page.get_by_text("Pruned · unstructured · 50%").wait_for()
    clock("prune (calibrate, rank, first pruned output)")
    shoot(page, "prune")
    clock.skip()
    slider = page.locator('[data-testid="stSlider"]', has_text="Sparsity").get_by_role("slider")
    first_token, latencies = [], []
    for target in (55, 60, 65, 70):
        # the pruned box of these masks: it streams (data-state="streaming") then is done
        box = f'.mlp-out[data-kind="pruned"][data-label="unstructured {target}%"]'
        slider.focus()
        start = time.perf_counter()
        page.keyboard.press("ArrowRight")
        page.locator(f'{box}:is([data-state="done"], :has(.mlp-tok))').first.wait_for()
        first_token.append(time.perf_counter() - start)
        streaming = page.locator(f'{box}[data-state="streaming"]')
        if target == 55 and streaming.count():  # the answer caught while it streams in
            from playwright.sync_api import Error as PlaywrightError

            try:
                page.locator('[data-testid="stHorizontalBlock"]', has=streaming).last.screenshot(
                    path=SHOTS / "prune_streaming.png", timeout=3000)
                print("screenshot of the pruned answer streaming: prune_streaming.png")
            except PlaywrightError:  # it finished first: nothing to show, nothing wrong
                print("the pruned answer finished before its streaming frame was captured")
        page.locator(f'{box}[data-state="done"]').wait_for()
        latencies.append(time.perf_counter() - start)
    clock("four slider moves")
    print(f"slider -> first pruned token visible, seconds: {[round(x, 2) for x in first_token]} "
          f"(median {statistics.median(first_token):.2f}; target < 1.0, not asserted)")
    print(f"slider -> full pruned answer, seconds: {[round(x, 2) for x in latencies]} "
          f"(median {statistics.median(latencies):.2f})")
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "slider_latency.json").write_text(json.dumps({"seconds": latencies,
                                                           "first_token_seconds": first_token}))
    assert max(latencies) < 60  # a hang, not a speed limit: the numbers are reported above

    # Compare: dense and pruned side by side for a held-out sentence.
    go(page, "Compare")
    dense = page.locator('.mlp-out[data-kind="dense"]')
    pruned = page.locator('.mlp-out[data-kind="pruned"]')
    dense.wait_for()
    pruned.wait_for()
    page.get_by_text("Output language").first.wait_for()
    assert dense.inner_text().strip() and pruned.inner_text().strip()
    clock("compare")
    shoot(page, "compare")
    clock.skip()

    # Sweep: the page and a small grid (results of the runs above are reused where cached).
    go(page, "Sweep")
    cells = page.get_by_label("Held-out sentences per cell")
    # a small grid, 2 methods x 3 sparsities x 16 sentences: long enough that a second tab's
    # answer comes while it runs, even on a fast quiet machine (with 4 sentences it ended first)
    cells.fill("16")
    cells.press("Enter")
    page.wait_for_timeout(1500)
    page.get_by_role("button", name="Run").first.click()
    running = page.get_by_text("Sweeping in a worker process")
    running.first.wait_for()
    clock("sweep started")

    # Issue 14: the sweep runs in a worker process with its own model, so the shared model is
    # free: a second tab (another session) gets a new dense output while the sweep runs.
    busy = compare_in_a_new_tab(page, server, "English: Another tab is sweeping right now.\n"
                                "French:", running)
    clock("a second tab's Compare, during the sweep")

    # generous: a hang, not a speed limit (a loaded 2-core machine needs 8+ min for 6 cells)
    running.first.wait_for(state="detached", timeout=4 * WORK_S * 1000)
    page.locator(".js-plotly-plot").first.wait_for()
    clock("sweep (6 cells)")
    shoot(page, "sweep")
    clock.skip()
    idle = compare_in_a_new_tab(page, server, "English: Nobody is sweeping any more.\nFrench:")
    print(f"a second tab's new Compare answer: {busy:.1f} s during the sweep, {idle:.1f} s "
          f"idle ({busy / idle:.1f}x slower while the worker shares the 2 cores)")
    (SHOTS / "second_tab.json").write_text(json.dumps({"during_sweep_s": busy, "idle_s": idle}))

    if os.environ.get("MLPRUNE_ASSETS") == "1":
        for name in ("home", "features", "prune", "compare", "sweep"):
            shutil.copy(SHOTS / f"{name}.png", ROOT / "assets" / f"{name}.png")
