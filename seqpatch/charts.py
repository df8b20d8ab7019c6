"""Altair charts, drawn from tidy polars frames that the stages derive from their datasets.

Charts never compute results: ``seqpatch.stages.patching.effect_cells`` and
``seqpatch.stages.benchmark`` turn a stored dataset into the frames drawn here. Every chart is
saved as a self-contained HTML page (interactive, no CDN) and as PNG through vl-convert.

Heatmaps follow ROME's causal-trace figures: one row per token of the prompt (top to bottom, in
reading order, with the tokens that differ between the two programs starred), one column per
layer, colour = mean effect over pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import altair as alt
import polars as pl

METRIC_TITLES = {
    "normalised": "normalised effect (0 = none, 1 = switched to A)",
    "prob_delta": "Δ P(answer B)",
    "logit_diff": "logit(A) − logit(B)",
}
LEGEND_TITLES = {
    "normalised": "normalised effect",
    "prob_delta": "Δ P(B)",
    "logit_diff": "logit diff",
}
SITE_TITLES = {
    "resid_pre": "residual stream (layer input)",
    "resid_post": "residual stream (layer output)",
    "attn_out": "attention output",
    "mlp_out": "MLP output",
}
ChartFormat = str


def _color(metric: str) -> alt.Color:
    title = LEGEND_TITLES.get(metric, metric)
    if metric == "normalised":
        scale = alt.Scale(scheme="purples", domain=[0, 1], clamp=True)
    elif metric == "prob_delta":
        scale = alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True)
    else:
        scale = alt.Scale(scheme="redblue", domainMid=0, reverse=True)
    return alt.Color("mean:Q", title=title, scale=scale)


def heatmap_chart(cells: pl.DataFrame, metric: str, title: str | None = None) -> alt.Chart:
    """Layer × token heatmap, one panel per site (columns) and divergence index (rows).

    ``cells`` columns: ``site, divergence_index, layer, position, label, mean, std, count``.
    """
    sites = cells["site"].unique(maintain_order=True).to_list()
    ks = cells["divergence_index"].unique().sort().to_list()
    data = cells.with_columns(
        pl.col("site").replace_strict(SITE_TITLES, default=pl.col("site")).alias("site_title"),
        pl.format("{} · {}", pl.col("position"), pl.col("label")).alias("token"),
    )
    n_tokens = int(cells["position"].max()) + 1
    base = alt.Chart(data).mark_rect()
    chart = base.encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y(
            "token:N",
            title=None,
            sort=alt.EncodingSortField(field="position", order="ascending"),
            axis=alt.Axis(labelFontSize=10, labelLimit=160),
        ),
        color=_color(metric),
        tooltip=[
            alt.Tooltip("site:N"),
            alt.Tooltip("divergence_index:O", title="divergence index"),
            alt.Tooltip("layer:O"),
            alt.Tooltip("position:O"),
            alt.Tooltip("label:N", title="token"),
            alt.Tooltip("mean:Q", format=".3f"),
            alt.Tooltip("std:Q", format=".3f"),
            alt.Tooltip("count:Q", title="pairs"),
        ],
    ).properties(width=max(120, 28 * int(cells["layer"].max() + 1)), height=13 * n_tokens)
    facet_row = alt.Row("divergence_index:O", title="divergence index") if len(ks) > 1 else None
    facet_col = alt.Column("site_title:N", title=None, sort=[SITE_TITLES.get(s, s) for s in sites])
    if facet_row is not None:
        chart = chart.facet(row=facet_row, column=facet_col)
    else:
        chart = chart.facet(column=facet_col)
    return chart.resolve_scale(y="independent").properties(
        title=title or f"Activation patching, A → B: {METRIC_TITLES.get(metric, metric)}"
    )


def trace_chart(
    example: pl.DataFrame, metric: str, highlight: Sequence[int], title: str | None = None
) -> alt.Chart:
    """One pair's per-token effect across layers: one line per highlighted token.

    ``example`` columns: ``site, layer, position, label, value``.
    """
    data = example.filter(pl.col("position").is_in(list(highlight))).with_columns(
        pl.format("{} · {}", pl.col("position"), pl.col("label")).alias("token")
    )
    return (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="layer patched"),
            y=alt.Y("value:Q", title=METRIC_TITLES.get(metric, metric)),
            color=alt.Color(
                "token:N", sort=alt.EncodingSortField(field="position"), title="patched token"
            ),
            tooltip=["site:N", "layer:O", "token:N", alt.Tooltip("value:Q", format=".3f")],
        )
        .properties(width=260, height=200)
        .facet(column=alt.Column("site:N", title=None))
        .properties(title=title or "Token traces")
    )


def accuracy_chart(summary: pl.DataFrame, title: str | None = None) -> alt.LayerChart:
    """Accuracy vs program length with Wilson 95% intervals, one colour per model.

    ``summary`` columns: ``model_id, family, seq_len, accuracy, ci_low, ci_high, n``.
    """
    data = summary
    base = alt.Chart(data).encode(
        x=alt.X("seq_len:Q", title="statements in the program", axis=alt.Axis(tickMinStep=1)),
        color=alt.Color("model_id:N", title="model"),
    )
    line = base.mark_line(point=True).encode(
        y=alt.Y("accuracy:Q", title="exact-match accuracy", scale=alt.Scale(domain=[0, 1])),
        tooltip=[
            "model_id:N",
            "family:N",
            "seq_len:Q",
            alt.Tooltip("accuracy:Q", format=".3f"),
            alt.Tooltip("ci_low:Q", format=".3f"),
            alt.Tooltip("ci_high:Q", format=".3f"),
            "n:Q",
        ],
    )
    band = base.mark_errorbar().encode(
        y=alt.Y("ci_low:Q", title="exact-match accuracy"), y2="ci_high:Q"
    )
    return (line + band).properties(
        width=420, height=260, title=title or "Accuracy by program length"
    )


def save_chart(
    chart: alt.TopLevelMixin,
    out_dir: Path,
    name: str,
    formats: Sequence[ChartFormat] = ("html", "png"),
) -> list[Path]:
    """Save ``chart`` as ``out_dir/name.<fmt>``; HTML is self-contained (works offline)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        if fmt == "html":
            chart.save(path, inline=True)
        elif fmt == "png":
            chart.save(path, scale_factor=2)
        elif fmt == "svg":
            chart.save(path)
        else:
            raise ValueError(f"unknown chart format {fmt!r}; use html, png or svg")
        written.append(path)
    return written
