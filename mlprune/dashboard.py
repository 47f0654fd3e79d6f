"""Glue between the Streamlit pages and the library: shared models and caches, session state,
the model lock, error messages and progress.

What is shared and what is not:

- One :class:`Shared` object per process (``st.cache_resource``) holds the loaded models and
  caches of things that do not depend on any session's pruning: activation statistics,
  rankings, dense generations. They are read-only once made.
- A session's masks live in that session's ``st.session_state`` only. They touch the shared
  model's weights only inside ``prune.pruned(model, masks)``, which holds the model's lock and
  restores the dense weights before releasing it. Every other use of the model (dense
  generation, capture, ranking, export) also holds that lock (:func:`dense`), so no session
  ever computes on weights another session has masked.

Everything here except the ``st.*`` helpers can be called without a browser.
"""

from __future__ import annotations

import difflib
import hashlib
import html
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import streamlit as st

from mlprune import MlpruneError, Progress, no_progress, pipeline
from mlprune.capture import ActivationStats, Cancelled, token_magnitudes
from mlprune.corpus import ParallelCorpus, builtin_corpus, read_corpus
from mlprune.evaluate import Generation, generate
from mlprune.models import DEFAULT_MODEL, LoadedModel, load_model
from mlprune.pipeline import PruneSpec
from mlprune.prompts import PromptSet, parse_pair
from mlprune.prune import MaskSet, Ranking, pruned

log = logging.getLogger("mlprune.dashboard")

MODEL_ENV = "MLPRUNE_MODEL"  # default model spec (tests point it at a tiny folder)
CORPUS_ENV = "MLPRUNE_CORPUS"  # default corpus file instead of the built-in one
WIDGET = "w."  # prefix of widget keys whose values survive page switches
PREVIEW_TOKENS = 32  # the Prune preview's and Compare's default cap: one shared cache entry
CAPTURE_BATCH = 4  # small batches: a smoother progress bar, about the same speed on CPU

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

    def __call__(self, loaded: LoadedModel, method: str, sparsity: float) -> dict:
        if self._eval is None:
            from mlprune.zeroshot import sweep_eval

            self._eval = sweep_eval([self.task], limit=ZERO_SHOT_ITEMS, batch_size=CAPTURE_BATCH)
        return self._eval(loaded, method, sparsity)


for _task in ("nli", "sentiment"):
    SWEEP_EXTRA_EVALS[f"zero-shot {_task}"] = _ZeroShot(_task)


# --------------------------------------------------------------------------- process-wide


class LoadJob:
    """A model load in a background thread, so a page rerun never interrupts it half-way
    (the first conversion of the embedded model takes ~2 min on 2 cores)."""

    def __init__(self, spec: str, loader: Callable[..., LoadedModel] = load_model):
        self.spec = spec
        self.fraction, self.message = 0.0, "Starting"
        self.result: LoadedModel | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started = time.perf_counter()
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(loader,), daemon=True,
                                        name=f"mlprune-load-{spec}")
        self._thread.start()

    def _progress(self, fraction: float, message: str) -> None:
        self.fraction, self.message = max(0.0, min(1.0, float(fraction))), message

    def _run(self, loader) -> None:
        try:
            self.result = loader(self.spec, progress=self._progress)
        except BaseException as e:  # handed to the page, which shows it as a message
            self.error = e
        finally:
            self.seconds = time.perf_counter() - self.started
            self.done.set()


