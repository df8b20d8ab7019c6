"""Shared pieces of the interventions: errors, site names, index resolution, hook capture."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from seqpatch.models import ModelHandle, Site

SWEEP_SITES: tuple[Site, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")
# Execution order inside one decoder layer: nnsight must read modules in this order.
SITE_ORDER: tuple[Site, ...] = ("resid_pre", "head", "attn_out", "mlp_out", "resid_post")


class InterventionError(SeqpatchError, ValueError):
    """An intervention was asked for something impossible; the message says what to change."""


def check_sites(sites: Iterable[str], allowed: Sequence[str]) -> list[Site]:
    sites = list(sites)
    unknown = [s for s in sites if s not in allowed]
    if unknown or not sites:
        raise InterventionError(
            f"unknown or missing site(s) {unknown or sites!r}; choose from {', '.join(allowed)}"
        )
    return sites  # type: ignore[return-value]


def resolve_indices(indices: Iterable[int] | None, size: int, what: str) -> list[int]:
    """``None`` → ``0..size-1``; negative indices count from the end; out of range raises."""
    if indices is None:
        return list(range(size))
    resolved = []
    for i in indices:
        i = int(i)
        if not -size <= i < size:
            raise InterventionError(f"{what} {i} is out of range for size {size}")
        resolved.append(i % size)
    return resolved


@contextmanager
def hooked(handle: ModelHandle, hooks: dict[tuple[Site, int], Callable]) -> Iterator[None]:
    """Plain torch hooks on site modules for the duration of the block (removed even on error)."""
    handles = [handle.module(site, layer).hook(fn) for (site, layer), fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_sites(
    handle: ModelHandle, input_ids: torch.Tensor, sites: Iterable[Site], layers: Iterable[int]
) -> tuple[dict[tuple[Site, int], torch.Tensor], torch.Tensor]:
    """One plain forward of unpadded ``input_ids`` ``[B, T]``; site tensors by (site, layer) and
    the next-token logits at the last position ``[B, vocab]``."""
    captured: dict[tuple[Site, int], torch.Tensor] = {}

    def keep(key: tuple[Site, int]) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            captured[key] = x.detach()

        return fn

    keys = [(site, layer) for site in sites for layer in layers]
    with torch.no_grad(), hooked(handle, {key: keep(key) for key in keys}):
        logits = handle.hf_model(input_ids=input_ids, logits_to_keep=1).logits[:, -1]
    return captured, logits


def as_id_rows(ids: Any, what: str) -> list[torch.Tensor]:
    """Token ids as a list of 1-D long tensors: from ``[n, T]`` or a sequence of rows."""
    if isinstance(ids, torch.Tensor):
        if ids.ndim != 2:
            raise InterventionError(
                f"{what} must be [n_pairs, tokens], got shape {list(ids.shape)}"
            )
        return list(ids.long())
    rows = [torch.as_tensor(row, dtype=torch.long) for row in ids]
    if any(row.ndim != 1 or row.numel() == 0 for row in rows):
        raise InterventionError(f"{what} must be non-empty 1-D rows of token ids (no padding)")
    return rows
