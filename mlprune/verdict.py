"""The verdict grid: does translation-calibrated pruning beat the unpruned model, and
monolingual calibration, in non-English zero-shot accuracy? Measured with seeds and power.

Kim et al. (2024) claim that Wanda calibrated on few-shot translation demonstrations
*improves* a model's non-English zero-shot accuracy. One calibration draw and 40 items per
language cannot tell that from noise: two draws of one method differ by up to 3.5 points in
one language. This grid measures the claim the way a reader needs it:

- the sparsity curve (10, 20, 30 and 50% unstructured, one-shot: one ranking per calibration
  set and seed, sliced at each sparsity) of wanda-mt (en->X demonstrations: X is the target
  language, as the authors' scripts evaluate in the target) and wanda-mono (X alone), for
  each calibration language X, each evaluated in X on every item of the tasks;
- at 50% only, evaluated in every grid language and English: English-only wanda-mono (the
  usual Wanda calibration), pooled (every X->en direction), OWL on wanda-mt and M-Wanda;
- the paper's protocol (sequential, 100 prompts) at 50% and 2:4 for the first language;
- translation (en->X, the calibration direction) at 50% and 2:4 on the 170 parallel source
  sentences of the built-in tasks, which never enter calibration;
- every variant with several seeds: independent draws of the calibration prompts.

Each measured cell is one strict JSON file under ``out/cells``, written atomically as soon as
it is done, so the grid resumes cell by cell after any stop, and finished cells can be
committed and resumed on another machine (a cell that cannot be read is moved aside and
measured again, :class:`mlprune.storage.Cells`' policy). ``out/grid.json`` records the
model's fingerprint, the corpus and task hashes and the settings; a folder measured with
anything else is refused.
The work runs in priority order (dense, then every seed of wanda-mt's curve, then
wanda-mono's, then the rest), so a grid stopped early answers the headline first.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mlprune import MlpruneError, Progress, no_progress, storage
from mlprune import zeroshot as zs
from mlprune.capture import Cancelled
from mlprune.corpus import ParallelCorpus, language_name
from mlprune.evaluate import bleu, chrf, generate, target_language_rate
from mlprune.models import LoadedModel
from mlprune.pipeline import SWEEP_METHODS, PruneSpec, calibrate, model_fingerprint, rank
from mlprune.prompts import split_rows
from mlprune.prune import pruned
from mlprune.storage import atomic_write_json

DENSE = "dense"
ANALYSIS = "analysis:overlap"  # the dense model's large dimensions, compared across sets
OVERLAP_FRACTIONS = {"top_in_top": 0.05, "top_in_bottom": 0.4}  # ours; the paper's (40%)
# Variants measured at 50% only and evaluated in every language (beyond the per-language
# curve): what each is, as a spec's fields. The calibration language of wanda-owl is the
# grid's first language (en->X demonstrations, like wanda-mt).
WIDE_VARIANTS = {
    "wanda-mono-en": dict(method="wanda", calibration="mono"),
    "wanda-pooled": dict(SWEEP_METHODS["wanda-pooled"]),
    "wanda-owl": dict(SWEEP_METHODS["wanda-owl"]),
    "m-wanda": dict(SWEEP_METHODS["m-wanda"]),
}


def _sparsity_label(pattern: str) -> str:
    return pattern if ":" in pattern else f"{float(pattern):.0%}"


@dataclass(frozen=True)
class Variant:
    """One pruned model (or the dense one): a method, its calibration language, a pattern
    and a seed. ``id`` names its cells."""

    method: str  # wanda-mt, wanda-mono, or a WIDE_VARIANTS name; "dense"
    lang: str = ""  # calibration language X (wanda-mt: en->X; wanda-mono: X)
    pattern: str = ""  # "0.3" (unstructured sparsity) or "2:4"
    seed: int = 0
    protocol: str = "one-shot"  # one-shot (16 prompts, sliced) or paper (sequential, 100)

    @property
    def id(self) -> str:
        """'wanda-mt_fr_0.3_s1_one-shot': the name of its cells' folder."""
        if self.method == DENSE:
            return DENSE
        pattern = self.pattern.replace(":", "of")
        return f"{self.method}_{self.lang}_{pattern}_s{self.seed}_{self.protocol}"

    @property
    def label(self) -> str:
        """'wanda-mt fr 30%' (seed apart)."""
        if self.method == DENSE:
            return DENSE
        proto = " (paper protocol)" if self.protocol == "paper" else ""
        return f"{self.method} {self.lang} {_sparsity_label(self.pattern)}{proto}"


