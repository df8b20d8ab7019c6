"""Accuracy by program length per model (``accuracy_figure``): colour, shape and dash per
model, Wilson 95% intervals, the choice threshold and the chosen (model, length) marked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import altair as alt
import polars as pl

from seqpatch.charts.style import ChartError

MODEL_SHAPES = ["circle", "square", "triangle-up", "diamond", "cross", "triangle-down"]
MODEL_DASHES = [[1, 0], [6, 3], [2, 2], [8, 3, 2, 3], [1, 3]]


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _chosen(chosen: Any) -> tuple[str, int, str | None] | None:
    """``(model_id, seq_len, family)`` of a ``choose.Choice``, a mapping or a 2-tuple."""
    if chosen is None:
        return None
    if isinstance(chosen, tuple | list):
        return str(chosen[0]), int(chosen[1]), None
    return str(_field(chosen, "model_id")), int(_field(chosen, "seq_len")), _field(chosen, "family")


def accuracy_figure(
    summary: pl.DataFrame,
    threshold: float | None = None,
    chosen: Any = None,
    version: str | None = None,
    *,
    title: str = "Exact-match accuracy by program length",
    studied: int | None = None,
    cap_reason: str = "",
) -> alt.LayerChart:
    """Accuracy by length, one line per model (colour + point shape + dash), Wilson 95% bars.

    ``summary`` is ``benchmark.summarize``'s frame (``model_id, family, seq_len, accuracy,
    ci_low, ci_high, n``). ``threshold`` (the choice's minimum accuracy; default
    ``chosen.min_accuracy``) is a dashed rule; ``chosen`` (a ``choose.Choice``, a mapping or a
    ``(model_id, seq_len)`` tuple) is ringed and labelled. Models are nudged apart along x so
    their intervals do not hide each other. ``version`` goes in the subtitle. ``studied`` is
    the length the study went on with when it differs from the chosen one (the main job caps it:
    ``cap_reason`` says why), drawn as a dotted vertical line and named in the subtitle.

    The threshold's label sits above its line at the end of the plot away from the chosen
    length, so it never covers the chosen point's label.
    """
    if summary.is_empty():
        raise ChartError("the benchmark summary is empty: nothing to draw")
    families = summary["family"].unique().to_list() if "family" in summary.columns else []
    series = (
        pl.format("{} ({})", pl.col("model_id"), pl.col("family"))
        if len(families) > 1
        else pl.col("model_id")
    )
    data = summary.with_columns(series.alias("series"))
    order = data["series"].unique(maintain_order=True).to_list()
    step = 0.08
    offsets = {s: (i - (len(order) - 1) / 2) * step for i, s in enumerate(order)}
    data = data.with_columns(
        (pl.col("seq_len") + pl.col("series").replace_strict(offsets)).alias("x")
    )
    lengths = sorted(summary["seq_len"].unique().to_list())
    x = alt.X(
        "x:Q",
        title="statements in the program (length)",
        scale=alt.Scale(domain=[lengths[0] - 0.5, lengths[-1] + 0.5], nice=False),
        axis=alt.Axis(values=lengths, format="d", labelAngle=0, grid=False),
    )
    y_scale = alt.Scale(domain=[0, 1])
    models = dict(
        sort=order,
        scale=alt.Scale(domain=order),
        legend=alt.Legend(
            title="model",
            orient="bottom",
            direction="vertical",
            labelLimit=420,
            symbolOpacity=1,
            symbolStrokeWidth=0,
            symbolSize=110,
            labelFontSize=12,
        ),
    )
    tooltip = [
        alt.Tooltip("series:N", title="model"),
        alt.Tooltip("seq_len:Q", title="length"),
        alt.Tooltip("accuracy:Q", format=".3f"),
        alt.Tooltip("ci_low:Q", title="Wilson 95% low", format=".3f"),
        alt.Tooltip("ci_high:Q", title="Wilson 95% high", format=".3f"),
        alt.Tooltip("n:Q", title="programs"),
    ]
    base = alt.Chart(data).encode(x=x, color=alt.Color("series:N", **models))
    bars = base.mark_rule(strokeWidth=1.5, opacity=0.8).encode(
        y=alt.Y("ci_low:Q", scale=y_scale), y2="ci_high:Q"
    )
    lines = base.mark_line(strokeWidth=2).encode(
        y=alt.Y("accuracy:Q", title="exact-match accuracy", scale=y_scale),
        strokeDash=alt.StrokeDash(
            "series:N", sort=order, scale=alt.Scale(domain=order, range=MODEL_DASHES), legend=None
        ),
    )
    points = base.mark_point(filled=True, size=70, opacity=1).encode(
        y="accuracy:Q",
        shape=alt.Shape(
            "series:N", **{**models, "scale": alt.Scale(domain=order, range=MODEL_SHAPES)}
        ),
        tooltip=tooltip,
    )
    layers: list[alt.Chart] = [bars, lines, points]
    threshold = threshold if threshold is not None else _field(chosen, "min_accuracy")
    pick = _chosen(chosen)
    if threshold is not None:
        # the label goes to the end of the plot away from the chosen length
        middle = (lengths[0] + lengths[-1]) / 2
        at_left = pick is None or pick[1] >= middle
        rule = pl.DataFrame(
            {"t": [float(threshold)], "x": [lengths[0] - 0.45 if at_left else lengths[-1] + 0.45]}
        )
        layers.append(alt.Chart(rule).mark_rule(strokeDash=[5, 4], color="#555555").encode(y="t:Q"))
        layers.append(
            alt.Chart(rule)
            .mark_text(
                align="left" if at_left else "right",
                baseline="bottom",
                dy=-3,
                color="#555555",
                fontSize=11,
            )
            .encode(x=alt.X("x:Q"), y="t:Q", text=alt.value(f"choice threshold {threshold:g}"))
        )
    if pick is not None:
        middle = (lengths[0] + lengths[-1]) / 2
        layers += _choice_layers(data, pick, chosen, len(families) > 1, threshold, middle)
    if studied is not None and (pick is None or studied != pick[1]):
        mark = pl.DataFrame({"x": [float(studied)], "y": [0.0]})  # at the foot: the top is busy
        layers.append(alt.Chart(mark).mark_rule(strokeDash=[2, 3], color="black").encode(x="x:Q"))
        for halo in ({"stroke": "white", "strokeWidth": 4, "strokeJoin": "round"}, {}):
            layers.append(
                alt.Chart(mark)
                .mark_text(align="left", baseline="bottom", dx=4, dy=-3, fontSize=11, **halo)
                .encode(x="x:Q", y="y:Q", text=alt.value(f"studied: length {studied}"))
            )
    subtitle = [
        "Error bars: Wilson 95% interval over the programs of each (model, length)",
        "; ".join(
            [
                *(
                    ["dashed line: the threshold the choice requires"]
                    if threshold is not None
                    else []
                ),
                *(["ringed: the chosen (model, length)"] if pick is not None else []),
            ]
        ),
        (
            f"dotted line: the length studied, {studied}"
            + (f" (the chosen {pick[1]}, {cap_reason})" if pick and cap_reason else "")
            if studied is not None and (pick is None or studied != pick[1])
            else ""
        ),
        f"benchmark version {version}" if version else "",
    ]
    return (
        alt.layer(*layers)
        .resolve_scale(color="shared", shape="shared")
        .properties(
            width=460,
            height=280,
            title=alt.TitleParams(
                title, subtitle=[line for line in subtitle if line], anchor="start", fontSize=14
            ),
        )
    )


def _choice_layers(
    data: pl.DataFrame,
    pick: tuple[str, int, str | None],
    chosen: Any,
    by_family: bool,
    threshold: float | None = None,
    middle: float = 0.0,
) -> list[alt.Chart]:
    """A black ring on the chosen (model, length) and a label above it (below near 1.0; beside
    it when the threshold line runs just below)."""
    model_id, seq_len, family = pick
    match = data.filter((pl.col("model_id") == model_id) & (pl.col("seq_len") == seq_len))
    if family is not None and by_family:
        match = match.filter(pl.col("family") == family)
    if match.is_empty():
        acc = _field(chosen, "accuracy")
        if acc is None:
            raise ChartError(
                f"the chosen model {model_id!r} at length {seq_len} is not in the summary"
            )
        match = pl.DataFrame({"x": [float(seq_len)], "accuracy": [float(acc)]})
    mark = (
        match.select("x", "accuracy")
        .head(1)
        .with_columns(pl.lit(f"chosen: {model_id}, length {seq_len}").alias("label"))
    )
    acc = float(mark["accuracy"][0])
    # above the ring where the label fits under 1.0, else below it; a threshold line in the
    # way below puts the label beside the ring instead
    high = acc > 0.9
    beside = high and threshold is not None and acc - 0.14 <= threshold <= acc
    ring = (
        alt.Chart(mark)
        .mark_point(shape="circle", size=420, filled=False, strokeWidth=2.5, color="black")
        .encode(x="x:Q", y="accuracy:Q")
    )
    if beside:
        right_half = float(mark["x"][0]) > middle
        text: dict[str, Any] = dict(
            align="right" if right_half else "left",
            baseline="middle",
            dx=-16 if right_half else 16,
            fontSize=11,
        )
    else:
        text = dict(
            align="center",
            baseline="top" if high else "bottom",
            dy=16 if high else -16,
            fontSize=11,
        )
    halo = alt.Chart(mark).mark_text(
        **text, fontWeight="bold", stroke="white", strokeWidth=4, strokeJoin="round"
    )
    label = alt.Chart(mark).mark_text(**text, fontWeight="bold", color="black")
    enc = dict(x="x:Q", y="accuracy:Q", text="label:N")
    return [ring, halo.encode(**enc), label.encode(**enc)]


def accuracy_chart(summary: pl.DataFrame, title: str | None = None) -> alt.LayerChart:
    """Old entry point: ``accuracy_figure`` without threshold or choice marks."""
    return accuracy_figure(summary, title=title or "Exact-match accuracy by program length")