class _Lru(OrderedDict):
    """A small least-recently-used map (callers hold Shared's lock)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_fresh(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class Shared:
    """What every session of this process shares: models and caches that no pruning changes."""

    def __init__(self, max_models: int = 2):
        self.lock = threading.Lock()
        self.max_models = max_models
        self.jobs: OrderedDict[str, LoadJob] = OrderedDict()
        self.stats = _Lru(64)  # (model, prompts) -> ActivationStats, ~1 MB each
        self.rankings = _Lru(3)  # (model, corpus, spec minus sparsity) -> Ranked, ~200 MB each
        self.dense = _Lru(512)  # (model, prompt, max_new_tokens) -> Generation
        self.tokens = _Lru(8)  # (model, text) -> (tokens, |h|)

    def load_job(self, spec: str) -> LoadJob:
        """The load of this spec: finished, running, or started now. One per spec."""
        with self.lock:
            job = self.jobs.get(spec)
            if job is not None and job.done.is_set() and job.error is not None:
                job = None  # a failed load is tried again when asked again
            if job is None:
                job = self.jobs[spec] = LoadJob(spec)
            self.jobs.move_to_end(spec)
            loaded_specs = [s for s, j in self.jobs.items() if j.done.is_set() and j.result]
            for old in loaded_specs[: max(0, len(loaded_specs) - self.max_models)]:
                # Sessions still holding the old model keep it alive until they move on.
                del self.jobs[old]
            return job

    def model(self, spec: str) -> LoadedModel | None:
        """The loaded model of this spec, if it is loaded (never starts a load)."""
        job = self.jobs.get(spec)
        return job.result if job is not None and job.done.is_set() else None

    def cached(self, table: str, key):
        with self.lock:
            return getattr(self, table).get_fresh(key)

    def store(self, table: str, key, value) -> None:
        with self.lock:
            getattr(self, table).put(key, value)

    def clear(self) -> None:
        """Forget every cache and model (tests; a user never needs it)."""
        with self.lock:
            self.jobs.clear()
            for table in (self.stats, self.rankings, self.dense, self.tokens):
                table.clear()


@st.cache_resource(show_spinner=False)
def shared() -> Shared:
    """The process's one :class:`Shared` (created on first use)."""
    return Shared()


def model_key(loaded: LoadedModel) -> str:
    """Identifies one loaded model object (a reload is a new key, so caches never go stale)."""
    return f"{loaded.name}@{id(loaded.model):x}"


def corpus_key(corpus: ParallelCorpus) -> str:
    """Name and content hash of a corpus (computed once per corpus object)."""
    key = corpus.__dict__.get("_mlprune_key")
    if key is None:
        digest = hashlib.sha256(corpus.table.to_csv(index=False).encode()).hexdigest()[:16]
        key = corpus.__dict__["_mlprune_key"] = f"{corpus.name}:{digest}"
    return key


# --------------------------------------------------------------------------- the lock


@contextmanager
def dense(loaded: LoadedModel) -> Iterator:
    """The shared model with its dense weights, for as long as the block runs (holds its lock)."""
    with pruned(loaded.model, None) as model:
        yield model


@contextmanager
def masked(loaded: LoadedModel, masks: MaskSet | None) -> Iterator:
    """The shared model with a session's masks applied, restored dense when the block ends."""
    with pruned(loaded.model, masks) as model:
        yield model


# --------------------------------------------------------------------------- library calls


