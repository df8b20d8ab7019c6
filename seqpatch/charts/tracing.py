"""ROME's causal-trace figure (``tracing_figure``): per divergence index three panels (single
restored state, MLP window, attention window), layers across, tokens down, corrupted tokens
marked; colour = the average indirect effect of restoring one state."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from seqpatch.charts.layout import (
    _grid_figure,
    _grid_sizes,
    _layer_token_base,
    _panel_cells,
    _panel_group,
    group_rows,
    group_width,
)
from seqpatch.charts.style import NO_DATA, WHITE, ChartError, _nice_ceiling, ordinal

TRACING_PANELS: dict[str, tuple[str, str]] = {
    "resid": ("single restored state", "(residual stream)"),
    "mlp": ("MLP outputs", "(window of {w} layer{s})"),
    "attn": ("attention outputs", "(window of {w} layer{s})"),
}
AIE_COLORS = [WHITE, "#807dba", "#3f007d"]  # white → purple: restoring brings the answer back
AIE_NEGATIVE = "#b35806"  # orange: restoring lowers the answer's probability


def tracing_panel_title(kind: str, window: int, sep: str = "|") -> str:
    """``resid`` → ``single restored state|(residual stream)``; windows name their width."""
    head, tail = TRACING_PANELS.get(kind, (kind, ""))
    return sep.join([head, tail.format(w=window, s="" if window == 1 else "s")]).strip(sep)


def aie_scale(values: Iterable[float]) -> tuple[alt.Scale, bool]:
    """The AIE colour scale and whether it is diverging; 0 is white either way.

    Sequential white → purple on ``[0, max]`` (a nice ceiling), clamped, when no value falls
    below −5% of the maximum (those small negatives are noise and draw white); else diverging,
    orange below 0, symmetric at the largest ``|value|``.
    """
    finite = [v for v in values if v is not None and math.isfinite(v)]
    high = _nice_ceiling(max([*finite, 0.0]) or 1.0)
    low = min([*finite, 0.0])
    if low >= -0.05 * high:
        return (
            alt.Scale(domain=[0, high / 2, high], range=AIE_COLORS, clamp=True, interpolate="lab"),
            False,
        )
    bound = _nice_ceiling(max(high, -low))
    return (
        alt.Scale(
            domain=[-bound, 0, bound / 2, bound],
            range=[AIE_NEGATIVE, *AIE_COLORS],
            clamp=True,
            interpolate="lab",
        ),
        True,
    )


def tracing_cells(summary: Mapping[str, Any]) -> pl.DataFrame:
    """``plots.tracing_summary`` as tidy cells: ``kind, divergence_index, layer, position, label,
    corrupted, aie`` (``aie`` null where no program has that position)."""
    grid = np.asarray(summary["by_position"], dtype=np.float64)  # [K, kinds, layers, positions]
    layers = [int(layer) for layer in summary["layers"]]
    frames = []
    for ki, k in enumerate(summary["divergence_indices"]):
        labels = list(summary["labels"][k])
        corrupted = set(summary["corrupted"][k])
        n_pos = len(labels)
        for kind_i, kind in enumerate(summary["kinds"]):
            values = grid[ki, kind_i, :, :n_pos].reshape(-1)
            frames.append(
                _panel_cells(
                    ("kind", kind),
                    k,
                    layers,
                    labels,
                    corrupted=[t in corrupted for t in range(n_pos)] * len(layers),
                    aie=values,
                )
            )
    if not frames:
        raise ChartError("the causal trace has no cells to draw")
    return pl.concat(frames).with_columns(pl.col("aie").fill_nan(None))


def tracing_caption(summary: Mapping[str, Any], diverging: bool, missing: bool) -> list[str]:
    """The lines under the causal-trace chart: what is corrupted, restored and coloured."""
    window = int(summary["window"])
    layers = len(summary["layers"])
    what = {
        "changed": "the tokens of the changed statement (the binding the pair alters)",
        "diff": "the tokens where A and B differ (the value being bound)",
        "chain": "every statement of the query's reference chain",
    }.get(str(summary["corrupt"]), f"statement {summary['corrupt']}")
    lines = [
        f"Corrupted: {what}, marked * and bold, their cells outlined (an outlined white box: "
        "restoring that state alone does not bring the answer back); their input embeddings "
        "get Gaussian noise of "
        f"σ = {summary['noise_scale']:g} × std(embeddings) = {summary['sigma']:.3g}, "
        f"{summary['n_samples']} draws per program (seeds stored in the rows).",
        "Rows: the tokens of one example program per k (numbered by position); the grid "
        "averages every traced program with that k at each position.",
        "Colour: average indirect effect AIE = P(answer | corrupted, that state restored to its "
        "clean value) − P(answer | corrupted), P over the full vocabulary; 0 = white.",
        "Single restored state: the residual stream entering layer l (layer 0 = the embeddings). "
        f"MLP / attention: the outputs of a window of w = {window} layer"
        f"{'' if window == 1 else 's'} centred on l (ROME's 10 of 48, scaled to {layers} "
        "layers: w = max(1, round(10·L/48))).",
        "k = the statement the pair changes (counted from 0); one group of panels per k.",
    ]
    lines.append(
        "Orange = restoring that state lowers the answer's probability."
        if diverging
        else "Slightly negative values (noise) are drawn white."
    )
    if missing:
        lines.append("Grey = no traced program has a token at that position.")
    return lines


def tracing_figure(
    summary: Mapping[str, Any], *, title: str | None = None, max_height: int = 900
) -> alt.VConcatChart:
    """ROME's causal-trace figure: per divergence index, three panels (single restored state,
    MLP window, attention window), layers across, tokens down, corrupted tokens marked.

    ``summary`` is ``plots.tracing_summary``'s: the AIE grid ``by_position`` ``[k, kind, layer,
    position]``, example ``labels`` and ``corrupted`` positions per ``k``, program ``counts`` and
    mean clean / corrupted probabilities (overall and ``by_k``), and the trace's parameters.
    Each group's title carries its program count and its clean → corrupted probability; the
    subtitle the overall ones; a caption says what is corrupted, restored and coloured.
    """
    cells = tracing_cells(summary)
    kinds = list(summary["kinds"])
    layers = [int(layer) for layer in summary["layers"]]
    ks = [int(k) for k in summary["divergence_indices"]]
    window = int(summary["window"])
    n_pos = max(len(summary["labels"][k]) for k in summary["divergence_indices"])
    _, cell_w, _ = _grid_sizes(n_pos, len(layers), max_height)
    n_rows = -(-len(ks) // group_rows(len(ks), group_width(len(kinds), cell_w * len(layers))))
    row_h, cell_w, font = _grid_sizes(n_pos, len(layers), (max_height - 220) // n_rows)
    scale, diverging = aie_scale(cells["aie"].drop_nulls().to_list())
    missing = bool(cells["aie"].null_count())
    panel_titles = [tracing_panel_title(kind, window) for kind in kinds]
    data = cells.with_columns(
        pl.col("kind")
        .replace_strict({kind: tracing_panel_title(kind, window) for kind in kinds})
        .alias("panel"),
        pl.format(
            "{}{} ({})",
            pl.col("label"),
            pl.when(pl.col("corrupted")).then(pl.lit("*")).otherwise(pl.lit("")),
            pl.col("position"),
        ).alias("token"),
    )
    counts = {int(k): int(v) for k, v in summary["counts"].items()}
    by_k = summary.get("by_k", {})
    groups = []
    for k in ks:
        block = data.filter(pl.col("divergence_index") == k)
        base = _layer_token_base(
            layers,
            cell_w,
            font,
            [
                alt.Tooltip("kind:N", title="restored"),
                alt.Tooltip("divergence_index:O", title="k"),
                alt.Tooltip("layer:O"),
                alt.Tooltip("position:O"),
                alt.Tooltip("label:N", title="token (example program)"),
                alt.Tooltip("corrupted:N"),
                alt.Tooltip("aie:Q", title="AIE", format=".3f"),
            ],
        )
        values = base.mark_rect().encode(
            color=alt.Color("aie:Q", title=["average", "indirect effect"], scale=scale)
        )
        empty = base.mark_rect(color=NO_DATA)
        outline = base.mark_rect(fill=None, stroke="#222222", strokeWidth=0.6)
        view = alt.layer(
            empty.transform_filter("!isValid(datum.aie)"),
            values.transform_filter("isValid(datum.aie)"),
            outline.transform_filter("datum.corrupted"),
            data=block,
        ).properties(width=cell_w * len(layers), height=row_h * len(summary["labels"][k]))
        n_k = counts.get(k, 0)
        probs = by_k.get(k)
        what = "corrupted" if summary["corrupt"] in ("changed", "diff") else "changed"
        heading = f"k = {k} ({ordinal(k + 1)} statement {what}) · {n_k} program" + (
            "s" if n_k != 1 else ""
        )
        groups.append(
            _panel_group(
                view,
                "panel:N",
                panel_titles,
                alt.TitleParams(
                    heading,
                    subtitle=(
                        f"P(answer): clean {probs[0]:.2f}, corrupted {probs[1]:.2f}"
                        if probs
                        else ""
                    ),
                    fontSize=13,
                    anchor="middle",
                ),
            )
        )
    total = sum(counts.get(k, 0) for k in ks)
    model = summary.get("model")
    heading = title or (
        "Causal tracing (ROME): which restored clean states bring the answer back?"
        f" ({total} program{'s' if total != 1 else ''}{f', {model}' if model else ''})"
    )
    subtitle = (
        f"Mean P(correct answer) over programs: clean {summary['clean_prob']:.3f}, corrupted "
        f"{summary['corrupted_prob']:.3f} (noise on the * tokens); colour = mean gain from "
        "restoring one state"
    )
    return _grid_figure(
        groups,
        len(kinds),
        cell_w * len(layers),
        tracing_caption(summary, diverging, missing),
        heading,
        subtitle,
    )


def tracing_name() -> str:
    """File stem of the causal-trace chart: ``causal-trace``."""
    return "causal-trace"