@dataclass(frozen=True)
class Job:
    """One ranking (a calibration set, a seed) and what to measure with its masks: for each
    pattern, the evaluations ("zs:TASK:LANG" or "mt:en-X") of that variant."""

    spec: PruneSpec | None  # None: the dense model
    variants: tuple[tuple[Variant, tuple[str, ...]], ...]
    phase: str


@dataclass(frozen=True)
class VerdictGrid:
    """What the verdict measures. :data:`FULL` is the README's grid (sized for ~6 h on 2 CPU
    cores once scoring shares prompts); :data:`QUICK` is a smoke-sized one."""

    langs: tuple[str, ...] = ("fr", "zh", "ru", "sw")
    sparsities: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    seeds: tuple[int, ...] = (0, 1, 2)
    samples: int = 16  # calibration prompts of the one-shot variants
    shots: int = 4
    tasks: tuple[str, ...] = ("wordorder", "completion")
    task_limit: int | None = None  # items per language (None: every item)
    wide: tuple[str, ...] = tuple(WIDE_VARIANTS)
    paper_langs: tuple[str, ...] = ("fr",)
    paper_samples: int = 100
    translation_patterns: tuple[str, ...] = ("0.5", "2:4")
    translation_limit: int = 150
    rankc: bool = True  # also score the 50% headline variants in English (RankC)

    def validate(self) -> VerdictGrid:
        """Refuse a grid that cannot answer (in one sentence); returns the grid."""
        if not self.langs or "en" in self.langs:
            raise MlpruneError("The verdict's languages are the non-English ones to calibrate "
                               "and evaluate in, e.g. fr,zh,ru,sw.")
        if not self.seeds:
            raise MlpruneError("The verdict needs at least one seed.")
        for s in self.sparsities:
            if not 0 < s < 1:
                raise MlpruneError(f"Sparsity {s} is outside (0, 1).")
        unknown = [w for w in self.wide if w not in WIDE_VARIANTS]
        if unknown:
            raise MlpruneError(f"Unknown variant(s) {', '.join(unknown)}: use "
                               f"{', '.join(WIDE_VARIANTS)}.")
        return self

    def spec(self, method: str, lang: str, seed: int, protocol: str = "one-shot",
             pattern: str = "0.5") -> PruneSpec:
        """The spec of one ranking (one-shot) or one sequential pruning (paper)."""
        if method == "wanda-mt":
            fields = dict(method="wanda", calibration="mt", pair=f"en-{lang}")
        elif method == "wanda-mono":
            fields = dict(method="wanda", calibration="mono", pair=f"{lang}-en")
        elif method == "wanda-mono-en":
            fields = dict(WIDE_VARIANTS[method], pair=f"en-{self.langs[0]}")
        elif method in WIDE_VARIANTS:
            fields = dict(WIDE_VARIANTS[method], pair=f"en-{self.langs[0]}")
        else:
            raise MlpruneError(f"Unknown verdict method '{method}'.")
        structured = ":" in pattern
        shape = dict(pattern=pattern if structured else "unstructured",
                     sparsity=0.5 if structured else float(pattern))
        if protocol == "paper":
            return PruneSpec.preset("paper", seed=seed, samples=self.paper_samples,
                                    shots=self.shots, **shape, **fields)
        return PruneSpec.preset("default", mode="one-shot", seed=seed, samples=self.samples,
                                shots=self.shots, **shape, **fields)

    def zs_evals(self, langs: Iterable[str]) -> tuple[str, ...]:
        """The zero-shot evaluations ("zs:TASK:LANG") of every task in ``langs``."""
        return tuple(f"zs:{t}:{lang}" for lang in langs for t in self.tasks)

    def jobs(self) -> list[Job]:
        """Every ranking and what its masks measure, in the order the run takes them."""
        patterns = tuple(str(s) for s in self.sparsities)
        all_langs = (*self.langs, "en")
        out = [Job(None, ((Variant(DENSE), self.zs_evals(all_langs)),), "dense")]
        # the headline curve: every seed of wanda-mt first (pruned vs dense needs only it),
        # then wanda-mono's, one seed at a time across languages
        for method in ("wanda-mt", "wanda-mono"):
            for seed in self.seeds:
                for lang in self.langs:
                    variants = []
                    for p in patterns:
                        evals = self.zs_evals([lang])
                        if self.rankc and float(p) == 0.5:
                            evals += self.zs_evals(["en"])
                        variants.append((Variant(method, lang, p, seed), evals))
                    out.append(Job(self.spec(method, lang, seed), tuple(variants), "curve"))
        for seed in self.seeds:  # 50%, every language
            for method in ("wanda-mt", *self.wide):
                lang = self.langs[0]
                evals = self.zs_evals([x for x in all_langs
                                       if method in self.wide or x not in (lang, "en")])
                out.append(Job(self.spec(method, lang, seed), ((Variant(method, lang, "0.5", seed),
                                                                evals),), "wide"))
        for seed in self.seeds:  # the paper's protocol
            for lang in self.paper_langs:
                for method in ("wanda-mt", "wanda-mono"):
                    for p in self.translation_patterns:
                        v = Variant(method, lang, p, seed, "paper")
                        out.append(Job(self.spec(method, lang, seed, "paper", p),
                                       ((v, self.zs_evals([lang]) + (f"mt:en-{lang}",)),),
                                       "paper"))
        out.append(Job(None, ((Variant(DENSE), tuple(f"mt:en-{x}" for x in self.langs)),),
                       "translation"))
        for seed in self.seeds:  # translation, one-shot rankings sliced at 50% and 2:4
            for lang in self.langs:
                for method in ("wanda-mt", "wanda-mono"):
                    out.append(Job(self.spec(method, lang, seed), tuple(
                        (Variant(method, lang, p, seed), (f"mt:en-{lang}",))
                        for p in self.translation_patterns), "translation"))
        return out

    def cells(self) -> list[tuple[Variant, str]]:
        """(variant, evaluation) of every cell, in run order (each once)."""
        seen, out = {(DENSE, ANALYSIS)}, [(Variant(DENSE), ANALYSIS)]
        for job in self.jobs():
            for v, evals in job.variants:
                for e in evals:
                    if (v.id, e) not in seen:
                        seen.add((v.id, e))
                        out.append((v, e))
        return out


