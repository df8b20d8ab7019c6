"""Several models side by side: the mean patching effect against relative depth, one line per
model, one panel per token group (``seqpatch.depth.depth_curves`` gives the rows)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import altair as alt
import polars as pl

from seqpatch.charts.style import METRIC_TITLES, ChartError, site_title

MODEL_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e")
COMPLETE = "finished: all the study's pairs"
PARTIAL = "partial: an unfinished build's shards"
DASHED = "Dashed line: partial, from the finished shards of an unfinished patching build."
LEGEND = {
    "orient": "bottom",
    "symbolType": "stroke",
    "symbolStrokeWidth": 2.5,
    "symbolOpacity": 1,
    "labelLimit": 400,
}


def depth_name() -> str:
    """File stem of the comparison chart."""
    return "compare-models"


def depth_figure(
    curves: pl.DataFrame,
    groups: Sequence[str],
    group_titles: dict[str, str],
    notes: Sequence[str],
    site: str = "resid_pre",
) -> alt.TopLevelMixin:
    """One panel per token group (``groups``, in order), x = relative depth, y = mean
    normalised effect with its 95% interval as a band, one colour per model. ``notes`` are the
    subtitle's lines (each model's pairs and whether its patching finished). The y scale always
    holds 0 and every interval."""
    if curves.is_empty():
        raise ChartError("no model has a patching grid to draw; build the studies' patching first")
    models = list(dict.fromkeys(curves["model"].to_list()))
    data = curves.with_columns(
        panel=pl.col("group").replace_strict(group_titles, return_dtype=pl.String),
        low=pl.col("ci_low").fill_null(pl.col("mean")),
        high=pl.col("ci_high").fill_null(pl.col("mean")),
        patching=pl.when(pl.col("partial")).then(pl.lit(PARTIAL)).otherwise(pl.lit(COMPLETE)),
    ).select(
        "model", "group", "panel", "layer", "n_layers", "depth", "mean", "low", "high", "n",
        "patching",
    )  # fmt: skip
    top = math.ceil(max(1.0, float(data["high"].max())) * 10) / 10
    bottom = math.floor(min(0.0, float(data["low"].min())) * 10) / 10
    y_scale = alt.Scale(domain=[bottom, top], zero=True, nice=False)
    color_scale = alt.Scale(domain=models, range=list(MODEL_COLORS[: len(models)]))
    color = alt.Color("model:N", scale=color_scale, legend=alt.Legend(title="model", **LEGEND))
    dash = alt.StrokeDash(
        "patching:N",
        scale=alt.Scale(domain=[COMPLETE, PARTIAL], range=[[1, 0], [5, 3]]),
        legend=None,  # the subtitle says what a dashed line is (vl-convert draws no dash key)
    )
    x = alt.X(
        "depth:Q",
        scale=alt.Scale(domain=[0, 1]),
        axis=alt.Axis(title="relative depth: layer ÷ (layers − 1)", format=".1f", tickCount=5),
    )
    base = alt.Chart().encode(x=x)
    band = base.mark_area(opacity=0.18).encode(
        y=alt.Y("low:Q", scale=y_scale),
        y2="high:Q",
        color=color,
        detail="model:N",
    )
    line = base.mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        color=color,
        strokeDash=dash,
        y=alt.Y(
            "mean:Q",
            scale=y_scale,
            title=["mean normalised effect", "(band: 95% interval)"],
        ),
        tooltip=[
            alt.Tooltip("model:N"),
            alt.Tooltip("panel:N", title="tokens"),
            alt.Tooltip("layer:O"),
            alt.Tooltip("n_layers:Q", title="layers"),
            alt.Tooltip("mean:Q", format=".3f"),
            alt.Tooltip("low:Q", format=".3f", title="95% low"),
            alt.Tooltip("high:Q", format=".3f", title="95% high"),
            alt.Tooltip("n:Q", title="pairs"),
            alt.Tooltip("patching:N"),
        ],
    )
    zero = alt.Chart().mark_rule(color="#888888", strokeDash=[3, 3]).encode(y=alt.datum(0))
    return (
        alt.layer(zero, band, line, data=data)
        .properties(width=210, height=190)
        .facet(
            column=alt.Column(
                "panel:N",
                sort=[group_titles[g] for g in groups],
                header=alt.Header(title=None, labelFontSize=12),
            )
        )
        .properties(
            title=alt.TitleParams(
                "Where the changed value sits, by relative depth: patching "
                f"{site_title(site)} at the chain's tokens, A → B",
                subtitle=[
                    f"Mean over pairs of the {METRIC_TITLES['normalised']}; per pair, a group "
                    "of several tokens counts its strongest one; the band is the 95% interval.",
                    *notes,
                    *([DASHED] if data["patching"].eq(PARTIAL).any() else []),
                ],
                anchor="start",
            )
        )
        .configure_view(stroke=None)
    )
