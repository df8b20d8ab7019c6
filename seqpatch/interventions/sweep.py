"""The batched activation-patching engine: every cell of a grid of patches, many pairs at once.

A patch is described by data (``PatchSpec``), as TransformerLens'
``generic_activation_patch(index_axis_names=..., patch_setter=...)`` describes it, but run in
batches:

- its **site** — ``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out`` (``[tokens, d_model]``
  per prompt) or a head site ``head_z``, ``head_q``, ``head_k``, ``head_v``
  (``[tokens, heads, d_head]``, see ``seqpatch.interventions.sites``);
- its named **axes**, in this order: ``layer`` (always), then ``head`` (head sites only), then
  at most one of ``pos`` (one position per cell) or ``span`` (a set of positions patched
  together per cell: ``"all"``, ``"from-divergence"`` — every position from a pair's first
  differing token on — or explicit positions). Without ``pos`` or ``span`` every cell patches
  ``PatchSpec.spans[0]`` (default all positions) as a whole: ``("layer",)`` is whole-stream
  patching, ``("layer", "head")`` patches one head at every position. Without ``head`` a head
  site is patched for all its heads;
- its **setter** — write the donor's values at the cell's (positions, head) of the site tensor,
  nothing else (``_row_setter``);
- its **donor** — today the source run of the pair (its activations are captured in one forward,
  or given as ``source_activations``).

Conventions (the same as ``seqpatch.metrics``):

- A pair is ``(source, target)`` token ids of equal length ``T``. The *source* (clean, program A)
  donates activations; the *target* (program B) is the run being patched and scored.
- The result (``GridResult``) holds ``logits`` ``[n_pairs, *axes, n_candidates]`` float32, the
  next-token logits of the answer candidates at the target's last position, in the order the
  axis values were given; and ``lse`` ``[n_pairs, *axes]`` float32, the log-sum-exp of the
  *whole vocabulary's* logits there (the log-normaliser), taken in float32 inside the same
  forward. ``logits - lse[..., None]`` are full-vocabulary log-probabilities, so the roadmap's
  Δ = P(answer | patched) − P(answer | baseline) over the whole vocabulary is a view. Metrics
  are views of these two arrays (``seqpatch.metrics``). ``sweep`` is the ``("layer", "pos")``
  grid returned as a ``Readout``.

Two exact strategies, chosen by ``method``, both restarts of the targets' ``RestartableRun``
(``seqpatch.interventions.restart``, whose docstring states the compute floor):

- ``"cached"`` — the compute floor. Each forward batches cells across many pairs and the heads
  of a cell (the head axis is folded into rows); when there are few pairs, neighbouring
  positions share a forward (starting at the smallest). Cells whose patch provably changes
  nothing take the clean logits without running (``skip_noops``): the source activation equals
  the target's bit for bit at every patched coordinate (every position before a pair's
  divergence), or the site is local to its layer's output (the site table's ``local``) and
  patched in the last layer at positions before the last. A cell patching a set of positions
  starts at the first of them whose donor differs from the target in some bit — for every
  position at once, the pair's divergence or later — since writing a value a position already
  holds is a no-op.
- ``"full"`` — the generic path for any architecture: full forwards of target copies, each copy
  with one cell patched by a plain hook, many copies per forward.

``"auto"`` takes ``cached`` where ``_layers.supports_layer_runner`` holds, else ``full``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from seqpatch.interventions._grid import (
    SPAN_NAMES,
    Counters,
    Group,
    Plan,
    Readout,
    Span,
    by_length,
    candidates,
    positions_for,
    read,
    source_grid,
)
from seqpatch.interventions.restart import choose_method
from seqpatch.interventions.sites import (
    GRID_SITES,
    HEAD_SITES,
    SWEEP_SITES,
    InterventionError,
    as_id_rows,
    as_pair_rows,
    check_sites,
    resolve_indices,
    site_heads,
)

if TYPE_CHECKING:
    from seqpatch.models import ModelHandle, Site

__all__ = [
    "GRID_AXES",
    "SPAN_NAMES",
    "GridResult",
    "PatchSpec",
    "Readout",
    "Span",
    "SweepStats",
    "candidate_logits",
    "check_axes",
    "patch_grid",
    "sweep",
]

Method = Literal["auto", "cached", "full"]
AXIS_ORDER = ("layer", "head", "pos", "span")
GRID_AXES: tuple[tuple[str, ...], ...] = (
    ("layer", "pos"),
    ("layer",),
    ("layer", "span"),
    ("layer", "head"),
    ("layer", "head", "pos"),
    ("layer", "head", "span"),
)
"""The axes a grid may have (``head`` only for head sites)."""


@dataclass(frozen=True)
class SweepStats:
    """What a sweep computed, for benchmarks: cells, forwards, and token-layers of work.

    ``token_layers`` counts one decoder layer applied to one token position (attention to the
    prefix cache included, as it is in a normal forward); ``naive_token_layers`` is what one full
    forward per cell would cost (``cells · L · T``).
    """

    method: str
    cells: int
    skipped_cells: int
    forwards: int
    token_layers: int
    naive_token_layers: int

    @property
    def work_ratio(self) -> float:
        return self.token_layers / max(self.naive_token_layers, 1)


def candidate_logits(
    handle: ModelHandle, input_ids: Any, candidate_ids: Sequence[int] | torch.Tensor
) -> Readout:
    """Unpatched readout at each prompt's last position: logits ``[n, C]`` and lse ``[n]``.

    ``input_ids`` as for ``sweep`` (``[n, T]`` or rows of any lengths); these are the baselines
    of the metrics (run on the targets and on the sources).
    """
    rows = as_id_rows(input_ids, "input_ids")
    cand = candidates(candidate_ids, len(rows), handle)
    out = torch.empty(len(rows), cand.shape[1], dtype=torch.float32)
    lse = torch.empty(len(rows), dtype=torch.float32)
    for members in by_length(rows).values():
        ids = torch.stack([rows[i] for i in members]).to(handle.device)
        with torch.no_grad():
            logits = handle.hf_model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        out[members], lse[members] = read(logits, cand[members])
    return Readout(out, lse)


@dataclass(frozen=True)
class PatchSpec:
    """One grid of patches, as data: the site, its named axes and each axis's values.

    ``layers``/``heads``/``positions`` ``None`` = all of them (negative indices count from the
    end; positions from each pair's end). ``spans`` are the ``span`` axis's values; without a
    ``pos`` or ``span`` axis, ``spans[0]`` is the position set every cell patches.
    """

    site: str
    axes: tuple[str, ...] = ("layer", "pos")
    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    positions: Sequence[int] | None = None
    spans: tuple[Span, ...] = ("all",)

    def __post_init__(self) -> None:
        check_sites([self.site], GRID_SITES)
        check_axes(self.axes, self.site)
        if not self.spans:
            raise InterventionError("spans must name at least one position set, e.g. ('all',)")
        for span in self.spans:
            if isinstance(span, str) and span not in SPAN_NAMES:
                raise InterventionError(
                    f"unknown span {span!r}; use {', '.join(SPAN_NAMES)} or a list of positions"
                )


def check_axes(axes: Sequence[str], site: str) -> tuple[str, ...]:
    """``axes`` as a tuple if the engine can sweep them for ``site``, else an actionable error."""
    axes = tuple(axes)
    if axes not in GRID_AXES:
        choices = "; ".join(",".join(a) for a in GRID_AXES)
        raise InterventionError(
            f"axes {','.join(axes) or '(none)'} are not a grid the engine sweeps; choose one of: "
            f"{choices}"
        )
    if "head" in axes and site not in HEAD_SITES:
        raise InterventionError(
            f"axis 'head' needs a head site ({', '.join(HEAD_SITES)}); {site!r} has no heads"
        )
    return axes


@dataclass(frozen=True)
class GridResult:
    """What a grid sweep returns.

    ``logits`` ``[n_pairs, *sizes, n_candidates]`` and ``lse`` ``[n_pairs, *sizes]`` (float32,
    NaN where a ``pos`` lies beyond a pair's length), with ``sizes`` the lengths of ``axes``;
    ``index[axis]`` lists the axis's values (layers and heads resolved; positions as given, or
    ``0..max_len-1``; spans as given); ``clean`` and ``source`` are the unpatched target's and
    source's readouts ``[n_pairs, C]`` / ``[n_pairs]``.
    """

    axes: tuple[str, ...]
    index: dict[str, list[Any]]
    logits: torch.Tensor
    lse: torch.Tensor
    clean: Readout
    source: Readout
    stats: SweepStats

    @property
    def readout(self) -> Readout:
        return Readout(self.logits, self.lse)


def sweep(
    handle: ModelHandle,
    src_ids: Any,
    tgt_ids: Any,
    site: Site,
    candidate_ids: Sequence[int] | torch.Tensor,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    source_activations: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    method: Method = "auto",
    max_rows: int = 256,
    min_rows: int = 32,
    skip_noops: bool = True,
    stats: list[SweepStats] | None = None,
) -> Readout:
    """Patch one (layer, position) cell at a time: logits ``[n, L', P', C]``, lse ``[n, L', P']``.

    The ``("layer", "pos")`` grid of ``patch_grid`` for a residual-stream site (``resid_pre``,
    ``resid_post``, ``attn_out`` or ``mlp_out``); see ``patch_grid`` for the arguments.
    ``source_activations``: the sources' site tensors, one ``[len(layers), len(positions), d]``
    per pair (the swept grid, in order), any float dtype; computed when omitted.
    """
    check_sites([site], SWEEP_SITES)
    result = patch_grid(
        handle,
        src_ids,
        tgt_ids,
        PatchSpec(site, ("layer", "pos"), layers=layers, positions=positions),
        candidate_ids,
        source_activations=source_activations,
        method=method,
        max_rows=max_rows,
        min_rows=min_rows,
        skip_noops=skip_noops,
    )
    if stats is not None:
        stats.append(result.stats)
    return result.readout


def patch_grid(
    handle: ModelHandle,
    src_ids: Any,
    tgt_ids: Any,
    spec: PatchSpec,
    candidate_ids: Sequence[int] | torch.Tensor,
    *,
    source_activations: Sequence[torch.Tensor] | torch.Tensor | None = None,
    method: Method = "auto",
    max_rows: int = 256,
    min_rows: int = 32,
    skip_noops: bool = True,
) -> GridResult:
    """Patch every cell of ``spec``'s grid into every target, the source donating.

    Args:
        src_ids, tgt_ids: source and target token ids, unpadded: ``[n_pairs, T]`` tensors or
            sequences of 1-D rows (a pair's two rows have equal length; pairs may differ).
        spec: site, axes and axis values (``PatchSpec``).
        candidate_ids: the answer candidates' token ids, ``[C]`` shared or ``[n_pairs, C]``.
        source_activations: only for a residual-stream site on ``("layer", "pos")``: one
            ``[len(layers), len(positions), d_model]`` grid per pair; computed when omitted.
        method: ``auto``, ``cached`` (compute floor, Llama-like models) or ``full`` (any model).
        max_rows: most patched copies in one forward (memory bound).
        min_rows: with fewer rows than this in a cell, neighbouring positions share a forward.
        skip_noops: take the clean readout, without running, for cells whose patch provably
            changes nothing (see the module docstring).
    """
    site, axes = spec.site, spec.axes
    src_rows, tgt_rows = as_pair_rows(src_ids, tgt_ids)
    if handle.remote:
        raise InterventionError("the sweep runs locally; load the model with remote=False")
    layer_idx = resolve_indices(spec.layers, handle.n_layers, "layer")
    n_site_heads = site_heads(handle, site)
    head_idx: list[int | None] = [None]
    if "head" in axes:
        head_idx = list(resolve_indices(spec.heads, n_site_heads or 0, "head"))
    max_len = max(row.numel() for row in tgt_rows)
    if "pos" in axes:
        n_pos = max_len if spec.positions is None else len(list(spec.positions))
    else:
        n_pos = len(spec.spans) if "span" in axes else 1
    method = choose_method(handle, method)
    if source_activations is not None:
        if axes != ("layer", "pos") or site in HEAD_SITES:
            raise InterventionError(
                "source_activations are only taken for a residual-stream site on axes layer,pos; "
                "omit them (the sources are then captured in one forward)"
            )
        if len(source_activations) != len(src_rows):
            raise InterventionError(
                f"source_activations has {len(source_activations)} entries for "
                f"{len(src_rows)} pairs"
            )
    cand = candidates(candidate_ids, len(tgt_rows), handle)
    n, n_cand = len(tgt_rows), cand.shape[1]
    shape = (n, len(layer_idx), len(head_idx), n_pos)
    out = torch.full((*shape, n_cand), float("nan"))
    lse = torch.full(shape, float("nan"))
    clean = Readout(torch.empty(n, n_cand), torch.empty(n))
    source = Readout(torch.empty(n, n_cand), torch.empty(n))
    counters = Counters()
    with torch.no_grad():
        for length, members in by_length(tgt_rows).items():
            src = torch.stack([src_rows[i] for i in members]).to(handle.device)
            tgt = torch.stack([tgt_rows[i] for i in members]).to(handle.device)
            if "pos" in axes:
                plan = Plan.single(positions_for(spec.positions, length), len(members))
            else:
                spans = spec.spans if "span" in axes else spec.spans[:1]
                plan = Plan.sets(spans, src, tgt)
            group = Group(
                handle,
                src,
                tgt,
                site,
                cand[members].to(handle.device),
                layer_idx,
                head_idx,
                plan,
                source_grid(
                    source_activations, members, len(layer_idx), len(plan.positions), handle, site
                ),
                counters,
                method,
            )
            group.compute(max_rows, min_rows, skip_noops)
            out[members, :, :, : group.n_entries] = group.out
            lse[members, :, :, : group.n_entries] = group.lse
            clean.logits[members], clean.lse[members] = group.clean, group.clean_lse
            source.logits[members], source.lse[members] = group.source_readout
    keep = [0, 1] + ([2] if "head" in axes else []) + ([3] if {"pos", "span"} & set(axes) else [])
    sizes = [shape[d] for d in keep]
    index: dict[str, list[Any]] = {"layer": layer_idx}
    if "head" in axes:
        index["head"] = head_idx
    if "pos" in axes:
        index["pos"] = list(range(max_len)) if spec.positions is None else list(spec.positions)
    if "span" in axes:
        index["span"] = list(spec.spans)
    stats = SweepStats(
        method,
        counters.cells,
        counters.skipped,
        counters.forwards,
        counters.token_layers,
        counters.naive,
    )
    return GridResult(
        axes,
        index,
        out.reshape(*sizes, n_cand),
        lse.reshape(*sizes),
        clean,
        source,
        stats,
    )


Row = tuple[int, int, int]  # (head index, entry index, pair) of one patched copy at one layer
