"""The dashboard's work without Streamlit: the shared model cache, load jobs, cached
statistics, rankings and dense outputs, a session's pruning, sweeps, and text helpers.

Nothing here imports Streamlit, so all of it runs in tests, benchmarks or another front end.

The cache is an object, not a module global. :class:`Shared` holds the loaded models and the
caches of everything no pruning changes (activation statistics, rankings, dense generations
and scores), and the operations that fill those caches are its methods: ``shared.stats(...)``,
``shared.ranking(...)``, ``shared.dense_generations(...)``. Whoever owns the process decides
how many there are: the dashboard keeps one per process (``ui.shared()``, an
``st.cache_resource``); a test makes its own ``Shared()`` and throws it away. No function here
reaches for a hidden singleton, so nothing needs patching to run it without Streamlit. The
tables themselves are private: callers ask the methods, never the LRU maps.

What is shared and what is not:

- Everything in a :class:`Shared` is read-only once made and the same for every session.
- Long work (a sweep, a reproduce run) does not touch the shared model at all: it runs in a
  worker process with its own copy (:func:`start_sweep`, :func:`start_reproduce`), so the
  model's lock is only ever held for short generations and every page stays live.
- A session's masks live in that session's :class:`SessionPruning` only. They touch the
  shared model's weights only inside ``prune.pruned(model, masks)`` (:func:`masked`), which
  holds the model's lock and restores the dense weights before releasing it. Every other use
  of the model (dense generation, capture, ranking, sweeps) also holds that lock
  (:func:`dense`), so no session ever computes on weights another session has masked.
"""

from __future__ import annotations

import difflib
import hashlib
import html
import json
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from mlprune import MlpruneError, Progress, no_progress, pipeline, runners
from mlprune.capture import ActivationStats, token_magnitudes
from mlprune.corpus import ParallelCorpus, builtin_corpus, read_corpus
from mlprune.evaluate import Generation, evaluate_translation, generate, stream_generate
from mlprune.experiments import (
    BuiltInterventions,
    Cells,
    InterventionSpec,
    build_interventions,
    run_intervention_experiment,
)
from mlprune.features import detect
from mlprune.interventions import intervened
from mlprune.models import DEFAULT_MODEL, LoadedModel, load_model, split_precision
from mlprune.pipeline import PruneSpec
from mlprune.prompts import PromptSet, parse_pair
from mlprune.protocol import get_protocol
from mlprune.prune import MaskSet, Ranking, pruned
from mlprune.store import STORE_SUFFIXES, ResultStore, is_store

MODEL_ENV = "MLPRUNE_MODEL"  # default model spec (tests point it at a tiny folder)
CORPUS_ENV = "MLPRUNE_CORPUS"  # default corpus file instead of the built-in one
PREVIEW_TOKENS = 32  # the Prune preview's and Compare's default cap: one shared cache entry
HELD_OUT_TOKENS = 48  # Compare's chrF slice: room for one translated sentence
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


# --------------------------------------------------------------------------- keys


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


def ranking_key(loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec) -> tuple:
    """What a ranking depends on: the model, the corpus and the spec except sparsity/pattern."""
    rest = asdict(replace(spec, sparsity=0.0, pattern="unstructured"))
    return (model_key(loaded), corpus_key(corpus), tuple(sorted(rest.items())))


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


# --------------------------------------------------------------------------- what caches hold


@dataclass
class CalibratedRanking:
    """A ranking with the calibration and the spec it was made from; masks at any sparsity
    come from it in milliseconds."""

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


