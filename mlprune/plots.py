"""Plotly figures, built by plain functions so tests and the dashboard call the same code."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mlprune import MlpruneError
from mlprune.capture import ActivationStats
from mlprune.features import detect
from mlprune.prune import MaskSet

if TYPE_CHECKING:  # evaluate pulls in transformers; figures only read Generation's fields
    from mlprune.evaluate import Generation

DEQUANT_NOTE = "weights de-quantized from {q}: magnitudes and scores are those of the de-quantized model"


def _note(fig: go.Figure, dequantized_from: str | None) -> go.Figure:
    """Say under the figure that its model's weights are de-quantized (when they are)."""
    if dequantized_from:
        # Pixels below the plot area, past the tick labels and the axis title, whatever
        # the figure's height (a paper-fraction offset lands on the axis title in short ones).
        fig.add_annotation(text=DEQUANT_NOTE.format(q=dequantized_from), xref="paper", yref="paper",
                           x=0, y=0, yshift=-66, yanchor="top", showarrow=False,
                           font={"size": 11, "color": "#666"}, xanchor="left")
        bottom = fig.layout.margin.b
        fig.update_layout(margin={"b": max(bottom or 0, 96)})
    return fig


def _layer_axis(numbering: str) -> str:
    """The layer axis's title under a numbering (``ActivationStats.layer_view``)."""
    return "layer" if numbering == "sites" else "layer (output_hidden_states: 0 = embeddings)"


def top_dims_figure(stats: ActivationStats, n: int = 5, title: str | None = None,
                    dequantized_from: str | None = None, numbering: str = "sites") -> go.Figure:
    """Per-layer bars of the n largest dimensions' ratio to the layer median (paper, Fig. 2).

    ``numbering="hidden_states"`` lays layers out as the paper does (0 = embedding output)."""
    table = detect(stats, f"top-k:{n}", numbering)
    fig = go.Figure()
    for rank in range(n):
        part = table.groupby("layer").nth(rank)
        fig.add_bar(x=part["layer"], y=part["ratio_to_median"], name=f"#{rank + 1}",
                    customdata=part[["dim", "magnitude"]].to_numpy(),
                    hovertemplate="layer %{x}<br>dim %{customdata[0]}<br>magnitude %{customdata[1]:.1f}"
                                  "<br>%{y:.0f}x median<extra></extra>")
    fig.update_layout(barmode="group", title=title or f"Top {n} dimensions per layer ({stats.meta.get('prompts', '')})",
                      xaxis_title=_layer_axis(numbering),
                      yaxis_title="magnitude / layer median", yaxis_type="log",
                      legend_title="rank", margin={"b": 90})
    return _note(fig, dequantized_from)


def sweep_figure(table, metric: str = "chrf", dequantized_from: str | None = None) -> go.Figure:
    """One line per method and pair: a metric against sparsity. Where the table has the
    metric's p-value against dense (``{metric}_p_vs_dense``), hovering a point shows it."""
    fig = go.Figure()
    p_column = f"{metric}_p_vs_dense"
    for (pair, method), part in table.groupby(["pair", "method"]):
        part = part.sort_values("sparsity")
        extra = {}
        if p_column in part:
            p = pd.to_numeric(part[p_column], errors="coerce")
            extra = dict(customdata=["dense" if pd.isna(v) else f"p = {v:.3f} vs dense"
                                     for v in p],
                         hovertemplate=f"{method} ({pair})<br>sparsity %{{x}}<br>{metric} "
                                       "%{y:.2f}<br>%{customdata}<extra></extra>")
        fig.add_scatter(x=part["sparsity"], y=part[metric], mode="lines+markers",
                        name=f"{method} ({pair})", **extra)
    fig.update_layout(title=f"{metric} against sparsity", xaxis_title="sparsity",
                      yaxis_title=metric, yaxis_type="log" if metric == "perplexity" else "linear",
                      margin={"b": 90})
    return _note(fig, dequantized_from)


# --------------------------------------------------------------------------- features

_LOG_SCALE = "Viridis"


