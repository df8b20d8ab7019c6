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

from collections.abc import Mapping, Sequence
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
    group_rows,
    group_width,
)
from seqpatch.charts.style import (
    METRIC_MEANINGS,
    METRIC_TITLES,
    NO_DATA,
    POSITION_SELECTION_TITLES,
    ChartError,
    _check_metric,
    color_scale,
    legend_title,
    mean_title,
    method_title,
    ordinal,
    site_title,
    span_title,
)
from seqpatch.charts.tokens import NEWLINE, SPACE


def heatmap_caption(
    metric: str,
    missing: bool = False,
    method: str | None = None,
    dropped: Mapping[int, tuple[int, int]] | None = None,
    aligned: Sequence[int] = (),
    whitespace: bool = False,
    by_role: bool = False,
) -> list[str]:
    """The lines under the heatmap: what the token labels, ``*`` and the colours mean, which
    rows were left out (``dropped``: per ``k``, (positions drawn, positions)) and where pairs
    of different token lengths were aligned at their last token (``aligned``: those ``k``);
    ``whitespace``: the labels show the marks for spaces and new lines, so say what they are;
    ``by_role``: the rows are token roles (a ``slice`` grid), not one pair's tokens."""
    _check_metric(metric)
    rows = (
        "Rows: token roles in the changed value's data flow (hop0 = the changed statement, hop1… "
        "the later statements it flows through; var, =, value, end = the parts of a statement, "
        "value+1 its value's second token, e.g. a digit after a space token; "
        "question:j = the j-th token of the question; last = where the answer is read); each "
        "pair's token of that role, wherever it sits, is averaged with the others'."
        if by_role
        else "Rows: the tokens of one example pair per divergence index (B's prompt, numbered by "
        f"position{'; · = a space, ↵ = a new line' if whitespace else ''}); * marks the tokens "
        "where A and B differ."
    )
    lines = [
        rows,
        METRIC_MEANINGS[metric],
        "k = the statement that differs between A and B (counted from 0); each group of panels "
        "averages over the pairs that diverge there.",
    ]
    if method == "attribution":
        lines.insert(
            1,
            "Attribution patching: every value is a first-order (gradient × activation "
            "difference) estimate of the patch's effect, not a measured patch; it can be far "
            "from exact patching (e.g. where a patch saturates).",
        )
    if dropped:
        counts = set(dropped.values())
        if len(dropped) > 1 and len(counts) == 1:
            drawn, n = counts.pop()
            parts = f"{drawn} of {n} at every k"
        else:
            parts = ", ".join(f"{drawn} of {n} at k = {k}" for k, (drawn, n) in dropped.items())
        lines.append(
            f"Only patched positions are drawn ({parts}): the others were not patched (see the "
            "gaps in the position numbers)."
        )
    if aligned:
        lines.append(
            "Pairs of different token lengths (k = "
            + ", ".join(str(k) for k in aligned)
            + ") are aligned at their last token; the labels are the longest pair's."
        )
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


def patched_positions(cells: pl.DataFrame) -> dict[int, list[int]]:
    """Per divergence index, the positions some pair has a value at (any site or layer): the
    rows a heatmap draws. An index with none keeps every position (drawn grey)."""
    out: dict[int, list[int]] = {}
    for k in cells["divergence_index"].unique(maintain_order=True).to_list():
        block = cells.filter(pl.col("divergence_index") == k)
        kept = block.filter(pl.col("count") > 0)["position"].unique().sort().to_list()
        out[int(k)] = kept or block["position"].unique().sort().to_list()
    return out


