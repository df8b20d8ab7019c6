"""The batched activation-patching sweep: every (layer, position) cell of one site, many pairs.

Conventions (the same as ``seqpatch.metrics``):

- A pair is ``(source, target)`` token ids of equal length ``T``. The *source* (clean, program A)
  donates activations; the *target* (program B) is the run being patched and scored.
- Cell ``(l, t)`` of ``site``: the target runs with the site tensor of layer ``l`` at position
  ``t`` replaced by the source's tensor at the same ``(l, t)`` — one cell per patched run.
- The result is ``[n_pairs, layers, positions, n_candidates]`` float32: the next-token logits of
  the answer candidates at the target's last position, in the order ``layers`` and ``positions``
  were given. Metrics are views of these logits (``seqpatch.metrics``).

Two exact strategies, chosen by ``method``:

- ``"cached"`` — the compute floor. A patch at ``(l, t)`` changes nothing below layer ``l`` or
  before position ``t``, so the run restarts at layer ``l`` from the target's clean residual
  stream and computes positions ``t..T-1`` only, attending to the clean keys/values of positions
  ``< t`` (``_layers.LayerRunner``). Each (cell) forward batches that cell across many pairs; when
  there are few pairs, neighbouring positions share a forward (starting at the smallest). Work per
  cell is ``(L - l)(T - t)`` token-layers instead of ``L·T``: about a quarter of the naive sweep.
  The last layer's MLP runs on the last position only (the only one read). Cells whose patch
  provably changes nothing take the clean logits without running (``skip_noops``): the source
  activation equals the target's bit for bit (every position before a pair's divergence), or
  the patch sits after the last layer's attention at an earlier position.
- ``"full"`` — the generic path for any architecture: full forwards of target copies, each copy
  with one cell patched by a plain hook, many copies per forward.

``"auto"`` takes ``cached`` where ``_layers.supports_layer_runner`` holds, else ``full``.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from seqpatch.interventions._layers import LayerRunner, PrefixCache, supports_layer_runner
from seqpatch.interventions.sites import (
    SWEEP_SITES,
    InterventionError,
    as_id_rows,
    capture_sites,
    check_sites,
    hooked,
    resolve_indices,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from seqpatch.models import ModelHandle, Site

Method = Literal["auto", "cached", "full"]


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
) -> torch.Tensor:
    """Unpatched logits of the candidates at each prompt's last position: ``[n, n_candidates]``.

    ``input_ids`` as for ``sweep`` (``[n, T]`` or rows of any lengths); these are the baselines
    of the metrics (run on the targets and on the sources).
    """
    rows = as_id_rows(input_ids, "input_ids")
    cand = _candidates(candidate_ids, len(rows), handle)
    out = torch.empty(len(rows), cand.shape[1], dtype=torch.float32)
    for members in _by_length(rows).values():
        ids = torch.stack([rows[i] for i in members]).to(handle.device)
        with torch.no_grad():
            logits = handle.hf_model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        out[members] = _gather(logits, cand[members]).cpu()
    return out


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
) -> torch.Tensor:
    """Patch one cell at a time, for every cell and pair; candidate logits ``[n, L', P', C]``.

    Args:
        src_ids, tgt_ids: source and target token ids, unpadded: ``[n_pairs, T]`` tensors or
            sequences of 1-D rows (a pair's two rows have equal length; pairs may differ).
        site: ``resid_pre``, ``resid_post``, ``attn_out`` or ``mlp_out``.
        candidate_ids: the answer candidates' token ids, ``[C]`` shared or ``[n_pairs, C]``.
        layers: layer indices to sweep (default all; negative count from the end).
        positions: positions to sweep (default all); unpadded indices, negative ones count from
            each pair's end. Cells beyond a shorter pair's length are NaN.
        source_activations: the sources' site tensors, one ``[len(layers), len(positions), d]``
            per pair (the swept grid, in order), any float dtype; computed when omitted.
        method: ``auto``, ``cached`` (compute floor, Llama-like models) or ``full`` (any model).
        max_rows: most patched copies in one forward (memory bound).
        min_rows: with fewer pairs than this, neighbouring positions share a forward.
        skip_noops: take the clean logits, without running, for cells whose patch provably
            changes nothing: the source activation equals the target's bit for bit (positions
            before the divergence), or the patch lands after the last layer's attention at a
            position before the last (``attn_out``/``mlp_out``/``resid_post`` of layer L-1).
        stats: if given, a ``SweepStats`` is appended to it.
    """
    check_sites([site], SWEEP_SITES)
    src_rows, tgt_rows = as_id_rows(src_ids, "src_ids"), as_id_rows(tgt_ids, "tgt_ids")
    if len(src_rows) != len(tgt_rows):
        raise InterventionError(f"{len(src_rows)} source rows but {len(tgt_rows)} target rows")
    for i, (s, t) in enumerate(zip(src_rows, tgt_rows, strict=True)):
        if s.shape != t.shape:
            raise InterventionError(
                f"pair {i}: source has {s.numel()} tokens and target {t.numel()}; a patched cell "
                "needs the same position in both, so pairs must have equal token lengths"
            )
    if handle.remote:
        raise InterventionError("the sweep runs locally; load the model with remote=False")
    layer_idx = resolve_indices(layers, handle.n_layers, "layer")
    max_len = max(row.numel() for row in tgt_rows)
    n_pos = max_len if positions is None else len(list(positions))
    if method == "auto":
        method = "cached" if supports_layer_runner(handle) else "full"
    elif method == "cached" and not supports_layer_runner(handle):
        raise InterventionError(
            f"method='cached' does not support {handle.adapter.model_type!r} with "
            f"{handle.hf_model.config._attn_implementation!r} attention; use method='full'"
        )
    elif method not in ("cached", "full"):
        raise InterventionError(f"unknown method {method!r}; use 'auto', 'cached' or 'full'")
    if source_activations is not None and len(source_activations) != len(src_rows):
        raise InterventionError(
            f"source_activations has {len(source_activations)} entries for {len(src_rows)} pairs"
        )
    cand = _candidates(candidate_ids, len(tgt_rows), handle)
    out = torch.full((len(tgt_rows), len(layer_idx), n_pos, cand.shape[1]), float("nan"))
    run_group = _CachedGroup if method == "cached" else _FullGroup
    counters = _Stats()
    with torch.no_grad():
        for length, members in _by_length(tgt_rows).items():
            pos_idx = _positions_for(positions, length)
            group = run_group(
                handle,
                torch.stack([src_rows[i] for i in members]).to(handle.device),
                torch.stack([tgt_rows[i] for i in members]).to(handle.device),
                site,
                cand[members].to(handle.device),
                layer_idx,
                pos_idx,
                _source_grid(source_activations, members, len(layer_idx), len(pos_idx), handle),
                counters,
            )
            grid = group.run(max_rows, min_rows, skip_noops)
            out[members, :, : len(pos_idx)] = grid.float().cpu()
    if stats is not None:
        stats.append(
            SweepStats(
                method,
                counters.cells,
                counters.skipped,
                counters.forwards,
                counters.token_layers,
                counters.naive,
            )
        )
    return out


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


def _gather(logits: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, cand.to(logits.device)).float()


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


class _Group:
    """The sweep of one group of equal-length pairs (both strategies share the bookkeeping)."""

    def __init__(
        self,
        handle: ModelHandle,
        src: torch.Tensor,
        tgt: torch.Tensor,
        site: Site,
        cand: torch.Tensor,
        layers: list[int],
        positions: list[int],
        source_grid: torch.Tensor | None,
        counters: _Stats,
    ) -> None:
        self.handle, self.site, self.cand = handle, site, cand
        self.layers, self.positions = layers, positions
        self.n, self.length = tgt.shape
        self.counters = counters
        self.tgt = tgt
        needed = sorted(set(layers))
        captured, _ = capture_sites(handle, torch.cat([src, tgt]), [site], needed)
        self.tgt_acts = {layer: captured[(site, layer)][self.n :] for layer in needed}
        src_acts = {layer: captured[(site, layer)][: self.n] for layer in needed}
        # source[p, li, pi]: the donated activation of pair p at (layers[li], positions[pi]).
        valid = [max(pos, 0) for pos in positions]
        if source_grid is None:
            source_grid = torch.stack([src_acts[layer][:, valid] for layer in layers], dim=1)
        self.source = source_grid
        self.out = torch.full((self.n, len(layers), len(positions), cand.shape[1]), float("nan"))

    def cells(self, skip_noops: bool) -> list[tuple[int, int, list[int]]]:
        """``(layer_index, position_index, pairs to run)`` for every cell that must be computed."""
        todo = []
        for li, layer in enumerate(self.layers):
            for pi, pos in enumerate(self.positions):
                if pos < 0:
                    continue
                pairs = list(range(self.n))
                self.counters.cells += self.n
                self.counters.naive += self.n * self.handle.n_layers * self.length
                if skip_noops and self.unreachable(layer, pos):
                    self.out[:, li, pi] = self.clean
                    self.counters.skipped += self.n
                    continue
                if skip_noops:
                    same = (self.source[:, li, pi] == self.tgt_acts[layer][:, pos]).all(-1)
                    pairs = [p for p in pairs if not bool(same[p])]
                    self.out[same.cpu(), li, pi] = self.clean[same.cpu()]
                    self.counters.skipped += self.n - len(pairs)
                if pairs:
                    todo.append((li, pi, pairs))
        return todo

    def unreachable(self, layer: int, pos: int) -> bool:
        """A patch after the last layer's attention at an earlier position cannot reach the
        last position's logits (nothing mixes positions after it): the result is the clean run."""
        last = layer == self.handle.n_layers - 1 and pos < self.length - 1
        return last and self.site in ("attn_out", "mlp_out", "resid_post")

    clean: torch.Tensor  # [n, C] float32, the target's unpatched candidate logits


