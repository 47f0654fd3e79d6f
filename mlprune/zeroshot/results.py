"""One model's scores on a task (accuracy, RankC, power) and two models compared on it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from mlprune import MlpruneError, Progress, no_progress
from mlprune.zeroshot.scoring import NORMS, ItemScores, score_items
from mlprune.zeroshot.statistics import (
    assumed_discordance,
    detectable_difference,
    paired_bootstrap,
    rankc,
)
from mlprune.zeroshot.tasks import REFERENCE_LANG, Task, rankc_unaligned

NAN = float("nan")


def _mean(values) -> float:
    """Mean of the defined values (NaN, e.g. an undefined RankC, left out); NaN if none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else NAN


@dataclass
class TaskResult:
    """Scored items of one task for one model, with accuracy and consistency views."""

    task: str
    scored: list[ItemScores]
    norm: str = "token"

    @classmethod
    def from_dict(cls, task: Task, cell: dict) -> TaskResult:
        """The result read back from its stored form (``result_dict(result, n_bytes=True)``,
        a grid's zero-shot cell) and the task's items, without the model."""
        items = {(it.id, it.lang): it for it in task.items}
        scored = [ItemScores(items[(c["id"], c["lang"])], tuple(c["logprob"]),
                             tuple(c["n_tokens"]), tuple(c["n_bytes"])) for c in cell["items"]]
        return cls(task.name, scored, cell["norm"])

    @property
    def languages(self) -> list[str]:
        """Its languages, English first."""
        seen = list(dict.fromkeys(s.item.lang for s in self.scored))
        return sorted(seen, key=lambda lang: lang != REFERENCE_LANG)

    def by_lang(self, lang: str) -> list[ItemScores]:
        """The scored items in ``lang``."""
        return [s for s in self.scored if s.item.lang == lang]

    def accuracy(self, norm: str | None = None) -> dict[str, float]:
        """Accuracy per language."""
        norm = norm or self.norm
        out = {}
        for lang in self.languages:
            part = self.by_lang(lang)
            out[lang] = sum(s.correct(norm) for s in part) / len(part)
        return out

    def non_english_accuracy(self, norm: str | None = None) -> float:
        """Mean of the per-language accuracies of the languages other than English."""
        acc = [v for k, v in self.accuracy(norm).items() if k != REFERENCE_LANG]
        return sum(acc) / len(acc) if acc else NAN

    def rankc_skipped(self) -> dict[str, int]:
        """Per non-English language: items left out of RankC because their choices are in
        another order than in English (:func:`tasks.rankc_unaligned`)."""
        unaligned = rankc_unaligned(s.item for s in self.scored)
        return {lang: sum((s.item.id, lang) in unaligned for s in self.by_lang(lang))
                for lang in self.languages if lang != REFERENCE_LANG}

    def consistency(self, norm: str | None = None) -> dict[str, float]:
        """RankC of each non-English language with English, over the items both have in the
        same choice order (NaN for a language without any)."""
        norm = norm or self.norm
        if REFERENCE_LANG not in self.languages:
            return {}
        ref = {s.item.id: s.scores(norm) for s in self.by_lang(REFERENCE_LANG)}
        unaligned = rankc_unaligned(s.item for s in self.scored)
        out = {}
        for lang in self.languages:
            if lang == REFERENCE_LANG:
                continue
            pairs = [(ref[s.item.id], s.scores(norm)) for s in self.by_lang(lang)
                     if s.item.id in ref and (s.item.id, lang) not in unaligned]
            out[lang] = rankc([p[0] for p in pairs], [p[1] for p in pairs])
        return out

    def mean_consistency(self, norm: str | None = None) -> float:
        """Mean RankC over the non-English languages where it is defined."""
        return _mean(self.consistency(norm).values())

    def correctness(self, norm: str | None = None) -> dict[tuple[str, str], bool]:
        """(id, lang) -> whether the model picked the label."""
        norm = norm or self.norm
        return {(s.item.id, s.item.lang): s.correct(norm) for s in self.scored}

    def table(self) -> list[dict]:
        """One row per language (and the non-English mean): n, accuracy (chosen norm), raw
        accuracy, RankC with English, items RankC left out, and the detectable difference:
        the smallest accuracy change a paired test finds at p < 0.05 with 80% power at this n,
        assuming the other model errs independently (:func:`statistics.assumed_discordance`)."""
        acc, raw, cons = self.accuracy(), self.accuracy("none"), self.consistency()
        skipped = self.rankc_skipped()
        rows = [{"lang": lang, "n": len(self.by_lang(lang)), "accuracy": acc[lang],
                 "accuracy_raw": raw[lang], "rankc": cons.get(lang, NAN),
                 "rankc_skipped": skipped.get(lang, 0)}
                for lang in self.languages]
        if len(self.languages) > 1:
            others = [r for r in rows if r["lang"] != REFERENCE_LANG]
            rows.append({"lang": "non-en", "n": sum(r["n"] for r in others),
                         "accuracy": self.non_english_accuracy(),
                         "accuracy_raw": self.non_english_accuracy("none"),
                         "rankc": self.mean_consistency(),
                         "rankc_skipped": sum(r["rankc_skipped"] for r in others)})
        for r in rows:
            r["detectable_diff"] = detectable_difference(r["n"], assumed_discordance(r["accuracy"]))
        return rows

    def columns(self) -> dict[str, float]:
        """Flat columns for a sweep row: ``{task}_acc_{lang}``, ``_acc_non_en``, ``_rankc_...``."""
        t = self.task
        out = {f"{t}_acc_{lang}": v for lang, v in self.accuracy().items()}
        out[f"{t}_acc_non_en"] = self.non_english_accuracy()
        out.update({f"{t}_rankc_{lang}": v for lang, v in self.consistency().items()})
        out[f"{t}_rankc_mean"] = self.mean_consistency()
        return out


