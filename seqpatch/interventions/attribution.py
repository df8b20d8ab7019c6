"""Attribution patching (AtP): a first-order estimate of every patched cell from one backward.

Conventions are the sweep engine's (``seqpatch.interventions.sweep``): the *source* (program A)
donates activations, the *target* (program B) is patched and scored, cell ``(l, t)`` of a site is
the site tensor of layer ``l`` at position ``t``.

**The metric differentiated** is the logit difference at the target's scored (last) position,

    LD = logit(A's answer) − logit(B's answer),

the same number ``seqpatch.metrics.logit_diff`` reads from stored logits. Attribution patching
(Nanda 2023, "Attribution patching"; AtP, Kramár et al. 2024) replaces each patched run by its
first-order Taylor expansion around the target run:

    LD(patched at cell) ≈ LD(target) + Σ_d (a_src − a_tgt)[d] · ∂LD/∂a[d]  (at the target run),

the sum running over the cell's feature dimension ``d`` (the last axis of the site tensor).

**What is computed**, per batch of equal-length pairs, all on the restart core
(``seqpatch.interventions.restart.RestartableRun``, the one place that runs the model with
hooks), at the work floor — the sources' forward, the targets' forward under grad, one
backward:

1. a capture-only base run of the sources up to the highest swept layer ``l1`` (``upto=l1+1``):
   the site tensors ``a_src`` of every swept layer, nothing else kept;
2. a base run of the targets up to the lowest swept layer ``l0`` (``upto=l0``): the residual
   stream entering it (the restart core's rule 1 applied to the base run);
3. one differentiable restart of the targets from ``l0`` in which every swept layer's site
   tensor gets a zero added at every position and head (``Write(add=True)``: ``x + 0`` keeps the
   forward's values bit for bit and makes ``∂LD/∂0 = ∂LD/∂a``). Hooks active during it read the
   site tensors (``a_tgt``) and its logits are the targets' clean readout — the same values, bit
   for bit, as an unpatched forward of the targets, with no forward of their own;
4. one backward of ``Σ_pairs LD`` to those zeros.

Counted in token-layers for ``b`` pairs of ``T`` tokens in an ``L``-layer model: ``b·(l1+1)·T``
(sources) + ``b·l0·T`` (targets' base run) + ``b·(L − l0)·T`` (the restart, less the floor's last
layer: its output projection and MLP run on the last position only) — at most ``2·b·L·T``, what
a private pair of forwards costs, and less when the highest swept layer is below the last; then
a backward from the logits down to ``l0`` (about twice the restart's forward). SmolLM2 (30
layers), 2 pairs of 40 tokens, every layer: 4,800 forward token-layers (2,400 + 0 + 2,400),
counted by the core's counters (``scripts/count_attribution.py``); layers 5 and 9 only: 3,200
(800 + 400 + 2,000).
Architectures without the layer runner (GPT-2) restart by a full forward of the targets with the
additions as hooks (the targets' base run then runs nothing: ``upto`` without captures). Pairs never interact inside a forward, so the summed backward is each
pair's own gradient. The model's weights never receive a gradient: their ``requires_grad``
flags are off during the backward and restored after, as is training mode (the model runs in
eval mode, so dropout never perturbs the estimate).

**What ``attribution_sweep`` returns**, shaped like the exact sweep so the patching stage stores
it as its own rows (``method="attribution"``) and compares cell by cell: a ``Readout`` whose
``logits[..., c]`` are the target's unpatched candidate logits with the estimated change Δ̂ of LD
split evenly, ``+Δ̂/2`` on answer A's logit and ``−Δ̂/2`` on answer B's. Hence

- ``logit_diff`` (LD_target + Δ̂) and ``normalised`` (Δ̂ / (LD_source − LD_target)) read from
  those logits are the attribution estimates — the meaningful metrics;
- the individual candidate logits are *not* estimates (only their difference is), so
  ``prob_delta`` and ``prob_delta_candidates`` mean nothing for attribution rows: ``lse`` is NaN,
  which makes ``prob_delta`` NaN, and the stage stores ``prob_delta_candidates`` as NaN too.

Sites: every site ``sites.hooked`` hooks, with a site tensor of any trailing shape — the
residual-stream sites (``[batch, tokens, d_model]``) and the head sites ``head_z``,
``head_q/k/v`` (``[batch, tokens, heads, d_head]``; k/v per k/v head). The grid's named ``axes``
follow the engine's order (``sweep.GRID_AXES``): ``layer,pos`` (the default), ``layer`` (the
``positions`` patched at once), and for head sites ``layer,head`` and ``layer,head,pos``; without
``head`` a head site is patched for all its heads. Because the estimate is linear in the patch,
a cell that patches several coordinates at once (all heads, a set of positions) is estimated by
the sum of theirs — no extra pass. The result is ``[n_pairs, *axes, C]`` (``estimates`` returns
the Δ̂ grid alone).

Where it is exact: when LD is linear in the patched activation (say ``resid_post`` of the last
layer without a final norm) the estimate equals the exact patch. Where it fails: the expansion
is local, so a patch that flips the answer is underestimated. On the organism (300 pairs,
``scripts/bench_attribution.py``) it ranks cells like exact patching (Spearman 0.92, ~96% top-20
recall per pair) but recovers only 3–62% of the strongest cells' effect; freezing attention
patterns keeps most of the exact effect there, so the miss is not mainly attention saturation
and AtP*'s QK fix is not implemented. ``compare_methods`` measures agreement against exact rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from seqpatch.interventions._grid import Readout
from seqpatch.interventions._grid import by_length as _by_length
from seqpatch.interventions._grid import candidates as _candidates
from seqpatch.interventions._grid import positions_for as _positions_for
from seqpatch.interventions.restart import RestartableRun, Write, choose_method
from seqpatch.interventions.sites import (
    GRID_SITES,
    HEAD_SITES,
    InterventionError,
    as_pair_rows,
    check_sites,
    hooked,
    resolve_indices,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from seqpatch.models import ModelHandle, Site

METRIC = "logit(A) - logit(B) at the target's last position"
# The engine's grids (sweep.GRID_AXES) but ``span`` (one position set per cell is ``positions``).
ATTRIBUTION_AXES: tuple[tuple[str, ...], ...] = (
    ("layer", "pos"),
    ("layer",),
    ("layer", "head"),
    ("layer", "head", "pos"),
)


@dataclass(frozen=True)
class Estimates:
    """The attribution grid and the target baselines it is added to.

    ``delta`` ``[n, *axes]`` float32: the estimated change of LD per cell (NaN at a ``pos``
    beyond a shorter pair's length). ``clean`` ``[n, C]`` and ``clean_lse`` ``[n]``: the targets'
    unpatched readout from the same forward.
    """

    delta: torch.Tensor
    clean: torch.Tensor
    clean_lse: torch.Tensor
    axes: tuple[str, ...] = ("layer", "pos")


def attribution_sweep(
    handle: ModelHandle,
    src_ids: Any,
    tgt_ids: Any,
    site: Site,
    candidate_ids: Sequence[int] | torch.Tensor,
    answer_a: int | Sequence[int] | torch.Tensor,
    answer_b: int | Sequence[int] | torch.Tensor,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    *,
    axes: Sequence[str] = ("layer", "pos"),
    max_pairs: int = 64,
    method: str = "auto",
) -> Readout:
    """The attribution estimate of every cell, as a ``Readout`` shaped like ``sweep``'s.

    ``logits`` ``[n, *axes, C]`` hold the target's candidate logits with Δ̂/2 added to answer
    A's and subtracted from answer B's (so ``logit_diff`` is the estimate); ``lse`` is NaN
    (full-vocabulary probabilities are not estimated). Arguments as for ``sweep``;
    ``answer_a``/``answer_b`` are indices into the candidate axis (an int, or one per pair), as in
    ``seqpatch.metrics``; ``positions`` are the ``pos`` axis's values, or on a grid without
    ``pos`` the positions patched together (default all; NaN-free: positions beyond a pair's
    length are left out); ``max_pairs`` bounds the pairs in one forward and backward;
    ``method`` is the restart core's (``auto``, ``cached``, ``full``: how, not what, is computed).
    """
    est = estimates(
        handle,
        src_ids,
        tgt_ids,
        site,
        candidate_ids,
        answer_a,
        answer_b,
        layers,
        positions,
        axes=axes,
        max_pairs=max_pairs,
        method=method,
    )
    n, n_cand = est.clean.shape
    cells = est.delta.shape[1:]
    logits = est.clean.reshape(n, *([1] * len(cells)), n_cand).expand(n, *cells, n_cand).clone()
    half = (est.delta / 2)[..., None]
    idx_a = _answer_index(answer_a, n, n_cand, "answer_a").reshape(n, *([1] * len(cells)), 1)
    idx_b = _answer_index(answer_b, n, n_cand, "answer_b").reshape(n, *([1] * len(cells)), 1)
    logits.scatter_add_(-1, idx_a.expand(n, *cells, 1), half)
    logits.scatter_add_(-1, idx_b.expand(n, *cells, 1), -half)
    return Readout(logits, torch.full(logits.shape[:-1], float("nan")))


def estimates(
    handle: ModelHandle,
    src_ids: Any,
    tgt_ids: Any,
    site: Site,
    candidate_ids: Sequence[int] | torch.Tensor,
    answer_a: int | Sequence[int] | torch.Tensor,
    answer_b: int | Sequence[int] | torch.Tensor,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    *,
    axes: Sequence[str] = ("layer", "pos"),
    max_pairs: int = 64,
    method: str = "auto",
) -> Estimates:
    """Δ̂ = (a_src − a_tgt) · ∂LD/∂a per cell, with the targets' clean readout (``Estimates``)."""
    axes = tuple(axes)
    if axes not in ATTRIBUTION_AXES:
        choices = "; ".join(",".join(a) for a in ATTRIBUTION_AXES)
        raise InterventionError(f"axes {','.join(axes)!r}: attribution estimates {choices}")
    if "head" in axes and site not in HEAD_SITES:
        raise InterventionError(
            f"axis 'head' needs a head site ({', '.join(HEAD_SITES)}); {site!r} has no heads"
        )
    src_rows, tgt_rows = as_pair_rows(src_ids, tgt_ids)
    if handle.remote:
        raise InterventionError("attribution runs locally; load the model with remote=False")
    if max_pairs < 1:
        raise InterventionError(f"max_pairs must be >= 1, got {max_pairs}")
    check_sites([site], GRID_SITES)
    choose_method(handle, method)  # an unknown or unsupported method fails before any work
    n = len(tgt_rows)
    layer_idx = resolve_indices(layers, handle.n_layers, "layer")
    cand = _candidates(candidate_ids, n, handle)
    idx_a = _answer_index(answer_a, n, cand.shape[1], "answer_a")
    idx_b = _answer_index(answer_b, n, cand.shape[1], "answer_b")
    max_len = max(row.numel() for row in tgt_rows)
    n_pos = max_len if positions is None else len(list(positions))
    clean = torch.empty(n, cand.shape[1])
    clean_lse = torch.empty(n)
    delta: torch.Tensor | None = None
    with _frozen(handle.hf_model):
        for length, group in _by_length(tgt_rows).items():
            pos_idx = _positions_for(positions, length)
            for start in range(0, len(group), max_pairs):
                members = group[start : start + max_pairs]
                grid, logits, lse = _batch(
                    handle,
                    torch.stack([src_rows[i] for i in members]).to(handle.device),
                    torch.stack([tgt_rows[i] for i in members]).to(handle.device),
                    site,
                    cand[members].to(handle.device),
                    idx_a[members].to(handle.device),
                    idx_b[members].to(handle.device),
                    layer_idx,
                    pos_idx,
                    method,
                )
                grid = _to_axes(grid, axes, n_pos)
                if delta is None:
                    delta = torch.full((n, *grid.shape[1:]), float("nan"))
                delta[members] = grid
                clean[members], clean_lse[members] = logits, lse
    assert delta is not None  # at least one pair: as_id_rows rejects none
    return Estimates(delta, clean, clean_lse, axes)


def _to_axes(grid: torch.Tensor, axes: tuple[str, ...], n_pos: int) -> torch.Tensor:
    """``[b, L', P, *extra]`` per-coordinate estimates as the ``axes`` grid (first order: a cell
    patching several coordinates is their sum). ``pos`` grids are padded with NaN to ``n_pos``."""
    extra = tuple(range(3, grid.ndim))
    if "head" not in axes and extra:
        grid = grid.sum(extra)
    if "pos" not in axes:
        return grid.nansum(2)  # [b, L'(, heads)]
    if "head" in axes:
        grid = grid.movedim(2, -1)  # [b, L', heads, P]
    pad = n_pos - grid.shape[-1] if "head" in axes else n_pos - grid.shape[2]
    if pad:
        shape = list(grid.shape)
        where = -1 if "head" in axes else 2
        shape[where] = pad
        grid = torch.cat([grid, torch.full(shape, float("nan"))], dim=where)
    return grid


def _batch(
    handle: ModelHandle,
    src: torch.Tensor,
    tgt: torch.Tensor,
    site: Site,
    cand: torch.Tensor,
    idx_a: torch.Tensor,
    idx_b: torch.Tensor,
    layers: list[int],
    positions: list[int],
    method: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of equal-length pairs: Δ̂ ``[b, L', P', *extra]`` and the clean readout.

    On the restart core, at the work floor: a capture-only base run of the sources up to the
    highest swept layer (their site tensors ``a_src``); a base run of the targets up to the
    lowest swept layer ``l0`` (``upto``: only the residual stream entering it); one
    differentiable restart of the targets from ``l0`` in which every swept layer's site tensor
    gets a zero added at every position (all heads at once), read by capture hooks active
    during it (``a_tgt``: ``x + 0`` leaves the values bit for bit, so they are the targets'
    clean site tensors) and giving the clean readout; one backward. The restart keeps the
    floor's rule 4: the last layer's output projection and MLP run on the last position only,
    so a site there is read at that position alone and its earlier positions, which cannot
    reach the logits, get gradient exactly 0 and estimate 0 (``materialize_grads`` makes any
    write the restart leaves out read as that 0, never as a missing gradient).
    """
    n, length = tgt.shape
    needed = sorted(set(layers))
    keys = [(site, layer) for layer in needed]
    sources = RestartableRun(
        handle, src, method=method, capture=keys, upto=needed[-1] + 1, restartable=slice(0, 0)
    )
    a_src = {layer: sources.acts[(site, layer)] for layer in needed}  # [b, T, *extra]
    del sources
    run = RestartableRun(handle, tgt, method=method, upto=needed[0])
    rows = torch.arange(n, device=tgt.device)
    cell_rows = rows.repeat_interleave(length)
    cell_pos = torch.arange(length, device=tgt.device).repeat(n)
    zeros = [
        torch.zeros(
            (len(cell_rows), *a_src[layer].shape[2:]),
            dtype=a_src[layer].dtype,
            device=tgt.device,
            requires_grad=True,
        )
        for layer in needed
    ]
    writes = [
        Write(site, layer, cell_rows, cell_pos, zero, add=True)
        for layer, zero in zip(needed, zeros, strict=True)
    ]
    a_tgt: dict[int, torch.Tensor] = {}
    readers = {(site, layer): _reader(a_tgt, layer) for layer in needed}
    with torch.enable_grad():
        with hooked(handle, readers):
            logits = run.restart(rows, writes)
        picked = logits.gather(-1, cand)
        ld = picked.gather(-1, idx_a[:, None]) - picked.gather(-1, idx_b[:, None])
        grads = torch.autograd.grad(ld.sum(), zeros, allow_unused=True, materialize_grads=True)
    clean = logits.detach().float()
    valid = [max(pos, 0) for pos in positions]
    per_layer = []
    for layer, grad in zip(needed, grads, strict=True):
        read = a_tgt[layer].shape[1]  # T, or 1 where the restart ran the last position only
        diff = torch.zeros_like(a_src[layer], dtype=torch.float32)
        diff[:, length - read :] = a_src[layer][:, length - read :].float() - a_tgt[layer].float()
        cells = (diff * grad.unflatten(0, (n, length)).float()).sum(-1)  # [b, T, *extra]
        per_layer.append(cells[:, valid])
    by_layer = dict(zip(needed, per_layer, strict=True))
    grid = torch.stack([by_layer[layer] for layer in layers], dim=1).cpu()  # [b, L', P', *extra]
    grid[:, :, [i for i, pos in enumerate(positions) if pos < 0]] = float("nan")
    return grid, clean.gather(-1, cand).cpu(), clean.logsumexp(-1).cpu()


def _reader(into: dict[int, torch.Tensor], layer: int) -> Callable[[torch.Tensor], None]:
    def read(x: torch.Tensor) -> None:
        into[layer] = x.detach()

    return read


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the block; flags and modes restored after."""
    modes = {m: m.training for m in model.modules()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for m, mode in modes.items():
            m.training = mode


def _answer_index(index: Any, n_pairs: int, n_cand: int, what: str) -> torch.Tensor:
    """An answer's index into the candidate axis, one per pair ``[n]`` (from an int or ``[n]``)."""
    idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
    if idx.ndim == 0:
        idx = idx.expand(n_pairs)
    if idx.shape != (n_pairs,) or bool((idx < 0).any() or (idx >= n_cand).any()):
        raise InterventionError(
            f"{what} must be an index into the {n_cand} candidates, as an int or one per pair "
            f"({n_pairs}); got {index!r}"
        )
    return idx.contiguous()


# ---------------------------------------------------------------------------------------------
# Attribution against exact patching, cell by cell


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation of two equal-length samples (ties get their mean rank)."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(
            f"spearman needs two samples of the same size >= 2, got {x.size}, {y.size}"
        )
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return (upper - (counts - 1) / 2)[inverse]


def top_k_recall(exact: np.ndarray, estimate: np.ndarray, k: int = 20) -> float:
    """Share of the exact top cells that the estimate also ranks in its top ``k``.

    The exact top cells are the ``k`` of largest ``|exact|`` among the non-zero ones (fewer if
    fewer move); the estimate's are its ``k`` of largest ``|estimate|``. NaN cells never count;
    NaN when no exact cell moves.
    """
    exact, estimate = (
        np.asarray(exact, np.float64).ravel(),
        np.asarray(estimate, np.float64).ravel(),
    )
    ok = ~(np.isnan(exact) | np.isnan(estimate))
    exact, estimate = np.abs(exact[ok]), np.abs(estimate[ok])
    top_exact = np.argsort(-exact, kind="stable")[: min(k, int((exact > 0).sum()))]
    if top_exact.size == 0:
        return float("nan")
    top_est = np.argsort(-estimate, kind="stable")[:k]
    return len(set(top_exact.tolist()) & set(top_est.tolist())) / top_exact.size


def ld_change(row: Mapping[str, Any]) -> np.ndarray:
    """A patching row's effect grid: LD(patched) − LD(target), ``[layers, positions]``.

    This is the quantity attribution estimates (Δ̂); for exact rows it is the true change.
    """
    base = np.asarray(row["baseline_logits_b"], np.float64)
    ld_target = base[row["answer_index_a"]] - base[row["answer_index_b"]]
    return np.asarray(row["logit_diff"], np.float64) - ld_target


def compare_methods(
    exact_rows: Iterable[Mapping[str, Any]],
    attribution_rows: Iterable[Mapping[str, Any]],
    k: int = 20,
    atol: float = 1e-4,
) -> dict[str, dict[str, float]]:
    """Per site, how well attribution rows reproduce exact rows of the same pairs.

    Rows are patching-stage rows (a ``Dataset`` or dicts with ``pair_id``, ``site``,
    ``logit_diff``, ``baseline_logits_b``, ``answer_index_a/b``), matched by (pair, site). The
    compared value is each cell's change of LD (``ld_change``), with changes below ``atol``
    logits set to 0: the stored baseline and each method's own clean run are different
    forwards, so an untouched cell reads as float32 noise (~1e-6) that would otherwise be ranked.
    Per site:

    - ``spearman`` — rank correlation over every (pair, layer, position) cell;
    - ``spearman_moved`` — the same over cells that either method moves (|change| ≥ ``atol``);
      cells before a pair's divergence are 0 in both and inflate the first number;
    - ``recall_pairs`` — top-``k`` recall of each pair's exact top cells by |effect|, averaged;
    - ``recall_mean`` — top-``k`` recall on the grid averaged over pairs per divergence index
      (the stored heatmap's cells: divergence index × layer × position);
    - ``pairs`` and ``cells`` — how many were compared.
    """
    exact = {(r["pair_id"], r["site"]): r for r in exact_rows}
    result: dict[str, dict[str, float]] = {}
    by_site: dict[str, list[tuple[np.ndarray, np.ndarray, int]]] = defaultdict(list)
    for row in attribution_rows:
        key = (row["pair_id"], row["site"])
        if key not in exact:
            raise InterventionError(
                f"pair {key[0]} site {key[1]} has attribution rows but no exact rows: compare "
                "stages built from the same pairs and sites"
            )
        by_site[row["site"]].append(
            (ld_change(exact[key]), ld_change(row), int(row["divergence_index"]))
        )
    for site, grids in by_site.items():
        ex = np.stack([g[0] for g in grids])
        at = np.stack([g[1] for g in grids])
        with np.errstate(invalid="ignore"):
            ex = np.where(np.abs(ex) < atol, 0.0, ex)
            at = np.where(np.abs(at) < atol, 0.0, at)
        ok = ~(np.isnan(ex) | np.isnan(at))
        moved = ok & ((ex != 0) | (at != 0))
        means_ex, means_at = [], []
        ks = np.asarray([g[2] for g in grids])
        for div in sorted(set(ks.tolist())):
            with np.errstate(invalid="ignore"):
                means_ex.append(_nanmean(ex[ks == div]))
                means_at.append(_nanmean(at[ks == div]))
        result[site] = {
            "spearman": spearman(ex[ok], at[ok]),
            "spearman_moved": spearman(ex[moved], at[moved]) if moved.sum() > 1 else float("nan"),
            "recall_pairs": float(
                np.nanmean([top_k_recall(e, a, k) for e, a in zip(ex, at, strict=True)])
            ),
            "recall_mean": top_k_recall(np.stack(means_ex), np.stack(means_at), k),
            "pairs": float(len(grids)),
            "cells": float(ok.sum()),
        }
    return result


def _nanmean(x: np.ndarray) -> np.ndarray:
    count = (~np.isnan(x)).sum(0)
    total = np.nansum(x, 0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
