"""Charts drawn from stored stages: what ``seqpatch plot`` and the stages' artifacts call.

Each function reads rows (a stored stage's ``Dataset``), turns them into frames with the
charts' data views (``seqpatch.charts.grid_data``, ``tracing_data``) and builds an altair chart
with ``seqpatch.charts``; ``save_chart`` writes it. A stage's own charts are artifacts of its
version (written once, at commit); ``seqpatch plot`` redraws into a folder of the user's
choice, never into a stored version.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqpatch.charts.tracing_data import tracing_summary as tracing_summary

if TYPE_CHECKING:
    from collections.abc import Sequence

    from seqpatch.stages.base import Artifact

DEFAULT_METRIC = "normalised"


def heatmap_chart(
    rows: Any,
    metric: str = DEFAULT_METRIC,
    ks: Sequence[int] | None = None,
    sites: Sequence[str] | None = None,
) -> Any:
    """Layer × token heatmaps of the mean effect over pairs, per divergence index and site;
    ``ks`` and ``sites`` keep only those divergence indices and sites (``ChartError`` naming
    the stage's own when one is missing)."""
    from seqpatch import charts
    from seqpatch.charts.grid_data import DEFAULT_AXES, aggregate, grid_axes

    if grid_axes(rows) != DEFAULT_AXES:  # heads or whole-stream: their own chart
        return grid_chart(rows, metric, ks, sites)[0]
    agg = aggregate(rows, metric, ks=ks, sites=sites)
    counts = {k: n for k, n in charts.count_pairs(rows).items() if k in agg["divergence_indices"]}
    title = None
    if agg.get("position_axis") == "role":  # a slice grid: one row per role, not per token
        title = (  # the caption says what each role is
            "Activation patching A → B along the data flow: rows are token roles, averaged "
            "across pairs"
        )
    return charts.heatmap_figure(agg, metric, counts, title=title)


def traces_chart(
    rows: Any,
    metric: str = DEFAULT_METRIC,
    pair_id: str | None = None,
    pairs: Any = None,
) -> tuple[Any, str]:
    """One pair's effect by layer for its changed, strongest and last tokens, and the pair id.

    ``pairs`` (the parent pairs rows) supply the changed statements for the title.
    """
    from seqpatch import charts
    from seqpatch.charts.grid_data import example_frame

    frame, row = example_frame(rows, metric, pair_id)
    statements: dict[str, str] = {}
    ids = pairs["pair_id"] if pairs is not None else []  # read the column once
    if row["pair_id"] in ids:
        found = pairs[ids.index(row["pair_id"])]
        statements = {"statement_a": found["statement_a"], "statement_b": found["statement_b"]}
    return charts.traces_figure(frame, row, metric, **statements), row["pair_id"]


def plot_heatmap(
    rows: Any,
    out_dir: Path,
    metric: str = DEFAULT_METRIC,
    ks: Sequence[int] | None = None,
    sites: Sequence[str] | None = None,
) -> list[Path]:
    """Save ``heatmap_chart`` as ``heatmap-<metric>[-k<ks>][-<sites>].html/.png``."""
    from seqpatch.charts import heatmap_name, save_chart

    name = heatmap_name(metric)
    if ks is not None:
        name += "-k" + "_".join(str(k) for k in ks)
    if sites is not None:
        name += "-" + "_".join(sites)
    return save_chart(heatmap_chart(rows, metric, ks, sites), Path(out_dir), name)


def plot_traces(
    rows: Any,
    out_dir: Path,
    metric: str = DEFAULT_METRIC,
    pair_id: str | None = None,
    pairs: Any = None,
) -> list[Path]:
    from seqpatch.charts import save_chart, traces_name

    chart, chosen = traces_chart(rows, metric, pair_id, pairs)
    return save_chart(chart, Path(out_dir), traces_name(chosen, metric))


def patching_chart_artifacts(rows: Any, pairs: Any = None) -> dict[str, Artifact]:
    """The patching stage's own charts (heatmap and one pair's traces, HTML + PNG)."""
    from seqpatch.charts import heatmap_name, traces_name
    from seqpatch.stages.base import chart_artifacts

    traces, pair_id = traces_chart(rows, pairs=pairs)
    return {
        **chart_artifacts(heatmap_chart(rows), heatmap_name(DEFAULT_METRIC)),
        **chart_artifacts(traces, traces_name(pair_id, DEFAULT_METRIC)),
    }


def default_charts_dir(ref: Any) -> Path:
    """Where ``seqpatch plot`` writes by default: ``<data_dir>/charts/<stage>-<version>/``,
    beside the store's stages, never inside a stored version."""
    return ref.path.parent.parent / "charts" / f"{ref.stage}-{ref.version}"


def parent_rows(store: Any, ref: Any, stage: str) -> Any:
    """The rows of ``ref``'s parent ``stage`` if it is stored here, else ``None``."""
    for parent in ref.parents:
        if parent.get("stage") == stage:
            found = store.find(stage, parent.get("version") or "")
            if found is not None:
                return store.load_ref(found)
    return None


def tracing_chart(rows: Any, model: str | None = None, noise_scale: float | None = None) -> Any:
    """ROME's three-panel causal-trace chart of stored ``tracing`` rows."""
    from seqpatch import charts
    from seqpatch.charts.tracing_data import tracing_summary

    return charts.tracing_figure(tracing_summary(rows, model, noise_scale))


def plot_tracing(
    rows: Any, out_dir: Path, model: str | None = None, noise_scale: float | None = None
) -> list[Path]:
    from seqpatch.charts import save_chart, tracing_name

    return save_chart(tracing_chart(rows, model, noise_scale), Path(out_dir), tracing_name())


def tracing_chart_artifacts(
    rows: Any, model: str | None = None, noise_scale: float | None = None
) -> dict[str, Artifact]:
    """The tracing stage's own chart (``causal-trace``, HTML + PNG)."""
    from seqpatch.charts import tracing_name
    from seqpatch.stages.base import chart_artifacts

    return chart_artifacts(tracing_chart(rows, model, noise_scale), tracing_name())


def grid_chart(
    rows: Any,
    metric: str = DEFAULT_METRIC,
    ks: Sequence[int] | None = None,
    sites: Sequence[str] | None = None,
) -> tuple[Any, str]:
    """The chart of a patching stage whose grid is not ``layer,pos``, and its file stem: a
    layer × head heatmap (``layer,head[,pos]``) or a layer line chart (whole-stream ``layer``)."""
    from seqpatch import charts
    from seqpatch.charts.grid_data import aggregate, effect_cells

    agg = aggregate(rows, metric, ks=ks, sites=sites)
    cells = effect_cells(agg)
    counts = charts.count_pairs(rows)
    if "head" in agg["axes"]:
        return charts.head_heatmap_figure(cells, agg, metric, counts), charts.heatmap_name(metric)
    return charts.layer_line_figure(cells, agg, metric, counts), charts.layers_name(metric)


def grid_chart_artifacts(rows: Any) -> dict[str, Artifact]:
    """The charts of a patching stage over other axes (HTML + PNG)."""
    from seqpatch.stages.base import chart_artifacts

    chart, name = grid_chart(rows)
    return chart_artifacts(chart, name)


def top_heads_chart(rows: Any, metric: str = DEFAULT_METRIC, n_top: int = 6) -> Any:
    """Per-position panels for the strongest heads of a ``layer,head,pos`` patching stage."""
    from seqpatch import charts
    from seqpatch.charts.grid_data import aggregate, effect_cells

    agg = aggregate(rows, metric)
    return charts.top_heads_figure(effect_cells(agg), agg, metric, charts.count_pairs(rows), n_top)


def head_positions_chart_artifacts(rows: Any) -> dict[str, Artifact]:
    """The top heads' per-position chart (HTML + PNG) of a ``layer,head,pos`` stage; nothing
    for other grids."""
    from seqpatch.charts import top_heads_name
    from seqpatch.charts.grid_data import grid_axes
    from seqpatch.stages.base import chart_artifacts

    if grid_axes(rows) != ("layer", "head", "pos"):
        return {}
    return chart_artifacts(top_heads_chart(rows), top_heads_name(DEFAULT_METRIC))