FULL = VerdictGrid()
QUICK = VerdictGrid(langs=("fr", "zh"), sparsities=(0.3, 0.5), seeds=(0, 1), samples=8,
                    task_limit=40, wide=("wanda-mono-en",), paper_langs=(), paper_samples=16,
                    translation_patterns=("0.5",), translation_limit=24)


# --------------------------------------------------------------------------- cells


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


class Cells(storage.Cells):
    """The grid's measured cells in ``out/cells``, one per (variant id, evaluation), with
    :class:`mlprune.storage.Cells`' policy: a cell that cannot be read is moved aside and
    measured again."""

    def __init__(self, out: str | Path, on_damaged: Callable[[str], None] | None = None):
        super().__init__(Path(out) / "cells", on_damaged)

    def path(self, variant_id: str, evaluation: str) -> Path:
        """``cells/<variant id>/<evaluation>.json``. Named as the verdict always named its
        cells (each character outside letters, digits and ``._-`` becomes ``_``, none merged
        or stripped, unlike :func:`mlprune.storage.slug`), so folders measured before, and
        the shipped one, are found cell for cell."""
        return self.root / _slug(variant_id) / f"{_slug(evaluation)}.json"


# --------------------------------------------------------------------------- identity


def _hash(text: str | bytes) -> str:
    return hashlib.sha256(text if isinstance(text, bytes) else text.encode()).hexdigest()[:16]


def corpus_hash(corpus: ParallelCorpus) -> str:
    """A short hash of the corpus's sentences."""
    return _hash(corpus.table.to_csv(index=False))


def task_hash(task: zs.Task) -> str:
    """A short hash of the task's items (ids, languages, prompts, choices, labels)."""
    return _hash(json.dumps([(it.id, it.lang, it.prompt, list(it.choices), it.label)
                             for it in task.items], ensure_ascii=False))


def identity(loaded: LoadedModel, corpus: ParallelCorpus, tasks: list[zs.Task],
             grid: VerdictGrid) -> dict:
    """What every cell of a folder depends on: the model's weights, the corpus, the tasks,
    and the settings that change a cell's content (not which cells exist)."""
    settings = {k: getattr(grid, k) for k in ("samples", "shots", "task_limit", "paper_samples",
                                              "translation_limit")}
    return {"model": loaded.name, "dequantized_from": loaded.dequantized_from,
            "model_fingerprint": model_fingerprint(loaded),
            "corpus": corpus.name, "corpus_hash": corpus_hash(corpus),
            "tasks": {t.name: task_hash(t) for t in tasks}, "settings": settings}