@dataclass
class FeatureCapture:
    """What the Features page leaves for the other pages: the prompt sets it captured, their
    statistics, the protocol they were built under, and the detection rule the user settled
    on with the dimensions it found."""

    model: str  # model_key of the model the statistics came from
    prompts: dict[str, PromptSet]
    stats: dict[str, ActivationStats]
    seconds: float
    rule: str | None = None
    detected: pd.DataFrame | None = None
    protocol: str = "clean"  # the prompts' separator and the figures' layer numbering

    @property
    def pairs(self) -> list[str]:
        """The translation directions captured, in capture order ('fr-en', ...)."""
        return [name[3:] for name in self.stats if name.startswith("mt:")]

    @property
    def numbering(self) -> str:
        """How the protocol numbers layers ("sites" or the paper's "hidden_states")."""
        return get_protocol(self.protocol).numbering

    def detect(self, name: str, rule: str) -> pd.DataFrame:
        """The dimensions ``rule`` detects in set ``name`` (layers in the protocol's
        numbering), remembered as the session's choice (the Prune page protects them by
        default)."""
        table = detect(self.stats[name], rule, self.numbering)
        self.rule, self.detected = rule, table
        return table


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

    def _progress(self, stage: str, fraction: float) -> None:
        self.fraction, self.message = max(0.0, min(1.0, float(fraction))), stage

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
    """What every session of a process shares: models, and caches of what no pruning changes."""

    def __init__(self, max_models: int = 2):
        self.max_models = max_models
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, LoadJob] = OrderedDict()
        self._tables = {
            "stats": _Lru(64),  # (model, prompts) -> ActivationStats, ~1 MB each
            "rankings": _Lru(3),  # (model, corpus, spec minus sparsity) -> CalibratedRanking
            "dense": _Lru(512),  # (model, prompt, max_new_tokens) -> Generation
            "scores": _Lru(32),  # (model, corpus, pair, shots, limit) -> dense metrics
            "tokens": _Lru(8),  # (model, text) -> (tokens, |h|)
            "interventions": _Lru(8),  # (model, corpus, InterventionSpec) -> BuiltInterventions
            "intervened": _Lru(256),  # (model, corpus, spec, prompt, max_new_tokens) -> Generation
        }
        # measured cells of intervention experiments (dense ones are shared by every spec)
        self.intervention_cells = Cells()

    def _cached(self, table: str, key):
        with self._lock:
            return self._tables[table].get_fresh(key)

    def _store(self, table: str, key, value) -> None:
        with self._lock:
            self._tables[table].put(key, value)

    def clear(self) -> None:
        """Forget every cache and model (tests; a user never needs it)."""
        with self._lock:
            self._jobs.clear()
            for table in self._tables.values():
                table.clear()
            self.intervention_cells = Cells()

    # ---- models

    def load_job(self, spec: str) -> LoadJob:
        """The load of this spec: finished, running, or started now. One per spec."""
        with self._lock:
            job = self._jobs.get(spec)
            if job is not None and job.done.is_set() and job.error is not None:
                job = None  # a failed load is tried again when asked again
            if job is None:
                job = self._jobs[spec] = LoadJob(spec)
            self._jobs.move_to_end(spec)
            loaded_specs = [s for s, j in self._jobs.items() if j.done.is_set() and j.result]
            for old in loaded_specs[: max(0, len(loaded_specs) - self.max_models)]:
                # Sessions still holding the old model keep it alive until they move on.
                del self._jobs[old]
            return job

    def model(self, spec: str) -> LoadedModel | None:
        """The loaded model of this spec, if it is loaded (never starts a load)."""
        job = self._jobs.get(spec)
        return job.result if job is not None and job.done.is_set() else None

    def load_seconds(self, spec: str) -> float | None:
        """How long the load of this spec took (None when it was never asked for)."""
        job = self._jobs.get(spec)
        return job.seconds if job is not None else None

    # ---- statistics

    def stats(self, loaded: LoadedModel, prompts: PromptSet,
              progress: Progress = no_progress,
              should_stop: Callable[[], bool] | None = None) -> ActivationStats:
        """Activation statistics of a prompt set, cached per (model, prompts) in memory and
        on disk."""
        key = (model_key(loaded), prompts.name, hashlib.sha256(prompts.key.encode()).hexdigest())
        stats = self._cached("stats", key)
        if stats is None:
            with dense(loaded):
                stats = pipeline.cached_capture(loaded, prompts, batch_size=CAPTURE_BATCH,
                                                progress=progress, should_stop=should_stop)
            self._store("stats", key, stats)
        return stats

    def capture(self, loaded: LoadedModel, sets: list[PromptSet],
                progress: Progress = no_progress, protocol: str = "clean") -> FeatureCapture:
        """The statistics of every prompt set (each cached), as the Features page's result;
        ``protocol`` is the one the sets were built under (it numbers the figures' layers)."""
        get_protocol(protocol)
        start, stats = time.perf_counter(), {}
        for i, ps in enumerate(sets):
            def step(stage: str, fraction: float, i=i, ps=ps) -> None:
                progress(f"{prompt_set_label(ps.name)}, {stage}", (i + fraction) / len(sets))
            stats[ps.name] = self.stats(loaded, ps, progress=step)
        return FeatureCapture(model_key(loaded), {ps.name: ps for ps in sets}, stats,
                              time.perf_counter() - start, protocol=protocol)

    def tokens(self, loaded: LoadedModel, text: str):
        """``capture.token_magnitudes`` of one text, cached per (model, text)."""
        key = (model_key(loaded), text)
        out = self._cached("tokens", key)
        if out is None:
            with dense(loaded):
                out = token_magnitudes(loaded.model, loaded.tokenizer, text)
            self._store("tokens", key, out)
        return out

    # ---- rankings

    def ranking(self, loaded: LoadedModel, corpus: ParallelCorpus,
                spec: PruneSpec) -> CalibratedRanking | None:
        """The ranking of this spec if some session already made it."""
        return self._cached("rankings", ranking_key(loaded, corpus, spec))

    def make_ranking(self, loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec,
                     progress: Progress = no_progress) -> CalibratedRanking:
        """Calibrate (one pass over the calibration prompts, or a cached one) and rank, once."""
        spec.validate()
        start = time.perf_counter()
        with dense(loaded):  # scores read the weights: they must be the dense ones
            calib = (pipeline.calibrate(loaded, corpus, spec, batch_size=CAPTURE_BATCH,
                                        progress=progress)
                     if spec.needs_calibration else None)
            ranking = pipeline.rank(loaded, spec, calib, batch_size=CAPTURE_BATCH,
                                    progress=progress)
        made = CalibratedRanking(ranking, calib, spec, time.perf_counter() - start)
        self._store("rankings", ranking_key(loaded, corpus, spec), made)
        return made

    # ---- dense outputs

    def dense_generations(self, loaded: LoadedModel, prompts: list[str],
                          max_new_tokens: int = 48,
                          progress: Progress = no_progress) -> list[Generation]:
        """Greedy dense continuations, cached for every session (they never depend on masks)."""
        keys = [(model_key(loaded), p, max_new_tokens) for p in prompts]
        found = {k: self._cached("dense", k) for k in keys}
        missing = [k[1] for k in keys if found[k] is None]
        if missing:
            with dense(loaded):
                fresh = generate(loaded.model, loaded.tokenizer, missing,
                                 max_new_tokens=max_new_tokens, progress=progress)
            for prompt, gen in zip(missing, fresh):
                key = (model_key(loaded), prompt, max_new_tokens)
                self._store("dense", key, gen)
                found[key] = gen
        return [found[k] for k in keys]

    def translation_scores(self, loaded: LoadedModel, corpus: ParallelCorpus, pair: str,
                           masks: MaskSet | None, *, shots: int, limit: int,
                           progress: Progress = no_progress) -> dict[str, dict]:
        """``evaluate.evaluate_translation`` on the held-out slice: ``{"dense": metrics}``
        (cached for every session), plus ``"pruned"`` with ``masks`` applied when given, and
        ``"significance"``: the paired test of pruned against dense on the same sentences
        (``pipeline.paired_vs_dense``: per metric, chrf and bleu, the scores, difference and
        p-value)."""
        src, tgt = parse_pair(pair)
        settings = dict(shots=shots, limit=limit, max_new_tokens=HELD_OUT_TOKENS)
        key = (model_key(loaded), corpus_key(corpus), pair, shots, limit)
        scores = {"dense": self._cached("scores", key)}
        if scores["dense"] is None:
            with dense(loaded) as model:
                scores["dense"] = evaluate_translation(
                    model, loaded.tokenizer, corpus, src, tgt, **settings,
                    progress=lambda s, f: progress(f"dense ({s})", f))
            self._store("scores", key, scores["dense"])
        if masks is not None:
            with masked(loaded, masks) as model:
                scores["pruned"] = evaluate_translation(
                    model, loaded.tokenizer, corpus, src, tgt, **settings,
                    progress=lambda s, f: progress(f"pruned ({s})", f))
            scores["significance"] = pipeline.paired_vs_dense(
                scores["dense"]["outputs"], scores["pruned"]["outputs"], tgt)
        return scores

    # ---- interventions

    def intervention(self, loaded: LoadedModel, corpus: ParallelCorpus, spec: InterventionSpec,
                     progress: Progress = no_progress) -> BuiltInterventions:
        """The spec's intervention and control (means and vectors computed once), under the
        model's lock: they read the dense model."""
        key = (model_key(loaded), corpus_key(corpus), _what_builds(spec.validate()))
        built = self._cached("interventions", key)
        if built is None:
            with dense(loaded):
                built = build_interventions(loaded, corpus, spec, batch_size=CAPTURE_BATCH,
                                            progress=progress)
            self._store("interventions", key, built)
        return built

    def intervened_generations(self, loaded: LoadedModel, corpus: ParallelCorpus,
                               spec: InterventionSpec, prompts: list[str], max_new_tokens: int = 48,
                               progress: Progress = no_progress) -> list[Generation]:
        """Greedy continuations with the spec's intervention on the dense model (hooks added
        and removed under the model's lock, so no session's masks are ever under them)."""
        what = _what_builds(spec)
        keys = [(model_key(loaded), corpus_key(corpus), what, p, max_new_tokens) for p in prompts]
        found = {k: self._cached("intervened", k) for k in keys}
        missing = [k[3] for k in keys if found[k] is None]
        if missing:
            built = self.intervention(loaded, corpus, spec, progress=progress)
            with dense(loaded) as model, intervened(model, built.intervention):
                fresh = generate(model, loaded.tokenizer, missing, max_new_tokens=max_new_tokens,
                                 batch_size=CAPTURE_BATCH, progress=progress)
            for prompt, gen in zip(missing, fresh):
                key = (model_key(loaded), corpus_key(corpus), what, prompt, max_new_tokens)
                self._store("intervened", key, gen)
                found[key] = gen
        return [found[k] for k in keys]

    def intervention_scores(self, loaded: LoadedModel, corpus: ParallelCorpus,
                            spec: InterventionSpec, progress: Progress = no_progress) -> dict:
        """``experiments.run_intervention_experiment`` on the dense model, under its lock:
        dense, intervened and control on the held-out slice (and the spec's tasks)."""
        built = self.intervention(loaded, corpus, spec, progress=progress)
        with dense(loaded):
            return run_intervention_experiment(loaded, corpus, spec, batch_size=CAPTURE_BATCH,
                                               cells=self.intervention_cells, built=built,
                                               progress=progress)