def _log_colour(values: np.ndarray) -> tuple[np.ndarray, dict]:
    """log10 of magnitudes and a colour bar labelled in the magnitudes themselves."""
    z = np.log10(np.clip(values, 1e-6, None))
    lo, hi = math.floor(float(z.min())), math.ceil(float(z.max()))
    ticks = list(range(lo, hi + 1)) if hi > lo else [lo]
    return z, {"tickvals": ticks, "ticktext": [f"{10.0 ** t:g}" for t in ticks], "title": "|h|"}


def layer_dim_heatmap(stats: ActivationStats, detected: pd.DataFrame | None = None,
                      title: str | None = None, dequantized_from: str | None = None,
                      numbering: str = "sites") -> go.Figure:
    """Layer x dimension magnitudes on a log colour scale, detected dimensions circled
    (``detected`` as ``features.detect`` gives it in the same ``numbering``).
    ``numbering="hidden_states"`` has the paper's L + 1 rows: 0 is the embedding output, the
    last is after the final norm."""
    values = stats.layer_view(numbering)[1].float().numpy()
    z, colorbar = _log_colour(values)
    fig = go.Figure(go.Heatmap(
        z=z, customdata=values, colorscale=_LOG_SCALE, colorbar=colorbar,
        hovertemplate="layer %{y}<br>dim %{x}<br>magnitude %{customdata:.2f}<extra></extra>"))
    if detected is not None and len(detected):
        fig.add_scatter(
            x=detected["dim"], y=detected["layer"], mode="markers", name="detected",
            marker={"symbol": "circle-open", "size": 10, "color": "#e8372c", "line": {"width": 2}},
            customdata=detected[["magnitude", "ratio_to_median"]].to_numpy(),
            hovertemplate="layer %{y}<br>dim %{x}<br>magnitude %{customdata[0]:.1f}"
                          "<br>%{customdata[1]:.0f}x median<extra>detected</extra>")
    fig.update_layout(
        title=title or f"Magnitude per layer and dimension ({stats.meta.get('prompts', '')})",
        xaxis_title="hidden dimension", yaxis_title=_layer_axis(numbering), margin={"b": 90},
        legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"})
    return _note(fig, dequantized_from)


def _token_label(i: int, token: str) -> str:
    shown = token.replace("\n", "⏎").replace("\t", "⇥")
    return f"{i:>3} {shown if shown.strip() else repr(shown)}"


def token_figure(tokens: list[str], magnitudes: torch.Tensor, layer: int,
                 dims: list[int] | None = None, title: str | None = None,
                 dequantized_from: str | None = None) -> go.Figure:
    """Token x dimension magnitudes of one prompt at one layer (log colour): which tokens
    carry the large values. ``magnitudes`` is ``capture.token_magnitudes``'s [layer, token, dim]."""
    if not 0 <= layer < magnitudes.shape[0]:
        raise MlpruneError(f"Layer {layer} is outside 0-{magnitudes.shape[0] - 1}.")
    # a saturated half-precision value would break the log scale: show it at the largest finite
    values = np.nan_to_num(magnitudes[layer].float().numpy(), nan=0.0, posinf=float(
        torch.finfo(magnitudes.dtype).max if magnitudes.dtype.is_floating_point else 0))
    columns = list(range(values.shape[1]))
    if dims:
        columns = [d for d in dims if d < values.shape[1]]
        values = values[:, columns]
    z, colorbar = _log_colour(values)
    labels = [_token_label(i, t) for i, t in enumerate(tokens)]
    # dims as categories when only a few are shown, so the columns are wide and labelled
    x = [str(d) for d in columns] if dims else columns
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=labels, customdata=values, colorscale=_LOG_SCALE, colorbar=colorbar,
        hovertemplate="token %{y}<br>dim %{x}<br>|h| %{customdata:.2f}<extra></extra>"))
    fig.update_layout(
        title=title or f"Which tokens carry the large values (layer {layer})",
        xaxis_title="hidden dimension", xaxis_type="category" if dims else "linear",
        yaxis={"autorange": "reversed", "tickfont": {"family": "monospace", "size": 10}},
        height=min(1400, max(360, 16 * len(tokens) + 140)), margin={"b": 90})
    return _note(fig, dequantized_from)


