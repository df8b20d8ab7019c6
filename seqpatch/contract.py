"""What a stage hands the store: ``Built`` (rows, statistics, files) and ``Artifact`` (one file).

These types sit below both the stages and the store so that neither imports the other for
them: a stage returns a ``Built``, the store writes its rows and artifacts. They are re-exported
by ``seqpatch.stages.base``, where stage authors look for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

Artifact = bytes | str | Callable[[Path], None]
"""A file beside a stage's rows: its bytes, its text, or a function that writes it to a path."""


@dataclass(frozen=True)
class Built:
    """What ``build``/``build_shard`` return: rows, statistics for provenance, and files."""

    rows: Dataset
    stats: Mapping[str, Any] = field(default_factory=dict)
    artifacts: Mapping[str, Artifact] = field(default_factory=dict)
