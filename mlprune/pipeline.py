"""The whole flow from one spec: calibrate -> rank -> masks, and sweeps over many specs.

The command line, the dashboard and the benchmarks all go through these functions, so a
pruned model means the same thing wherever it was made.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mlprune import MlpruneError, Progress, cache_name, no_progress
from mlprune.allocation import ALLOCATIONS
from mlprune.capture import PAD_SIDES, ActivationStats, Cancelled, capture, padding_side
from mlprune.corpus import ParallelCorpus
from mlprune.evaluate import evaluate_translation, paired_translation_test
from mlprune.features import detected_dims
from mlprune.models import LoadedModel, cache_dir, onloaded
from mlprune.mwanda import PARTS, MWanda
from mlprune.prompts import (
    CALIBRATIONS,
    PromptSet,
    calibration_mix,
    calibration_prompts,
    is_mix,
    mix_components,
    parse_pair,
    pooled_prompts,
)
from mlprune.protocol import get_protocol
from mlprune.prune import (
    METHODS,
    MODES,
    MaskSet,
    Pattern,
    Ranking,
    allocate,
    check_sparsity,
    pruned,
    rank_modules,
    select_modules,
    sequential_run,
)
from mlprune.store import KEY, ResultStore, check_same_source, is_store


def _setting(default, help: str, **cli):
    """A spec field with its command-line help (``cli`` holds argparse extras: metavar...)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class PruneSpec:
    """Everything that decides a pruned model. Plain values: hashable, JSON-able, cacheable.

    This is the one place where a setting and its default are written: the command line's
    flags and the dashboard's widgets are built from these fields (see :func:`spec_flags`).
    """

    method: str = _setting("wanda", "wanda, ratio, m-wanda (M-Wanda: needs a calibration mix, "
                                    "e.g. pooled), magnitude or random")
    calibration: str = _setting("mt", "calibration set: mt (translation), mono, code, pooled "
                                      "(every X-en direction, equal weights) or a mix: "
                                      "mix:fr-en=1,de-en=1,zh=0.5 (pairs translate, single "
                                      "languages are monolingual; samples prompts per set)",
                                metavar="SET")
    pair: str = _setting("fr-en", "language pair src-tgt of the calibration and evaluation")
    other: str = _setting("code", "second calibration set of the ratio method")
    sparsity: float = _setting(0.5, "share of each row's weights to prune, in [0, 1); with a "
                                    "layer-adaptive allocation, the mean over layers")
    pattern: str = _setting("unstructured", "unstructured, 2:4 or 4:8")
    allocation: str = _setting("uniform", "sparsity per layer: uniform, owl (layers with more "
                                          "outlier scores pruned less, as OWL) or cwl "
                                          "(M-Wanda's, from cross-lingual correlation); "
                                          "unstructured only")
    allocation_range: float = _setting(0.08, "owl/cwl: OWL's lambda: the layers' sparsities "
                                             "span 2*LAMBDA, their mean the target (so one "
                                             "layer may sit up to ~2*LAMBDA from it)",
                                       metavar="LAMBDA")
    outlier_threshold: float = _setting(5.0, "owl: a score above M times its layer's mean "
                                             "score is an outlier (OWL's M)", metavar="M")
    mwanda_parts: str = _setting("variance,cwl,prob", "m-wanda: the parts used (drop one to "
                                                      "ablate it; none = wanda on the mix): "
                                                      "variance (the languages' spread in the "
                                                      "score), cwl (per-layer sparsity from "
                                                      "cross-lingual correlation), prob (MLP "
                                                      "neurons' activation probability)",
                                 metavar="PARTS")
    variance_weight: float = _setting(1.0, "m-wanda: weight of the languages' spread in the "
                                           "score (alpha)", metavar="ALPHA")
    prob_weight: float = _setting(1.0, "m-wanda: weight of the activation probability in the "
                                       "score (gamma)", metavar="GAMMA")
    invert: bool = _setting(False, "prune the highest scores instead (the paper's ablation)")
    protect: str | None = _setting(None, "never prune detected feature dims: top-k:8, ratio:100")
    layers: str | None = _setting(None, "layer range to prune, e.g. 0-11")
    blocks: str | None = _setting(None, "module kinds to prune: attn, mlp or attn,mlp")
    mode: str = _setting("sequential", "sequential (as Wanda: each layer calibrated with the "
                                       "layers before it pruned) or one-shot")
    shots: int = _setting(4, "demonstrations per calibration prompt")
    samples: int = _setting(16, "calibration prompts")
    seed: int = _setting(0, "seed of the demonstration draws and of random pruning")
    protocol: str = _setting("clean", "clean (padding excluded, newline-separated "
                                      "demonstrations) or paper (the authors' setup)")
    pad_to: int | None = _setting(None, "pad every calibration prompt to N tokens and count "
                                        "the padding, as the authors' code did (a bug; off)",
                                  metavar="N")
    pad_side: str = _setting("tokenizer", "with --pad-to: where the padding goes: tokenizer "
                                          "(its own padding_side, as the authors' code padded: "
                                          "left for BLOOM and Llama), left or right",
                             metavar="SIDE")

    def validate(self) -> PruneSpec:
        """Check every field; returns the spec (one clear sentence for anything wrong)."""
        if self.method not in METHODS:
            raise MlpruneError(f"Unknown method '{self.method}': use {', '.join(METHODS)}.")
        if self.mode not in MODES:
            raise MlpruneError(f"Unknown mode '{self.mode}': use one-shot or sequential.")
        pattern = Pattern.parse(self.pattern)
        if not pattern.structured:
            check_sparsity(self.sparsity)
        if self.allocation not in ALLOCATIONS:
            raise MlpruneError(f"Unknown allocation '{self.allocation}': use "
                               f"{', '.join(ALLOCATIONS)}.")
        if self.allocation != "uniform" and pattern.structured:
            raise MlpruneError(f"The {self.allocation} allocation prunes layers unevenly, which "
                               f"the fixed {pattern} pattern cannot: use unstructured sparsity "
                               "or the uniform allocation.")
        mwanda = self.mwanda  # checks the parts and weights
        if self.method == "m-wanda" or self.allocation == "cwl":
            if not is_mix(self.calibration):
                what = "The m-wanda method" if self.method == "m-wanda" else "The cwl allocation"
                raise MlpruneError(f"{what} compares languages: calibrate on a mix, e.g. "
                                   "--calibration pooled.")
        if self.method == "m-wanda" and "cwl" in mwanda and self.allocation == "owl":
            raise MlpruneError("M-Wanda's cwl part sets the per-layer sparsity: drop cwl from "
                               "--mwanda-parts to use the owl allocation.")
        if self.layer_allocation != "uniform" and pattern.structured:
            raise MlpruneError(f"M-Wanda's cwl part prunes layers unevenly, which the fixed "
                               f"{pattern} pattern cannot: use unstructured sparsity or drop cwl "
                               "from --mwanda-parts.")
        if not 0 <= self.allocation_range <= 0.5:
            raise MlpruneError("The allocation range must be between 0 and 0.5; got "
                               f"{self.allocation_range}.")
        if self.outlier_threshold <= 0:
            raise MlpruneError(f"The outlier threshold must be above 0; got "
                               f"{self.outlier_threshold}.")
        parse_pair(self.pair)
        for name in (self.calibration, self.other):
            if is_mix(name):
                mix_components(name)  # the syntax; the languages are checked with the corpus
            elif name not in CALIBRATIONS:
                raise MlpruneError(f"Unknown calibration set '{name}': use "
                                   f"{', '.join(CALIBRATIONS)}, pooled or a mix such as "
                                   "mix:fr-en=1,de-en=1.")
        if self.samples < 1:
            raise MlpruneError("The number of samples must be at least 1.")
        get_protocol(self.protocol)
        if self.pad_to is not None and self.pad_to < 1:
            raise MlpruneError(f"--pad-to must be a positive number of tokens; got {self.pad_to}.")
        if self.pad_side not in PAD_SIDES:
            raise MlpruneError(f"Unknown padding side '{self.pad_side}': use "
                               f"{', '.join(PAD_SIDES)}.")
        return self

    @property
    def separator(self) -> str:
        """How demonstrations are separated under this spec's protocol."""
        return get_protocol(self.protocol).separator

    @classmethod
    def preset(cls, name: str, **changes) -> PruneSpec:
        """A named starting point (see :data:`PRESETS`) with ``changes`` on top, validated."""
        if name not in PRESETS:
            raise MlpruneError(f"Unknown preset '{name}': use {', '.join(PRESETS)}.")
        return replace(cls(), **{**PRESETS[name], **changes}).validate()

    @property
    def uses_activations(self) -> bool:
        """Whether the method's scores read calibration statistics (Wanda and its variants)."""
        return self.method in ("wanda", "ratio", "m-wanda")

    @property
    def mwanda(self) -> MWanda:
        """M-Wanda's parts and weights under this spec."""
        return MWanda.parse(self.mwanda_parts, self.variance_weight, self.prob_weight)

    @property
    def layer_allocation(self) -> str:
        """How sparsity is shared across layers: M-Wanda's cwl when its cwl part is on, else
        the ``allocation`` field."""
        if self.method == "m-wanda" and "cwl" in self.mwanda:
            return "cwl"
        return self.allocation

    @property
    def needs_calibration(self) -> bool:
        """Whether a run must capture calibration prompts: for the scores, or to detect the
        features that ``protect`` keeps."""
        return self.uses_activations or bool(self.protect)

    @property
    def label(self) -> str:
        calib = f"-{self.calibration}" if self.method in ("wanda",) else ""
        alloc = f"-{self.allocation}" if self.allocation != "uniform" else ""
        if self.method == "m-wanda":
            parts = set(self.mwanda.parts)
            alloc = "" if parts == set(PARTS) else f"[{','.join(sorted(parts)) or 'none'}]"
            alloc += f"-{self.allocation}" if self.allocation == "owl" else ""
        return f"{self.method}{calib}{alloc}{'-inv' if self.invert else ''}"


