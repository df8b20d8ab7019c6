"""Patching grids over layers and tokens: the heatmap (``heatmap_figure``) and whole-stream
patching's effect by layer (``layer_line_figure``).

- **heatmap**: one group of panels per divergence index ``k``, one panel per site inside a
  group (in the order given), layers on x, the tokens of one example pair on y (ROME's
  causal-trace layout), colour = mean effect over pairs on a diverging scale centred at 0. Every
  group's title carries its pair count; a caption under the chart says what the labels, ``*``
  and the colours mean.
- **whole-stream lines**: the mean effect by layer, one line per ``k``, one panel per site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from seqpatch.charts.layout import (
    _cells_frame,
    _grid_figure,
    _grid_sizes,
    _layer_token_base,
    _panel_cells,
    _panel_group,
)
from seqpatch.charts.style import (
    LEGEND_TITLES,
    METRIC_MEANINGS,
    METRIC_TITLES,
    NO_DATA,
    ChartError,
    _check_metric,
    color_scale,
    ordinal,
    site_title,
)


def heatmap_caption(metric: str, missing: bool = False) -> list[str]:
    """The lines under the heatmap: what the token labels, ``*`` and the colours mean."""
    _check_metric(metric)
    lines = [
        "Rows: the tokens of one example pair per divergence index (B's prompt, numbered by "
        "position); * marks the tokens where A and B differ.",
        METRIC_MEANINGS[metric],
        "k = the statement that differs between A and B (counted from 0); each group of panels "
        "averages over the pairs that diverge there.",
    ]
    if metric != "logit_diff":
        lines.append("Values beyond ±1 are drawn at the end colours (clamped).")
    if missing:
        lines.append("Grey = no pair has a defined value at that cell.")
    return lines


def pairs_per_k(agg: Mapping[str, Any]) -> dict[int, int]:
    """Pairs per divergence index, read from an aggregate's counts (``patching.aggregate``).

    The largest cell count of each ``k`` (any site): a pair contributes to every cell it covers,
    except where its normalisation is undefined. Pass the exact counts to ``heatmap_figure``
    when you have them.
    """
    counts = np.asarray(agg["stats"])[:, :, 2]
    return {
        int(k): int(np.nan_to_num(counts[:, ki]).max())
        for ki, k in enumerate(agg["divergence_indices"])
    }


def count_pairs(rows: Any) -> dict[int, int]:
    """Distinct pairs per divergence index of patching rows (a ``Dataset`` or a frame with
    ``pair_id`` and ``divergence_index``): the counts ``heatmap_figure`` puts in its titles."""
    seen: dict[int, set[str]] = {}
    for pid, k in zip(rows["pair_id"], rows["divergence_index"], strict=True):
        seen.setdefault(int(k), set()).add(pid)
    return {k: len(ids) for k, ids in sorted(seen.items())}


def heatmap_cells(agg: Mapping[str, Any]) -> pl.DataFrame:
    """The aggregate as tidy cells: ``site, divergence_index, layer, position, label, mean, std,
    count`` (``count`` 0 and ``mean`` null where no pair has a value)."""
    stats = np.asarray(agg["stats"], dtype=np.float64)
    frames = []
    for si, site in enumerate(agg["sites"]):
        for ki, k in enumerate(agg["divergence_indices"]):
            labels = list(agg["labels"][k])
            n_pos = len(labels)
            layers = list(agg["layers"])
            block = stats[si, ki, :, :, :n_pos]  # (3, layers, positions)
            mean, std, count = (block[i].reshape(-1) for i in range(3))
            frames.append(
                _panel_cells(
                    ("site", site),
                    k,
                    layers,
                    labels,
                    mean=mean,
                    std=std,
                    count=np.nan_to_num(count).astype(np.int64),
                )
            )
    if not frames:
        raise ChartError("the aggregate has no cells to draw")
    cells = pl.concat(frames)
    return cells.with_columns(
        pl.when(pl.col("count") > 0).then(pl.col("mean")).otherwise(None).alias("mean"),
        pl.when(pl.col("count") > 0).then(pl.col("std")).otherwise(None).alias("std"),
    ).with_columns(pl.col("mean").fill_nan(None), pl.col("std").fill_nan(None))


def heatmap_figure(
    agg: Mapping[str, Any],
    metric: str | None = None,
    n_pairs_by_k: Mapping[int, int] | None = None,
    *,
    title: str | None = None,
    max_height: int = 900,
) -> alt.VConcatChart:
    """Layer × token heatmaps of an aggregate (``seqpatch.stages.patching.aggregate``).

    Layout: one group per divergence index (across), titled with its pair count
    (``n_pairs_by_k``, else ``pairs_per_k(agg)``); inside it one panel per site (across, in
    ``agg["sites"]`` order) sharing the token axis; layer labels horizontal. Row height shrinks
    with the number of tokens so the chart stays under ``max_height`` CSS pixels (PNGs are
    saved at 2×). A caption under the chart explains labels, ``*`` and colours.
    """
    metric = metric or agg.get("metric", "normalised")
    _check_metric(metric)
    cells = heatmap_cells(agg)
    counts = {int(k): int(v) for k, v in (n_pairs_by_k or pairs_per_k(agg)).items()}
    ks = [int(k) for k in agg["divergence_indices"]]
    sites = list(agg["sites"])
    layers = list(agg["layers"])
    n_pos = max(len(agg["labels"][k]) for k in agg["divergence_indices"])
    row_h, cell_w, font = _grid_sizes(n_pos, len(layers), max_height - 200)
    missing = bool(cells["mean"].null_count())
    scale = color_scale(metric, cells["mean"].drop_nulls().to_list())
    data = cells.with_columns(
        pl.col("site").replace_strict({s: site_title(s, "|") for s in sites}).alias("site_title"),
        pl.format("{} · {}", pl.col("label"), pl.col("position")).alias("token"),
    )
    groups = []
    for k in ks:
        block = data.filter(pl.col("divergence_index") == k)
        n_k = counts.get(k, 0)
        base = _layer_token_base(
            layers,
            cell_w,
            font,
            [
                alt.Tooltip("site:N"),
                alt.Tooltip("divergence_index:O", title="k"),
                alt.Tooltip("layer:O"),
                alt.Tooltip("position:O"),
                alt.Tooltip("label:N", title="token (example pair)"),
                alt.Tooltip("mean:Q", format=".3f"),
                alt.Tooltip("std:Q", format=".3f"),
                alt.Tooltip("count:Q", title="pairs in cell"),
            ],
        )
        values = base.mark_rect().encode(
            color=alt.Color("mean:Q", title=LEGEND_TITLES[metric], scale=scale)
        )
        empty = base.mark_rect(color=NO_DATA)
        cells_view = alt.layer(
            empty.transform_filter("datum.count == 0"),
            values.transform_filter("datum.count > 0"),
            data=block,
        ).properties(width=cell_w * len(layers), height=row_h * len(agg["labels"][k]))
        groups.append(
            _panel_group(
                cells_view,
                "site_title:N",
                [site_title(s, "|") for s in sites],
                alt.TitleParams(
                    f"k = {k} ({ordinal(k + 1)} statement changed) · "
                    f"{n_k} pair{'s' if n_k != 1 else ''}",
                    fontSize=13,
                    anchor="middle",
                ),
            )
        )
    total = sum(counts.get(k, 0) for k in ks)
    heading = title or (
        f"Activation patching A → B: where does the changed statement matter? ({total} pairs)"
    )
    return _grid_figure(
        groups,
        len(sites),
        cell_w * len(layers),
        heatmap_caption(metric, missing),
        heading,
        f"Mean {METRIC_TITLES[metric]} over pairs, per site, layer and token",
    )


def heatmap_chart(cells: pl.DataFrame, metric: str, title: str | None = None) -> alt.TopLevelMixin:
    """Draw tidy cells (``patching.effect_cells``) with ``heatmap_figure``'s layout.

    Kept for callers that hold cells rather than the aggregate; prefer ``heatmap_figure``.
    """
    return heatmap_figure(_aggregate_from_cells(cells, metric), metric, title=title)


def _aggregate_from_cells(cells: pl.DataFrame, metric: str) -> dict[str, Any]:
    sites = cells["site"].unique(maintain_order=True).to_list()
    ks = sorted(cells["divergence_index"].unique().to_list())
    layers = sorted(cells["layer"].unique().to_list())
    n_pos = int(cells["position"].max()) + 1
    stats = np.full((len(sites), len(ks), 3, len(layers), n_pos), np.nan)
    labels: dict[int, list[str]] = {}
    for row in cells.iter_rows(named=True):
        si, ki = sites.index(row["site"]), ks.index(row["divergence_index"])
        li = layers.index(row["layer"])
        stats[si, ki, :, li, row["position"]] = (row["mean"], row["std"], row["count"])
        labels.setdefault(row["divergence_index"], {})[row["position"]] = row["label"]  # type: ignore[index]
    labels = {k: [v[t] for t in sorted(v)] for k, v in labels.items()}  # type: ignore[attr-defined]
    return {
        "metric": metric,
        "sites": sites,
        "divergence_indices": ks,
        "layers": layers,
        "labels": labels,
        "stats": stats,
    }


def heatmap_name(metric: str) -> str:
    """File stem of a metric's heatmap: ``heatmap-<metric>``."""
    return f"heatmap-{metric}"