def stats_for(loaded: LoadedModel, prompts: PromptSet,
              progress: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> ActivationStats:
    """Activation statistics of a prompt set, cached per (model, prompts) in memory and on disk."""
    key = (model_key(loaded), prompts.name, hashlib.sha256("\x00".join(prompts.texts).encode())
           .hexdigest())
    stats = shared().cached("stats", key)
    if stats is None:
        with dense(loaded):
            stats = pipeline.cached_capture(loaded, prompts, batch_size=CAPTURE_BATCH,
                                            progress=progress, should_stop=should_stop)
        shared().store("stats", key, stats)
    return stats


def tokens_for(loaded: LoadedModel, text: str):
    """``capture.token_magnitudes`` of one text, cached per (model, text)."""
    key = (model_key(loaded), text)
    out = shared().cached("tokens", key)
    if out is None:
        with dense(loaded):
            out = token_magnitudes(loaded.model, loaded.tokenizer, text)
        shared().store("tokens", key, out)
    return out


@dataclass
class Ranked:
    """A ranking and what it was made from; masks at any sparsity come from it in milliseconds."""

    ranking: Ranking
    calibration: pipeline.Calibration | None
    spec: PruneSpec
    seconds: float

    def masks(self, sparsity: float, pattern: str) -> MaskSet:
        """Masks at this sparsity and pattern, their meta carrying the full spec."""
        masks = self.ranking.masks(sparsity, pattern)
        masks.meta["spec"] = asdict(replace(self.spec, sparsity=float(sparsity), pattern=pattern))
        return masks

    @property
    def approximate_at(self) -> str | None:
        """Sequential statistics are exact only at the sparsity they were taken with."""
        if self.spec.mode != "sequential" or not self.spec.uses_activations:
            return None
        return f"{self.spec.sparsity:.0%} {self.spec.pattern}"


def ranking_key(loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec) -> tuple:
    """What a ranking depends on: the model, the corpus and the spec except sparsity/pattern."""
    rest = asdict(replace(spec, sparsity=0.0, pattern="unstructured"))
    return (model_key(loaded), corpus_key(corpus), tuple(sorted(rest.items())))


def cached_ranking(loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec) -> Ranked | None:
    """The ranking of this spec if some session already made it."""
    return shared().cached("rankings", ranking_key(loaded, corpus, spec))


def make_ranking(loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec,
                 progress: Progress = no_progress) -> Ranked:
    """Calibrate (one pass over the calibration prompts, or a cached one) and rank, once."""
    spec.validate()
    start = time.perf_counter()
    with dense(loaded):  # scores read the weights: they must be the dense ones
        calib = (pipeline.calibrate(loaded, corpus, spec, batch_size=CAPTURE_BATCH,
                                    progress=progress)
                 if spec.needs_calibration else None)
        ranking = pipeline.rank(loaded, spec, calib, batch_size=CAPTURE_BATCH, progress=progress)
    ranked = Ranked(ranking, calib, spec, time.perf_counter() - start)
    shared().store("rankings", ranking_key(loaded, corpus, spec), ranked)
    return ranked


def dense_generations(loaded: LoadedModel, prompts: list[str], max_new_tokens: int = 48,
                      progress: Callable[[int, int], None] | None = None) -> list[Generation]:
    """Greedy dense continuations, cached for every session (they never depend on masks)."""
    keys = [(model_key(loaded), p, max_new_tokens) for p in prompts]
    found = {k: shared().cached("dense", k) for k in keys}
    missing = [k[1] for k in keys if found[k] is None]
    if missing:
        with dense(loaded):
            fresh = generate(loaded.model, loaded.tokenizer, missing,
                             max_new_tokens=max_new_tokens, progress=progress)
        for prompt, gen in zip(missing, fresh):
            key = (model_key(loaded), prompt, max_new_tokens)
            shared().store("dense", key, gen)
            found[key] = gen
    return [found[k] for k in keys]


def pruned_generations(loaded: LoadedModel, masks: MaskSet, prompts: list[str],
                       max_new_tokens: int = 48,
                       progress: Callable[[int, int], None] | None = None) -> list[Generation]:
    """Greedy continuations with a session's masks applied only while generating."""
    with masked(loaded, masks):
        return generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                        progress=progress)


def run_sweep(loaded: LoadedModel, corpus: ParallelCorpus, *, methods: list[str],
              sparsities: list[float], pairs: list[str], base: PruneSpec, limit: int,
              out_csv: Path, progress: Progress = no_progress,
              should_stop: Callable[[], bool] | None = None,
              extra_eval: Callable[[LoadedModel, str, float], dict] | None = None) -> pd.DataFrame:
    """``pipeline.sweep`` under the model's lock (it prunes the shared model cell by cell)."""
    if not methods or not sparsities or not pairs:
        raise MlpruneError("Pick at least one method, one sparsity and one direction.")
    with dense(loaded):
        rows = pipeline.sweep(loaded, corpus, methods=methods, sparsities=sparsities, pairs=pairs,
                              base=base, limit=limit, out_csv=out_csv, batch_size=CAPTURE_BATCH,
                              progress=progress, should_stop=should_stop, extra_eval=extra_eval)
    return sweep_table(rows, methods, sparsities, pairs)


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