# Named presets: what differs from the field defaults above, written once. The dashboard's
# live pages use ``interactive`` (one-shot statistics: a slider move is then a slice of one
# ranking; 8 prompts keep the first capture short); the command line can ask for any.
PRESETS: dict[str, dict] = {
    "default": {},
    "interactive": {"mode": "one-shot", "samples": 8},
    # the authors' published setup (prune.sh: 100 samples, 4 shots; Wanda's sequential pass)
    "paper": {"protocol": "paper", "samples": 100, "mode": "sequential"},
}


@dataclass
class Calibration:
    """Statistics behind a ranking: the calibration set's, and the ratio method's second set
    (its prompts too, which a sequential pass replays through the pruned layers)."""

    prompts: PromptSet
    stats: ActivationStats
    other: ActivationStats | None = None
    seconds: float = 0.0
    other_prompts: PromptSet | None = None


@dataclass
class PruneResult:
    spec: PruneSpec
    ranking: Ranking
    masks: MaskSet
    calibration: Calibration | None
    timings: dict = field(default_factory=dict)


def model_fingerprint(loaded: LoadedModel) -> str:
    """A short id of the model's current weights: name, shapes and a sample of values (an
    offloaded model's read from its offloaded copy: the same id as loaded in memory)."""
    h = hashlib.sha256(loaded.name.encode())
    for name, _ in list(loaded.model.named_parameters())[:64]:
        owner, _, leaf = name.rpartition(".")
        module = loaded.model.get_submodule(owner)
        with onloaded(module, recurse=False):
            param = getattr(module, leaf)
            h.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            h.update(param.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def corpus_hash(corpus: ParallelCorpus) -> str:
    """A short id of a corpus's content (every sentence of every language, in order; its
    name left out), computed once per corpus object."""
    found = corpus.__dict__.get("_mlprune_hash")
    if found is None:
        found = hashlib.sha256(corpus.table.to_csv(index=False).encode()).hexdigest()[:16]
        corpus.__dict__["_mlprune_hash"] = found
    return found


def task_hash(extra_eval: Callable | None) -> str | None:
    """A short id of the zero-shot tasks an ``extra_eval`` scores (its ``tasks``: every item
    and its normalisation), None when it scores none."""
    tasks = getattr(extra_eval, "tasks", None)
    if not tasks:
        return None
    what = [getattr(extra_eval, "norm", None),
            [[t.name, [[it.id, it.lang, it.prompt, list(it.choices), it.label] for it in t.items]]
             for t in tasks]]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()[:16]


def sweep_key(loaded: LoadedModel, corpus: ParallelCorpus,
              extra_eval: Callable | None = None) -> dict:
    """What a sweep's rows were measured on (:data:`KEY_COLUMNS`): the model's fingerprint,
    the corpus's hash and the zero-shot tasks' hash (None without tasks). Every row and
    every store carries it, so rows of another model or corpus are never taken for these."""
    return {"model_fingerprint": model_fingerprint(loaded), "corpus_hash": corpus_hash(corpus),
            "task_hash": task_hash(extra_eval)}


STATS_VERSION = "3"  # bumped when ActivationStats gain fields: older cache entries are not read


def cached_capture(loaded: LoadedModel, prompts: PromptSet, *, batch_size: int = 8,
                   progress: Progress = no_progress,
                   should_stop: Callable[[], bool] | None = None,
                   pad_to: int | None = None, pad_side: str | None = None) -> ActivationStats:
    """Capture, saved to the cache folder as soon as it is done and read back next time,
    so a crash later never costs the calibration again (a cached read reports no progress).
    ``pad_to``/``pad_side``: :func:`~mlprune.capture.capture`'s."""
    padding = pad_to
    if pad_to is not None and padding_side(loaded.tokenizer, pad_side) == "left":
        padding = f"{pad_to}:left"  # right-padded entries keep the key they had before sides
    what = f"{STATS_VERSION}\x00{padding}\x00{prompts.key}{model_fingerprint(loaded)}"
    key = hashlib.sha256(what.encode()).hexdigest()
    # the name only helps a reader: it comes from corpus columns (user text), so it is made
    # harmless; the hash is what identifies the entry
    path = cache_dir() / "stats" / f"{cache_name(prompts.name)}-{key[:20]}.safetensors"
    if path.is_file():
        try:
            return ActivationStats.load(path)
        except MlpruneError:
            path.unlink(missing_ok=True)  # a damaged cache entry: capture again
    stats = capture(loaded.model, loaded.tokenizer, prompts, batch_size=batch_size,
                    progress=progress, should_stop=should_stop, pad_to=pad_to, pad_side=pad_side)
    stats.save(path)
    return stats


def calibration_stats(loaded: LoadedModel, corpus: ParallelCorpus, calibration: str,
                      spec: PruneSpec, *, what: str = "calibration", batch_size: int = 8,
                      progress: Progress = no_progress,
                      should_stop: Callable[[], bool] | None = None
                      ) -> tuple[PromptSet, ActivationStats]:
    """One calibration set's prompts and cached statistics, under the spec's shots, samples,
    seed, protocol and padding. A mix captures (or reads from the cache) each of its sets
    alone and combines them with its weights (:meth:`ActivationStats.combine`); its prompts
    are the pooled prompt set, which a sequential pass collects per part."""
    kw = dict(shots=spec.shots, samples=spec.samples, seed=spec.seed, separator=spec.separator)
    if not is_mix(calibration):
        prompts = calibration_prompts(corpus, calibration, spec.pair, **kw)
        stats = cached_capture(loaded, prompts, batch_size=batch_size, should_stop=should_stop,
                               pad_to=spec.pad_to, pad_side=spec.pad_side,
                               progress=lambda s, f: progress(f"{what} ({prompts.name}), {s}", f))
        return prompts, stats
    parts = calibration_mix(corpus, calibration, **kw)
    captured = []
    for i, (ps, _) in enumerate(parts):
        captured.append(cached_capture(
            loaded, ps, batch_size=batch_size, should_stop=should_stop, pad_to=spec.pad_to,
            pad_side=spec.pad_side,
            progress=lambda s, f, i=i, n=ps.name: progress(
                f"{what} ({n}, set {i + 1}/{len(parts)}), {s}", (i + f) / len(parts))))
    prompts = pooled_prompts(calibration, parts)
    meta = {**{k: v for k, v in captured[0].meta.items() if k not in ("texts", "src", "tgt",
                                                                      "lang")},
            "prompts": calibration, "kind": "mix"}
    if spec.pad_to:
        meta.update(pad_to=spec.pad_to, pad_side=padding_side(loaded.tokenizer, spec.pad_side))
    stats = ActivationStats.combine(captured, [w for _, w in parts], [ps.name for ps, _ in parts],
                                    meta=meta)
    return prompts, stats


def cached_masks(loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec, path: str | Path,
                 *, batch_size: int = 8, progress: Progress = no_progress) -> MaskSet:
    """The spec's masks, read back from ``path`` when an earlier run made them there, else
    pruned and saved there (atomically), so a stopped grid or benchmark never prunes twice.
    A damaged file is made again. The caller names the file after what the masks depend on."""
    path = Path(path)
    if path.is_file():
        try:
            return MaskSet.load(path)
        except Exception:  # noqa: BLE001 - a damaged file is made again
            path.unlink(missing_ok=True)
    masks = prune(loaded, corpus, spec, batch_size=batch_size, progress=progress).masks
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    masks.save(tmp)
    tmp.replace(path)
    return masks


def calibrate(loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec, *,
              batch_size: int = 8, progress: Progress = no_progress,
              should_stop: Callable[[], bool] | None = None) -> Calibration:
    """The dense model's statistics on the spec's calibration set (and second set), cached."""
    start = time.perf_counter()
    prompts, stats = calibration_stats(loaded, corpus, spec.calibration, spec,
                                       batch_size=batch_size, progress=progress,
                                       should_stop=should_stop)
    other = other_prompts = None
    if spec.method == "ratio":
        other_prompts, other = calibration_stats(loaded, corpus, spec.other, spec,
                                                 what="second set", batch_size=batch_size,
                                                 progress=progress, should_stop=should_stop)
    return Calibration(prompts, stats, other, time.perf_counter() - start, other_prompts)


def rank(loaded: LoadedModel, spec: PruneSpec, calib: Calibration | None, *,
         batch_size: int = 8, checkpoint_dir: str | Path | None = None,
         progress: Progress = no_progress) -> Ranking:
    """Rank the selected modules by the spec's method (sequential mode re-captures per layer).
    With ``checkpoint_dir``, each finished layer of the sequential pass and of the ranking is
    saved there as it is done, and a run given the same folder resumes from them."""
    modules = select_modules(loaded.model, spec.layers, spec.blocks)
    protect = None
    if spec.protect:
        if calib is None:
            raise MlpruneError("Protecting features needs calibration statistics.")
        protect = detected_dims(calib.stats, spec.protect)
    stats = calib.stats if calib else None
    other = calib.other if calib else None
    # the allocation reads the dense statistics, in sequential mode too (before the pass)
    allocation = allocate(loaded.model, stats, kind=spec.layer_allocation, method=spec.method,
                          other=other, modules=modules, strength=spec.allocation_range,
                          threshold=spec.outlier_threshold, seed=spec.seed, mwanda=spec.mwanda)
    if spec.mode == "sequential" and spec.uses_activations:
        # the ratio method's second set is replayed through the pruned layers too, as the
        # authors' prune_mt.py runs both sets through each pruned layer
        run = sequential_run(
            loaded.model, loaded.tokenizer, calib.prompts, calib.stats, method=spec.method,
            sparsity=spec.sparsity, pattern=spec.pattern, other=other, invert=spec.invert,
            protect=protect, modules=modules, seed=spec.seed, batch_size=batch_size,
            pad_to=spec.pad_to, pad_side=spec.pad_side, allocation=allocation,
            mwanda=spec.mwanda, checkpoint_dir=checkpoint_dir,
            other_prompts=calib.other_prompts if other is not None else None,
            progress=lambda s, f: progress(f"sequential calibration, {s}", f))
        stats, other = run.stats, run.other if run.other is not None else other
    return rank_modules(loaded.model, stats, method=spec.method, other=other,
                        invert=spec.invert, protect=protect, modules=modules, seed=spec.seed,
                        allocation=allocation, mwanda=spec.mwanda, checkpoint_dir=checkpoint_dir,
                        progress=lambda s, f: progress(f"ranking, {s}", f))


def prune(loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec, *, batch_size: int = 8,
          checkpoint_dir: str | Path | None = None,
          progress: Progress = no_progress) -> PruneResult:
    """Calibrate (when the method needs data), rank and build masks. The model stays dense.
    ``checkpoint_dir``: where the sequential pass and the ranking save each finished layer,
    and resume from."""
    spec.validate()
    t0 = time.perf_counter()
    calib = calibrate(loaded, corpus, spec, batch_size=batch_size, progress=progress) \
        if spec.needs_calibration else None
    t1 = time.perf_counter()
    ranking = rank(loaded, spec, calib, batch_size=batch_size, checkpoint_dir=checkpoint_dir,
                   progress=progress)
    t2 = time.perf_counter()
    masks = ranking.masks(spec.sparsity, spec.pattern)
    masks.meta.update(spec=asdict(spec))
    t3 = time.perf_counter()
    return PruneResult(spec, ranking, masks, calib,
                       {"calibrate": t1 - t0, "rank": t2 - t1, "masks": t3 - t2})


# --------------------------------------------------------------------------- sweep

# Per metric, the column holding the p-value of a row's difference from the dense row of the
# same pair (empty on dense rows): sacrebleu's paired bootstrap, dense as system a.
SIGNIFICANCE_COLUMNS = {"chrf": "chrf_p_vs_dense", "bleu": "bleu_p_vs_dense"}
KEY_COLUMNS = ("model_fingerprint", "corpus_hash", "task_hash")  # sweep_key's: text
SWEEP_COLUMNS = ["pair", "method", "sparsity", "pattern", "chrf", "bleu",
                 "target_language_rate", "perplexity", "n", "sparsity_reached",
                 *SIGNIFICANCE_COLUMNS.values(), *KEY_COLUMNS]
SWEEP_METHODS = {
    "wanda-mt": dict(method="wanda", calibration="mt"),
    "wanda-mono": dict(method="wanda", calibration="mono"),
    "wanda-code": dict(method="wanda", calibration="code"),
    "ratio": dict(method="ratio", calibration="mt", other="code"),
    "magnitude": dict(method="magnitude"),
    "random": dict(method="random"),
    # beyond the paper: a mix of every X->en direction, OWL's per-layer sparsity, M-Wanda
    # and M-Wanda with each of its parts left out
    "wanda-pooled": dict(method="wanda", calibration="pooled"),
    "wanda-owl": dict(method="wanda", calibration="mt", allocation="owl"),
    "m-wanda": dict(method="m-wanda", calibration="pooled", mwanda_parts=",".join(PARTS)),
    **{f"m-wanda-no-{part}": dict(method="m-wanda", calibration="pooled",
                                  mwanda_parts=",".join(p for p in PARTS if p != part))
       for part in PARTS},
}


def paired_vs_dense(dense_outputs: list[dict], outputs: list[dict], lang: str) -> dict:
    """:func:`~mlprune.evaluate.paired_translation_test` of ``outputs`` (system b) against
    ``dense_outputs`` (system a), both ``evaluate_translation``'s ``outputs`` of the same
    sentences; BLEU tokenized for the target language ``lang``."""
    references = [o["reference"] for o in dense_outputs]
    if references != [o["reference"] for o in outputs]:
        raise MlpruneError("The dense and pruned outputs are not of the same sentences; "
                           "they cannot be compared pair by pair.")
    hyps_a, hyps_b = [o["output"] for o in dense_outputs], [o["output"] for o in outputs]
    return paired_translation_test(references, hyps_a, hyps_b,
                                   metrics=tuple(SIGNIFICANCE_COLUMNS), lang=lang)


def sweep(loaded: LoadedModel, corpus: ParallelCorpus, *, methods: list[str], sparsities: list[float],
          pairs: list[str], base: PruneSpec | None = None,
          limit: int | None = 16, out_csv: str | Path | None = None, batch_size: int = 8,
          progress: Progress = no_progress, should_stop: Callable[[], bool] | None = None,
          extra_eval: Callable[[LoadedModel, str, float], dict] | None = None,
          store: str | Path | ResultStore | None = None) -> list[dict]:
    """Evaluate every method x sparsity x pair (unstructured, one-shot; one ranking per
    method and pair: each (pair, method) is a cell a runner can run on its own).

    Each row is written as soon as it is measured, and rows already there are not measured
    again, so an interrupted sweep resumes where it stopped: to ``store`` (a
    :class:`~mlprune.store.ResultStore` or its path: one transaction per row, safe for
    concurrent workers; ``out_csv`` is then an export written at the end), else appended to
    ``out_csv``. A store records the settings its rows were measured with (model, limit,
    spec, extra columns) and refuses rows of other settings. Every pruned row
    carries the p-values of its chrF and BLEU difference from the dense model on the same
    sentences (:data:`SIGNIFICANCE_COLUMNS`, :func:`paired_vs_dense`). The dense outputs come
    from this run's dense row of the pair; when the sweep has none in memory (resumed past it,
    or 0 is not among the sparsities) they are generated once more: greedy decoding of the
    same prompts gives the same outputs.
    """
    unknown = [m for m in methods if m not in SWEEP_METHODS]
    if unknown:
        raise MlpruneError(f"Unknown sweep method {', '.join(unknown)}: use {', '.join(SWEEP_METHODS)}.")
    for s in sparsities:
        check_sparsity(s)
    base = base or PruneSpec()
    pattern = "unstructured"
    settings = sweep_settings(loaded, base, limit, extra_eval, corpus=corpus)
    key = {k: settings[k] for k in KEY_COLUMNS}
    if store is not None:
        store = ResultStore.open(store)
        store.claim(settings)
        done = store.rows()
    else:
        if out_csv:  # the writing path: refuse a CSV not a sweep's, drop a row torn by a crash
            _resume_csv(out_csv)
        done = read_sweep_rows(out_csv) if out_csv else []
        for r in done:  # a CSV keeps no settings: each row says what it was measured on
            check_same_source(out_csv, key, r)
    seen = {(r["pair"], r["method"], float(r["sparsity"]), r["pattern"]) for r in done}
    rows = list(done)
    total = len(methods) * len(sparsities) * len(pairs)
    count = len(seen)
    dense: dict[str, tuple[dict, dict]] = {}  # pair -> dense metrics: the same for every method
    dense_outputs: dict[str, list[dict]] = {}  # pair -> the dense outputs the p-values compare to

    def evaluate(pair: str, spec: PruneSpec) -> dict:  # on the weights the model has now
        return evaluate_translation(loaded.model, loaded.tokenizer, corpus, *parse_pair(pair),
                                    shots=spec.shots, limit=limit, batch_size=batch_size)

    for pair in pairs:
        for method in methods:
            todo = [s for s in sparsities if (pair, method, float(s), pattern) not in seen]
            if not todo:
                continue
            spec = replace(base, pair=pair, mode="one-shot", pattern="unstructured",
                           **SWEEP_METHODS[method]).validate()
            ranking = None
            for s in todo:
                if should_stop is not None and should_stop():
                    raise Cancelled("Sweep cancelled; finished rows are kept.")
                if s == 0 and pair in dense:
                    (metrics, extra), masks = dense[pair], None
                else:
                    if s > 0 and ranking is None:  # calibrate and rank only when pruning
                        calib = calibrate(loaded, corpus, spec, batch_size=batch_size,
                                          should_stop=should_stop) \
                            if spec.needs_calibration else None
                        ranking = rank(loaded, spec, calib)
                    masks = ranking.masks(s) if s > 0 else None
                    with pruned(loaded.model, masks):
                        metrics = evaluate(pair, spec)
                        extra = extra_eval(loaded, method, s) if extra_eval else {}
                    if s == 0:
                        dense[pair] = metrics, extra
                        dense_outputs[pair] = metrics["outputs"]
                p_values = dict.fromkeys(SIGNIFICANCE_COLUMNS.values())
                if s > 0:
                    if pair not in dense_outputs:
                        with pruned(loaded.model, None):
                            dense_outputs[pair] = evaluate(pair, spec)["outputs"]
                    test = paired_vs_dense(dense_outputs[pair], metrics["outputs"],
                                           parse_pair(pair)[1])
                    p_values = {col: test[m]["p_value"] for m, col in SIGNIFICANCE_COLUMNS.items()}
                row = {"pair": pair, "method": method, "sparsity": float(s), "pattern": pattern,
                       **{k: metrics[k] for k in ("chrf", "bleu", "target_language_rate", "perplexity", "n")},
                       "sparsity_reached": masks.overall_sparsity() if masks else 0.0, **p_values,
                       **key, **extra}
                rows.append(row)
                if store is not None:
                    store.add(row)
                elif out_csv:
                    _append_row(out_csv, row)
                count += 1
                progress(f"{pair} {method} {s:.2f}", count / total)
    if store is not None and out_csv:
        store.export_csv(out_csv)
    return rows


def sweep_settings(loaded: LoadedModel, base: PruneSpec, limit: int | None,
                   extra_eval: Callable | None = None, *, corpus: ParallelCorpus) -> dict:
    """What a sweep row's numbers depend on besides its cell: the model (its name and
    fingerprint), the corpus (its hash), the held-out limit, the base spec's fields a cell
    does not set, and the extra columns with their tasks' hash (:func:`sweep_key`)."""
    per_cell = {"pair", "sparsity", "pattern", "mode", *(k for fields in SWEEP_METHODS.values()
                                                         for k in fields)}
    settings = {"model": loaded.name, "dequantized_from": loaded.dequantized_from,
                "limit": limit, "spec": {k: v for k, v in asdict(base).items() if k not in per_cell},
                "extra": list(getattr(extra_eval, "columns", [])),
                **sweep_key(loaded, corpus, extra_eval)}
    dtype = loaded.facts()["dtype"]
    if dtype != "float32":  # a bf16 sweep never resumes (or is mixed into) an fp32 one
        settings["dtype"] = dtype
    return settings


def read_sweep_rows(path: str | Path) -> list[dict]:
    """The complete rows of a sweep CSV or results store (by its suffix: .sqlite, .db), read
    without changing the file (a store is opened read-only). A CSV's last line without a
    final newline (cut short by a crash, or being written) is left out: a resumed sweep
    measures it again. Raises MlpruneError for a file that is not a sweep's results."""
    path = Path(path)
    if not path.is_file():
        return []
    if is_store(path):
        return ResultStore(path, readonly=True).rows()
    data = path.read_bytes()
    if b"\n" not in data and _torn_header(data):
        return []  # a header cut short on the first write: no row yet
    complete = data[: data.rfind(b"\n") + 1]  # bytes: a torn line may end mid-character
    try:
        reader = csv.DictReader(io.StringIO((complete or data).decode("utf-8-sig"), newline=""))
        rows = list(reader) if complete else []  # one line and no newline: a header only
    except (UnicodeDecodeError, csv.Error) as e:
        raise MlpruneError(f"{path} is not a sweep results CSV ({e}).") from e
    missing = [c for c in KEY if c not in (reader.fieldnames or [])]
    if missing:
        raise MlpruneError(f"{path} is not a sweep results file: it has no column {missing[0]}.")
    for line, r in enumerate(rows, start=2):
        if None in r:
            raise MlpruneError(f"Line {line} of {path} has more fields than its header.")
        for k, v in r.items():
            if v == "" or v is None:
                r[k] = None  # written for None (the dense rows' p-values)
            elif k not in ("pair", "method", "pattern", *KEY_COLUMNS):  # text, even "1e5"
                try:
                    r[k] = float(v)
                except (TypeError, ValueError):
                    pass
        bad = next((k for k in KEY if r[k] is None or (k == "sparsity"
                                                      and not isinstance(r[k], float))), None)
        if bad:
            raise MlpruneError(f"Line {line} of {path} has no valid {bad}; it is not a sweep "
                               "results file.")
    return rows


def _torn_header(data: bytes) -> bool:
    """Whether ``data`` (no newline in it) is the start of a sweep CSV's header, cut short on
    the first write (header and first row go in one write)."""
    mine = ",".join(SWEEP_COLUMNS).encode()
    return mine.startswith(data) or data.startswith(mine)


def _resume_csv(path: str | Path) -> None:
    """(The sweep's writing path, before it appends.) Refuse a CSV that is not a sweep's, and
    cut off a last row torn by a crash mid-write (no final newline) so that it is measured
    again; a file that is not a sweep's is never changed."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut == len(data):
        _check_header(path, SWEEP_COLUMNS)
        return
    if cut == 0 and not _torn_header(data):
        raise MlpruneError(f"{path} is not a sweep CSV; give another CSV file to resume into.")
    if cut:
        _check_header(path, SWEEP_COLUMNS)
    with path.open("r+b") as f:
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def _header(path: Path) -> list[str] | None:
    """The column names of a CSV file (None when it has none yet)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), None)
    except (UnicodeDecodeError, csv.Error) as e:
        raise MlpruneError(f"{path} is not a sweep results CSV ({e}).") from e