def evaluate_task(model: nn.Module, tokenizer, task: Task, *, norm: str = "token",
                  batch_size: int = 8, max_logits_mb: int = 256,
                  progress: Progress = no_progress) -> TaskResult:
    """Score a task on the model's current weights (wrap in ``prune.pruned`` for a pruned one)."""
    if norm not in NORMS:
        raise MlpruneError(f"Unknown normalisation '{norm}': use {', '.join(NORMS)}.")
    scored = score_items(model, tokenizer, task.items, batch_size=batch_size,
                         max_logits_mb=max_logits_mb, progress=progress)
    return TaskResult(task.name, scored, norm)


def compare_results(a: TaskResult, b: TaskResult, *, n_resamples: int = 10_000, seed: int = 0,
                    confidence: float = 0.95) -> list[dict]:
    """Model a vs model b on the same items: per language and over non-English items
    (translations of an item resampled together), with a paired bootstrap each.

    Each row also has the observed discordance (share of items exactly one model gets right)
    and the detectable difference at it (p < 0.05, 80% power; the non-English row counts
    every translation as its own pair, so its figure is optimistic).
    """
    ca, cb = a.correctness(), b.correctness()
    if set(ca) != set(cb):
        raise MlpruneError("The two results are not on the same items; score both on one task.")
    cons_a, cons_b = a.consistency(), b.consistency()
    rows = []
    langs = a.languages
    blocks = [(lang, [k for k in ca if k[1] == lang]) for lang in langs]
    if len(langs) > 1:
        blocks.append(("non-en", [k for k in ca if k[1] != REFERENCE_LANG]))
    for name, keys in blocks:
        if not keys:
            continue
        sig = paired_bootstrap([ca[k] for k in keys], [cb[k] for k in keys],
                               groups=[k[0] for k in keys], n_resamples=n_resamples, seed=seed,
                               confidence=confidence)
        if name == "non-en":
            acc_a, acc_b = a.non_english_accuracy(), b.non_english_accuracy()
            ra, rb = a.mean_consistency(), b.mean_consistency()
        else:
            acc_a, acc_b = a.accuracy()[name], b.accuracy()[name]
            ra, rb = cons_a.get(name, NAN), cons_b.get(name, NAN)
        discordance = sum(ca[k] != cb[k] for k in keys) / len(keys)
        rows.append({"lang": name, "n": sig.n, "acc_a": acc_a, "acc_b": acc_b, "diff": sig.diff,
                     "ci_low": sig.low, "ci_high": sig.high, "p_value": sig.p_value,
                     "rankc_a": ra, "rankc_b": rb, "discordance": discordance,
                     "detectable_diff": detectable_difference(len(keys), discordance)})
    return rows
