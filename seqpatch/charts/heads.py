"""Attention heads: layer × head heatmaps (``head_heatmap_figure``) and the strongest heads'
effect token by token (``top_heads_figure``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import altair as alt
import polars as pl

from seqpatch.charts.grids import pairs_per_k
from seqpatch.charts.layout import MAX_WIDTH, _cells_frame
from seqpatch.charts.style import (
    METRIC_TITLES,
    TOWARDS_A,
    TOWARDS_B,
    ChartError,
    _check_metric,
    color_scale,
    legend_title,
    mean_title,
    ordinal,
    site_title,
    span_title,
)
from seqpatch.metrics import METRIC_INFO


def head_heatmap_figure(
    cells: pl.DataFrame,
    agg: Mapping[str, Any],
    metric: str | None = None,
    n_pairs_by_k: Mapping[int, int] | None = None,
) -> alt.TopLevelMixin:
    """Layer × head heatmaps (``patching.effect_cells`` of a ``layer,head[,pos]`` grid): one
    row of panels per site, one panel per divergence index, layers across, heads down; a study
    whose divergence indices would not fit ``MAX_WIDTH`` across gets one row per index instead.

    With a position axis each (layer, head) shows its strongest position: the mean effect at
    the position whose mean has the largest magnitude (the tooltip names the token).
    """
    metric = metric or agg.get("metric", "normalised")
    _check_metric(metric)
    sites = list(agg["sites"])
    if "position" in cells.columns:
        cells = (
            cells.with_columns(pl.col("mean").abs().alias("_size"))
            .sort("_size", descending=True, nulls_last=True)
            .group_by(["site", "divergence_index", "layer", "head"], maintain_order=True)
            .first()
            .drop("_size")
        )
    data = _cells_frame(cells, sites)
    counts = {int(k): int(v) for k, v in (n_pairs_by_k or pairs_per_k(agg)).items()}
    data = data.with_columns(
        pl.col("divergence_index")
        .replace_strict(
            {k: f"k = {k} · {counts.get(int(k), 0)} pairs" for k in agg["divergence_indices"]},
            return_dtype=pl.String,
        )
        .alias("k_title")
    )
    layers, heads = list(agg["layers"]), list(agg["heads"])
    tooltip = [
        alt.Tooltip("site:N"),
        alt.Tooltip("divergence_index:O", title="k"),
        alt.Tooltip("layer:O"),
        alt.Tooltip("head:O"),
        alt.Tooltip("mean:Q", format=".3f"),
        alt.Tooltip("std:Q", format=".3f"),
        alt.Tooltip("count:Q", title="pairs in cell"),
    ]
    if "position" in data.columns:
        tooltip += [alt.Tooltip("position:O"), alt.Tooltip("label:N", title="token")]
    cell = 22 if len(heads) <= 16 else 12
    panel_w = max(90, cell * len(layers))
    by_site = alt.Row(
        "site_title:N",
        sort=[site_title(s, "|") for s in sites],
        header=alt.Header(title=None, labelExpr="split(datum.value, '|')"),
    )
    k_sort = [f"k = {k} · {counts.get(int(k), 0)} pairs" for k in agg["divergence_indices"]]
    by_k = alt.Column("k_title:N", sort=k_sort, header=alt.Header(title=None))
    if len(k_sort) * (panel_w + 20) > MAX_WIDTH:  # a wide study: one row per k, sites across
        facets = {
            "row": alt.Row("k_title:N", sort=k_sort, header=alt.Header(title=None)),
            "column": alt.Column(
                "site_title:N",
                sort=[site_title(s, "|") for s in sites],
                header=alt.Header(title=None, labelExpr="split(datum.value, '|')"),
            ),
        }
    else:
        facets = {"row": by_site, "column": by_k}
    chart = (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X("layer:O", sort=layers, axis=alt.Axis(labelAngle=0)),
            y=alt.Y("head:O", sort=heads),
            color=alt.Color(
                "mean:Q",
                title=legend_title(metric, agg.get("method")),
                scale=color_scale(metric, data["mean"].to_list()),
            ),
            tooltip=tooltip,
        )
        .properties(width=panel_w, height=cell * len(heads))
        .facet(**facets)
    )
    where = (
        "at its strongest position" if "position" in cells.columns else span_title(agg.get("span"))
    )
    return chart.properties(
        title=alt.TitleParams(
            "Which attention heads carry the changed statement? (A → B, one head patched"
            + ("; attribution estimates)" if agg.get("method") == "attribution" else ")"),
            subtitle=f"{mean_title(agg.get('method'))} {METRIC_TITLES[metric]} over pairs, each "
            f"head patched {where}; "
            "k = the statement that differs",
            anchor="start",
        )
    ).configure_view(stroke=None)


HEAD_LABEL_W = 150  # CSS pixels of a row's head label ("L0 H5 · peak +0.93")


def top_heads(cells: pl.DataFrame, n: int = 6) -> pl.DataFrame:
    """The ``n`` (layer, head) pairs of each site with the largest peak mean effect.

    ``cells`` is ``patching.effect_cells`` of a ``layer,head,pos`` grid. A head's peak is its
    largest ``|mean|`` over every divergence index and position; returns ``site, layer, head,
    peak`` (the signed mean at the peak), ranked by ``|peak|`` within each site, sites in the
    order they first appear.
    """
    if cells.is_empty():
        raise ChartError("the aggregate has no cells to draw")
    if "position" not in cells.columns or "head" not in cells.columns:
        raise ChartError(
            "top heads need a layer,head,pos grid (build it with --axes layer,head,pos)"
        )
    if n < 1:
        raise ChartError(f"the number of top heads must be at least 1, not {n}")
    sites = list(dict.fromkeys(cells["site"].to_list()))
    peaks = (
        cells.drop_nulls("mean")
        .filter(pl.col("mean").is_not_nan())
        .with_columns(pl.col("mean").abs().alias("_size"))
        .sort(["_size", "layer", "head"], descending=[True, False, False])
        .group_by(["site", "layer", "head"], maintain_order=True)
        .agg(pl.col("mean").first().alias("peak"), pl.col("_size").first().alias("_size"))
    )
    ranked = [
        peaks.filter(pl.col("site") == site)
        .sort(["_size", "layer", "head"], descending=[True, False, False])
        .head(n)
        for site in sites
    ]
    return pl.concat(ranked).select("site", "layer", "head", "peak")


def head_name(layer: int, head: int) -> str:
    """``L0 H5``: how the charts and the docs name a head."""
    return f"L{layer} H{head}"


def top_heads_figure(
    cells: pl.DataFrame,
    agg: Mapping[str, Any],
    metric: str | None = None,
    n_pairs_by_k: Mapping[int, int] | None = None,
    n_top: int = 6,
) -> alt.TopLevelMixin:
    """Per-position panels for the strongest heads of a ``layer,head,pos`` grid.

    One row per head of ``top_heads(cells, n_top)`` (per site, strongest first), one column per
    divergence index; each panel is the mean effect over pairs (bars) of patching that head at
    one token, tokens of the column's example pair on x (``*`` = where A and B differ). The
    row header names the head and its peak.
    """
    metric = metric or agg.get("metric", "normalised")
    _check_metric(metric)
    chosen = top_heads(cells, n_top)
    counts = {int(k): int(v) for k, v in (n_pairs_by_k or pairs_per_k(agg)).items()}
    ks = [int(k) for k in agg["divergence_indices"]]
    k_titles = {
        k: f"k = {k} ({ordinal(k + 1)} statement changed) · {counts.get(k, 0)} pairs" for k in ks
    }
    rank = {
        (row["site"], row["layer"], row["head"]): i
        for i, row in enumerate(chosen.iter_rows(named=True))
    }
    multi_site = chosen["site"].n_unique() > 1
    titles = {
        key: (f"{site_title(key[0])} · " if multi_site else "")
        + f"{head_name(key[1], key[2])} · peak {peak:+.2f}"
        for key, peak in zip(rank, chosen["peak"].to_list(), strict=True)
    }
    data = (
        cells.join(chosen.select("site", "layer", "head"), on=["site", "layer", "head"])
        .filter(pl.col("count") > 0)
        .with_columns(
            pl.struct("site", "layer", "head")
            .map_elements(
                lambda s: titles[(s["site"], s["layer"], s["head"])], return_dtype=pl.String
            )
            .alias("head_title"),
            pl.struct("site", "layer", "head")
            .map_elements(lambda s: rank[(s["site"], s["layer"], s["head"])], return_dtype=pl.Int64)
            .alias("rank"),
            pl.col("divergence_index")
            .replace_strict(k_titles, return_dtype=pl.String)
            .alias("k_title"),
            pl.format("{} ({})", pl.col("label"), pl.col("position")).alias("token"),
        )
    )
    n_pos = max(len(agg["labels"][k]) for k in ks)
    changed = "indexof(datum.value, '* (') >= 0"
    panel_w = max(160, 9 * n_pos)
    bars = (
        alt.Chart()
        .mark_bar()
        .encode(
            x=alt.X(
                "token:N",
                sort=alt.EncodingSortField(field="position", order="ascending"),
                axis=alt.Axis(
                    title=None,
                    labelAngle=-90,
                    labelFontSize=8,
                    labelFontWeight=alt.ExprRef(f"{changed} ? 'bold' : 'normal'"),
                    labelColor=alt.ExprRef(f"{changed} ? 'black' : '#666666'"),
                ),
            ),
            y=alt.Y(
                "mean:Q",
                title=legend_title(metric, agg.get("method")),
                axis=alt.Axis(tickCount=3),
            ),
            color=alt.condition(  # blue where the metric's sign means "towards A's answer"
                "datum.mean >= 0" if METRIC_INFO[metric].towards_a > 0 else "datum.mean <= 0",
                alt.value(TOWARDS_A),
                alt.value(TOWARDS_B),
            ),
            tooltip=[
                alt.Tooltip("site:N"),
                alt.Tooltip("head_title:N", title="head"),
                alt.Tooltip("divergence_index:O", title="k"),
                alt.Tooltip("position:O"),
                alt.Tooltip("label:N", title="token (example pair)"),
                alt.Tooltip("mean:Q", format=".3f"),
                alt.Tooltip("std:Q", format=".3f"),
                alt.Tooltip("count:Q", title="pairs in cell"),
            ],
        )
        .properties(width=panel_w, height=70)
    )

    def columns(chunk: list[int]) -> alt.FacetChart:
        return (
            bars.properties(data=data.filter(pl.col("divergence_index").is_in(chunk)))
            .facet(
                row=alt.Row(
                    "head_title:N",
                    sort=alt.EncodingSortField(field="rank", order="ascending"),
                    header=alt.Header(
                        title=None, labelAngle=0, labelAlign="left", labelFontSize=11
                    ),
                ),
                column=alt.Column(
                    "k_title:N", sort=[k_titles[k] for k in chunk], header=alt.Header(title=None)
                ),
                spacing={"row": 8, "column": 14},
            )
            .resolve_scale(x="independent")
        )

    # a wide study: its divergence indices wrapped into rows of columns under MAX_WIDTH
    per_row = max(1, (MAX_WIDTH - HEAD_LABEL_W) // (panel_w + 14))
    chunks = [ks[i : i + per_row] for i in range(0, len(ks), per_row)]
    chart: Any = columns(ks) if len(chunks) == 1 else alt.vconcat(*map(columns, chunks))
    caption = [
        "Bars: mean over pairs of patching A's activation of that one head, at that one token, "
        "into B; blue = towards A's answer, red = away from it.",
        "x: the tokens of one example pair per column (B's prompt, numbered by position); * marks "
        "the tokens where A and B differ. Rows: the heads with the largest peak (any k, any "
        "token), strongest first.",
    ]
    return chart.properties(
        title=alt.TitleParams(
            f"Where in the prompt do the top {len(chosen)} heads carry the changed statement?",
            subtitle=[
                f"{mean_title(agg.get('method'))} {METRIC_TITLES[metric]} over pairs, one head at "
                "one token patched"
                + (
                    " (attribution: first-order estimates)"
                    if agg.get("method") == "attribution"
                    else ""
                ),
                *caption,
            ],
            anchor="start",
        )
    ).configure_view(stroke=None)


def top_heads_name(metric: str) -> str:
    """File stem of the top heads' per-position chart: ``top-heads-<metric>``."""
    return f"top-heads-{metric}"