def _check_header(path: str | Path, columns: list[str]) -> None:
    """Refuse to resume into a sweep CSV written without some of these columns (an earlier
    version's): appended rows would not line up with its header."""
    header = _header(Path(path))
    missing = [c for c in columns if header is not None and c not in header]
    if any(c in missing for c in KEY):  # not even a cell's key: another program's file
        raise MlpruneError(f"{path} is not a sweep CSV; give another CSV file to resume into.")
    if missing:
        raise MlpruneError(f"{path} was written without the column {missing[0]} (by an earlier "
                           "mlprune); give another CSV file to resume into.")


def _append_row(path: str | Path, row: dict) -> None:
    """Append one row in a single write and fsync it, writing the header for a new file."""
    path = Path(path)
    header = _header(path)
    new = header is None
    if not new and header != list(row):
        raise MlpruneError(f"The columns of this row do not match the header of {path}; give "
                           "another CSV file to resume into.")
    path.parent.mkdir(parents=True, exist_ok=True)
    line = io.StringIO(newline="")
    writer = csv.DictWriter(line, fieldnames=list(row))
    if new:
        writer.writeheader()
    writer.writerow(row)
    with path.open("a", newline="", encoding="utf-8") as f:
        f.write(line.getvalue())
        f.flush()
        os.fsync(f.fileno())
