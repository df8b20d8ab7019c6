"""Causal tracing as ROME does it (Meng et al. 2022, §2.1): corrupt the input, restore clean states.

One program, three runs:

- the *clean* run reads the program as is: ``P_clean`` is the probability, over the full
  vocabulary, of the target token (the correct answer's first token) at the last position;
- each *corrupted* run adds Gaussian noise ``σ·ε`` to the input embeddings (the embedding
  module's output, as ROME does) of the chosen positions, ``ε ~ N(0, I)`` drawn from one seed per
  noise sample; ``P_corrupted`` is the mean over the samples of the target's probability;
- each *restored* run is a corrupted run in which chosen states take their clean values, and
  ``P_restored`` is again the mean over the noise samples (the same noise in every restoration).

The indirect effect of a restoration is ``IE = P_restored − P_corrupted``; averaged over programs
it is ROME's AIE. Restorations come in three kinds (``KINDS``), one grid cell per
``(layer l, position t)``:

- ``resid`` — the residual stream entering layer ``l`` (``resid_pre``) at ``t``. ROME restores a
  block's *output*, which is our ``resid_pre`` of the next layer: ROME's row ``l`` is our row
  ``l + 1``; our row 0 restores the embedding itself.
- ``mlp`` / ``attn`` — the MLP / attention outputs at ``t`` of a window of ``w`` consecutive
  layers centred on ``l``: layers ``max(0, l - w//2) .. min(L, l + ceil(w/2)) - 1`` (ROME's
  ``trace_important_window``, truncated at both ends of the stack). ROME uses ``w = 10`` on 48
  layers; ``default_window`` scales it with depth, ``w = max(1, round(10·L/48))`` — on a
  4-layer model ``w = 1``: each cell restores a single layer's MLP (or attention) output.

σ (``embedding_std``): ``ν`` × the standard deviation over all entries of the input embedding
matrix (every vocabulary row, Bessel-corrected like ``torch.std``, times the embedding module's
own scale where it has one, as Gemma's); ROME uses ``ν = 3`` with
the std of the embeddings of its dataset's subject tokens, which ``embedding_std(handle,
token_ids)`` computes for any list of tokens.

Two exact strategies (``method``):

- ``"cached"`` — the compute floor: the clean row and the corrupted rows are one
  ``RestartableRun`` (``seqpatch.interventions.restart``, whose docstring states the floor), and
  a restored run restarts a corrupted row at the restored states' lowest layer and position.
  Rows of many cells × all noise samples share each forward. Restorations that provably change nothing take
  the corrupted probability without running: the clean state equals the corrupted one bit for
  bit (positions before the first corrupted token), or the state is an MLP/attention output of
  the last layer at a position before the last.
- ``"full"`` — any architecture: full forwards with plain hooks, many cells × samples per forward.

``"auto"`` takes ``cached`` where the layer runner supports the model, else ``full``.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from seqpatch.interventions.restart import RestartableRun, Write, choose_method
from seqpatch.interventions.sites import InterventionError, hooked, resolve_indices
from seqpatch.programs import derive_seed

if TYPE_CHECKING:
    from collections.abc import Callable

    from seqpatch.models import ModelHandle, Site

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("resid", "mlp", "attn")
KIND_SITES: dict[str, Site] = {"resid": "resid_pre", "mlp": "mlp_out", "attn": "attn_out"}
ROME_NOISE_SCALE = 3.0  # ν: σ = ν · std(embeddings)
ROME_SAMPLES = 10
ROME_WINDOW, ROME_DEPTH = 10, 48  # w = 10 restored layers on GPT-2 XL's 48
Method = Literal["auto", "cached", "full"]
State = tuple[str, int, int]  # (site, layer, position) of one restored state


def default_window(n_layers: int) -> int:
    """ROME's window scaled to the model's depth: ``max(1, round(10 · n_layers / 48))``."""
    return max(1, round(ROME_WINDOW * n_layers / ROME_DEPTH))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers a window of ``window`` centred on ``layer`` restores (ROME's rule)."""
    return range(max(0, layer - window // 2), min(n_layers, layer + math.ceil(window / 2)))


def embedding_std(handle: ModelHandle, token_ids: Sequence[int] | None = None) -> float:
    """Standard deviation (Bessel-corrected, float64) over all entries of the input embeddings.

    ``token_ids=None``: every row of the embedding matrix (this module's default basis for σ, a
    property of the model alone). Otherwise the rows of the given tokens, repeats counted (ROME:
    the subject tokens of its whole dataset). Rows are taken as the embedding module outputs
    them: times its ``embed_scale`` where it has one (Gemma's ``sqrt(d_model)``), since that
    output is what the noise is added to.
    """
    module = handle.submodule(handle.adapter.embed)
    weight = module.weight.detach()
    if token_ids is not None:
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=weight.device)
        if ids.numel() == 0:
            raise InterventionError("embedding_std needs at least one token id")
        weight = weight[ids]
    scale = getattr(module, "embed_scale", None)
    factor = abs(float(scale)) if scale is not None else 1.0
    return float(weight.double().std()) * factor


def noise_seeds(seed: int, key: str, n_samples: int) -> list[int]:
    """One seed per noise sample of the program ``key`` (a pure function of its arguments)."""
    return [derive_seed("tracing-noise", seed, key, s) for s in range(n_samples)]


def sample_noise(seed: int, n_positions: int, d_model: int) -> torch.Tensor:
    """Standard normal ``ε`` ``[n_positions, d_model]`` float32 on CPU from ``seed`` alone."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((n_positions, d_model), generator=generator, dtype=torch.float32)


@dataclass(frozen=True)
class Corruption:
    """What is corrupted: token positions, noise scale ``sigma`` and one seed per noise sample.

    The corrupted embedding of sample ``s`` at ``positions[i]`` is
    ``emb + (sigma · sample_noise(seeds[s], len(positions), d)[i])`` cast to the model's dtype.
    """

    positions: tuple[int, ...]
    seeds: tuple[int, ...]
    sigma: float

    def __post_init__(self) -> None:
        if not self.positions:
            raise InterventionError("a corruption needs at least one token position")
        if not self.seeds:
            raise InterventionError("a corruption needs at least one noise sample (seed)")
        if len(set(self.positions)) != len(self.positions):
            raise InterventionError(f"corrupted positions repeat: {list(self.positions)}")

    @property
    def n_samples(self) -> int:
        return len(self.seeds)

    def noise(self, d_model: int) -> torch.Tensor:
        """``sigma · ε`` for every sample: ``[n_samples, len(positions), d_model]`` float32."""
        return self.sigma * torch.stack(
            [sample_noise(s, len(self.positions), d_model) for s in self.seeds]
        )


@dataclass
class TraceResult:
    """One program's causal trace; probabilities are of the target token over the full vocabulary.

    ``restored[k, li, t, s]``: noise sample ``s`` with kind ``kinds[k]`` restored at layer
    ``layers[li]`` and position ``t``.
    """

    kinds: tuple[str, ...]
    layers: list[int]
    window: int
    clean_prob: float
    corrupted_probs: np.ndarray  # [n_samples]
    restored: np.ndarray  # [kinds, layers, positions, n_samples]

    @property
    def corrupted_prob(self) -> float:
        return float(self.corrupted_probs.mean())

    @property
    def restored_prob(self) -> np.ndarray:
        """``P_restored`` ``[kinds, layers, positions]``: mean over the noise samples."""
        return self.restored.mean(-1)

    @property
    def indirect_effect(self) -> np.ndarray:
        """``IE = P_restored − P_corrupted`` ``[kinds, layers, positions]``."""
        return self.restored_prob - self.corrupted_prob


@dataclass
class TraceStats:
    """What a trace computed: restored cells × samples, how many were skipped, forwards, work.

    ``token_layers`` counts one decoder layer applied to one position of one row;
    ``naive_token_layers`` is what one full forward per (cell, sample) would cost.
    """

    method: str = ""
    rows: int = 0
    skipped_rows: int = 0
    forwards: int = 0
    token_layers: int = 0
    naive_token_layers: int = 0


@dataclass
class _Cell:
    kind: str
    kind_index: int
    layer_index: int
    position: int
    states: list[tuple[str, int]]  # (site, layer) restored at ``position``
    samples: list[int] = field(default_factory=list)  # samples that must run

    @property
    def start_layer(self) -> int:
        return min(layer for _, layer in self.states)


def trace(
    handle: ModelHandle,
    input_ids: Sequence[int] | torch.Tensor,
    target: int,
    corruption: Corruption,
    *,
    kinds: Sequence[str] = KINDS,
    layers: Sequence[int] | None = None,
    window: int | None = None,
    method: Method = "auto",
    max_rows: int = 256,
    min_rows: int = 64,
    skip_noops: bool = True,
    stats: list[TraceStats] | None = None,
) -> TraceResult:
    """Causal trace of one program: every (kind, layer, position) restoration, every noise sample.

    Args:
        input_ids: the program's token ids ``[T]``, unpadded.
        target: token id whose probability is read at the last position.
        corruption: positions, σ and noise seeds.
        kinds: restoration kinds, from ``KINDS``.
        layers: grid layers (default all); a window kind centres its window on each.
        window: layers per MLP/attention window (default ``default_window(L)``).
        method: ``auto``, ``cached`` (compute floor, Llama-like models) or ``full`` (any model).
        max_rows: most restored rows in one forward (memory bound, in full-length rows).
        min_rows: rows of neighbouring positions that share a forward (fewer, larger forwards).
        skip_noops: take the corrupted probability for restorations that provably change nothing.
        stats: if given, a ``TraceStats`` is appended.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).to(handle.device)
    length = ids.numel()
    if handle.remote:
        raise InterventionError("tracing runs locally; load the model with remote=False")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise InterventionError(f"unknown restoration kind(s) {unknown}; use {', '.join(KINDS)}")
    bad = [p for p in corruption.positions if not 0 <= p < length]
    if bad:
        raise InterventionError(f"corrupted position {bad[0]} is outside the {length} tokens")
    vocab = handle.hf_model.config.get_text_config().vocab_size
    if not 0 <= int(target) < vocab:
        raise InterventionError(f"target token {target} is not in [0, {vocab})")
    n_layers = handle.n_layers
    layer_idx = resolve_indices(layers, n_layers, "layer")
    window = default_window(n_layers) if window is None else int(window)
    if window < 1:
        raise InterventionError(f"window must be >= 1, got {window}")
    method = choose_method(handle, method)  # type: ignore[assignment]
    counters = TraceStats(method=method)
    with torch.no_grad():
        engine = _Engine(handle, ids, int(target), corruption, method == "cached", counters)
    n = corruption.n_samples
    restored = np.empty((len(kinds), len(layer_idx), length, n))
    cells: list[_Cell] = []
    for ki, kind in enumerate(kinds):
        for li, layer in enumerate(layer_idx):
            for t in range(length):
                states = _states(kind, layer, t, length, window, n_layers)
                cell = _Cell(kind, ki, li, t, states)
                counters.rows += n
                counters.naive_token_layers += n * n_layers * length
                if skip_noops:
                    same = engine.unchanged(states, t)
                else:
                    same = np.zeros(n, dtype=bool) if states else np.ones(n, dtype=bool)
                restored[ki, li, t] = engine.corrupted_probs
                cell.samples = [s for s in range(n) if not same[s]]
                counters.skipped_rows += n - len(cell.samples)
                if cell.samples:
                    cells.append(cell)
    with torch.no_grad():
        engine.run_cells(cells, restored, max_rows, min_rows)
    if stats is not None:
        stats.append(counters)
    return TraceResult(
        tuple(kinds),
        layer_idx,
        window,
        engine.clean_prob,
        engine.corrupted_probs.copy(),
        restored,
    )


