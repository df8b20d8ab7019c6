"""What a restart writes: ``Write`` (a setter carried by rows) and the site hooks that apply it.

``RestartableRun`` (``seqpatch.interventions.restart``) restarts rows that each carry writes; this
module holds the write itself, the positions a restarted forward holds (``Frame``) and how a
write becomes a site hook on a tensor of those positions — including the last layer trimmed to
its last position, where writes at other positions cannot reach the logits and are dropped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True)
class Write:
    """One setter carried by rows: ``value[i]`` goes to ``(rows[i], pos[i])`` of ``site`` at
    ``layer`` (and head ``heads[i]``); ``rows`` index the restarted batch, ``pos`` are positions
    of the prompt (absolute). Differentiable in ``value`` (DAS trains through it). ``add``: the
    value is added to the tensor instead of replacing it (attribution adds a zero that carries
    the gradient, so the forward's values stay the restarted run's own, bit for bit)."""

    site: str
    layer: int
    rows: torch.Tensor
    pos: torch.Tensor
    value: torch.Tensor
    heads: torch.Tensor | None = None
    add: bool = False

    @property
    def entry(self) -> int:
        """The layer a restart at this write begins with (``resid_post[l]`` is layer ``l+1``'s
        input)."""
        return self.layer + 1 if self.site == "resid_post" else self.layer

    def select(self, lo: int, hi: int) -> Write | None:
        """The part of this write on restarted rows ``lo..hi-1``, renumbered from 0."""
        keep = (self.rows >= lo) & (self.rows < hi)
        if not bool(keep.any()):
            return None
        heads = None if self.heads is None else self.heads[keep]
        return replace(
            self, rows=self.rows[keep] - lo, pos=self.pos[keep], value=self.value[keep], heads=heads
        )


@dataclass(frozen=True)
class Frame:
    """Which positions a restarted forward holds: ``start..start+width-1``, or (``gather``) one
    position per row."""

    start: int
    width: int
    gather: torch.Tensor | None = None


def setter(write: Write, frame: Frame) -> Callable[[torch.Tensor], torch.Tensor]:
    """A site hook applying ``write`` to a tensor of ``frame``'s positions; on the last layer
    trimmed to its last position (``last_only``), writes at other positions are dropped."""

    def put(x: torch.Tensor) -> torch.Tensor:
        if frame.gather is not None:
            ok, cols = write.pos == frame.gather[write.rows], torch.zeros_like(write.pos)
        elif x.shape[1] == frame.width:
            cols = write.pos - frame.start
            ok = cols >= 0
        else:  # trimmed to the last position
            ok, cols = write.pos == frame.start + frame.width - 1, torch.zeros_like(write.pos)
        x = x.clone()
        index = (write.rows[ok], cols[ok])
        if write.heads is not None:
            index = (*index, write.heads[ok])
        value = write.value[ok].to(x.dtype)
        x[index] = x[index] + value if write.add else value
        return x

    return put


def write_hooks(writes: Iterable[Write], frame: Frame) -> dict[tuple[Any, int], Callable]:
    """One hook per (site, layer), applying every write there in order."""
    grouped: dict[tuple[str, int], list[Write]] = defaultdict(list)
    for write in writes:
        grouped[(write.site, write.layer)].append(write)
    hooks: dict[tuple[Any, int], Callable] = {}
    for key, group in grouped.items():
        setters = [setter(w, frame) for w in group]

        def apply(x: torch.Tensor, setters: list[Callable] = setters) -> torch.Tensor:
            for setter in setters:
                x = setter(x)
            return x

        hooks[key] = apply
    return hooks


def rows_where(write: Write, keep: torch.Tensor) -> Write | None:
    """The part of ``write`` where ``keep`` (one flag per written element), or ``None``."""
    if not bool(keep.any()):
        return None
    heads = None if write.heads is None else write.heads[keep]
    return replace(
        write, rows=write.rows[keep], pos=write.pos[keep], value=write.value[keep], heads=heads
    )


def rows_of(write: Write, index: torch.Tensor) -> Write | None:
    """The part of ``write`` on the rows ``index`` maps to ``>= 0``, renumbered by it."""
    part = rows_where(write, index[write.rows] >= 0)
    return None if part is None else replace(part, rows=index[part.rows])


def renumber(write: Write, rows: torch.Tensor) -> Write:
    """``write`` on a subset's rows (``0..len(rows)-1``) back on the batch's: ``rows[i]``."""
    return replace(write, rows=rows[write.rows])