class _FullGroup(_Group):
    """Generic path: full forwards of target copies, one patched cell per copy, by plain hooks."""

    def run(self, max_rows: int, min_rows: int, skip_noops: bool) -> torch.Tensor:
        del min_rows
        with torch.no_grad():
            logits = self.handle.hf_model(input_ids=self.tgt, logits_to_keep=1).logits[:, -1]
        self.clean = _gather(logits, self.cand).cpu()
        self.counters.forwards += 1
        rows = [(li, pi, p) for li, pi, pairs in self.cells(skip_noops) for p in pairs]
        for start in range(0, len(rows), max_rows):
            self._forward(rows[start : start + max_rows])
        return self.out

    def _forward(self, rows: list[tuple[int, int, int]]) -> None:
        li = torch.tensor([r[0] for r in rows], device=self.handle.device)
        pi = torch.tensor([r[1] for r in rows], device=self.handle.device)
        pair = torch.tensor([r[2] for r in rows], device=self.handle.device)
        pos = torch.tensor(self.positions, device=self.handle.device)[pi]
        value = self.source[pair, li, pi]
        hooks: dict[tuple[Site, int], Callable] = {}
        for layer_index, layer in enumerate(self.layers):
            chosen = (li == layer_index).nonzero().squeeze(-1)
            if chosen.numel():
                hooks[(self.site, layer)] = _row_setter(chosen, pos[chosen], value[chosen])
        with hooked(self.handle, hooks):
            logits = self.handle.hf_model(input_ids=self.tgt[pair], logits_to_keep=1).logits
        self.out[pair.cpu(), li.cpu(), pi.cpu()] = _gather(logits[:, -1], self.cand[pair]).cpu()
        self.counters.forwards += 1
        self.counters.token_layers += len(rows) * self.handle.n_layers * self.length