def pruned_generations(loaded: LoadedModel, masks: MaskSet, prompts: list[str],
                       max_new_tokens: int = 48,
                       progress: Progress = no_progress) -> list[Generation]:
    """Greedy continuations with a session's masks applied only while generating."""
    with masked(loaded, masks):
        return generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                        progress=progress)


# --------------------------------------------------------------------------- one session


@dataclass
class SessionPruning:
    """A session's current pruning: its spec and masks, the ranking they were cut from, a
    version that changes with them, and the pruned outputs generated with these masks."""

    model: str  # model_key of the model the masks belong to
    spec: PruneSpec
    masks: MaskSet
    version: int
    ranking: CalibratedRanking
    outputs: dict[tuple[str, int], Generation] = field(default_factory=dict, repr=False)

    def generated(self, prompt: str, max_new_tokens: int = 48) -> Generation | None:
        """The pruned continuation of ``prompt`` if these masks made it already."""
        return self.outputs.get((prompt, max_new_tokens))

    def stream(self, loaded: LoadedModel, prompt: str,
               max_new_tokens: int = 48) -> Generator[str, None, Generation]:
        """The pruned continuation of one prompt as text pieces, each as soon as its token is
        made (``evaluate.stream_generate``): the masks are applied, under the model's lock,
        only while it generates. Returns the Generation and keeps it (:meth:`generated`,
        :meth:`generations`) once complete. Close it to stop early (a page rerun): the
        model is dense and unlocked again when ``close()`` returns."""
        done = self.generated(prompt, max_new_tokens)
        if done is None:
            done = yield from stream_generate(loaded.model, loaded.tokenizer, prompt,
                                              max_new_tokens=max_new_tokens,
                                              hold=lambda: masked(loaded, self.masks))
            self.outputs[(prompt, max_new_tokens)] = done
        else:
            yield from done.tokens
        return done

    def generations(self, loaded: LoadedModel, prompts: list[str],
                    max_new_tokens: int = 48) -> tuple[list[Generation], float]:
        """Pruned generations, made once per prompt for these masks; and the seconds spent."""
        todo = [p for p in prompts if (p, max_new_tokens) not in self.outputs]
        start = time.perf_counter()
        if todo:
            made = pruned_generations(loaded, self.masks, todo, max_new_tokens)
            self.outputs.update({(p, max_new_tokens): g for p, g in zip(todo, made)})
        return [self.outputs[(p, max_new_tokens)] for p in prompts], time.perf_counter() - start