def claim_folder(out: Path, ident: dict) -> None:
    """Record what the folder's cells were measured on; refuse a folder measured on another
    model, corpus, task or setting, naming what differs (adding tasks is allowed)."""
    manifest = out / "grid.json"
    if manifest.is_file():
        old = json.loads(manifest.read_text(encoding="utf-8"))
        differs = [k for k in ("model_fingerprint", "corpus_hash", "settings")
                   if old.get(k) != ident[k]]
        differs += [f"task {t}" for t, h in ident["tasks"].items()
                    if t in old.get("tasks", {}) and old["tasks"][t] != h]
        if differs:
            what = ", ".join(d.replace("_fingerprint", "").replace("_hash", "") for d in differs)
            raise MlpruneError(f"{out} holds cells measured with another {what} (see "
                               f"{manifest}); choose another --out or delete that folder.")
        ident = {**old, **ident, "tasks": {**old.get("tasks", {}), **ident["tasks"]}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, ident)


# --------------------------------------------------------------------------- measuring


def translation_sentences(langs: tuple[str, ...] = ()) -> ParallelCorpus:
    """The 170 parallel source sentences of the built-in tasks (never in calibration)."""
    from mlprune.corpus import read_corpus
    from mlprune.zeroshot.tasks import builtin_task_path

    read = read_corpus(builtin_task_path("wordorder").parent / "source.tsv", name="tasks-source")
    return ParallelCorpus(read.table.drop(columns=[c for c in ("id",) if c in read.table]),
                          read.name)


def translation_cell(loaded: LoadedModel, corpus: ParallelCorpus, sentences: ParallelCorpus,
                     src: str, tgt: str, *, limit: int, shots: int = 4, batch_size: int = 16,
                     progress: Progress = no_progress) -> dict:
    """Few-shot translation of ``limit`` task source sentences, demonstrations drawn from the
    calibration corpus's pool (seeded, the same for every variant): chrF, BLEU, language."""
    import random

    pool, _ = split_rows(corpus)
    rng = random.Random(1)
    s_name, t_name = language_name(src), language_name(tgt)
    table = corpus.table
    prompts, refs, sources = [], [], []
    for r in range(min(limit, len(sentences))):
        demos = rng.sample(pool, shots)
        head = "".join(f"{s_name}: {table[src].iat[d]}\n{t_name}: {table[tgt].iat[d]}\n"
                       for d in demos)
        source = sentences.table[src].iat[r]
        prompts.append(f"{head}{s_name}: {source}\n{t_name}:")
        sources.append(source)
        refs.append(sentences.table[tgt].iat[r])
    outputs = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=64,
                       batch_size=batch_size, progress=progress)
    hyps = [g.text for g in outputs]
    return {"pair": f"{src}-{tgt}", "n": len(hyps), "chrf": chrf(hyps, refs),
            "bleu": bleu(hyps, refs, tgt),
            "target_language_rate": target_language_rate(hyps, tgt, tuple(corpus.languages)),
            "outputs": [{"source": s, "reference": r, "output": h}
                        for s, r, h in zip(sources, refs, hyps)]}


def zeroshot_cell(loaded: LoadedModel, task: zs.Task, lang: str, *, batch_size: int = 16,
                  progress: Progress = no_progress) -> dict:
    """Every item of ``task`` in ``lang`` scored: per-choice log-likelihoods, enough to
    rebuild the result (and RankC against English) without the model."""
    sub = task.subset(None, [lang])
    scored = zs.evaluate_task(loaded.model, loaded.tokenizer, sub, batch_size=batch_size,
                              progress=progress)
    return zs.result_dict(scored, n_bytes=True)