OVERLAP_MEASURES = {
    "top_in_top": "share of the row's top-x% dims in the column's top-x%",
    "top_in_bottom": "share of the row's top-x% dims in the column's bottom-x%",
    "jaccard": "Jaccard overlap of the two top-x% sets",
}


def overlap_figure(matrix: pd.DataFrame, measure: str = "top_in_top", fraction: float = 0.05,
                   layer: int | None = None, dequantized_from: str | None = None) -> go.Figure:
    """Heatmap of ``features.overlap_matrix`` across languages and pairs (paper, Figs. 1 and 3)."""
    where = f"layer {layer}" if layer is not None else "mean over layers"
    fig = go.Figure(go.Heatmap(
        z=matrix.to_numpy(dtype=float), x=list(matrix.columns), y=list(matrix.index),
        zmin=0, zmax=1, colorscale="Blues", texttemplate="%{z:.2f}",
        hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>", colorbar={"title": "share"}))
    fig.update_layout(
        title=f"{OVERLAP_MEASURES.get(measure, measure)} (x = {fraction:.0%}, {where})",
        xaxis_title="column set", yaxis={"title": "row set", "autorange": "reversed"},
        margin={"b": 90})
    return _note(fig, dequantized_from)


def direction_compare_figure(a: ActivationStats, b: ActivationStats, name_a: str, name_b: str,
                             layer: int, label_top: int = 6,
                             dequantized_from: str | None = None,
                             numbering: str = "sites") -> go.Figure:
    """Two prompt sets' magnitudes, dimension by dimension, at one layer (log-log scatter);
    ``layer`` counts as ``numbering`` lays layers out (``ActivationStats.layer_view``)."""
    if a.hidden_norms.shape != b.hidden_norms.shape:
        raise MlpruneError("These statistics come from different models and cannot be compared.")
    rows_a, rows_b = a.layer_view(numbering)[1], b.layer_view(numbering)[1]
    if not 0 <= layer < len(rows_a):
        raise MlpruneError(f"Layer {layer} is outside 0-{len(rows_a) - 1}.")
    x = rows_a[layer].float().clamp_min(1e-6).numpy()
    y = rows_b[layer].float().clamp_min(1e-6).numpy()
    dims = np.arange(len(x))
    top = np.argsort(-np.maximum(x, y))[:label_top]
    fig = go.Figure()
    fig.add_scatter(x=x, y=y, mode="markers", name="dimensions", customdata=dims,
                    marker={"size": 5, "color": "#8a99b5", "opacity": 0.7},
                    hovertemplate="dim %{customdata}<br>" + f"{name_a} " + "%{x:.2f}<br>"
                                  + f"{name_b} " + "%{y:.2f}<extra></extra>")
    fig.add_scatter(x=x[top], y=y[top], mode="markers+text", name="largest",
                    text=[str(d) for d in top], textposition="top center", customdata=top,
                    marker={"size": 9, "color": "#e8372c"},
                    hovertemplate="dim %{customdata}<br>" + f"{name_a} " + "%{x:.2f}<br>"
                                  + f"{name_b} " + "%{y:.2f}<extra></extra>")
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="equal",
                    line={"dash": "dot", "color": "#999"}, hoverinfo="skip")
    fig.update_layout(title=f"{name_a} vs {name_b}, dimension by dimension (layer {layer})",
                      xaxis={"title": f"magnitude, {name_a}", "type": "log"},
                      yaxis={"title": f"magnitude, {name_b}", "type": "log"}, margin={"b": 90})
    return _note(fig, dequantized_from)


# --------------------------------------------------------------------------- pruning


def _parse_module(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return int(parts[1]), ".".join(parts[2:])


def sparsity_figure(masks: MaskSet, dequantized_from: str | None = None) -> go.Figure:
    """Sparsity reached per module (bars, grouped by layer) and per layer (line), against the
    target (dashed) and, for a layer-adaptive run, each layer's allocated share of it (with
    the layer's importance: OWL's outlier share or M-Wanda's 1 - correlation)."""
    per_module = masks.sparsity()
    weights = {n: c.shape[0] * masks.in_features[n] for n, c in masks.pruned_cols.items()}
    kinds: dict[str, list[tuple[int, float]]] = {}
    layer_pruned: dict[int, float] = {}
    layer_total: dict[int, float] = {}
    for name, s in per_module.items():
        layer, kind = _parse_module(name)
        kinds.setdefault(kind, []).append((layer, s))
        layer_pruned[layer] = layer_pruned.get(layer, 0) + s * weights[name]
        layer_total[layer] = layer_total.get(layer, 0) + weights[name]
    fig = go.Figure()
    for kind, points in kinds.items():
        fig.add_bar(x=[p[0] for p in points], y=[p[1] for p in points], name=kind,
                    hovertemplate=f"layer %{{x}} {kind}: %{{y:.1%}}<extra></extra>")
    layers = sorted(layer_total)
    fig.add_scatter(x=layers, y=[layer_pruned[n] / layer_total[n] for n in layers],
                    mode="lines+markers", name="layer (all modules)",
                    line={"color": "#222", "width": 2},
                    hovertemplate="layer %{x}: %{y:.1%}<extra></extra>")
    fig.add_scatter(x=layers, y=[masks.target] * len(layers), mode="lines", name="target",
                    line={"color": "#888", "dash": "dash"},
                    hovertemplate="target %{y:.1%}<extra></extra>")
    allocation = masks.meta.get("allocation")
    title = f"Sparsity per layer and module ({masks.pattern}, target {masks.target:.0%}"
    if allocation:
        per_layer = {int(k): v for k, v in allocation["per_layer"].items()}
        importance = {int(k): v for k, v in allocation.get("importance", {}).items()}
        fig.add_scatter(
            x=layers, y=[per_layer[n] for n in layers], mode="lines+markers",
            name=f"allocated ({allocation['kind']})", line={"color": "#d62728", "dash": "dot"},
            customdata=[importance.get(n, float("nan")) for n in layers],
            hovertemplate="layer %{x}: allocated %{y:.1%}, importance %{customdata:.3g}"
                          "<extra></extra>")
        title += f", {allocation['kind']} allocation +-{allocation.get('range', 0):.0%}"
    fig.update_layout(
        barmode="group", title=f"{title}, reached {masks.overall_sparsity():.1%})",
        xaxis={"title": "layer", "dtick": 1}, yaxis={"title": "sparsity", "tickformat": ".0%",
                                                     "range": [0, 1]},
        legend_title="module", margin={"b": 90})
    return _note(fig, dequantized_from)


def mask_figure(masks: MaskSet, name: str, max_side: int = 160,
                crop: tuple[int, int, int] | None = None,
                dequantized_from: str | None = None) -> go.Figure:
    """One module's mask, rows = outputs, columns = inputs, with protected input columns
    marked in a strip above. The whole mask is averaged down to ``max_side`` cells a side
    (colour = share kept); ``crop=(row, col, size)`` shows that window weight by weight."""
    if name not in masks.pruned_cols:
        raise MlpruneError(f"No mask for module {name}.")
    keep = masks.keep(name).float()
    protected = masks.protected.get(name)
    protected = (protected.float() if protected is not None
                 else torch.zeros(keep.shape[1]))
    out_f, in_f = keep.shape
    if crop is not None:
        row, col, size = crop
        row = max(0, min(row, out_f - 1))
        col = max(0, min(col, in_f - 1))
        window = keep[row:row + size, col:col + size]
        strip = protected[col:col + size]
        xs = np.arange(col, col + window.shape[1])
        ys = np.arange(row, row + window.shape[0])
        what = f"rows {row}-{ys[-1]}, inputs {col}-{xs[-1]}, one cell per weight"
    else:
        shape = (min(out_f, max_side), min(in_f, max_side))
        window = torch.nn.functional.adaptive_avg_pool2d(keep[None, None], shape)[0, 0]
        strip = torch.nn.functional.adaptive_max_pool1d(protected[None, None], shape[1])[0, 0]
        xs = (np.arange(shape[1]) + 0.5) * in_f / shape[1]
        ys = (np.arange(shape[0]) + 0.5) * out_f / shape[0]
        what = ("one cell per weight" if shape == (out_f, in_f)
                else f"averaged from {out_f}x{in_f} to {shape[0]}x{shape[1]} cells")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.06, 0.94],
                        vertical_spacing=0.02)
    fig.add_trace(go.Heatmap(
        z=strip.numpy()[None, :], x=xs, y=["protected"], zmin=0, zmax=1, showscale=False,
        colorscale=[[0, "#f4f4f4"], [1, "#e8372c"]],
        hovertemplate="input %{x:.0f}: protected %{z:.0f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Heatmap(
        z=window.numpy(), x=xs, y=ys, zmin=0, zmax=1,
        colorscale=[[0, "#ffffff"], [1, "#2f6fed"]], colorbar={"title": "kept", "y": 0.47,
                                                               "len": 0.9},
        hovertemplate="output %{y:.0f}<br>input %{x:.0f}<br>kept %{z:.0%}<extra></extra>"),
        row=2, col=1)
    n_prot = int((masks.protected.get(name, torch.zeros(0)) > 0).sum())
    kept = float(keep.mean())
    fig.update_yaxes(autorange="reversed", title_text="output", row=2, col=1)
    fig.update_xaxes(title_text="input column", row=2, col=1)
    fig.update_layout(title=f"{name}: {kept:.1%} kept, {n_prot} protected input columns ({what})",
                      height=520, margin={"b": 90})
    return _note(fig, dequantized_from)