def next_pruning(previous: SessionPruning | None, loaded: LoadedModel,
                 ranking: CalibratedRanking, spec: PruneSpec, masks: MaskSet) -> SessionPruning:
    """The session's pruning after this page run: the previous one (outputs and all) when
    nothing changed, else a new version."""
    if previous is not None and previous.model == model_key(loaded) and previous.spec == spec \
            and previous.ranking is ranking:
        return previous
    version = previous.version + 1 if previous is not None else 1
    return SessionPruning(model_key(loaded), spec, masks, version, ranking)


# --------------------------------------------------------------------------- sweeps


def run_sweep(loaded: LoadedModel, corpus: ParallelCorpus, *, methods: list[str],
              sparsities: list[float], pairs: list[str], base: PruneSpec, limit: int,
              out_csv: Path, progress: Progress = no_progress,
              should_stop: Callable[[], bool] | None = None,
              extra_eval: Callable[[LoadedModel, str, float], dict] | None = None) -> pd.DataFrame:
    """``pipeline.sweep`` in this process, under the model's lock for its whole length (it
    prunes the shared model cell by cell); ``out_csv`` a CSV or a results store. The
    dashboard uses :func:`start_sweep` instead, which leaves the shared model free."""
    if not methods or not sparsities or not pairs:
        raise MlpruneError("Pick at least one method, one sparsity and one direction.")
    store = out_csv if is_store(out_csv) else None
    with dense(loaded):
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
                store: Path, extra: list[str]) -> runners.Job:
    """The sweep in a worker process with its own copy of the model ``model_spec`` (loaded
    as this process loaded it; the embedded model's conversion is cached), its rows
    committed to ``store`` as they are measured. Returns at once; the shared model and its
    lock are never touched, so every other page stays live while it runs."""
    job = runners.SweepJob(
        runners.ModelSource(model_spec), corpus, str(store), tuple(methods),
        tuple(float(s) for s in sparsities), tuple(pairs), base, limit, CAPTURE_BATCH,
        tasks=sweep_tasks(extra), task_limit=ZERO_SHOT_ITEMS)
    return runners.ProcessRunner().start(job)


