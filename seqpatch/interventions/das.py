"""Distributed alignment search (DAS): find the subspace of one activation that carries a variable.

Geiger, Wu, Icard, Potts, Goodman (2024), "Finding Alignments Between Interpretable Causal
Variables and Distributed Neural Representations"; Wu et al. (2023), "Interpretability at Scale".

Conventions (those of ``sweep``): the *source* (program A) donates, the *target* (program B) is
run and scored. At one cell ``(site, layer, position)`` an interchange intervention with an
orthonormal basis ``W`` (``[k, d]``, orthonormal rows) replaces the target's activation ``b``
with ``b + (s - b) Wᵀ W``: the component of ``b`` inside ``span(W)`` becomes the source's, the
rest stays the target's. Any complete basis (``k = d``) gives the full-vector patch.

The causal variable is the value the program's answer holds, so the intervention's
counterfactual label is the *source's* answer (``answer_index_a`` among the candidates).
Interchange-intervention accuracy (IIA) is the fraction of pairs whose argmax over the candidate
logits after the intervention equals that label.

Training (``train_bases``): ``W`` is the orthogonal parametrization
(``torch.nn.utils.parametrizations.orthogonal``) of a ``[d, k]`` matrix (orthonormal columns,
stored transposed), initialised from a seeded Gaussian; the loss is the cross-entropy of the
candidate logits toward the label; Adam; the model is frozen (no weight receives a gradient).
Each basis keeps its epoch with the best validation IIA (ties: lower validation loss). Several
bases (different ``k``, or different labels — the shuffled-label control) train together on the
same batches, sharing forwards of at most ``ROWS_PER_FORWARD`` rows, each with its own parameters
and optimizer state, so joint training equals separate training on the same batches.

What DAS trains against is an ``Interchange``: the base and source activations of ``n`` pairs
at one cell, and a differentiable map from a value written into that cell to the target's
candidate logits. ``SiteInterchange`` is that map for a loaded model (it restarts at the cell's
layer and position from the target's clean run, as the sweep's compute-floor path does); tests
pass small synthetic ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from seqpatch.interventions.restart import RestartableRun, Write
from seqpatch.interventions.sites import (
    SWEEP_SITES,
    InterventionError,
    check_sites,
)
from seqpatch.models.sites import site_info

if TYPE_CHECKING:
    from seqpatch.models import ModelHandle, Site


class Interchange(Protocol):
    """One cell of ``n`` pairs: what DAS swaps and how the target responds.

    ``base`` and ``source`` are ``[n, d]`` (the target's and the source's activation at the
    cell); ``logits(rows, value)`` is the target's candidate logits ``[m, C]`` for pairs
    ``rows`` (``[m]`` indices) when the cell holds ``value`` (``[m, d]``), differentiable in
    ``value``.
    """

    base: torch.Tensor
    source: torch.Tensor

    def logits(self, rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor: ...


def swap(base: torch.Tensor, source: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``base + (source - base) Wᵀ W``: the span of ``basis`` (``[k, d]``) taken from ``source``."""
    return base + ((source - base) @ basis.T) @ basis


