"""Views of a stored patching dataset that charts draw: the aggregate over pairs, tidy cells,
one pair's frame.

They read the rows' own columns (``axes``, ``tokens``, ``diff_positions``, metric grids) and
nothing else, so the stage that writes the rows (``seqpatch.stages.patching``) and every chart
or report that reads them share one definition without importing each other.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from seqpatch.charts.style import ChartError, check_metric
from seqpatch.charts.tokens import display_token

if TYPE_CHECKING:
    from datasets import Dataset

DEFAULT_AXES = ("layer", "pos")
# The name each engine axis has in heatmap.json and the charts.
AXIS_NAMES = {"layer": "layer", "head": "head", "pos": "position"}


@contextmanager
def nan_quiet() -> Iterator[None]:
    """Numpy's invalid-value and all-NaN-slice warnings silenced while averaging grids: cells
    that no row covers stay NaN by design."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield


def grid_axes(dataset: Dataset) -> tuple[str, ...]:
    """The engine axes of a patching dataset's grids (``layer, pos`` for rows without them)."""
    if "axes" in dataset.column_names and len(dataset):
        return tuple(dataset[0]["axes"]) or DEFAULT_AXES
    return DEFAULT_AXES


Aligner = Callable[[np.ndarray, np.ndarray, np.ndarray], list[int]]
"""How ``aggregate`` lines up the position axis of pairs of different token lengths: called
with the metric grids ``[rows, *grid]`` (shifted in place, positions last), each row's
divergence index and token length; returns the divergence indices it moved."""


def align_ends(values: np.ndarray, k_col: np.ndarray, lengths: np.ndarray) -> list[int]:
    """Shift, in place, the position axis (last) of every row of a divergence index whose pairs
    differ in token length so that all of them end at its longest pair's last token; returns
    those indices. BPE tokenizers give pairs of different lengths (a digit is two tokens, a
    variable one), and only end-aligned positions (the changed statement, the query, the chat
    template's tail) mean the same token in every pair; equal-length indices are unchanged."""
    aligned = []
    for k in sorted(set(k_col.tolist())):
        rows = np.flatnonzero(k_col == k)
        longest = int(lengths[rows].max())
        if (lengths[rows] == longest).all():
            continue
        aligned.append(int(k))
        for i in rows:
            shift = longest - int(lengths[i])
            if shift:
                values[i] = np.roll(values[i], shift, axis=-1)  # the NaN padding moves in front
    return aligned


_align_ends = align_ends


def _pick(name: str, wanted: Sequence[Any] | None, present: list[Any]) -> list[Any]:
    """``wanted`` in the stage's order, or every value present; one error naming what exists."""
    if wanted is None:
        return present
    missing = [w for w in wanted if w not in present]
    if missing:
        raise ChartError(
            f"no {name} {missing[0]!r} in this patching stage; it has "
            f"{', '.join(str(p) for p in present)}"
        )
    return [p for p in present if p in set(wanted)]


