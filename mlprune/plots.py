"""Plotly figures, built by plain functions so tests and the dashboard call the same code."""

from __future__ import annotations

import plotly.graph_objects as go

from mlprune.capture import ActivationStats
from mlprune.features import detect

DEQUANT_NOTE = "weights de-quantized from {q}: magnitudes and scores are those of the de-quantized model"


def _note(fig: go.Figure, dequantized_from: str | None) -> go.Figure:
    if dequantized_from:
        fig.add_annotation(text=DEQUANT_NOTE.format(q=dequantized_from), xref="paper", yref="paper",
                           x=0, y=-0.18, showarrow=False, font={"size": 11, "color": "#666"},
                           xanchor="left")
    return fig


def top_dims_figure(stats: ActivationStats, n: int = 5, title: str | None = None,
                    dequantized_from: str | None = None) -> go.Figure:
    """Per-layer bars of the n largest dimensions' ratio to the layer median (paper, Fig. 2)."""
    table = detect(stats, f"top-k:{n}")
    fig = go.Figure()
    for rank in range(n):
        part = table.groupby("layer").nth(rank)
        fig.add_bar(x=part["layer"], y=part["ratio_to_median"], name=f"#{rank + 1}",
                    customdata=part[["dim", "magnitude"]].to_numpy(),
                    hovertemplate="layer %{x}<br>dim %{customdata[0]}<br>magnitude %{customdata[1]:.1f}"
                                  "<br>%{y:.0f}x median<extra></extra>")
    fig.update_layout(barmode="group", title=title or f"Top {n} dimensions per layer ({stats.meta.get('prompts', '')})",
                      xaxis_title="layer", yaxis_title="magnitude / layer median", yaxis_type="log",
                      legend_title="rank", margin={"b": 90})
    return _note(fig, dequantized_from)


def sweep_figure(table, metric: str = "chrf", dequantized_from: str | None = None) -> go.Figure:
    """One line per method and pair: a metric against sparsity."""
    fig = go.Figure()
    for (pair, method), part in table.groupby(["pair", "method"]):
        part = part.sort_values("sparsity")
        fig.add_scatter(x=part["sparsity"], y=part[metric], mode="lines+markers",
                        name=f"{method} ({pair})")
    fig.update_layout(title=f"{metric} against sparsity", xaxis_title="sparsity",
                      yaxis_title=metric, yaxis_type="log" if metric == "perplexity" else "linear",
                      margin={"b": 90})
    return _note(fig, dequantized_from)