def read_sweep_csv(path: Path) -> list[dict]:
    """Rows already measured in a sweep CSV (empty when there is none)."""
    return pipeline._read_rows(path)


# --------------------------------------------------------------------------- text helpers


def pair_label(pair: str) -> str:
    """'fr-en' -> 'fr→en'."""
    src, tgt = parse_pair(pair)
    return f"{src}→{tgt}"


def all_pairs(languages: list[str]) -> list[str]:
    """Every ordered pair of distinct languages, English targets first."""
    pairs = [f"{a}-{b}" for a in languages for b in languages if a != b]
    return sorted(pairs, key=lambda p: (p.split("-")[1] != "en", p.split("-")[0] != "en", p))


def default_pairs(languages: list[str], wanted=("fr-en", "en-fr", "zh-en")) -> list[str]:
    """The usual directions where the corpus has them, else the first available."""
    chosen = [p for p in wanted if set(p.split("-")) <= set(languages)]
    return chosen or all_pairs(languages)[:1]


def diff_flags(a: list[str], b: list[str]) -> tuple[list[bool], list[bool]]:
    """For two token lists, which tokens of each are not part of their common subsequence."""
    fa, fb = [True] * len(a), [True] * len(b)
    for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        for i in range(block.size):
            fa[block.a + i] = False
            fb[block.b + i] = False
    return fa, fb


def generation_html(gen: Generation, differs: list[bool] | None = None) -> str:
    """Tokens as spans: differing ones highlighted, each token's probability on hover."""
    if not gen.tokens:
        return '<span class="mlp-empty" style="color:#888">(empty output)</span>'
    parts = []
    for i, (tok, p) in enumerate(zip(gen.tokens, gen.probs)):
        diff = bool(differs and differs[i])
        style = "background:#ffe08a;border-radius:3px;" if diff else ""
        # low-confidence tokens are underlined so they stand out without hovering
        if p < 0.5:
            style += "border-bottom:2px dotted #e8372c;"
        parts.append(f'<span class="mlp-tok{" mlp-diff" if diff else ""}" style="{style}" '
                     f'title="p = {p:.3f}">{html.escape(tok)}</span>')
    return "".join(parts)


def dequant_text(dequantized_from: str | None) -> str | None:
    """The sentence every view of a de-quantized model carries."""
    if not dequantized_from:
        return None
    bits = "4-bit " if dequantized_from.upper().startswith("Q4") else ""
    return (f"Weights de-quantized from {bits}({dequantized_from}): the magnitudes, pruning "
            "scores and outputs shown are those of the de-quantized model.")


# --------------------------------------------------------------------------- session state


def default(key: str, value) -> None:
    """Set a session value once (widgets then read it through their key)."""
    if key not in st.session_state:
        st.session_state[key] = value


def valid_choice(key: str, options: list, fallback=None) -> None:
    """Keep a selectbox's stored value among its current options."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = fallback if fallback in options else (options[0] if options else None)


def valid_choices(key: str, options: list, fallback: list) -> None:
    """Keep a multiselect's stored values among its current options."""
    current = st.session_state.get(key)
    if current is None:
        current = fallback
    st.session_state[key] = [v for v in current if v in options]


def keep_widget_state() -> None:
    """Widget values with the ``w.`` prefix survive page switches (Streamlit drops the state
    of widgets not drawn in a run; re-assigning the key keeps it)."""
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and key.startswith(WIDGET):
            st.session_state[key] = st.session_state[key]


def source_of(spec: str) -> str:
    """Which kind of model spec this is (embedded, gguf, folder, hub), to preselect it."""
    if spec in (DEFAULT_MODEL, "embedded", "default"):
        return "embedded"
    if spec.lower().endswith(".gguf"):
        return "gguf"
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        return "folder"
    return "hub"


