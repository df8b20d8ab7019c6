"""Shared layout of the layer × token grids (patching heatmaps, causal traces): tidy cells,
panel sizes, the token axis, one group of panels per divergence index, and the figure that lays
the groups out with a caption under them."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from seqpatch.charts.style import ChartError, site_title


def _panel_cells(
    panel: tuple[str, str], k: int, layers: Sequence[int], labels: list[str], **values: Any
) -> pl.DataFrame:
    """One panel of one divergence index as tidy cells, layer-major: the ``panel`` column (name,
    value), ``divergence_index, layer, position, label``, then ``values`` (each flattened from
    ``[layers, positions]``)."""
    n_pos = len(labels)
    return pl.DataFrame(
        {
            panel[0]: [panel[1]] * (len(layers) * n_pos),
            "divergence_index": [int(k)] * (len(layers) * n_pos),
            "layer": np.repeat(np.asarray(layers, dtype=np.int64), n_pos),
            "position": np.tile(np.arange(n_pos, dtype=np.int64), len(layers)),
            "label": labels * len(layers),
            **values,
        }
    )


def _grid_sizes(n_pos: int, n_layers: int, height: int) -> tuple[int, int, int]:
    """Row height, cell width and token label font size of a layer × token panel whose rows
    share ``height`` CSS pixels (what the figure's titles and caption leave)."""
    row_h = max(7, min(14, height // max(n_pos, 1)))
    cell_w = max(6, min(24, 240 // max(n_layers, 1)))
    font = max(7, min(11, row_h - 2))
    return row_h, cell_w, font


def _layer_token_base(
    layers: Sequence[int], cell_w: int, font: int, tooltip: list[alt.Tooltip]
) -> alt.Chart:
    """The encoding of a layer × token panel: layers across (labels thinned to fit ``cell_w``),
    tokens down in position order, the labels of ``*`` tokens bold and black."""
    marked = "indexof(datum.value, '* (') >= 0"
    token_axis = alt.Axis(
        title=None,
        labelFontSize=font,
        labelLimit=150,
        labelFontWeight=alt.ExprRef(f"{marked} ? 'bold' : 'normal'"),
        labelColor=alt.ExprRef(f"{marked} ? 'black' : '#444444'"),
    )
    return alt.Chart().encode(
        x=alt.X(
            "layer:O",
            axis=alt.Axis(labelAngle=0, title="layer", values=_thin(layers, cell_w)),
            sort=layers,
        ),
        y=alt.Y(
            "token:N",
            axis=token_axis,
            sort=alt.EncodingSortField(field="position", order="ascending"),
        ),
        tooltip=tooltip,
    )


def _panel_group(
    view: alt.LayerChart, column: str, sort: list[str], title: alt.TitleParams
) -> alt.FacetChart:
    """One divergence index's group: ``view`` faceted across ``column`` (headers split at
    ``|`` into lines), under ``title``."""
    return view.facet(
        column=alt.Column(
            column,
            sort=sort,
            header=alt.Header(title=None, labelExpr="split(datum.value, '|')", labelFontSize=11),
        ),
        spacing=6,
    ).properties(title=title)


MAX_WIDTH = 1250  # CSS pixels: PNGs are saved at 2×, so a figure stays ≤ ~2,500 px wide
LEGEND_WIDTH = 100  # the colour legend right of the groups, title included
# A group's title ("k = 12 (13th statement changed) · 200 pairs", 13 px bold): it is wider than
# two narrow panels, so a group is never estimated narrower (the font is style.FONT).
GROUP_TITLE_WIDTH = 340


def group_rows(n_groups: int, group_w: int, max_width: int = MAX_WIDTH) -> int:
    """How many groups of ``group_w`` CSS pixels fit side by side in ``max_width`` (≥ 1), the
    colour legend beside them."""
    return max(1, min(n_groups, (max_width - LEGEND_WIDTH + 18) // (group_w + 18)))


def group_width(n_panels: int, panel_w: int) -> int:
    """The estimated CSS width of one group: its token labels and ``n_panels`` panels, or its
    title where that is wider."""
    return max(90 + n_panels * (panel_w + 6), GROUP_TITLE_WIDTH)


def _grid_figure(
    groups: list[alt.FacetChart],
    n_panels: int,
    panel_w: int,
    caption: list[str],
    heading: str,
    subtitle: str | list[str],
    max_width: int = MAX_WIDTH,
) -> alt.VConcatChart:
    """The groups side by side, wrapped into rows so the figure stays under ``max_width`` CSS
    pixels (``n_panels`` panels of ``panel_w`` pixels per group), the caption under them
    wrapped to that width, heading and subtitle above, one colour scale shared by every
    panel."""
    group_w = group_width(n_panels, panel_w)
    per_row = group_rows(len(groups), group_w, max_width)
    est_width = per_row * group_w
    wrapped = [part for line in caption for part in textwrap.wrap(line, max(est_width, 620) // 6)]
    rows = [groups[i : i + per_row] for i in range(0, len(groups), per_row)]
    footer = alt.TitleParams(
        wrapped,
        orient="bottom",
        anchor="start",
        fontSize=11,
        fontWeight="normal",
        color="#333333",
        offset=14,
    )
    if len(rows) == 1:
        body: Any = alt.hconcat(*rows[0], spacing=18)
    else:
        body = alt.vconcat(*(alt.hconcat(*row, spacing=18) for row in rows), spacing=24)
    return (
        alt.vconcat(body.properties(title=footer))
        .properties(title=alt.TitleParams(heading, subtitle=subtitle, anchor="start", fontSize=15))
        .resolve_scale(color="shared")
        .configure_view(stroke=None)
        .configure_legend(titleLimit=200)
    )


def _thin(values: Sequence[int], cell_w: int) -> list[int]:
    """Every layer label when they fit horizontally, else every n-th."""
    step = math.ceil(18 / max(cell_w, 1)) if cell_w < 18 else 1
    return list(values)[::step]


def _cells_frame(cells: pl.DataFrame, sites: Sequence[str]) -> pl.DataFrame:
    if cells.is_empty():
        raise ChartError("the aggregate has no cells to draw")
    return cells.with_columns(
        pl.col("site").replace_strict({s: site_title(s, "|") for s in sites}).alias("site_title")
    )
