"""M-Wanda (Choenni and Titov, EMNLP 2025, arXiv 2505.21171): Wanda for multilingual models.

M-Wanda extends Wanda's score |W_ij| * ||X_j|| in three ways, each a part a run can switch off
to ablate it. The paper names the parts (language-aware activation statistics with the
cross-language variance; layerwise sparsity from cross-lingual correlation, CWL; an
activation-probability term); its exact formulas, weights and code were out of reach when this
was written, so what follows is a reconstruction from that description, built on the published
pieces it names (Wanda, OWL's layerwise mapping, LAPE's activation probability) and chosen so
that with every part off M-Wanda *is* Wanda on the pooled calibration mix.

The "languages" are the sets of a calibration mix (``pooled``: every X->English direction),
each with its weight w_l; a_l[j] is the RMS of input column j over set l's tokens.

- ``variance``: A_j = sqrt(sum_l w_l a_l[j]^2) + alpha * sd_l(a_l[j]). The first term is the
  pooled RMS that Wanda on the mix reads; sd is the weighted standard deviation across the
  languages (in activation units, like the first term). A column that some languages use far
  more than others (language-specific) ranks above one with the same pooled norm used evenly.
- ``prob``: for MLP output projections, whose input columns are the MLP's neurons, the score
  is multiplied by 1 + gamma * p_j, p_j = sum_l w_l * (share of set l's tokens on which neuron
  j is active: the gate's output above 0 in gated MLPs, as LAPE counts it). Neurons that fire
  often are kept. Other modules' factor is 1.
- ``cwl``: per layer, rho = the weight-averaged Pearson correlation, over pairs of languages,
  of log a_l (the columns of all the layer's selected modules, one vector per language; logs,
  because a few massive dimensions would otherwise make every correlation close to 1). The
  layer's importance is 1 - rho: layers where the languages' activations diverge are pruned
  less, by OWL's mapping (:mod:`mlprune.allocation`: sparsities spanning 2 * lambda around
  the target as their mean).

Score: |W_ij| * A_j * P_j, compared within each output row as Wanda's.
"""

from __future__ import annotations

import torch

from mlprune import MlpruneError
from mlprune.models import LinearInfo
from mlprune.spec import PARTS, MWanda  # noqa: F401  (the spec's vocabulary, re-exported)
from mlprune.stats import ActivationStats

_LOG_FLOOR = 1e-6  # log of an RMS that is 0 (a column never used)


def language_parts(stats: ActivationStats | None) -> list[tuple[str, float, ActivationStats]]:
    """The languages (sets of a calibration mix) M-Wanda compares; at least two."""
    parts = stats.parts if stats is not None else []
    if len(parts) < 2:
        raise MlpruneError("M-Wanda compares languages: calibrate on a mix of at least two "
                           "sets, e.g. --calibration pooled.")
    return parts


def language_norms(stats: ActivationStats, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per language, the RMS input norm of each column of module ``name`` [languages, in],
    and the languages' weights [languages]."""
    parts = language_parts(stats)
    norms = torch.stack([p.input_norms(name) for _, _, p in parts])
    return norms, torch.tensor([w for _, w, _ in parts], dtype=norms.dtype)


def activation_term(stats: ActivationStats, name: str, mw: MWanda) -> torch.Tensor:
    """A_j: the pooled RMS of each input column, plus alpha times its cross-language spread
    when the ``variance`` part is on."""
    pooled = stats.input_norms(name)
    if "variance" not in mw or mw.variance_weight == 0:
        return pooled
    norms, w = language_norms(stats, name)
    mean = (w[:, None] * norms).sum(0)
    spread = (w[:, None] * (norms - mean).square()).sum(0).sqrt()
    return pooled + mw.variance_weight * spread


def probability_term(stats: ActivationStats, name: str, mw: MWanda) -> torch.Tensor | float:
    """P_j: 1 + gamma times each MLP neuron's activation probability (the mix's weighted mean)
    on MLP output projections when the ``prob`` part is on; 1 elsewhere."""
    if "prob" not in mw or mw.prob_weight == 0 or name not in stats.active_counts:
        return 1.0
    language_parts(stats)
    return 1.0 + mw.prob_weight * stats.active_share(name)


def scores(info: LinearInfo, stats: ActivationStats | None, mw: MWanda) -> torch.Tensor:
    """M-Wanda's score of every weight of one module, fp32 [out, in]."""
    if stats is None or info.name not in stats.input_sqnorms:
        raise MlpruneError(f"The m-wanda method needs calibration statistics for {info.name}.")
    language_parts(stats)  # M-Wanda without languages would quietly be Wanda
    w = info.weight.detach().float().abs()
    column = activation_term(stats, info.name, mw) * probability_term(stats, info.name, mw)
    return w * torch.as_tensor(column).to(w.device)


def cross_lingual_correlation(stats: ActivationStats, names_by_layer: dict[int, list[str]]
                              ) -> dict[int, float]:
    """Per layer, the weighted mean over pairs of languages of the Pearson correlation of
    their log input norms (all the layer's modules' columns, one vector per language)."""
    parts = language_parts(stats)
    out = {}
    for layer, names in names_by_layer.items():
        vectors = torch.stack([
            torch.cat([p.input_norms(n).double() for n in names]).clamp_min(_LOG_FLOOR).log()
            for _, _, p in parts])
        corr = torch.corrcoef(vectors).nan_to_num(0.0)  # a constant vector correlates with none
        total = weight = 0.0
        for a in range(len(parts)):
            for b in range(a + 1, len(parts)):
                pair_w = parts[a][1] * parts[b][1]
                total += pair_w * float(corr[a, b])
                weight += pair_w
        out[layer] = total / weight if weight > 0 else 1.0
    return out


def cwl_importance(stats: ActivationStats, names_by_layer: dict[int, list[str]]) -> dict[int, float]:
    """CWL's per-layer importance: 1 - cross-lingual correlation (less agreement, less pruning)."""
    return {k: 1.0 - rho for k, rho in cross_lingual_correlation(stats, names_by_layer).items()}