def random_basis(d: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random orthonormal basis ``[k, d]`` (QR of a Gaussian, signs fixed)."""
    gauss = torch.randn(d, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r))[None]
    return q.T.float().contiguous()


def full_basis(d: int) -> torch.Tensor:
    """The identity ``[d, d]``: swapping its span is the full-vector patch."""
    return torch.eye(d)


@torch.no_grad()
def predictions(
    model: Interchange, basis: torch.Tensor, rows: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Argmax candidate ``[m]`` of each pair in ``rows`` after the interchange with ``basis``."""
    out = []
    basis = basis.to(model.base)
    for chunk in rows.split(batch_size):
        value = swap(model.base[chunk], model.source[chunk], basis)
        out.append(model.logits(chunk, value).argmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def interchange_accuracy(
    model: Interchange,
    basis: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
) -> float:
    """IIA: the fraction of ``rows`` whose prediction after the interchange equals ``labels[rows]``."""
    if rows.numel() == 0:
        return math.nan
    predicted = predictions(model, basis, rows, batch_size)
    return float((predicted == labels[rows].cpu()).float().mean())


ROWS_PER_FORWARD = 64  # training rows per forward: Gemma-3's 12 bases × 16 pairs took 8 GB


@dataclass(frozen=True)
class TrainConfig:
    """How each basis is trained (defaults measured on the organism: see ``docs/das.md``)."""

    epochs: int = 20
    lr: float = 1e-2  # Adam; d ≤ a few hundred converges in a few hundred steps
    batch_size: int = 16  # pairs per step (each basis sees the same batches)
    seed: int = 0


@dataclass(frozen=True)
class BasisSpec:
    """One basis to train: its dimension, labels ``[n]`` (per pair) and initialisation seed."""

    k: int
    labels: torch.Tensor
    seed: int


@dataclass(frozen=True)
class Trained:
    """A trained basis ``[k, d]`` with its validation IIA and loss at the kept epoch."""

    basis: torch.Tensor
    val_iia: float
    val_loss: float
    best_epoch: int  # 0: the initialisation was never beaten
    steps: int


class _Basis(nn.Module):
    """``[d, k]`` with orthonormal columns via ``parametrizations.orthogonal``; ``rows()`` is ``[k, d]``."""

    def __init__(self, d: int, k: int, generator: torch.Generator) -> None:
        super().__init__()
        self.proj = nn.Linear(k, d, bias=False)  # weight [d, k]
        with torch.no_grad():
            self.proj.weight.copy_(random_basis(d, k, generator).T)
        # The parametrization completes the k columns to a d × d orthogonal base with the
        # global RNG; the gradient's coordinates, and so training, depend on that completion.
        # Seeded from the basis's own generator, a basis trains the same in any process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            nn.utils.parametrizations.orthogonal(self.proj)

    def rows(self) -> torch.Tensor:
        return self.proj.weight.T


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter of ``module`` for the block (then restore)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def train_bases(
    model: Interchange,
    specs: Sequence[BasisSpec],
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    cfg: TrainConfig = TrainConfig(),
    rows_per_forward: int = ROWS_PER_FORWARD,
) -> list[Trained]:
    """Train one basis per spec on ``train_rows``, keep each one's best epoch on ``val_rows``.

    Every step runs each spec's interchange of the same batch, bases grouped into forwards of
    at most ``rows_per_forward`` rows (at least one basis each), each group's loss
    back-propagated before the next: a basis's gradient comes from its own loss term alone, so
    the grouping bounds memory (the activations kept for the backward pass) and changes results
    only by float rounding (rows of one forward share matmuls). Labels of a spec may be anything
    per pair (the shuffled control permutes them).
    """
    if not specs:
        return []
    if rows_per_forward < 1:
        raise InterventionError(f"rows_per_forward must be >= 1, got {rows_per_forward}")
    d = model.base.shape[-1]
    for spec in specs:
        if not 1 <= spec.k <= d:
            raise InterventionError(f"subspace dimension k={spec.k} must be in 1..{d}")
    bases = [_Basis(d, spec.k, torch.Generator().manual_seed(spec.seed)) for spec in specs]
    bases = [b.to(model.base.device) for b in bases]
    optimizers = [torch.optim.Adam(b.parameters(), lr=cfg.lr) for b in bases]
    order = torch.Generator().manual_seed(cfg.seed)
    best = [
        _evaluate(model, b.rows().detach(), spec.labels, val_rows)
        for b, spec in zip(bases, specs, strict=True)
    ]
    kept = [(b.rows().detach().clone(), 0) for b in bases]
    steps = 0
    for epoch in range(1, cfg.epochs + 1):
        perm = train_rows[torch.randperm(len(train_rows), generator=order)]
        for batch in perm.split(cfg.batch_size):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            base, source = model.base[batch], model.source[batch]
            group = max(1, rows_per_forward // len(batch))
            for first in range(0, len(bases), group):
                chosen = range(first, min(first + group, len(bases)))
                values = torch.cat([swap(base, source, bases[j].rows()) for j in chosen])
                logits = model.logits(batch.repeat(len(chosen)), values).float()
                logits = logits.view(len(chosen), len(batch), -1)
                loss = sum(
                    nn.functional.cross_entropy(logits[i], specs[j].labels[batch].to(logits.device))
                    for i, j in enumerate(chosen)
                )
                loss.backward()  # type: ignore[union-attr]
            for opt in optimizers:
                opt.step()
            steps += 1
        for j, (b, spec) in enumerate(zip(bases, specs, strict=True)):
            score = _evaluate(model, b.rows().detach(), spec.labels, val_rows)
            if (score[0], -score[1]) > (best[j][0], -best[j][1]):
                best[j] = score
                kept[j] = (b.rows().detach().clone(), epoch)
    return [
        Trained(basis.cpu(), iia, loss, epoch, steps)
        for (basis, epoch), (iia, loss) in zip(kept, best, strict=True)
    ]


@torch.no_grad()
def _evaluate(
    model: Interchange, basis: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor
) -> tuple[float, float]:
    """(IIA, mean cross-entropy) of ``basis`` on ``rows`` toward ``labels``."""
    if rows.numel() == 0:
        return math.nan, math.nan
    hits, loss = 0.0, 0.0
    for chunk in rows.split(256):
        value = swap(model.base[chunk], model.source[chunk], basis)
        logits = model.logits(chunk, value).float()
        target = labels[chunk].to(logits.device)
        hits += float((logits.argmax(-1) == target).sum())
        loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    return hits / len(rows), loss / len(rows)


class SiteInterchange:
    """The ``Interchange`` of one cell ``(site, layer, pos)`` of a loaded model, ``n`` pairs.

    ``src_ids``/``tgt_ids`` are ``[n, T]`` (one token length: positions must mean the same token
    in every pair); ``candidate_ids`` ``[C]`` or ``[n, C]``. ``logits`` restarts the targets'
    ``RestartableRun`` with the written value: at the compute floor where the layer runner
    supports the model (only layers ≥ ``layer`` at positions ≥ ``pos``, against the target's
    clean keys/values — the only part of the run the intervention can change), else full
    forwards with a plain hook. Construct it under ``torch.no_grad`` or not: the clean run never
    tracks grads.
    """

    def __init__(
        self,
        handle: ModelHandle,
        site: Site,
        layer: int,
        pos: int,
        src_ids: torch.Tensor,
        tgt_ids: torch.Tensor,
        candidate_ids: Sequence[int] | torch.Tensor,
        method: str = "auto",
    ) -> None:
        check_sites([site], SWEEP_SITES)
        if src_ids.shape != tgt_ids.shape or src_ids.ndim != 2:
            raise InterventionError(
                f"src_ids and tgt_ids must be [n, T] of one shape, got {list(src_ids.shape)} "
                f"and {list(tgt_ids.shape)}"
            )
        n, length = tgt_ids.shape
        if not 0 <= pos < length:
            raise InterventionError(f"position {pos} is out of range for {length} tokens")
        if not 0 <= layer < handle.n_layers:
            raise InterventionError(f"layer {layer} is out of range for {handle.n_layers} layers")
        self.handle, self.site, self.layer, self.pos = handle, site, layer, pos
        device = handle.device
        self.tgt = tgt_ids.to(device)
        cand = torch.as_tensor(candidate_ids, dtype=torch.long)
        self.cand = (cand.expand(n, -1) if cand.ndim == 1 else cand).to(device)
        # Sources and targets in one base run (the sweep's layout): the cell is captured from
        # both, and only the targets' states are kept for restarts.
        self.run = RestartableRun(
            handle,
            torch.cat([src_ids.to(device), self.tgt]),
            method=method,
            capture=[(site, layer)],
            floor_layers=[layer] if site_info(site).after_attention else (),
            restartable=slice(n, None),
        )
        acts = self.run.acts.pop((site, layer))[:, pos].float()
        self.source, self.base = acts[:n].contiguous(), acts[n:].contiguous()
        self.method = self.run.method

    def logits(self, rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        rows = rows.to(self.handle.device)
        value = value.to(self.handle.dtype)
        at = torch.arange(len(rows), device=rows.device)
        write = Write(self.site, self.layer, at, torch.full_like(at, self.pos), value)
        start = self.pos if self.method == "cached" else 0
        with frozen(self.handle.hf_model):
            return self.run.restart(rows, [write], start, columns=self.cand[rows])