def model_spec() -> str:
    """The session's model spec: MLPRUNE_MODEL, else the embedded default."""
    default("model_spec", os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
    return st.session_state["model_spec"]


SESSION_RESULTS = ("features", "pruned", "compare", "sweep_result", "score")


def set_model_spec(spec: str) -> None:
    """Switch the session to another model, dropping results made with the previous one."""
    if spec != st.session_state.get("model_spec"):
        for key in SESSION_RESULTS:
            st.session_state.pop(key, None)
        st.session_state["model_spec"] = spec


def default_corpus() -> ParallelCorpus:
    """MLPRUNE_CORPUS when set, else the built-in corpus."""
    path = os.environ.get(CORPUS_ENV)
    if path:
        return read_corpus(path)
    try:
        return builtin_corpus()
    except (FileNotFoundError, OSError) as e:  # a broken install, not bad input
        raise MlpruneError("The built-in corpus is missing from this install; upload a corpus "
                           "on the Home page instead.") from e


def set_corpus(corpus: ParallelCorpus) -> None:
    """Switch the session's corpus, dropping results made with the previous one."""
    for key in SESSION_RESULTS:
        st.session_state.pop(key, None)
    st.session_state["corpus"] = corpus


@dataclass
class Pruned:
    """A session's current pruning: the spec, its masks, and a version that changes with them."""

    model: str
    spec: PruneSpec
    masks: MaskSet
    version: int
    ranked: Ranked


def set_pruned(loaded: LoadedModel, ranked: Ranked, spec: PruneSpec, masks: MaskSet) -> Pruned:
    """Record the session's masks (a new version only when the spec changed)."""
    old = st.session_state.get("pruned")
    if old is not None and old.model == model_key(loaded) and old.spec == spec \
            and old.ranked is ranked:
        return old
    version = (old.version + 1) if old is not None else 1
    st.session_state["pruned"] = Pruned(model_key(loaded), spec, masks, version, ranked)
    return st.session_state["pruned"]


def session_pruned(loaded: LoadedModel | None) -> Pruned | None:
    """This session's masks for this model, or None (other sessions' masks are never seen)."""
    state = st.session_state.get("pruned")
    if state is None or loaded is None or state.model != model_key(loaded):
        return None
    return state


def session_pruned_generations(loaded: LoadedModel, state: Pruned, prompts: list[str],
                               max_new_tokens: int = 48) -> tuple[list[Generation], float]:
    """Pruned generations cached in the session for the current masks; and seconds spent."""
    cache = st.session_state.setdefault("pruned_outputs", {})
    if cache.get("version") != (state.model, state.version):
        cache.clear()
        cache["version"] = (state.model, state.version)
    todo = [p for p in prompts if (p, max_new_tokens) not in cache]
    start = time.perf_counter()
    if todo:
        for prompt, gen in zip(todo, pruned_generations(loaded, state.masks, todo,
                                                         max_new_tokens)):
            cache[(prompt, max_new_tokens)] = gen
    return [cache[(p, max_new_tokens)] for p in prompts], time.perf_counter() - start


# --------------------------------------------------------------------------- st helpers


class Outcome:
    """Whether the block of :func:`errors` finished (False when a message was shown)."""

    ok = True


@contextmanager
def errors() -> Iterator[Outcome]:
    """Show a failure of the block as one readable message, never a traceback.

    MlpruneError carries a sentence meant for the user; anything else is a bug or an
    environment problem, logged in full on the server and shown as one line."""
    outcome = Outcome()
    try:
        yield outcome
    except Cancelled as e:
        outcome.ok = False
        st.warning(str(e))
    except MlpruneError as e:
        outcome.ok = False
        st.error(str(e))
    except FileNotFoundError as e:
        outcome.ok = False
        st.error(f"A file mlprune needs is missing: {e.filename or e}.")
    except Exception as e:  # noqa: BLE001 - the page must stay usable whatever happened
        outcome.ok = False
        log.exception("dashboard error")
        first = str(e).splitlines()[0] if str(e) else ""
        st.error(f"Something went wrong ({type(e).__name__}{': ' + first if first else ''}). "
                 "The details are in the server log.")


def progress_bar(text: str):
    """A progress bar and two callbacks for it: ``(done, total)`` and ``(stage, fraction)``."""
    bar = st.progress(0.0, text=text)

    def counts(done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(total, 1)), text=f"{text} ({done}/{total})")

    def stages(stage: str, fraction: float) -> None:
        bar.progress(min(1.0, max(0.0, fraction)), text=f"{text}: {stage}")

    return bar, counts, stages