POSITION_SET_TITLES = {
    "all": "every position at once",
    "from-divergence": "every position from the first changed token on, at once",
}


def layer_line_figure(
    cells: pl.DataFrame,
    agg: Mapping[str, Any],
    metric: str | None = None,
    n_pairs_by_k: Mapping[int, int] | None = None,
) -> alt.TopLevelMixin:
    """Whole-stream patching (``patching.effect_cells`` of a ``layer`` grid): the mean effect by
    layer, one line per divergence index, one panel per site; the band is ± one std."""
    metric = metric or agg.get("metric", "normalised")
    _check_metric(metric)
    sites = list(agg["sites"])
    counts = {int(k): int(v) for k, v in (n_pairs_by_k or pairs_per_k(agg)).items()}
    data = _cells_frame(cells, sites).with_columns(
        pl.col("divergence_index")
        .replace_strict(
            {k: f"k = {k} ({counts.get(int(k), 0)})" for k in agg["divergence_indices"]},
            return_dtype=pl.String,
        )
        .alias("k"),
        (pl.col("mean") - pl.col("std")).alias("low"),
        (pl.col("mean") + pl.col("std")).alias("high"),
    )
    base = alt.Chart().encode(
        x=alt.X("layer:O", axis=alt.Axis(labelAngle=0, title="layer patched")),
        color=alt.Color("k:N", title=["changed statement", "(pairs)"]),
    )
    band = base.mark_area(opacity=0.15).encode(y="low:Q", y2="high:Q")
    line = base.mark_line(point=True).encode(
        y=alt.Y("mean:Q", title=METRIC_TITLES[metric]),
        tooltip=[
            alt.Tooltip("site:N"),
            alt.Tooltip("k:N"),
            alt.Tooltip("layer:O"),
            alt.Tooltip("mean:Q", format=".3f"),
            alt.Tooltip("std:Q", format=".3f"),
            alt.Tooltip("count:Q", title="pairs"),
        ],
    )
    span = POSITION_SET_TITLES.get(agg.get("span") or "all", "every position at once")
    return (
        alt.layer(band, line, data=data)
        .properties(width=260, height=200)
        .facet(
            column=alt.Column(
                "site_title:N",
                sort=[site_title(s, "|") for s in sites],
                header=alt.Header(title=None, labelExpr="split(datum.value, '|')"),
            )
        )
        .properties(
            title=alt.TitleParams(
                "Whole-stream patching A → B: from which layer on does B take A's answer?",
                subtitle=f"Mean {METRIC_TITLES[metric]} over pairs; A's activation patched at "
                f"{span}",
                anchor="start",
            )
        )
        .configure_view(stroke=None)
    )


def layers_name(metric: str) -> str:
    """File stem of a whole-stream chart: ``layers-<metric>``."""
    return f"layers-{metric}"