def heatmap_figure(
    agg: Mapping[str, Any],
    metric: str | None = None,
    n_pairs_by_k: Mapping[int, int] | None = None,
    *,
    title: str | None = None,
    max_height: int = 900,
) -> alt.VConcatChart:
    """Layer × token heatmaps of an aggregate (``charts.grid_data.aggregate``).

    Layout: one group per divergence index, titled with its pair count (``n_pairs_by_k``, else
    ``pairs_per_k(agg)``), groups wrapped into rows so the figure stays ≤ ~1,200 CSS pixels
    (2,400 px as PNG); inside a group one panel per site (across, in ``agg["sites"]`` order)
    sharing the token axis. Only positions that some pair was patched at are drawn (a
    ``changed+ends+last`` selection leaves most rows unpatched); the caption says how many.
    Row height shrinks with the number of rows so the chart stays near ``max_height`` CSS
    pixels. Attribution aggregates are named as estimates in the title, subtitle, legend and
    caption.
    """
    metric = metric or agg.get("metric", "normalised")
    _check_metric(metric)
    method = agg.get("method")
    cells = heatmap_cells(agg)
    counts = {int(k): int(v) for k, v in (n_pairs_by_k or pairs_per_k(agg)).items()}
    ks = [int(k) for k in agg["divergence_indices"]]
    sites = list(agg["sites"])
    layers = list(agg["layers"])
    kept = patched_positions(cells)
    cells = cells.join(
        pl.DataFrame(
            [(k, t) for k, ts in kept.items() for t in ts],
            schema={"divergence_index": cells.schema["divergence_index"], "position": pl.Int64},
            orient="row",
        ),
        on=["divergence_index", "position"],
        how="semi",
    )
    dropped = {
        k: (len(kept[k]), len(agg["labels"][k])) for k in ks if len(kept[k]) < len(agg["labels"][k])
    }
    n_pos = max(len(kept[k]) for k in ks)
    _, cell_w, _ = _grid_sizes(n_pos, len(layers), max_height)
    n_rows = -(-len(ks) // group_rows(len(ks), group_width(len(sites), cell_w * len(layers))))
    row_h, cell_w, font = _grid_sizes(n_pos, len(layers), (max_height - 200) // n_rows)
    missing = bool(cells["mean"].null_count())
    scale = color_scale(metric, cells["mean"].drop_nulls().to_list())
    by_role = agg.get("position_axis") == "role"  # a slice grid: rows are roles, not tokens
    token = pl.col("label") if by_role else pl.format("{} ({})", "label", "position")
    data = cells.with_columns(
        pl.col("site").replace_strict({s: site_title(s, "|") for s in sites}).alias("site_title"),
        token.alias("token"),
    )
    where_tips = (
        [alt.Tooltip("label:N", title="token role")]
        if by_role
        else [alt.Tooltip("position:O"), alt.Tooltip("label:N", title="token (example pair)")]
    )
    value_title = "estimate" if method == "attribution" else "mean"
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
                *where_tips,
                alt.Tooltip("mean:Q", title=value_title, format=".3f"),
                alt.Tooltip("std:Q", format=".3f"),
                alt.Tooltip("count:Q", title="pairs in cell"),
            ],
        )
        values = base.mark_rect().encode(
            color=alt.Color("mean:Q", title=legend_title(metric, method), scale=scale)
        )
        empty = base.mark_rect(color=NO_DATA)
        cells_view = alt.layer(
            empty.transform_filter("datum.count == 0"),
            values.transform_filter("datum.count > 0"),
            data=block,
        ).properties(width=cell_w * len(layers), height=row_h * len(kept[k]))
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
        f"{method_title(method)} A → B: where does the changed statement matter? ({total} pairs)"
    )
    where = POSITION_SELECTION_TITLES.get(agg.get("span") or "", f"the cells {agg.get('span')!r}")
    subtitle = f"{mean_title(method)} {METRIC_TITLES[metric]} over pairs, per site, layer and " + (
        "token role" if by_role else "token"
    )
    if where != "every token":
        subtitle += f"; patched at {where}"
    return _grid_figure(
        groups,
        len(sites),
        cell_w * len(layers),
        heatmap_caption(
            metric,
            missing,
            method,
            dropped,
            agg.get("aligned_to_end") or (),
            whitespace=any(
                SPACE in label or NEWLINE in label for k in ks for label in agg["labels"][k]
            ),
            by_role=by_role,
        ),
        heading,
        subtitle,
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
    method = agg.get("method")
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
        y=alt.Y(
            "mean:Q",
            title=("estimated " if method == "attribution" else "") + METRIC_TITLES[metric],
        ),
        tooltip=[
            alt.Tooltip("site:N"),
            alt.Tooltip("k:N"),
            alt.Tooltip("layer:O"),
            alt.Tooltip("mean:Q", format=".3f"),
            alt.Tooltip("std:Q", format=".3f"),
            alt.Tooltip("count:Q", title="pairs"),
        ],
    )
    span = span_title(agg.get("span"))
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
                f"Whole-stream {method_title(method).lower()} A → B: from which layer on does B "
                "take A's answer?",
                subtitle=f"{mean_title(method)} {METRIC_TITLES[metric]} over pairs; A's "
                f"activation patched at {span}",
                anchor="start",
            )
        )
        .configure_view(stroke=None)
    )


def layers_name(metric: str) -> str:
    """File stem of a whole-stream chart: ``layers-<metric>``."""
    return f"layers-{metric}"