def aggregate(
    dataset: Dataset,
    metric: str = "normalised",
    *,
    ks: Sequence[int] | None = None,
    sites: Sequence[str] | None = None,
    align: Aligner = align_ends,
) -> dict[str, Any]:
    """Mean, std and count over pairs per (site, divergence index, grid cell).

    Returns ``{"metric", "method", "axes", "sites", "divergence_indices", "layers", "heads",
    "span", "labels", "stats"}`` where ``stats`` is ``[sites, divergence_indices, 3 (mean, std,
    count), *grid]`` float64 (``grid``: ``layers, positions`` by default, the sizes of
    ``axes``), ``method`` ``exact`` or ``attribution`` (first-order estimates), ``heads`` the
    head axis's values (empty without one), ``span`` the position set of a grid without a
    position axis (or the cell selection of one with it), and ``labels[k]`` the display labels
    (``tokens.display_token``: decoded, whitespace marked) of the first pair diverging at ``k``,
    starred where A and B differ. ``ks`` and ``sites`` keep only those divergence indices and
    sites. NaN cells (beyond a pair's length, a k/v site's missing heads, or undefined
    normalisation) are skipped. Where the pairs of one divergence index differ in token length
    (BPE tokenizers), ``align`` lines their positions up — by default at their last token
    (``align_ends``; ``aligned_to_end`` lists those indices; their labels are the longest
    pair's). An aligner by position role can be passed instead. A ``slice`` grid with token
    roles is aggregated by role (``aggregate_by_role``).
    """
    check_metric(metric)
    site_col = np.asarray(dataset["site"])
    k_col = np.asarray(dataset["divergence_index"])
    sites = _pick("site", sites, list(dict.fromkeys(site_col.tolist())))
    ks = _pick("divergence index", ks, sorted(set(k_col.tolist())))
    keep = np.flatnonzero(np.isin(site_col, sites) & np.isin(k_col, ks))
    if len(keep) < len(site_col):
        dataset = dataset.select(keep)
        site_col, k_col = site_col[keep], k_col[keep]
    if by_role(dataset):  # a slice grid: rows are token roles, averaged across pairs by role
        return aggregate_by_role(dataset, metric)
    cols = dataset.select_columns([metric]).with_format("numpy")
    values = np.array(cols[metric], dtype=np.float64)
    lengths = np.asarray(dataset["n_tokens"])
    aligned = align(values, k_col, lengths) if "pos" in grid_axes(dataset) else []
    stats = np.full((len(sites), len(ks), 3, *values.shape[1:]), np.nan)
    for si, site in enumerate(sites):
        for ki, k in enumerate(ks):
            chunk = values[(site_col == site) & (k_col == k)]
            if len(chunk) == 0:
                continue
            count = np.sum(~np.isnan(chunk), axis=0)
            with nan_quiet():
                stats[si, ki, 0] = np.nanmean(chunk, axis=0)
                stats[si, ki, 1] = np.nanstd(chunk, axis=0)
            stats[si, ki, 2] = count
    labels = {}
    first: dict[int, int] = {}
    for i, k in enumerate(k_col.tolist()):
        if k not in first or (k in aligned and lengths[i] > lengths[first[k]]):
            first[k] = i  # an aligned index takes its labels from its longest pair
    for k, i in first.items():
        row = dataset[i]
        diff = set(row["diff_positions"])
        labels[k] = [
            display_token(tok) + ("*" if t in diff else "") for t, tok in enumerate(row["tokens"])
        ]
    axes = grid_axes(dataset)
    heads = max((row for row in dataset["heads"]), key=len) if "head" in axes else []
    methods = set(dataset["method"]) if "method" in dataset.column_names else set()
    return {
        "metric": metric,
        "method": "attribution" if "attribution" in methods else "exact",
        "axes": axes,
        "sites": sites,
        "divergence_indices": ks,
        "layers": list(dataset[0]["layers"]),
        "heads": list(heads),
        "span": dataset[0]["span"] if "span" in dataset.column_names else "",
        "labels": labels,
        "aligned_to_end": aligned,
        "stats": stats,
    }


def by_role(dataset: Dataset) -> bool:
    """Whether ``dataset`` is a ``slice`` grid with token roles: aggregated by role, not index."""
    return (
        grid_axes(dataset) == DEFAULT_AXES
        and "roles" in dataset.column_names
        and len(dataset) > 0
        and dataset[0]["span"] == "slice"
    )


def aggregate_by_role(dataset: Dataset, metric: str = "normalised") -> dict[str, Any]:
    """``aggregate`` of a ``slice`` grid with the position axis replaced by token roles.

    Pairs of one divergence index may differ in length and chain depth; each patched cell is
    averaged with the cells of the same role (``seqpatch.roles``: ``hop1:value``,
    ``question:2``, ``last``) in the other pairs. ``labels[k]`` are the roles present among
    ``k``'s pairs in reading order (``role_key``), and only those: unpatched positions have no
    row. ``stats`` is ``[sites, divergence_indices, 3, layers, roles]`` (NaN beyond a ``k``'s
    roles); ``position_axis`` is ``"role"``.
    """
    from seqpatch.roles import role_key, slice_positions

    # the columns read once as lists: indexing a dataset's column row by row reads the Arrow
    # table (and updates a fingerprint) per access, minutes for a study's few hundred rows
    columns = dataset.select_columns(["site", "divergence_index", "roles"]).to_dict()
    sites = list(dict.fromkeys(columns["site"]))
    ks = sorted(set(columns["divergence_index"]))
    site_col = np.asarray(columns["site"])
    k_col = np.asarray(columns["divergence_index"])
    roles_col = columns["roles"]
    values = np.array(
        dataset.select_columns([metric]).with_format("numpy")[metric], dtype=np.float64
    )
    patched = [slice_positions(roles) for roles in roles_col]
    labels: dict[int, list[str]] = {}
    for k in ks:
        present = {roles_col[i][t] for i in np.flatnonzero(k_col == k) for t in patched[i]}
        labels[k] = sorted(present, key=role_key)
    width = max(len(v) for v in labels.values())
    stats = np.full((len(sites), len(ks), 3, values.shape[1], width), np.nan)
    for si, site in enumerate(sites):
        for ki, k in enumerate(ks):
            rows = np.flatnonzero((site_col == site) & (k_col == k))
            if len(rows) == 0:
                continue
            column = {role: c for c, role in enumerate(labels[k])}
            chunk = np.full((len(rows), values.shape[1], len(column)), np.nan)
            for j, i in enumerate(rows):
                for t in patched[i]:
                    chunk[j, :, column[roles_col[i][t]]] = values[i, :, t]
            n = len(column)
            with nan_quiet():
                stats[si, ki, 0, :, :n] = np.nanmean(chunk, axis=0)
                stats[si, ki, 1, :, :n] = np.nanstd(chunk, axis=0)
            stats[si, ki, 2, :, :n] = np.sum(~np.isnan(chunk), axis=0)
    return {
        "metric": metric,
        "method": "exact",
        "axes": DEFAULT_AXES,
        "sites": sites,
        "divergence_indices": ks,
        "layers": list(dataset[0]["layers"]),
        "heads": [],
        "span": "slice",
        "labels": labels,
        "aligned_to_end": [],
        "position_axis": "role",
        "stats": stats,
    }