def analysis_cell(loaded: LoadedModel, corpus: ParallelCorpus, grid: VerdictGrid, *,
                  batch_size: int = 8) -> dict:
    """Do translation directions share their large dimensions, and are they specific to
    translation? For each seed: X->en translation and X monolingual prompt sets (the
    calibration's size and shots) captured on the dense model, and two overlap measures
    between them, averaged over layers: top-5% in top-5% and the paper's top-40% in
    bottom-40%. Two draws of the same set give the ceiling an overlap can reach under
    sampling noise (seed s against seed s+1); chance is the value of unrelated rankings."""
    from mlprune.features import overlap
    from mlprune.pipeline import cached_capture
    from mlprune.prompts import monolingual_prompts, translation_prompts

    def sets(seed: int) -> dict:
        kw = dict(shots=grid.shots, samples=grid.samples, seed=seed)
        out = {f"mt:{x}-en": translation_prompts(corpus, x, "en", **kw) for x in grid.langs}
        out.update({f"mono:{x}": monolingual_prompts(corpus, x, **kw) for x in grid.langs})
        return {k: cached_capture(loaded, ps, batch_size=batch_size) for k, ps in out.items()}

    def mean(a, b, measure: str) -> float:
        return float(overlap(a, b, OVERLAP_FRACTIONS[measure], "hidden_states")[measure].mean())

    captured = {seed: sets(seed) for seed in grid.seeds}
    per_seed = []
    for i, seed in enumerate(grid.seeds):
        here = captured[seed]
        row: dict = {"seed": seed}
        for measure in OVERLAP_FRACTIONS:
            row[measure] = {a: {b: mean(here[a], here[b], measure) for b in here} for a in here}
            if len(grid.seeds) > 1:  # the same set, another draw: the noise ceiling
                other = captured[grid.seeds[(i + 1) % len(grid.seeds)]]
                row[f"{measure}_same_set_other_seed"] = {k: mean(here[k], other[k], measure)
                                                         for k in here}
        per_seed.append(row)
    return {"fractions": OVERLAP_FRACTIONS, "chance": {"top_in_top": 0.05,
                                                        "top_in_bottom": 0.4},
            "seeds": per_seed, "samples": grid.samples, "shots": grid.shots}