def _states(
    kind: str, layer: int, position: int, length: int, window: int, n_layers: int
) -> list[tuple[str, int]]:
    """The (site, layer) states a cell restores at ``position``, without those that cannot reach
    the last position (an MLP/attention output of the last layer at an earlier position)."""
    site = KIND_SITES[kind]
    if kind == "resid":
        return [(site, layer)]
    last_layer = n_layers - 1
    return [
        (site, j)
        for j in window_layers(layer, window, n_layers)
        if not (j == last_layer and position < length - 1)
    ]


def restore_probs(
    handle: ModelHandle,
    input_ids: Sequence[int] | torch.Tensor,
    target: int,
    corruption: Corruption | None,
    states: Sequence[State] = (),
) -> np.ndarray:
    """Target probability per noise sample ``[n_samples]`` with any set of states restored.

    One full forward with plain hooks: ``states`` lists ``(site, layer, position)`` (site
    ``resid_pre``, ``attn_out`` or ``mlp_out``) set to their clean values in every corrupted row.
    ``corruption=None`` runs the clean program (one row). This is the reference path: restoring
    nothing gives ``P_corrupted``, restoring everything the clean probability.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).to(handle.device)
    with torch.no_grad():
        if corruption is None:
            logits = handle.hf_model(input_ids=ids[None], logits_to_keep=1).logits[:, -1]
            return _probs(logits, target).cpu().numpy()
        clean = _clean_sites(handle, ids, {(site, layer) for site, layer, _ in states})
        n = corruption.n_samples
        by_key: dict[tuple[str, int], list[int]] = defaultdict(list)
        for site, layer, pos in states:
            by_key[(site, layer)].append(pos)
        hooks: dict[tuple[Site, int], Callable] = {}
        rows = torch.arange(n, device=handle.device)
        for (site, layer), positions in by_key.items():
            pos = torch.tensor(positions, device=handle.device)
            value = clean[(site, layer)][pos]
            hooks[(site, layer)] = _restorer(
                rows.repeat_interleave(len(positions)), pos.repeat(n), value.repeat(n, 1)
            )
        noise = corruption.noise(handle.d_model)
        with _corrupted(handle, corruption.positions, noise, rows), hooked(handle, hooks):
            logits = handle.hf_model(input_ids=ids.expand(n, -1), logits_to_keep=1).logits
        return _probs(logits[:, -1], target).cpu().numpy()


def _probs(logits: torch.Tensor, target: int) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)[:, target].exp().double()


def _clean_sites(
    handle: ModelHandle, ids: torch.Tensor, keys: set[tuple[str, int]]
) -> dict[tuple[str, int], torch.Tensor]:
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def keep(key: tuple[str, int]) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            captured[key] = x[0].detach()

        return fn

    with hooked(handle, {key: keep(key) for key in keys}):  # type: ignore[misc]
        handle.hf_model(input_ids=ids[None], logits_to_keep=1)
    return captured


@contextlib.contextmanager
def _corrupted(
    handle: ModelHandle, positions: Sequence[int], noise: torch.Tensor, rows: torch.Tensor
):
    """Add ``noise[rows[i]]`` (``[samples, P, d]``) to embedding row ``i`` at ``positions``.

    ``rows[i] < 0`` leaves batch row ``i`` clean.
    """
    pos = torch.tensor(list(positions), device=handle.device)
    keep = (rows >= 0).nonzero().squeeze(-1)
    added = noise.to(handle.device)[rows[keep]]

    def add_noise(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[keep[:, None], pos[None, :]] += added.to(output.dtype)
        return output

    hook = handle.submodule(handle.adapter.embed).register_forward_hook(add_noise)
    try:
        yield
    finally:
        hook.remove()


def _restorer(
    rows: torch.Tensor, positions: torch.Tensor, value: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A site hook writing ``value[i]`` at ``(rows[i], positions[i])`` (the reference path)."""

    def restore(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[rows, positions] = value.to(x.dtype)
        return x

    return restore


class _Engine:
    """One program's base run — clean row 0, corrupted rows ``1..n`` — as a ``RestartableRun``,
    and its restored cells as restarts whose rows restore clean values into corrupted rows."""

    SITES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")

    def __init__(
        self,
        handle: ModelHandle,
        ids: torch.Tensor,
        target: int,
        corruption: Corruption,
        cached: bool,
        counters: TraceStats,
    ) -> None:
        self.handle, self.target = handle, target
        self.length = ids.numel()
        self.corruption, self.counters = corruption, counters
        n = corruption.n_samples
        noise = corruption.noise(handle.d_model).to(handle.device)
        positions = corruption.positions

        def perturb(rows: torch.Tensor) -> contextlib.AbstractContextManager:
            return _corrupted(handle, positions, noise, rows - 1)  # base row 0 is clean

        self.run = RestartableRun(
            handle,
            ids.expand(n + 1, -1),
            method="cached" if cached else "full",
            perturb=perturb,
            capture=[(site, layer) for site in self.SITES for layer in range(handle.n_layers)],
            floor_layers=range(handle.n_layers),
            counters=counters,
        )
        self.acts = self.run.acts
        probs = _probs(self.run.logits, self.target).cpu().numpy()
        self.clean_prob = float(probs[0])
        self.corrupted_probs = probs[1:]
        self.counters.token_layers += (n + 1) * handle.n_layers * self.length

    def unchanged(self, states: list[tuple[str, int]], position: int) -> np.ndarray:
        """``[n_samples]``: whether restoring ``states`` at ``position`` writes, in that sample,
        exactly the values its corrupted run already has (then the result is ``P_corrupted``)."""
        n = self.corruption.n_samples
        same = torch.ones(n, dtype=torch.bool, device=self.handle.device)
        for site, layer in states:
            x = self.acts[(site, layer)][:, position]
            same &= (x[1:] == x[0]).all(-1)
        return same.cpu().numpy()

    def run_cells(self, cells: list[_Cell], out: np.ndarray, max_rows: int, min_rows: int) -> None:
        if self.run.method == "full":
            rows = [(cell, s) for cell in cells for s in cell.samples]
            for begin in range(0, len(rows), max(1, max_rows)):
                self._restart(rows[begin : begin + max(1, max_rows)], out, max_rows)
            return
        # one kind per forward: a block of attention or MLP restorations restarts at the floor
        by_start: dict[tuple[int, str], list[_Cell]] = defaultdict(list)
        for cell in cells:
            by_start[(cell.start_layer, cell.kind)].append(cell)
        for _, group in sorted(by_start.items()):
            group.sort(key=lambda cell: cell.position)
            block: list[tuple[_Cell, int]] = []
            for cell in group:
                rows = [(cell, s) for s in cell.samples]
                if block and len(block) + len(rows) > max(min_rows, 1):
                    self._restart(block, out, max_rows)
                    block = []
                block += rows
            if block:
                self._restart(block, out, max_rows)

    def _restart(self, rows: list[tuple[_Cell, int]], out: np.ndarray, max_rows: int) -> None:
        """Restart the corrupted rows of ``rows``' samples with their cells' states restored."""
        device = self.handle.device
        wanted: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
        for r, (cell, _) in enumerate(rows):
            for site, layer in cell.states:
                wanted[(site, layer)].append((r, cell.position))
        writes = []
        for (site, layer), where in wanted.items():
            at = torch.tensor([w[0] for w in where], device=device)
            pos = torch.tensor([w[1] for w in where], device=device)
            writes.append(Write(site, layer, at, pos, self.acts[(site, layer)][0, pos]))
        base_rows = torch.tensor([s + 1 for _, s in rows], device=device)  # row 0 is clean
        start = 0 if self.run.method == "full" else min(cell.position for cell, _ in rows)
        logits = self.run.restart(base_rows, writes, start, max_rows=max_rows)
        probs = _probs(logits, self.target).cpu().numpy()
        for (cell, s), p in zip(rows, probs, strict=True):
            out[cell.kind_index, cell.layer_index, cell.position, s] = p