def _row_setter(rows: torch.Tensor, pos: torch.Tensor, value: torch.Tensor) -> Callable:
    """A hook function that writes ``value[i]`` at ``(rows[i], pos[i])`` of the site tensor."""

    def set_rows(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[rows, pos] = value.to(x.dtype)
        return x

    return set_rows


class _CachedGroup(_Group):
    """Compute-floor path: restart at the patched layer and position from the clean run's state."""

    def run(self, max_rows: int, min_rows: int, skip_noops: bool) -> torch.Tensor:
        handle = self.handle
        self.runner = LayerRunner(handle)
        self._clean_run()
        by_layer: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
        for li, pi, pairs in self.cells(skip_noops):
            by_layer[li].append((pi, pairs))
        for li, cells in by_layer.items():
            cells.sort(key=lambda cell: self.positions[cell[0]])
            block: list[tuple[int, int]] = []  # (position index, pair) rows sharing one forward
            for pi, pairs in cells:
                rows = [(pi, p) for p in pairs]
                if block and len(block) + len(rows) > max(min_rows, 1):
                    self._forward(li, block, max_rows)
                    block = []
                block += rows
            if block:
                self._forward(li, block, max_rows)
        return self.out

    def _clean_run(self) -> None:
        """The target's clean run through the runner: residual stream per layer, keys/values."""
        handle = self.handle
        first = _layer0_input(handle, self.tgt)
        resid = [first]
        hooks = {("resid_post", i): _collect(resid) for i in range(handle.n_layers)}
        cache = PrefixCache(record=True)
        with hooked(handle, hooks):
            final = self.runner.run(first, 0, 0, cache)
        self.resid = resid  # resid[l]: clean input of layer l; resid[L]: the last layer's output
        self.kv = cache.recorded
        self.clean = _gather(handle.logits_from_resid(final[:, -1]), self.cand).cpu()
        self.counters.forwards += 1

    def _forward(self, li: int, rows: list[tuple[int, int]], max_rows: int) -> None:
        layer = self.layers[li]
        start_pos = min(self.positions[pi] for pi, _ in rows)
        width = self.length - start_pos
        chunk = max(1, max_rows * self.length // width)  # a budget of max_rows full copies
        for begin in range(0, len(rows), chunk):
            self._forward_chunk(layer, li, start_pos, rows[begin : begin + chunk])

    def _forward_chunk(
        self, layer: int, li: int, start_pos: int, rows: list[tuple[int, int]]
    ) -> None:
        handle = self.handle
        device = handle.device
        pi = torch.tensor([r[0] for r in rows], device=device)
        pair = torch.tensor([r[1] for r in rows], device=device)
        rel = torch.tensor(self.positions, device=device)[pi] - start_pos
        value = self.source[pair, li, pi]
        # resid_post[l] is resid_pre[l + 1]: patch it as the next layer's input.
        start_layer = layer + 1 if self.site == "resid_post" else layer
        hidden = self.resid[start_layer][pair, start_pos:]
        rows_here = torch.arange(len(rows), device=device)
        hooks: dict[tuple[Site, int], Callable] = {}
        if self.site in ("resid_pre", "resid_post"):
            hidden = hidden.clone()
            hidden[rows_here, rel] = value
        else:
            hooks[(self.site, layer)] = _row_setter(rows_here, rel, value)
        prefix = {
            j: (keys[pair, :, :start_pos], values[pair, :, :start_pos])
            for j, (keys, values) in self.kv.items()
            if j >= start_layer and start_pos > 0
        }
        with hooked(handle, hooks):
            last_only = not (self.site == "mlp_out" and layer == handle.n_layers - 1)
            final = self.runner.run(hidden, start_layer, start_pos, PrefixCache(prefix), last_only)
        logits = handle.logits_from_resid(final[:, -1])
        self.out[pair.cpu(), li, pi.cpu()] = _gather(logits, self.cand[pair]).cpu()
        self.counters.forwards += 1
        self.counters.token_layers += (
            len(rows) * (handle.n_layers - start_layer) * (self.length - start_pos)
        )


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
