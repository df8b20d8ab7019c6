"""Altair charts that a reader understands without the README, one module per kind of picture.

Charts never compute results: the data views beside them (``grid_data``: ``aggregate``,
``effect_cells``, ``example_frame``; ``tracing_data``: ``aie``, ``tracing_summary``) and
``seqpatch.stages.benchmark.summarize`` turn stored datasets into the frames and arrays drawn
here; ``seqpatch.plots`` ties both to stored stages. Every chart says on its face what it shows.

- ``style``: metric and site names, colours (blue = towards A's answer, red = away, 0 = white),
  scales, ``save_chart`` (self-contained HTML and PNG through vl-convert);
- ``layout``: the layer × token grid shared by the heatmap and the causal trace;
- ``grids``: the patching heatmap and whole-stream lines; ``traces``: one pair's lines per
  token; ``heads``: layer × head heatmaps and the top heads token by token; ``accuracy``;
  ``tracing``: ROME's causal-trace figure; ``das``: IIA against the subspace dimension;
  ``depth``: several models' effect against relative depth.

``from seqpatch.charts import X`` works for every name in ``__all__``; the modules load on first
use, so a stage that imports a data view does not pay for altair.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module that defines it.
_HOME = {
    "aggregate": "grid_data",
    "effect_cells": "grid_data",
    "example_frame": "grid_data",
    "grid_axes": "grid_data",
    "aie": "tracing_data",
    "tracing_summary": "tracing_data",
    "AIE_COLORS": "tracing",
    "AIE_NEGATIVE": "tracing",
    "ChartError": "style",
    "ChartFormat": "style",
    "LEGEND_TITLES": "style",
    "METRIC_MEANINGS": "style",
    "METRIC_TITLES": "style",
    "MODEL_DASHES": "accuracy",
    "MODEL_SHAPES": "accuracy",
    "NO_DATA": "style",
    "POSITION_SET_TITLES": "style",
    "POSITION_SELECTION_TITLES": "style",
    "span_title": "style",
    "method_title": "style",
    "mean_title": "style",
    "legend_title": "style",
    "patched_positions": "grids",
    "display_token": "tokens",
    "decode_piece": "tokens",
    "align_ends": "grid_data",
    "ROLE_COLORS": "traces",
    "ROLE_DASHES": "traces",
    "ROLE_SHAPES": "traces",
    "SEQUENTIAL_METRICS": "style",
    "SIGNED_METRICS": "style",
    "SITE_TITLES": "style",
    "TOWARDS_A": "style",
    "TOWARDS_B": "style",
    "TRACING_PANELS": "tracing",
    "WHITE": "style",
    "accuracy_chart": "accuracy",
    "accuracy_figure": "accuracy",
    "aie_scale": "tracing",
    "color_scale": "style",
    "count_pairs": "grids",
    "depth_figure": "depth",
    "depth_name": "depth",
    "head_heatmap_figure": "heads",
    "head_name": "heads",
    "heatmap_caption": "grids",
    "heatmap_cells": "grids",
    "heatmap_chart": "grids",
    "heatmap_figure": "grids",
    "heatmap_name": "grids",
    "iia_figure": "das",
    "iia_name": "das",
    "layer_line_figure": "grids",
    "layers_name": "grids",
    "nice_ceiling": "style",
    "ordinal": "style",
    "pairs_per_k": "grids",
    "save_chart": "style",
    "site_title": "style",
    "top_heads": "heads",
    "top_heads_figure": "heads",
    "top_heads_name": "heads",
    "trace_chart": "traces",
    "trace_lines": "traces",
    "traces_figure": "traces",
    "traces_name": "traces",
    "traces_title": "traces",
    "tracing_caption": "tracing",
    "tracing_cells": "tracing",
    "tracing_figure": "tracing",
    "tracing_name": "tracing",
    "tracing_panel_title": "tracing",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'seqpatch.charts' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"seqpatch.charts.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