def token_probs_figure(dense: Generation, pruned: Generation | None = None,
                       dequantized_from: str | None = None) -> go.Figure:
    """Probability of each generated token (the greedy choice), dense and pruned."""
    fig = go.Figure()
    for label, gen, colour in (("dense", dense, "#8a99b5"), ("pruned", pruned, "#2f6fed")):
        if gen is None:
            continue
        fig.add_bar(x=list(range(len(gen.tokens))), y=gen.probs, name=label,
                    marker_color=colour, customdata=[t.replace("\n", "⏎") for t in gen.tokens],
                    hovertemplate=f"{label} #%{{x}} '%{{customdata}}': p=%{{y:.3f}}<extra></extra>")
    fig.update_layout(barmode="group", title="Probability of each generated token",
                      xaxis_title="token position", yaxis={"title": "p", "range": [0, 1]},
                      height=320, margin={"b": 90})
    return _note(fig, dequantized_from)


# --------------------------------------------------------------------------- reproduce report


def top_dims_table_figure(layers: list[dict], title: str,
                          dequantized_from: str | None = None) -> go.Figure:
    """Figure 2 from ``features.top_dims`` JSON (what a report keeps): the top dimensions'
    ratio to their layer's median, per layer."""
    n = max((len(layer["top"]) for layer in layers), default=0)
    fig = go.Figure()
    for rank in range(n):
        xs = [layer["layer"] for layer in layers if len(layer["top"]) > rank]
        tops = [layer["top"][rank] for layer in layers if len(layer["top"]) > rank]
        fig.add_bar(x=xs, y=[t["ratio_to_median"] for t in tops], name=f"#{rank + 1}",
                    customdata=[[t["dim"], t["magnitude"]] for t in tops],
                    hovertemplate="layer %{x}<br>dim %{customdata[0]}<br>magnitude "
                                  "%{customdata[1]:.1f}<br>%{y:.0f}x median<extra></extra>")
    fig.update_layout(barmode="group", title=title, yaxis_type="log",
                      xaxis_title="layer (output_hidden_states: 0 = embeddings)",
                      yaxis_title="magnitude / layer median", legend_title="rank",
                      margin={"b": 90})
    return _note(fig, dequantized_from)


