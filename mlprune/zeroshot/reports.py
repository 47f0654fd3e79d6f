"""Zero-shot results as text tables and as JSON-ready dicts.

Strict JSON itself (no NaN: null) is :mod:`mlprune.storage`'s; ``json_safe`` and
``strict_json`` are re-exported here because ``zs.strict_json`` is how callers have always
reached them. :class:`~mlprune.zeroshot.results.TaskResult` is named in type hints only: the
results module never imports this one, so the two stay one way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlprune.reports.render import fmt
from mlprune.storage import json_safe, strict_json
from mlprune.zeroshot.tasks import REFERENCE_LANG

if TYPE_CHECKING:
    from mlprune.zeroshot.results import TaskResult

__all__ = ["ONE_MODEL_POWER", "POWER", "TWO_MODEL_POWER", "format_comparison", "format_result",
           "json_safe", "rankc_note", "result_dict", "strict_json"]

POWER = {"alpha": 0.05, "power": 0.8, "test": "two-sided paired test of binary outcomes "
         "(McNemar; Connor 1987 sample size solved for the difference)"}
ONE_MODEL_POWER = ("detect: the smallest accuracy change a paired test finds at p < 0.05 with "
                   "80% power at this n, if the other model erred independently of this one "
                   "(2 acc (1 - acc) of items discordant); models that err alike, as dense and "
                   "pruned ones do, need less; '-': no difference is detectable at this n.")
TWO_MODEL_POWER = ("detect: the smallest accuracy change a paired test finds at p < 0.05 with "
                   "80% power at this n and the observed discordance (disc: share of items "
                   "exactly one model gets right); '-': no difference is detectable.")


def rankc_note(result: TaskResult) -> str | None:
    """One line on items RankC could not use, or None when it used them all."""
    langs = result.languages
    if REFERENCE_LANG not in langs or len(langs) < 2:
        return None
    skipped = result.rankc_skipped()
    english = {s.item.id for s in result.by_lang(REFERENCE_LANG)}
    others = [s for s in result.scored if s.item.lang != REFERENCE_LANG]
    if not any(s.item.id in english for s in others):
        return ("RankC is undefined: no non-English item shares its id with an English one "
                "(the languages hold different items, e.g. MARC's reviews).")
    if sum(skipped.values()):
        return (f"RankC leaves out {sum(skipped.values())} of {len(others)} non-English items: "
                "their choices are in another order than in English (accuracy counts them all).")
    return None


def result_dict(result: TaskResult, *, n_bytes: bool = False) -> dict:
    """JSON-ready summary of one result, with every item's per-choice log-likelihoods. With
    ``n_bytes``, each item's byte counts too: with the task, enough to rebuild the result
    (:meth:`TaskResult.from_dict <mlprune.zeroshot.results.TaskResult.from_dict>`), which is
    how the grids keep their zero-shot cells."""
    note = rankc_note(result)
    items = []
    for s in result.scored:
        item = {"id": s.item.id, "lang": s.item.lang, "label": s.item.label,
                "logprob": list(s.logprob), "n_tokens": list(s.n_tokens),
                "predicted": s.predicted(result.norm)}
        if n_bytes:
            item["n_bytes"] = list(s.n_bytes)
        items.append(item)
    return {"task": result.task, "norm": result.norm, "languages": result.table(),
            "notes": [note] if note else [],
            "power": {**POWER, "discordance": "assumed: 2 acc (1 - acc), the other model erring "
                                              "independently (conservative)"},
            "items": items}


def _f(x: float | None) -> str:
    return fmt(x, ".3f")


def format_result(result: TaskResult) -> str:
    """A plain-text table of one model's accuracy, consistency and power per language."""
    lines = [f"{result.task} (scores: {result.norm}-normalised log-likelihood; raw = summed)",
             f"{'lang':<7} {'n':>4} {'accuracy':>9} {'raw':>7} {'RankC':>7} {'detect':>7}"]
    for r in result.table():
        lines.append(f"{r['lang']:<7} {r['n']:>4} {_f(r['accuracy']):>9} "
                     f"{_f(r['accuracy_raw']):>7} {_f(r['rankc']):>7} "
                     f"{_f(r['detectable_diff']):>7}")
    note = rankc_note(result)
    return "\n".join(lines + ([note] if note else []) + [ONE_MODEL_POWER])


def format_comparison(task: str, rows: list[dict], names: tuple[str, str] = ("dense", "pruned"),
                      confidence: float = 0.95, note: str | None = None) -> str:
    """A plain-text table of two models' accuracy, difference, interval, p-value and power."""
    a, b = names
    ci = f"{confidence:.0%} CI"
    lines = [f"{task}: {b} - {a}, paired bootstrap over items",
             f"{'lang':<7} {'n':>4} {a:>8} {b:>8} {'diff':>7} {ci:>17} {'p':>6} "
             f"{'RankC ' + a:>12} {'RankC ' + b:>12} {'disc':>6} {'detect':>7}"]
    for r in rows:
        interval = f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        lines.append(f"{r['lang']:<7} {r['n']:>4} {_f(r['acc_a']):>8} {_f(r['acc_b']):>8} "
                     f"{r['diff']:>+7.3f} {interval:>17} {r['p_value']:>6.3f} "
                     f"{_f(r['rankc_a']):>12} {_f(r['rankc_b']):>12} "
                     f"{_f(r.get('discordance')):>6} {_f(r.get('detectable_diff')):>7}")
    return "\n".join(lines + ([note] if note else []) + [TWO_MODEL_POWER])