def loaded_model(spec: str | None = None) -> LoadedModel:
    """The model of this spec (the session's by default), loading it once per process with a
    progress bar; raises MlpruneError when it cannot be loaded."""
    spec = spec or model_spec()
    job = shared().load_job(spec)
    if not job.done.is_set():
        bar = st.progress(job.fraction, text=f"Loading {spec}: {job.message}")
        while not job.done.wait(0.3):
            bar.progress(job.fraction, text=f"Loading {spec}: {job.message}")
        bar.empty()
    if job.error is not None:
        if isinstance(job.error, MlpruneError):
            raise job.error
        raise MlpruneError(f"Could not load {spec}: {job.error}") from job.error
    return job.result


def require_model() -> LoadedModel | None:
    """The session's model (its de-quantization noted), or None after showing why not."""
    with errors() as ok:
        loaded = loaded_model()
    if not ok.ok:
        st.info("Pick another model on the Home page.")
        return None
    dequant_caption(loaded)
    return loaded


def session_corpus() -> ParallelCorpus:
    """The session's corpus, the default one on first use (raises MlpruneError)."""
    if "corpus" not in st.session_state:
        st.session_state["corpus"] = default_corpus()
        st.session_state["corpus_origin"] = "default"
    return st.session_state["corpus"]


def require_corpus() -> ParallelCorpus | None:
    """The session's corpus, or None after showing why there is none."""
    with errors() as ok:
        corpus = session_corpus()
    if not ok.ok:
        st.info("Pick or upload a corpus on the Home page.")
        return None
    return corpus


def page(title: str) -> tuple[LoadedModel, ParallelCorpus] | None:
    """A task page's title, model and corpus; None (after saying why) when either is missing."""
    st.title(title)
    loaded = require_model()
    corpus = require_corpus()
    if loaded is None or corpus is None:
        return None
    return loaded, corpus


def dequant_caption(loaded: LoadedModel) -> None:
    """The de-quantization sentence under a page's title, when it applies."""
    text = dequant_text(loaded.dequantized_from)
    if text:
        st.caption(f":material/warning: {text}")


def plot(fig, key: str | None = None) -> None:
    """Draw a plotly figure across the page width."""
    st.plotly_chart(fig, key=key, config={"displaylogo": False})


def sidebar_status() -> None:
    """Model, corpus and pruning of this session, on every page."""
    spec = model_spec()
    loaded = shared().model(spec)
    st.markdown("**Model**")
    if loaded is None:
        st.caption(f"{spec} (not loaded yet)")
    else:
        st.caption(loaded.name)
        if loaded.dequantized_from:
            st.caption(f"weights de-quantized from {loaded.dequantized_from}")
    corpus = st.session_state.get("corpus")
    st.markdown("**Corpus**")
    st.caption(f"{corpus.name}: {len(corpus)} sentences, {', '.join(corpus.languages)}"
               if corpus is not None else "not read yet")
    state = session_pruned(loaded)
    st.markdown("**Pruning (this session only)**")
    if state is None:
        st.caption("none: the model is dense")
    else:
        st.caption(f"{state.spec.label} {state.spec.pair}, {state.masks.pattern}, "
                   f"{state.masks.overall_sparsity():.1%} of the selected weights pruned")