def variant_bars_figure(rows: list[dict], metric: str, title: str,
                        dequantized_from: str | None = None) -> go.Figure:
    """One bar per variant of a metric (Table 1's chrF or BLEU)."""
    fig = go.Figure(go.Bar(x=[r["variant"] for r in rows], y=[r[metric] for r in rows],
                           text=[f"{r[metric]:.1f}" for r in rows], textposition="outside"))
    fig.update_layout(title=title, yaxis_title=metric, xaxis_title="variant", margin={"b": 110})
    return _note(fig, dequantized_from)


def accuracy_by_language_figure(variants: dict[str, list[dict]], title: str,
                                dequantized_from: str | None = None) -> go.Figure:
    """Zero-shot accuracy per language, one group of bars per language, one bar per variant."""
    fig = go.Figure()
    for name, rows in variants.items():
        fig.add_bar(x=[r["lang"] for r in rows], y=[r["accuracy"] for r in rows], name=name)
    fig.update_layout(barmode="group", title=title, yaxis={"title": "accuracy",
                                                           "tickformat": ".0%"},
                      xaxis_title="language", margin={"b": 90})
    return _note(fig, dequantized_from)


def report_figures(report: dict) -> list[tuple[str, go.Figure]]:
    """Every figure of a ``mlprune reproduce`` report, built from its JSON alone."""
    q = report.get("dequantized_from")
    fig2 = report["figure2"]
    out = [("Figure 2: translating", top_dims_table_figure(
               fig2["translating"]["layers"], f"Top {fig2['top']} dimensions per layer while "
               f"translating ({report['grid']['pair'].split('-')[0]}-en)", q)),
           ("Figure 2: monolingual", top_dims_table_figure(
               fig2["monolingual"]["layers"], f"Top {fig2['top']} dimensions per layer while "
               f"reading {report['grid']['pair'].split('-')[0]}", q))]
    ov = report["overlap"]
    for measure, fraction in (("top_in_bottom", ov["fraction"]),
                              ("top_in_top", ov["fraction_top_in_top"])):
        matrix = pd.DataFrame(ov[measure])  # columns: column sets; index: row sets
        out.append((f"Overlap: {measure}", overlap_figure(matrix, measure, fraction,
                                                          dequantized_from=q)))
    if report["table1"]:
        out.append(("Table 1: chrF", variant_bars_figure(report["table1"], "chrf",
                                                         "Translation chrF per variant", q)))
    for task, block in report["zeroshot"].items():
        out.append((f"Zero-shot: {task}", accuracy_by_language_figure(
            block["variants"], f"Zero-shot accuracy per language: {task}", q)))
    return out