def effect_cells(agg: dict[str, Any]) -> Any:
    """The aggregate as a tidy polars frame: ``site, divergence_index``, one column per axis
    (``layer``, ``head``, ``position`` with its ``label``) and ``mean, std, count``; cells no
    pair covers are left out. The default grid's frame is what ``charts.heatmap_chart`` draws."""
    import polars as pl

    axes = tuple(agg.get("axes", DEFAULT_AXES))
    if axes != DEFAULT_AXES:
        return pl.DataFrame(_axis_cells(agg, axes))
    rows = []
    for si, site in enumerate(agg["sites"]):
        for ki, k in enumerate(agg["divergence_indices"]):
            labels = agg["labels"][k]
            for li, layer in enumerate(agg["layers"]):
                for t, label in enumerate(labels):
                    mean, std, count = agg["stats"][si, ki, :, li, t]
                    if count > 0:
                        rows.append(
                            {
                                "site": site,
                                "divergence_index": k,
                                "layer": layer,
                                "position": t,
                                "label": label,
                                "mean": float(mean),
                                "std": float(std),
                                "count": int(count),
                            }
                        )
    return pl.DataFrame(rows)


def _axis_cells(agg: dict[str, Any], axes: tuple[str, ...]) -> list[dict[str, Any]]:
    values = {"layer": agg["layers"], "head": agg.get("heads", []), "pos": None}
    rows = []
    for si, site in enumerate(agg["sites"]):
        for ki, k in enumerate(agg["divergence_indices"]):
            block = agg["stats"][si, ki]
            for cell in np.ndindex(*block.shape[1:]):
                mean, std, count = block[(slice(None), *cell)]
                if not count > 0:
                    continue
                row: dict[str, Any] = {"site": site, "divergence_index": k}
                for axis, i in zip(axes, cell, strict=True):
                    if axis == "pos":
                        row["position"] = i
                        labels = agg["labels"][k]
                        row["label"] = labels[i] if i < len(labels) else ""
                    else:
                        row[axis] = int(values[axis][i])
                row.update(mean=float(mean), std=float(std), count=int(count))
                rows.append(row)
    return rows


def example_frame(dataset: Dataset, metric: str, pair_id: str | None = None) -> tuple[Any, dict]:
    """One pair's grid of ``metric`` for every site, tidy (``charts.trace_chart``), and the row.

    Only for ``layer,pos`` grids (a trace is effect by layer per token)."""
    import polars as pl

    if grid_axes(dataset) != DEFAULT_AXES:
        raise ChartError(
            f"traces are drawn from layer,pos grids; this stage's axes are "
            f"{','.join(grid_axes(dataset))} (draw its heatmap instead)"
        )
    ids = dataset["pair_id"]
    target = pair_id if pair_id is not None else ids[0]
    if target not in ids:
        known = list(dict.fromkeys(ids))
        more = f" and {len(known) - 5} more" if len(known) > 5 else ""
        raise ChartError(
            f"no pair {target!r} in this patching stage; its pairs: {', '.join(known[:5])}{more}"
        )
    rows = []
    first = None
    for i, pid in enumerate(ids):
        if pid != target:
            continue
        row = dataset.with_format("numpy")[i]
        first = first or dataset[i]
        diff = set(first["diff_positions"])
        for li, layer in enumerate(row["layers"]):
            for t in range(int(row["n_tokens"])):
                rows.append(
                    {
                        "site": row["site"],
                        "layer": int(layer),
                        "position": t,
                        "label": display_token(first["tokens"][t]) + ("*" if t in diff else ""),
                        "value": float(row[metric][li, t]),
                    }
                )
    return pl.DataFrame(rows), first