@dataclass
class Clock:
    """Measured seconds per kind of cell, for the estimate of the time left."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, kind: str, s: float) -> None:
        """One more cell of ``kind`` took ``s`` seconds."""
        self.seconds.setdefault(kind, []).append(s)

    def estimate(self, todo: list[str]) -> float | None:
        """Seconds for the cells of these kinds, at each kind's mean so far (the overall mean
        for a kind not seen yet); None before any cell."""
        if not self.seconds:
            return None
        overall = sum(sum(v) for v in self.seconds.values()) / sum(
            len(v) for v in self.seconds.values())
        return sum((sum(v) / len(v)) if (v := self.seconds.get(k)) else overall for k in todo)


def _kind(evaluation: str) -> str:
    return evaluation.split(":")[0] + ":" + evaluation.split(":")[1] \
        if evaluation.startswith("zs:") else "mt"


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    h, rest = divmod(int(s), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def run(loaded: LoadedModel, corpus: ParallelCorpus, out: str | Path,
        grid: VerdictGrid = FULL, *, extra_tasks: tuple[str, ...] = (), batch_size: int = 16,
        progress: Progress = no_progress, log: Callable[[str], None] = print,
        should_stop: Callable[[], bool] | None = None, phases: tuple[str, ...] | None = None
        ) -> dict:
    """Measure every cell not measured yet, in priority order; returns what this run measured
    and the grid with its tasks (the report is :func:`mlprune.verdict_report.build_report`'s,
    from the cells). ``log`` hears one line per cell with the progress and the time left."""
    out = Path(out)
    grid = grid.validate()
    grid = replace(grid, tasks=(*grid.tasks, *[t for t in extra_tasks if t not in grid.tasks]))
    tasks = {t: zs.load_task(t).subset(grid.task_limit or None, None) for t in grid.tasks}
    corpus.require("en", *grid.langs)
    claim_folder(out, identity(loaded, corpus, list(tasks.values()), grid))
    cells = Cells(out, on_damaged=log)
    sentences = translation_sentences()
    jobs = [j for j in grid.jobs() if phases is None or j.phase in phases]
    todo = [(v.id, e) for j in jobs for v, evals in j.variants for e in evals
            if not cells.has(v.id, e)]
    todo = list(dict.fromkeys(todo))
    clock = Clock()
    total, done = len(todo), 0
    started = time.perf_counter()
    if not cells.has(DENSE, ANALYSIS) and (phases is None or "dense" in phases):
        todo.insert(0, (DENSE, ANALYSIS))
        total += 1
    log(f"verdict: {total} cells to measure in {out}")
    if (DENSE, ANALYSIS) in todo:
        t0 = time.perf_counter()
        cells.put({**analysis_cell(loaded, corpus, grid), "evaluation": ANALYSIS,
                   "variant": asdict(Variant(DENSE)),
                   "seconds": round(time.perf_counter() - t0, 2)}, DENSE, ANALYSIS)
        todo.remove((DENSE, ANALYSIS))
        done += 1
        log(f"[{done}/{total}] dense analysis (overlaps): {time.perf_counter() - t0:.0f} s")
    for job in jobs:
        missing = [(v, e) for v, evals in job.variants for e in evals
                   if not cells.has(v.id, e)]
        if not missing:
            continue
        if should_stop is not None and should_stop():
            raise Cancelled("Verdict stopped; finished cells are kept and a new run resumes.")
        ranking = None
        if job.spec is not None:
            t0 = time.perf_counter()
            calib = calibrate(loaded, corpus, job.spec, batch_size=8) \
                if job.spec.needs_calibration else None
            ranking = rank(loaded, job.spec, calib, batch_size=8)
            clock.add("rank", time.perf_counter() - t0)
        for variant, evals in job.variants:
            wanted = [e for e in evals if (variant, e) in missing]
            if not wanted:
                continue
            masks = None if ranking is None else ranking.masks(
                0.5 if ":" in variant.pattern else float(variant.pattern),
                variant.pattern if ":" in variant.pattern else "unstructured")
            with pruned(loaded.model, masks):
                for e in wanted:
                    t0 = time.perf_counter()
                    cell = _measure(loaded, corpus, sentences, tasks, grid, e, batch_size)
                    cell.update(variant=asdict(variant), evaluation=e,
                                sparsity_reached=masks.overall_sparsity() if masks else 0.0,
                                seconds=round(time.perf_counter() - t0, 2))
                    cells.put(cell, variant.id, e)
                    clock.add(_kind(e), time.perf_counter() - t0)
                    done += 1
                    todo.remove((variant.id, e))
                    left = clock.estimate([_kind(x[1]) for x in todo])
                    log(f"[{done}/{total}] {variant.label} seed {variant.seed} {e}: "
                        f"{cell['seconds']:.0f} s; elapsed "
                        f"{_fmt_s(time.perf_counter() - started)}, left ~{_fmt_s(left)}")
                    progress(f"{variant.label} {e}", done / max(total, 1))
    return {"measured": done, "total": total, "seconds": time.perf_counter() - started,
            "grid": grid}


def _lang_of(evaluation: str) -> str:
    if evaluation.startswith("zs:"):
        return evaluation.split(":")[2]
    return evaluation.split(":")[1].split("-")[1]


def _measure(loaded: LoadedModel, corpus: ParallelCorpus, sentences: ParallelCorpus,
             tasks: dict[str, zs.Task], grid: VerdictGrid, evaluation: str,
             batch_size: int) -> dict:
    kind, *rest = evaluation.split(":")
    if kind == "zs":
        task, lang = rest
        return zeroshot_cell(loaded, tasks[task], lang, batch_size=batch_size)
    src, tgt = rest[0].split("-")
    return translation_cell(loaded, corpus, sentences, src, tgt, limit=grid.translation_limit,
                            shots=grid.shots, batch_size=batch_size)


def status(out: str | Path, grid: VerdictGrid = FULL) -> dict:
    """How much of the grid a folder holds: cells done and to do per phase, and the measured
    seconds of the finished ones."""
    cells = Cells(Path(out))
    phases: dict[str, dict] = {}
    for job in grid.jobs():
        p = phases.setdefault(job.phase, {"done": 0, "todo": 0, "seconds": 0.0})
        for v, evals in job.variants:
            for e in evals:
                c = cells.get(v.id, e)
                if c is None:
                    p["todo"] += 1
                else:
                    p["done"] += 1
                    p["seconds"] += c.get("seconds", 0.0)
    return phases


def iter_cells(out: str | Path) -> Iterator[dict]:
    """Every measured cell of a folder."""
    root = Path(out) / "cells"
    for path in sorted(root.glob("*/*.json")):
        yield json.loads(path.read_text(encoding="utf-8"))


def grid_for(quick: bool, **changes) -> VerdictGrid:
    """The full or quick grid with ``changes`` on top."""
    return replace(QUICK if quick else FULL, **changes).validate()


def default_out() -> Path:
    """Where the README's verdict lives (cells and report ship with the project)."""
    return Path(os.environ.get("MLPRUNE_VERDICT") or
                Path(__file__).resolve().parents[1] / "bench" / "results" / "verdict")