def start_reproduce(model_spec: str, corpus: ParallelCorpus, out: Path, grid) -> runners.Job:
    """``reproduce.run`` of ``grid`` into ``out``, in a worker process with its own copy of
    the model (as :func:`start_sweep`). Returns at once; the job's result is the report."""
    from mlprune import reproduce

    work = runners.Call(runners.ModelSource(model_spec), reproduce.run, (corpus, out, grid),
                        {"batch_size": CAPTURE_BATCH})
    return runners.ProcessRunner().start(work)


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


def sweep_store(session_id: str, loaded: LoadedModel, corpus: ParallelCorpus, *, limit: int,
                samples: int, shots: int, extra: list[str]) -> Path:
    """One resumable results store per session and per setting that changes what a row
    means."""
    what = json.dumps([model_key(loaded), corpus_key(corpus), limit, samples, shots, extra])
    name = hashlib.sha256(what.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "mlprune-sweeps" / session_id / f"{name}.sqlite"


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
    every row as a table, and the settings a store recorded (None for a CSV)."""
    path = results_files(path)[0]
    rows = read_results(path)
    table = pd.DataFrame(rows, columns=None if rows else pipeline.SWEEP_COLUMNS)
    if not table.empty:
        table = table.sort_values(["pair", "method", "sparsity"]).reset_index(drop=True)
    return table, ResultStore(path).settings() if is_store(path) else None


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

    return extra_eval


# --------------------------------------------------------------------------- interventions

def _what_builds(spec: InterventionSpec) -> InterventionSpec:
    """The spec without what only measuring reads (held-out size, tasks): the key of its
    intervention and of the generations made with it."""
    return replace(spec, limit=1, tasks=(), task_limit=None, max_new_tokens=1,
                   compare_prune=None, resamples=0)


INTERVENTION_KINDS = {"none": "None", "zero": "Zero", "mean": "Set to mean",
                      "scale": "Scale", "lrp2": "LRP2 (language vector)"}


def detected_union(captured: FeatureCapture | None) -> list[int]:
    """Every dim the Features page's rule detected at any layer (sorted), or none."""
    if captured is None or captured.detected is None or not len(captured.detected):
        return []
    return sorted({int(d) for d in captured.detected["dim"]})


def dims_from_selection(selection) -> list[int]:
    """The dims of the points a user clicked in a layer x dimension figure (x is the dim)."""
    points = (selection or {}).get("points", []) if isinstance(selection, dict) else []
    dims = []
    for point in points:
        x = point.get("x") if isinstance(point, dict) else None
        if isinstance(x, (int, float)) and float(x).is_integer() and x >= 0:
            dims.append(int(x))
    return sorted(set(dims))


def intervention_spec(kind: str, *, pair: str, dims: list[int], layers: tuple[int, int] | None,
                      factor: float | None, lrp2_layers: tuple[int, int | None] | None,
                      shots: int, samples: int, limit: int, control: bool,
                      task: str | None, task_limit: int, detect: str | None) -> InterventionSpec:
    """The Compare page's widgets as an :class:`~mlprune.experiments.InterventionSpec`
    (one clear sentence when they do not make one)."""
    if kind == "lrp2":
        if lrp2_layers is None:
            raise MlpruneError("Choose the layer where LRP2 projects to English.")
        first, second = lrp2_layers
        where, chosen = (f"{first}" if second is None else f"{first},{second}"), None
    else:
        if not dims:
            raise MlpruneError("Pick at least one dimension to act on (the Features page's "
                               "detected set fills the list).")
        lo, hi = layers if layers is not None else (None, None)
        where, chosen = (None if lo is None else f"{lo}-{hi}"), tuple(sorted(set(dims)))
    return InterventionSpec(pair=pair, kind=kind, factor=factor if kind == "scale" else None,
                            layers=where, dims=chosen, detect=detect or "top-k:4",
                            control=control, limit=limit, shots=shots, samples=samples,
                            tasks=(task,) if task else (), task_limit=task_limit,
                            max_new_tokens=HELD_OUT_TOKENS).validate()


# --------------------------------------------------------------------------- text helpers


def pair_label(pair: str) -> str:
    """'fr-en' -> 'fr→en'."""
    src, tgt = parse_pair(pair)
    return f"{src}→{tgt}"


def prompt_set_label(name: str) -> str:
    """'mt:fr-en' -> 'fr→en', 'mono:en' -> 'en (mono)'."""
    kind, _, rest = name.partition(":")
    return pair_label(rest) if kind == "mt" else f"{rest} (mono)" if kind == "mono" else name


def comma_list(text: str) -> list[str]:
    """'fr→en, en-fr,' -> ['fr-en', 'en-fr']: a typed list of directions or languages."""
    return [item.strip().replace("→", "-") for item in text.split(",") if item.strip()]


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


def source_of(spec: str) -> str:
    """Which kind of model spec this is (embedded, gguf, folder, hub), to preselect it."""
    spec = split_precision(spec)[0]
    if spec in (DEFAULT_MODEL, "embedded", "default"):
        return "embedded"
    if spec.lower().endswith(".gguf"):
        return "gguf"
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        return "folder"
    return "hub"


def default_model_spec() -> str:
    """MLPRUNE_MODEL when set, else the embedded default."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


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
