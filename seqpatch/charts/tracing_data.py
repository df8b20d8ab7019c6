"""Views of a stored tracing dataset that charts draw: the average indirect effect (AIE) by
position and by token role, and the summary ``tracing_figure`` takes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from seqpatch.charts.grid_data import nan_quiet
from seqpatch.charts.tokens import display_token

if TYPE_CHECKING:
    from datasets import Dataset

ROLES = (
    "before",
    "first_corrupted",
    "middle_corrupted",
    "last_corrupted",
    "between",
    "first_after",
    "further_after",
    "last",
)
"""Token roles relative to the corrupted tokens (ROME Figure 2's, plus ``before`` and
``between``, which ROME's subject-first prompts rarely have). ``last`` wins over every other."""


def roles(n_tokens: int, corrupted: list[int]) -> list[str]:
    """The role (``ROLES``) of each position relative to the corrupted tokens."""
    first, last = min(corrupted), max(corrupted)
    out = []
    for t in range(n_tokens):
        if t == n_tokens - 1:
            role = "last"
        elif t < first:
            role = "before"
        elif t == first:
            role = "first_corrupted"
        elif t == last:
            role = "last_corrupted"
        elif t < last:
            role = "middle_corrupted" if t in corrupted else "between"
        elif t == last + 1:
            role = "first_after"
        else:
            role = "further_after"
        out.append(role)
    return out


def aie(rows: Dataset) -> dict[str, Any]:
    """AIE by divergence index and raw position, and by token role.

    Returns ``by_position`` ``[divergence_indices, kinds, layers, positions]`` (NaN where no
    program has that position), ``by_role`` ``[kinds, layers, roles]`` (each program's mean over
    its tokens of a role, then the mean over programs; NaN for a role no program has) and the
    axes.
    """
    data = rows.select_columns(["divergence_index", "indirect_effect"]).with_format("numpy")
    effect = np.asarray(data["indirect_effect"], dtype=np.float64)  # [programs, K, L, W]
    ks = sorted(set(rows["divergence_index"]))
    k_col = np.asarray(rows["divergence_index"])
    by_position = np.full((len(ks), *effect.shape[1:]), np.nan)
    with nan_quiet():
        for i, k in enumerate(ks):
            by_position[i] = np.nanmean(effect[k_col == k], axis=0)
        per_role = np.full((len(rows), *effect.shape[1:3], len(ROLES)), np.nan)
        for p, (n, positions) in enumerate(
            zip(rows["n_tokens"], rows["corrupted_positions"], strict=True)
        ):
            labels = np.asarray(roles(n, positions))
            for r, role in enumerate(ROLES):
                mask = labels == role
                if mask.any():
                    per_role[p, :, :, r] = effect[p][:, :, :n][:, :, mask].mean(-1)
        by_role = np.nanmean(per_role, axis=0)
    first = rows[0]
    return {
        "kinds": list(first["kinds"]),
        "layers": list(first["layers"]),
        "divergence_indices": ks,
        "roles": list(ROLES),
        "by_position": by_position,
        "by_role": by_role,
    }


def tracing_summary(
    rows: Any, model: str | None = None, noise_scale: float | None = None
) -> dict[str, Any]:
    """What ``charts.tracing_figure`` draws, from ``tracing`` rows: the AIE grid by position
    (``seqpatch.stages.tracing.aie``), one example program's tokens and corrupted positions per
    divergence index, program counts, mean clean / corrupted probabilities (overall and per
    ``k``) and the trace's parameters. ``noise_scale`` is the config's ν (the rows store σ, not
    ν; default: ROME's 3); ``model`` names the model in the title."""

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
        labels[k] = [display_token(t) for t in example["tokens"]]
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
    """ν for the chart: the number given, else the row's (a calibrated ``auto``), else ROME's 3."""
    from seqpatch.interventions.tracing import ROME_NOISE_SCALE

    if isinstance(given, int | float):
        return float(given)
    if "noise_scale" in first and first["noise_scale"] is not None:
        return float(first["noise_scale"])
    return ROME_NOISE_SCALE