def verdict_curve_figure(block: dict, lang: str, dequantized_from: str | None = None,
                         task_note: str = "both tasks pooled") -> go.Figure:
    """Zero-shot accuracy in ``lang`` against sparsity: dense as a line, wanda-mt and
    wanda-mono (calibrated in ``lang``) as the mean over seeds with a band from the lowest to
    the highest seed (``block``: one language of the verdict report's ``curves``)."""
    fig = go.Figure()
    colours = {"wanda-mt": "#1f77b4", "wanda-mono": "#ff7f0e"}
    for method, points in block["methods"].items():
        if not points:
            continue
        xs = [p["sparsity"] for p in points]
        colour = colours.get(method, "#2ca02c")
        fig.add_trace(go.Scatter(x=xs + xs[::-1], y=[p["max"] for p in points]
                                 + [p["min"] for p in points][::-1], fill="toself",
                                 fillcolor=colour, opacity=0.2, line={"width": 0},
                                 hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=xs, y=[p["mean"] for p in points], mode="lines+markers",
                                 name=f"{method} ({max(len(p['seeds']) for p in points)} seeds)",
                                 line={"color": colour},
                                 customdata=[len(p["seeds"]) for p in points],
                                 hovertemplate="%{x:.0%}: %{y:.1%} (mean of %{customdata} "
                                               "seeds)<extra></extra>"))
    if block.get("dense") is not None:
        fig.add_hline(y=block["dense"], line_dash="dash", line_color="black",
                      annotation_text=f"dense {block['dense']:.1%}",
                      annotation_position="bottom right")
    fig.update_layout(title=f"{lang}: zero-shot accuracy ({task_note})",
                      xaxis_title="sparsity (unstructured, one-shot)", yaxis_title="accuracy",
                      xaxis_tickformat=".0%", yaxis_tickformat=".0%", height=380)
    return _note(fig, dequantized_from)
