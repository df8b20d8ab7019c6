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

Two exact strategies, chosen by ``method``:

- ``"cached"`` — the compute floor. A patch at layer ``l`` whose first patched position is ``t``
  changes nothing below layer ``l`` or before position ``t`` (a head's q/k/v at ``t`` only
  reaches positions ``>= t``), so the run restarts at layer ``l`` from the target's clean
  residual stream and computes positions ``t..T-1`` only, attending to the clean keys/values of
  positions ``< t`` (``_layers.LayerRunner``). Each forward batches cells across many pairs and
  the heads of a cell (the head axis is folded into rows); when there are few pairs,
  neighbouring positions share a forward (starting at the smallest). Work per cell is
  ``(L - l)(T - t)`` token-layers instead of ``L·T``. A site read after its layer's keys and
  values (``attn_out``, ``mlp_out``, ``head_z``, ``head_q``) patched at one position changes its
  layer's output at that position alone, so that layer runs on the one position and the layers
  above from ``t``: ``1 + (L - l - 1)(T - t)``. The last layer's MLP runs on the last
  position only (the only one read). Cells whose patch provably changes nothing take the clean
  logits without running (``skip_noops``): the source activation equals the target's bit for
  bit at every patched coordinate (every position before a pair's divergence), or the patch
  sits after the last layer's attention mixing (``attn_out``, ``mlp_out``, ``resid_post``,
  ``head_z``, ``head_q`` of layer L-1) at positions before the last. A cell patching a set of
  positions starts at the first of them whose donor differs from the target in some bit — for
  every position at once, the pair's divergence or later — since writing a value a position
  already holds is a no-op.
- ``"full"`` — the generic path for any architecture: full forwards of target copies, each copy
  with one cell patched by a plain hook, many copies per forward.

``"auto"`` takes ``cached`` where ``_layers.supports_layer_runner`` holds, else ``full``.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch

