"""Labelling and summarising the cells of a patching grid: what ``seqpatch.views`` builds its
frames from. Positions get the token of one example pair (``display_token``, as the charts show
it) and a role in the program (``position_roles``); positions of pairs of different lengths are
aligned at their last token (``align_ends``, the rule the patching stage's heatmap uses); a
cell's pair values become ``mean, std, n`` and the 95% interval of the mean (``summarise``).
``values_of_rows`` turns patching rows into the long frame of pair values that
``Study.pair_values`` returns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from seqpatch.charts.tokens import display_token

__all__ = [
    "ANSWER_ROLE",
    "CHANGED_ROLE",
    "align_ends",
    "confidence_interval",
    "display_token",
    "position_labels",
    "position_roles",
    "summarise",
    "summarise_values",
    "token_roles",
    "values_of_rows",
]

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
ANSWER_ROLE = "last"  # the position where the answer is read
CHANGED_ROLE = "changed"
AXIS_COLUMNS = {"layer": "layer", "head": "head", "pos": "position"}  # the frames' axis names


def position_roles(n_tokens: int, diff_positions: list[int]) -> list[str]:
    """The role of each position of a pair's prompt: ``before`` the change, ``changed`` (where A
    and B differ), ``after`` it, and ``last`` (where the answer is read; it wins)."""
    changed = set(diff_positions)
    first = min(changed) if changed else n_tokens - 1
    roles = []
    for t in range(n_tokens):
        if t == n_tokens - 1:
            roles.append(ANSWER_ROLE)
        elif t in changed:
            roles.append(CHANGED_ROLE)
        else:
            roles.append("before" if t < first else "after")
    return roles


def confidence_interval(mean: Any, std: Any, n: Any) -> tuple[Any, Any]:
    """The 95% normal interval of a mean from the population ``std`` (``numpy.nanstd``) of ``n``
    values: mean ± z · s / √n with the sample std s = std · √(n / (n − 1)); NaN for n < 2."""
    mean, std, n = (np.asarray(x, dtype=np.float64) for x in (mean, std, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        half = np.where(n > 1, Z_95 * std / np.sqrt(np.maximum(n - 1, 1)), np.nan)
    return mean - half, mean + half


def summarise(values: pl.DataFrame) -> pl.DataFrame:
    """Per-cell mean, population std (as the stored heatmap), n and 95% CI of pair values."""
    keys = [
        "version",
        "method",
        "axes",
        "span",
        "site",
        "divergence_index",
        "layer",
        "head",
        "position",
        "label",
        "role",
        "metric",
    ]
    out = values.group_by(keys, maintain_order=True).agg(
        pl.col("value").mean().alias("mean"),
        pl.col("value").std(ddof=0).alias("std"),
        pl.len().alias("n"),
    )
    low, high = confidence_interval(out["mean"], out["std"], out["n"])
    return out.with_columns(ci_low=pl.Series(low), ci_high=pl.Series(high)).with_columns(
        pl.col("ci_low").fill_nan(None), pl.col("ci_high").fill_nan(None)
    )


def token_roles(rows: Any, k_col: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """``[rows, width]`` the role each pair's own token has in its program's data flow (the
    rows' ``roles`` column, ``seqpatch.roles``: ``hop1:value``, ``question:0``, ``last``…) at
    each end-aligned position; ``None`` where a pair has no token or the rows carry no roles."""
    out = np.full((len(rows), width), None, dtype=object)
    if "roles" not in rows.column_names:
        return out
    longest = {k: int(lengths[k_col == k].max()) for k in set(k_col.tolist())}
    for i, roles in enumerate(rows["roles"]):
        if roles:
            shift = longest[int(k_col[i])] - int(lengths[i])
            out[i, shift : shift + len(roles)] = roles[: width - shift]
    return out


def align_ends(values: np.ndarray, k_col: np.ndarray, lengths: np.ndarray) -> None:
    """Shift, in place, the position axis (last) of the rows of every ``k`` whose pairs differ
    in token length so that each ends at its longest pair's last token — the alignment the
    stored heatmap uses (``tests/test_views.py`` checks the means agree with it)."""
    for k in set(k_col.tolist()):
        rows = np.flatnonzero(k_col == k)
        longest = int(lengths[rows].max())
        for i in rows:
            if (shift := longest - int(lengths[i])) > 0:
                values[i] = np.roll(values[i], shift, axis=-1)  # NaN padding moves in front


def position_labels(
    meta: Any, k_col: np.ndarray, lengths: np.ndarray
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Display labels and roles of each ``k``'s positions, from its longest pair (the pair the
    end-aligned positions are counted from; the first pair when all are equally long)."""
    labels: dict[int, list[str]] = {}
    roles: dict[int, list[str]] = {}
    for k in sorted(set(k_col.tolist())):
        members = np.flatnonzero(k_col == k)
        i = int(members[np.argmax(lengths[members])])
        row = meta[i]
        diff = set(row["diff_positions"])
        labels[k] = [
            display_token(tok) + ("*" if t in diff else "") for t, tok in enumerate(row["tokens"])
        ]
        roles[k] = position_roles(len(row["tokens"]), list(diff))
    return labels, roles


def summarise_values(values: pl.DataFrame, by_role: bool) -> pl.DataFrame:
    """``Study.patching``'s cells of pair values: by position, or (``by_role``: a ``--positions
    slice`` grid, pairs of different layouts) by each pair's own token role."""
    if by_role:
        values = values.with_columns(
            position=pl.lit(None, pl.Int64), label=pl.col("token_role"), role=pl.col("token_role")
        )
    return summarise(values)


def values_of_rows(rows: Any, version: str, grid: dict[str, Any], metric: str) -> pl.DataFrame:
    """``Study.pair_values`` of patching ``rows`` (a stored version's, or the finished shards
    of an unfinished one) whose grid is ``grid`` (``Study.grid``), labelled ``version``."""
    from seqpatch.stages.patching import grid_axes

    if len(rows) == 0:
        return pl.DataFrame()
    axes = grid_axes(rows)
    column = rows.select_columns([metric]).with_format("numpy")[:][metric]  # one batch
    values = np.array(column, dtype=np.float64)  # [rows, *grid]
    k_col = np.asarray(rows["divergence_index"])
    lengths = np.asarray(rows["n_tokens"])
    meta = rows.select_columns(["pair_id", "site", "tokens", "diff_positions", "layers"])
    labels, roles = position_labels(meta, k_col, lengths)
    if "pos" in axes:
        align_ends(values, k_col, lengths)
    layers = np.asarray(meta[0]["layers"])
    heads = rows["heads"][0] if "head" in axes else []
    index = np.nonzero(~np.isnan(values))
    if index[0].size == 0:  # e.g. probabilities of an attribution grid: not estimated
        return pl.DataFrame()
    cell: dict[str, Any] = {}
    for axis, idx in zip(axes, index[1:], strict=True):
        if axis == "layer":
            cell["layer"] = layers[idx]
        elif axis == "head":
            cell["head"] = np.asarray(heads)[idx] if len(heads) else idx
        else:
            cell["position"] = idx
    row_idx = index[0]
    ks = k_col[row_idx]
    frame = pl.DataFrame(
        {
            "version": version,
            "method": grid["method"],
            "axes": ",".join(AXIS_COLUMNS[a] for a in axes),
            "span": "" if "pos" in axes else grid["positions"],
            "site": np.asarray(meta["site"])[row_idx],
            "divergence_index": ks.astype(np.int64),
            "pair_id": np.asarray(meta["pair_id"])[row_idx],
            "layer": cell["layer"].astype(np.int64),
            "head": cell["head"].astype(np.int64) if "head" in cell else None,
            "position": cell["position"].astype(np.int64) if "position" in cell else None,
            "metric": metric,
            "value": values[index],
        },
        schema_overrides={"head": pl.Int64, "position": pl.Int64},
    )
    if "position" not in cell:
        return frame.with_columns(
            label=pl.lit(None, pl.String),
            role=pl.lit(None, pl.String),
            token_role=pl.lit(None, pl.String),
        )
    frame = frame.with_columns(
        token_role=pl.Series(
            token_roles(rows, k_col, lengths, values.shape[-1])[index[0], index[-1]],
            dtype=pl.String,
        )
    )
    lookup = pl.DataFrame(
        [
            {"divergence_index": int(k), "position": t, "label": label, "role": role}
            for k in labels
            for t, (label, role) in enumerate(zip(labels[k], roles[k], strict=True))
        ],
        schema={
            "divergence_index": pl.Int64,
            "position": pl.Int64,
            "label": pl.String,
            "role": pl.String,
        },
    )
    frame = frame.join(lookup, on=["divergence_index", "position"], how="left")
    return frame
