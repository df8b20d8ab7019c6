"""Charts drawn from stored stages: what ``seqpatch plot`` and the stages' artifacts call.

Each function reads rows (a stored stage's ``Dataset``) and builds an altair chart with
``seqpatch.charts``; ``save_chart`` writes it. A stage's own charts are artifacts of its
version (written once, at commit); ``seqpatch plot`` redraws into a folder of the user's
choice, never into a stored version.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seqpatch.stages.base import Artifact

DEFAULT_METRIC = "normalised"


def heatmap_chart(rows: Any, metric: str = DEFAULT_METRIC) -> Any:
    """Layer × token heatmaps of the mean effect over pairs, per divergence index and site."""
    from seqpatch import charts
    from seqpatch.stages.patching import DEFAULT_AXES, aggregate, grid_axes

    if grid_axes(rows) != DEFAULT_AXES:  # heads or whole-stream: their own chart
        return grid_chart(rows, metric)[0]
    agg = aggregate(rows, metric)
    title = None
    if agg.get("position_axis") == "role":  # a slice grid: one row per role, not per token
        title = (
            "Activation patching A → B along the data flow: rows are token roles (the changed "
            "statement hop0, later hops, question, last), averaged across pairs by role"
        )
    return charts.heatmap_figure(agg, metric, charts.count_pairs(rows), title=title)


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
    from seqpatch.stages.patching import example_frame

    frame, row = example_frame(rows, metric, pair_id)
    statements: dict[str, str] = {}
    ids = pairs["pair_id"] if pairs is not None else []  # read the column once
    if row["pair_id"] in ids:
        found = pairs[ids.index(row["pair_id"])]
        statements = {"statement_a": found["statement_a"], "statement_b": found["statement_b"]}
    return charts.traces_figure(frame, row, metric, **statements), row["pair_id"]


def plot_heatmap(rows: Any, out_dir: Path, metric: str = DEFAULT_METRIC) -> list[Path]:
    from seqpatch.charts import heatmap_name, save_chart

    return save_chart(heatmap_chart(rows, metric), Path(out_dir), heatmap_name(metric))


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


def tracing_summary(
    rows: Any, model: str | None = None, noise_scale: float | None = None
) -> dict[str, Any]:
    """What ``charts.tracing_figure`` draws, from ``tracing`` rows: the AIE grid by position
    (``seqpatch.stages.tracing.aie``), one example program's tokens and corrupted positions per
    divergence index, program counts, mean clean / corrupted probabilities (overall and per
    ``k``) and the trace's parameters. ``noise_scale`` is the config's ν (the rows store σ, not
    ν; default: ROME's 3); ``model`` names the model in the title."""
    import numpy as np

    from seqpatch.stages.tracing import aie

    summary = aie(rows)
    meta = rows.select_columns(
        ["divergence_index", "tokens", "corrupted_positions", "clean_prob", "corrupted_prob"]
    )
    ks = np.asarray(meta["divergence_index"])
    clean = np.asarray(meta["clean_prob"], dtype=np.float64)
    corrupted = np.asarray(meta["corrupted_prob"], dtype=np.float64)
    labels: dict[int, list[str]] = {}
    marked: dict[int, list[int]] = {}
    for k in summary["divergence_indices"]:
        example = meta[int(np.flatnonzero(ks == k)[0])]
        labels[k] = list(example["tokens"])
        marked[k] = [int(t) for t in example["corrupted_positions"]]
    first = rows[0]
    return {
        **summary,
        "labels": labels,
        "corrupted": marked,
        "counts": {k: int((ks == k).sum()) for k in summary["divergence_indices"]},
        "by_k": {
            k: (float(clean[ks == k].mean()), float(corrupted[ks == k].mean()))
            for k in summary["divergence_indices"]
        },
        "clean_prob": float(clean.mean()),
        "corrupted_prob": float(corrupted.mean()),
        "window": int(first["window"]),
        "sigma": float(first["sigma"]),
        "noise_scale": _noise_scale(noise_scale, first),
        "n_samples": len(first["seeds"]),
        "corrupt": first["corrupt"],
        "model": model,
    }


def _noise_scale(given: Any, first: Any) -> float:
    """ν for the chart: the one given, else the row's (a calibrated ``auto``), else ROME's 3."""
    from seqpatch.interventions.tracing import ROME_NOISE_SCALE

    if isinstance(given, int | float):
        return float(given)
    if "noise_scale" in first and first["noise_scale"] is not None:
        return float(first["noise_scale"])
    return ROME_NOISE_SCALE


def tracing_chart(rows: Any, model: str | None = None, noise_scale: float | None = None) -> Any:
    """ROME's three-panel causal-trace chart of stored ``tracing`` rows."""
    from seqpatch import charts

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


def grid_chart(rows: Any, metric: str = DEFAULT_METRIC) -> tuple[Any, str]:
    """The chart of a patching stage whose grid is not ``layer,pos``, and its file stem: a
    layer × head heatmap (``layer,head[,pos]``) or a layer line chart (whole-stream ``layer``)."""
    from seqpatch import charts
    from seqpatch.stages.patching import aggregate, effect_cells

    agg = aggregate(rows, metric)
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
    from seqpatch.stages.patching import aggregate, effect_cells

    agg = aggregate(rows, metric)
    return charts.top_heads_figure(effect_cells(agg), agg, metric, charts.count_pairs(rows), n_top)


def head_positions_chart_artifacts(rows: Any) -> dict[str, Artifact]:
    """The top heads' per-position chart (HTML + PNG) of a ``layer,head,pos`` stage; nothing
    for other grids."""
    from seqpatch.charts import top_heads_name
    from seqpatch.stages.base import chart_artifacts
    from seqpatch.stages.patching import grid_axes

    if grid_axes(rows) != ("layer", "head", "pos"):
        return {}
    return chart_artifacts(top_heads_chart(rows), top_heads_name(DEFAULT_METRIC))