from seqpatch.interventions._layers import LayerRunner, PrefixCache, supports_layer_runner
from seqpatch.interventions.sites import (
    GRID_SITES,
    HEAD_SITES,
    SWEEP_SITES,
    InterventionError,
    as_id_rows,
    as_pair_rows,
    capture_sites,
    check_sites,
    hooked,
    resolve_indices,
    site_heads,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from seqpatch.models import ModelHandle, Site

Method = Literal["auto", "cached", "full"]
Span = str | Sequence[int]
"""A set of positions patched together: ``"all"``, ``"from-divergence"`` (from a pair's first
differing token on), ``"before-last"`` (from the divergence up to, not including, the last
token, where the answer is read), ``"last"`` (the last token alone) or explicit positions
(negative ones count from each pair's end; positions beyond a pair's length are left out)."""
SPAN_NAMES = ("all", "from-divergence", "before-last", "last")
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
# After the last layer's attention has mixed positions, these sites at an earlier position
# cannot reach the last position's logits.
_LOCAL_AFTER_MIXING = ("attn_out", "mlp_out", "resid_post", "head_z", "head_q")
# Patched at one position, these sites change their layer's output at that position only (the
# layer's keys and values, which carry positions to each other, are computed before them).
_LOCAL_AT_LAYER = ("attn_out", "mlp_out", "head_z", "head_q")


class Readout(NamedTuple):
    """What a run is scored on: the candidates' logits and the full vocabulary's log-normaliser.

    ``logits`` is ``[..., n_candidates]`` and ``lse`` is ``[...]`` (the same leading axes), both
    float32: ``[n, C]`` / ``[n]`` for ``candidate_logits``, ``[n, L', P', C]`` / ``[n, L', P']``
    for ``sweep``. Unpack it (``logits, lse = sweep(...)``) or read the fields.
    """

    logits: torch.Tensor
    lse: torch.Tensor

    def log_probs(self) -> torch.Tensor:
        """Full-vocabulary log-probabilities of the candidates: ``logits - lse``."""
        return self.logits - self.lse[..., None]


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


@dataclass
class _Stats:
    cells: int = 0
    skipped: int = 0
    forwards: int = 0
    token_layers: int = 0
    naive: int = 0


def candidate_logits(
    handle: ModelHandle, input_ids: Any, candidate_ids: Sequence[int] | torch.Tensor
) -> Readout:
    """Unpatched readout at each prompt's last position: logits ``[n, C]`` and lse ``[n]``.

    ``input_ids`` as for ``sweep`` (``[n, T]`` or rows of any lengths); these are the baselines
    of the metrics (run on the targets and on the sources).
    """
    rows = as_id_rows(input_ids, "input_ids")
    cand = _candidates(candidate_ids, len(rows), handle)
    out = torch.empty(len(rows), cand.shape[1], dtype=torch.float32)
    lse = torch.empty(len(rows), dtype=torch.float32)
    for members in _by_length(rows).values():
        ids = torch.stack([rows[i] for i in members]).to(handle.device)
        with torch.no_grad():
            logits = handle.hf_model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        out[members], lse[members] = _read(logits, cand[members])
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
    method = _choose_method(handle, method)
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
    cand = _candidates(candidate_ids, len(tgt_rows), handle)
    n, n_cand = len(tgt_rows), cand.shape[1]
    shape = (n, len(layer_idx), len(head_idx), n_pos)
    out = torch.full((*shape, n_cand), float("nan"))
    lse = torch.full(shape, float("nan"))
    clean = Readout(torch.empty(n, n_cand), torch.empty(n))
    source = Readout(torch.empty(n, n_cand), torch.empty(n))
    run_group = _CachedGroup if method == "cached" else _FullGroup
    counters = _Stats()
    with torch.no_grad():
        for length, members in _by_length(tgt_rows).items():
            src = torch.stack([src_rows[i] for i in members]).to(handle.device)
            tgt = torch.stack([tgt_rows[i] for i in members]).to(handle.device)
            if "pos" in axes:
                plan = _Plan.single(_positions_for(spec.positions, length), len(members))
            else:
                spans = spec.spans if "span" in axes else spec.spans[:1]
                plan = _Plan.sets(spans, src, tgt)
            group = run_group(
                handle,
                src,
                tgt,
                site,
                cand[members].to(handle.device),
                layer_idx,
                head_idx,
                plan,
                _source_grid(
                    source_activations, members, len(layer_idx), len(plan.positions), handle
                ),
                counters,
            )
            group.run(max_rows, min_rows, skip_noops)
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


def _choose_method(handle: ModelHandle, method: str) -> str:
    if method == "auto":
        return "cached" if supports_layer_runner(handle) else "full"
    if method == "cached" and not supports_layer_runner(handle):
        raise InterventionError(
            f"method='cached' does not support {handle.adapter.model_type!r} with "
            f"{handle.hf_model.config._attn_implementation!r} attention; use method='full'"
        )
    if method not in ("cached", "full"):
        raise InterventionError(f"unknown method {method!r}; use 'auto', 'cached' or 'full'")
    return method


@dataclass
class _Plan:
    """The position entries of one group of equal-length pairs.

    ``positions[e]`` is entry ``e``'s single position (``-1``: beyond the pairs, NaN) when
    ``masks`` is ``None``; else ``masks[e]`` ``[n, T]`` says which positions entry ``e`` patches
    in each pair. ``first``/``last`` ``[entries, n]`` are the smallest/largest patched position
    (``first == T`` for an empty set: nothing to patch, the clean readout).
    """

    positions: list[int]
    first: torch.Tensor
    last: torch.Tensor
    masks: torch.Tensor | None = None

    @classmethod
    def single(cls, positions: list[int], n: int) -> _Plan:
        at = torch.tensor(positions, dtype=torch.long)[:, None].expand(-1, n)
        return cls(positions, at, at)

    @classmethod
    def sets(cls, spans: Sequence[Span], src: torch.Tensor, tgt: torch.Tensor) -> _Plan:
        n, length = tgt.shape
        grid = torch.arange(length)
        masks = torch.zeros(len(spans), n, length, dtype=torch.bool)
        differs = (src != tgt).cpu()
        diverge = torch.where(differs.any(-1), differs.long().argmax(-1), length)
        for e, span in enumerate(spans):
            if span == "all":
                masks[e] = True
            elif span == "from-divergence":
                masks[e] = grid[None] >= diverge[:, None]
            elif span == "before-last":
                masks[e] = (grid[None] >= diverge[:, None]) & (grid[None] < length - 1)
            elif span == "last":
                masks[e][:, length - 1] = True
            else:
                chosen = [int(p) % length for p in span if -length <= int(p) < length]  # type: ignore[union-attr]
                masks[e][:, chosen] = True
        first = torch.where(masks.any(-1), masks.long().argmax(-1), length)
        last = torch.where(masks.any(-1), length - 1 - masks.flip(-1).long().argmax(-1), -1)
        return cls(list(range(len(spans))), first, last, masks)


def _positions_for(positions: Sequence[int] | None, length: int) -> list[int]:
    """Unpadded positions of a group of length ``length``; ``-1`` marks one beyond the pairs."""
    if positions is None:
        return list(range(length))
    return [int(p) % length if -length <= int(p) < length else -1 for p in positions]


def _by_length(rows: list[torch.Tensor]) -> dict[int, list[int]]:
    """Row indices grouped by token length: each group runs as one unpadded batch."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row.numel()].append(i)
    return dict(groups)


def _candidates(
    candidate_ids: Sequence[int] | torch.Tensor, n_pairs: int, handle: ModelHandle
) -> torch.Tensor:
    cand = torch.as_tensor(candidate_ids, dtype=torch.long)
    if cand.ndim == 1:
        cand = cand.expand(n_pairs, -1)
    if cand.ndim != 2 or cand.shape[0] != n_pairs or cand.shape[1] == 0:
        raise InterventionError(
            f"candidate_ids must be [n_candidates] or [n_pairs={n_pairs}, n_candidates], got "
            f"shape {list(cand.shape)}"
        )
    vocab = handle.hf_model.config.get_text_config().vocab_size
    if bool((cand < 0).any() or (cand >= vocab).any()):
        raise InterventionError(f"candidate_ids must be token ids in [0, {vocab})")
    return cand


def _read(logits: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate logits ``[rows, C]`` and the full-vocabulary log-normaliser ``[rows]`` of
    next-token logits ``[rows, vocab]``, both float32 on the CPU."""
    picked = logits.gather(-1, cand.to(logits.device)).float()
    return picked.cpu(), logits.float().logsumexp(-1).cpu()


def _source_grid(
    source_activations: Sequence[torch.Tensor] | torch.Tensor | None,
    members: list[int],
    n_layers: int,
    n_pos: int,
    handle: ModelHandle,
) -> torch.Tensor | None:
    if source_activations is None:
        return None
    grids = []
    for i in members:
        grid = torch.as_tensor(source_activations[i])
        if tuple(grid.shape) != (n_layers, n_pos, handle.d_model):
            raise InterventionError(
                f"source_activations[{i}] has shape {list(grid.shape)}; expected the swept grid "
                f"[layers={n_layers}, positions={n_pos}, d_model={handle.d_model}]"
            )
        grids.append(grid)
    return torch.stack(grids).to(device=handle.device, dtype=handle.dtype)


Row = tuple[int, int, int]  # (head index, entry index, pair) of one patched copy at one layer


@dataclass
class _Patch:
    """Where a batch of patched copies is written: ``value[i]`` at ``(rows[i], pos[i])`` of the
    site tensor (and head ``heads[i]``), positions counted from the forward's first position."""

    rows: torch.Tensor
    pos: torch.Tensor
    heads: torch.Tensor | None
    value: torch.Tensor
    pairs: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


class _Group:
    """The sweep of one group of equal-length pairs (both strategies share the bookkeeping)."""

    def __init__(
        self,
        handle: ModelHandle,
        src: torch.Tensor,
        tgt: torch.Tensor,
        site: str,
        cand: torch.Tensor,
        layers: list[int],
        heads: list[int | None],
        plan: _Plan,
        source_grid: torch.Tensor | None,
        counters: _Stats,
    ) -> None:
        self.handle, self.site, self.cand = handle, site, cand
        self.layers, self.heads, self.plan = layers, heads, plan
        self.n, self.length = tgt.shape
        self.n_entries = len(plan.positions)
        self.counters = counters
        self.tgt = tgt
        needed = sorted(set(layers))
        captured, logits = capture_sites(handle, torch.cat([src, tgt]), [site], needed)  # type: ignore[list-item]
        self.source_readout = _read(logits[: self.n], cand)
        self.tgt_acts = {layer: captured[(site, layer)][self.n :] for layer in needed}
        self.src_acts = {layer: captured[(site, layer)][: self.n] for layer in needed}
        self.source = source_grid  # [n, L', P', d]: given donated values of (layer, position)
        shape = (self.n, len(layers), len(heads), self.n_entries)
        self.out = torch.full((*shape, cand.shape[1]), float("nan"))
        self.lse = torch.full(shape, float("nan"))
        self._equal: dict[int, torch.Tensor] = {}  # layer -> [n, T] or [n, T, heads]: equal bits
        self.starts: dict[tuple[int, int, int], torch.Tensor] = {}  # (li, hi, pi) -> [n] start

    def donated(self, li: int, pi: int, pairs: torch.Tensor) -> torch.Tensor:
        """Single-position entries: the donor's site vectors ``[len(pairs), ...]`` at entry ``pi``."""
        if self.source is not None:
            return self.source[pairs, li, pi]
        return self.src_acts[self.layers[li]][pairs, self.plan.positions[pi]]

    def same(self, li: int, hi: int, pi: int) -> torch.Tensor:
        """``[n]`` bool, single-position entries: the donor equals the target bit for bit."""
        pos = self.plan.positions[pi]
        src = self.donated(li, pi, torch.arange(self.n, device=self.tgt.device))
        tgt = self.tgt_acts[self.layers[li]][:, pos]
        head = self.heads[hi]
        if head is not None:
            src, tgt = src[:, head], tgt[:, head]
        return (src == tgt).flatten(1).all(-1).cpu()

    def first_changed(self, li: int, hi: int, pi: int) -> torch.Tensor:
        """``[n]``, position-set entries: the first patched position whose donor differs from
        the target in some bit (``T``: none, the patch is a no-op).

        A forward may start there instead of at the set's first position: the positions before
        it are written with the values they already hold, so leaving them out is exact. For the
        ``all`` span this is the pair's divergence (or later), the compute floor of that patch.
        """
        layer, head = self.layers[li], self.heads[hi]
        if layer not in self._equal:
            eq = self.src_acts[layer] == self.tgt_acts[layer]  # [n, T, d] / [n, T, heads, d_head]
            self._equal[layer] = (eq.flatten(3) if eq.ndim == 4 else eq).all(-1).cpu()
        eq = self._equal[layer]
        if eq.ndim == 3:  # a head site: one column per head
            eq = eq[:, :, head] if head is not None else eq.all(-1)
        changed = ~eq & self.plan.masks[pi]  # type: ignore[index]
        return torch.where(changed.any(-1), changed.long().argmax(-1), self.length)

    def cells(self, skip_noops: bool) -> list[tuple[int, int, int, list[int]]]:
        """``(layer index, head index, entry index, pairs to run)`` for every cell to compute."""
        todo = []
        for li, layer in enumerate(self.layers):
            for hi in range(len(self.heads)):
                for pi in range(self.n_entries):
                    if self.plan.masks is None and self.plan.positions[pi] < 0:
                        continue
                    run = torch.ones(self.n, dtype=torch.bool)
                    self.counters.cells += self.n
                    self.counters.naive += self.n * self.handle.n_layers * self.length
                    run &= self.plan.first[pi] < self.length  # an empty set patches nothing
                    start = self.plan.first[pi]
                    if skip_noops:
                        run &= ~self.unreachable(layer, self.plan.last[pi])
                        if bool(run.any()) and self.plan.masks is None:
                            run &= ~self.same(li, hi, pi)
                        elif bool(run.any()):
                            start = self.first_changed(li, hi, pi)
                            run &= start < self.length
                    self.starts[(li, hi, pi)] = start
                    keep = ~run
                    self.out[keep, li, hi, pi] = self.clean[keep]
                    self.lse[keep, li, hi, pi] = self.clean_lse[keep]
                    self.counters.skipped += int(keep.sum())
                    pairs = run.nonzero().squeeze(-1).tolist()
                    if pairs:
                        todo.append((li, hi, pi, pairs))
        return todo

    def unreachable(self, layer: int, last: torch.Tensor) -> torch.Tensor:
        """``[n]`` bool: a patch after the last layer's attention at positions before the last
        cannot reach the last position's logits (nothing mixes positions after it)."""
        if layer != self.handle.n_layers - 1 or self.site not in _LOCAL_AFTER_MIXING:
            return torch.zeros(self.n, dtype=torch.bool)
        return last < self.length - 1

    def patch(self, li: int, rows: list[Row], start_pos: int) -> _Patch:
        """The coordinates and donated values of ``rows`` (one copy each) in a forward whose
        first position is ``start_pos``."""
        device = self.handle.device
        layer = self.layers[li]
        if self.plan.masks is None:
            at = torch.arange(len(rows), device=device)
            pairs = torch.tensor([r[2] for r in rows], device=device)
            pos = torch.tensor([self.plan.positions[r[1]] for r in rows], device=device)
            pi = torch.tensor([r[1] for r in rows], device=device)
            if self.source is not None:
                value = self.source[pairs, li, pi]
            else:
                value = self.src_acts[layer][pairs, pos]
            heads = [self.heads[r[0]] for r in rows]
        else:
            at_l, pos_l, heads = [], [], []
            for i, (hi, pi, p) in enumerate(rows):
                chosen = self.plan.masks[pi][p, start_pos:].nonzero().squeeze(-1) + start_pos
                chosen = chosen.tolist()
                at_l += [i] * len(chosen)
                pos_l += chosen
                heads += [self.heads[hi]] * len(chosen)
            at = torch.tensor(at_l, dtype=torch.long, device=device)
            pos = torch.tensor(pos_l, dtype=torch.long, device=device)
            pairs = torch.tensor([rows[i][2] for i in at_l], dtype=torch.long, device=device)
            value = self.src_acts[layer][pairs, pos]
        head_t = None
        if heads and heads[0] is not None:
            head_t = torch.tensor(heads, device=device)
            value = value[torch.arange(len(heads), device=device), head_t]
        return _Patch(at, pos - start_pos, head_t, value, pairs)

    clean: torch.Tensor  # [n, C] float32, the target's unpatched candidate logits
    clean_lse: torch.Tensor  # [n] float32, their full-vocabulary log-normaliser


class _FullGroup(_Group):
    """Generic path: full forwards of target copies, one patched cell per copy, by plain hooks."""

    def run(self, max_rows: int, min_rows: int, skip_noops: bool) -> None:
        del min_rows
        with torch.no_grad():
            logits = self.handle.hf_model(input_ids=self.tgt, logits_to_keep=1).logits[:, -1]
        self.clean, self.clean_lse = _read(logits, self.cand)
        self.counters.forwards += 1
        rows = [(li, hi, pi, p) for li, hi, pi, pairs in self.cells(skip_noops) for p in pairs]
        for start in range(0, len(rows), max_rows):
            self._forward(rows[start : start + max_rows])

    def _forward(self, rows: list[tuple[int, int, int, int]]) -> None:
        device = self.handle.device
        pair = torch.tensor([r[3] for r in rows], device=device)
        hooks: dict[tuple[str, int], Callable] = {}
        for li, layer in enumerate(self.layers):
            chosen = [i for i, r in enumerate(rows) if r[0] == li]
            if chosen:
                patch = self.patch(li, [rows[i][1:] for i in chosen], 0)  # type: ignore[misc]
                at = torch.tensor(chosen, device=device)[patch.rows]
                hooks[(self.site, layer)] = _row_setter(at, patch.pos, patch.value, patch.heads)
        with hooked(self.handle, hooks):  # type: ignore[arg-type]
            logits = self.handle.hf_model(input_ids=self.tgt[pair], logits_to_keep=1).logits
        li_t, hi_t, pi_t = (torch.tensor([r[k] for r in rows]) for k in range(3))
        at = (pair.cpu(), li_t, hi_t, pi_t)
        self.out[at], self.lse[at] = _read(logits[:, -1], self.cand[pair])
        self.counters.forwards += 1
        self.counters.token_layers += len(rows) * self.handle.n_layers * self.length


def _row_setter(
    rows: torch.Tensor, pos: torch.Tensor, value: torch.Tensor, heads: torch.Tensor | None = None
) -> Callable:
    """A hook function that writes ``value[i]`` at ``(rows[i], pos[i])`` (and head ``heads[i]``)
    of the site tensor."""

    def set_rows(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        if heads is None:
            x[rows, pos] = value.to(x.dtype)
        else:
            x[rows, pos, heads] = value.to(x.dtype)
        return x

    return set_rows


class _CachedGroup(_Group):
    """Compute-floor path: restart at the patched layer and position from the clean run's state."""

    def run(self, max_rows: int, min_rows: int, skip_noops: bool) -> None:
        handle = self.handle
        self.runner = LayerRunner(handle)
        self._clean_run()
        by_layer: dict[int, list[tuple[int, Row]]] = defaultdict(list)
        for li, hi, pi, pairs in self.cells(skip_noops):
            for p in pairs:
                by_layer[li].append((int(self.starts[(li, hi, pi)][p]), (hi, pi, p)))
        for li, rows in by_layer.items():
            # stable: at one start, heads and then pairs stay in grid order
            rows.sort(key=lambda row: row[0])
            block: list[Row] = []  # rows sharing one forward
            cell: list[Row] = []
            key = None
            for start, row in rows:
                if (start, row[0], row[1]) != key and cell:
                    block = self._add(li, block, cell, min_rows, max_rows)
                    cell = []
                key = (start, row[0], row[1])
                cell.append(row)
            block = self._add(li, block, cell, min_rows, max_rows)
            if block:
                self._forward(li, block, max_rows)

    def _add(
        self, li: int, block: list[Row], cell: list[Row], min_rows: int, max_rows: int
    ) -> list[Row]:
        """Add one cell's rows to the open block, running the block first if it would grow past
        ``min_rows`` rows — or, when all its rows start at the cell's position (no position is
        computed for nothing), past ``min_rows`` full-length rows' worth of positions; returns
        the open block.

        Blocks stay small on purpose: on a CPU, forwards of a few dozen rows run faster per row
        than larger ones whose activations no longer fit in cache. Rows arrive sorted by start,
        so ``block[0]`` starts first."""
        if block:
            start = self._start(li, cell[0])
            limit = max(min_rows, 1)
            if self._start(li, block[0]) == start:
                limit = max(limit, min_rows * self.length // (self.length - start))
            if len(block) + len(cell) > limit:
                self._forward(li, block, max_rows)
                block = []
        return block + cell

    def _start(self, li: int, row: Row) -> int:
        hi, pi, p = row
        return int(self.starts[(li, hi, pi)][p])

    def _clean_run(self) -> None:
        """The target's clean run through the runner: residual stream per layer, keys/values."""
        handle = self.handle
        first = _layer0_input(handle, self.tgt)
        resid = [first]
        hooks = {("resid_post", i): _collect(resid) for i in range(handle.n_layers)}
        cache = PrefixCache(record=True)
        with hooked(handle, hooks):  # type: ignore[arg-type]
            final = self.runner.run(first, 0, 0, cache)
        self.resid = resid  # resid[l]: clean input of layer l; resid[L]: the last layer's output
        self.kv = cache.recorded
        self.clean, self.clean_lse = _read(handle.logits_from_resid(final[:, -1]), self.cand)
        self.counters.forwards += 1

    def _forward(self, li: int, rows: list[Row], max_rows: int) -> None:
        start_pos = min(self._start(li, row) for row in rows)
        width = self.length - start_pos
        chunk = max(1, max_rows * self.length // width)  # a budget of max_rows full copies
        for begin in range(0, len(rows), chunk):
            self._forward_chunk(li, start_pos, rows[begin : begin + chunk])

    def _forward_chunk(self, li: int, start_pos: int, rows: list[Row]) -> None:
        handle = self.handle
        device = handle.device
        layer = self.layers[li]
        pair = torch.tensor([r[2] for r in rows], device=device)
        patch = self.patch(li, rows, start_pos)
        if self.site in _LOCAL_AT_LAYER and self.plan.masks is None:
            final = self._run_local(layer, start_pos, pair, patch)
            self._store(li, rows, pair, final)
            return
        # resid_post[l] is resid_pre[l + 1]: patch it as the next layer's input.
        start_layer = layer + 1 if self.site == "resid_post" else layer
        hidden = self.resid[start_layer][pair, start_pos:]
        hooks: dict[tuple[str, int], Callable] = {}
        if self.site in ("resid_pre", "resid_post"):
            hidden = hidden.clone()
            hidden[patch.rows, patch.pos] = patch.value
        else:
            hooks[(self.site, layer)] = _row_setter(patch.rows, patch.pos, patch.value, patch.heads)
        prefix = self._prefix(pair, start_pos, range(start_layer, handle.n_layers))
        with hooked(handle, hooks):  # type: ignore[arg-type]
            last_only = not (self.site == "mlp_out" and layer == handle.n_layers - 1)
            final = self.runner.run(hidden, start_layer, start_pos, prefix, last_only)
        self._store(li, rows, pair, final)
        self.counters.forwards += 1
        self.counters.token_layers += (
            len(rows) * (handle.n_layers - start_layer) * (self.length - start_pos)
        )

    def _run_local(
        self, layer: int, start_pos: int, pair: torch.Tensor, patch: _Patch
    ) -> torch.Tensor:
        """Single-position cells of a site local to its position within the layer: the patched
        layer changes its output at the patched position only, so it runs on that position
        alone; the layers above run from ``start_pos`` on. Returns the last layer's output."""
        handle = self.handle
        hidden = self.resid[layer + 1][pair, start_pos:].clone()
        at = patch.pos + start_pos  # one patched position per row
        for pos in sorted(set(at.tolist())):
            sel = (at == pos).nonzero().squeeze(-1)
            prefix = self._prefix(pair[sel], pos, [layer])
            heads = None if patch.heads is None else patch.heads[sel]
            zero = torch.zeros(len(sel), dtype=torch.long, device=sel.device)
            hook = _row_setter(
                torch.arange(len(sel), device=sel.device), zero, patch.value[sel], heads
            )
            one = self.resid[layer][pair[sel], pos : pos + 1]
            with hooked(handle, {(self.site, layer): hook}):  # type: ignore[dict-item]
                out = self.runner.run(one, layer, pos, prefix, stop_layer=layer + 1)
            hidden[sel, pos - start_pos] = out[:, 0]
            self.counters.forwards += 1
            self.counters.token_layers += len(sel)
        if layer + 1 == handle.n_layers:
            return hidden
        prefix = self._prefix(pair, start_pos, range(layer + 1, handle.n_layers))
        self.counters.forwards += 1
        self.counters.token_layers += (
            len(pair) * (handle.n_layers - layer - 1) * (self.length - start_pos)
        )
        return self.runner.run(hidden, layer + 1, start_pos, prefix, last_only=True)

    def _prefix(self, pair: torch.Tensor, start_pos: int, layers: Sequence[int]) -> PrefixCache:
        """The clean keys/values of positions ``< start_pos`` of ``layers``, one row per pair."""
        if start_pos == 0:
            return PrefixCache()
        return PrefixCache(
            {
                j: (keys[pair, :, :start_pos], values[pair, :, :start_pos])
                for j, (keys, values) in self.kv.items()
                if j in layers
            }
        )

    def _store(self, li: int, rows: list[Row], pair: torch.Tensor, final: torch.Tensor) -> None:
        logits = self.handle.logits_from_resid(final[:, -1])
        at = (
            pair.cpu(),
            li,
            torch.tensor([r[0] for r in rows]),
            torch.tensor([r[1] for r in rows]),
        )
        self.out[at], self.lse[at] = _read(logits, self.cand[pair])


class _Stop(Exception):
    """Raised by a hook to end a forward once it has what it came for."""


def _layer0_input(handle: ModelHandle, input_ids: torch.Tensor) -> torch.Tensor:
    """What decoder layer 0 receives (embeddings, scaled or with positions as the model does)."""
    first: list[torch.Tensor] = []

    def grab(x: torch.Tensor) -> None:
        first.append(x)
        raise _Stop

    with hooked(handle, {("resid_pre", 0): grab}), contextlib.suppress(_Stop):
        handle.hf_model(input_ids=input_ids)
    return first[0]


def _collect(into: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
    def fn(x: torch.Tensor) -> None:
        into.append(x)

    return fn
