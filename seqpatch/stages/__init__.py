"""The pipeline's stages: one module per stage, registered here by name.

Every stage module exposes ``SCHEMA_VERSION: int``, a frozen dataclass config, ``FEATURES`` (or a
function of the config returning them) and ``build(parent, cfg, ...) -> Dataset | Built``. Stage
code never writes files: ``build_stage`` hands it to the store, which versions and saves the rows.

To add a stage: write ``seqpatch/stages/<name>.py`` and add one ``StageInfo`` to ``STAGES`` (in
pipeline order). Modules are imported only when a stage is used, so the registry stays cheap.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    from datasets import Dataset

    from seqpatch.store import StageRef, Store


@dataclass(frozen=True)
class StageInfo:
    """How to find a stage and how a user builds it (``example`` is shown in error messages)."""

    name: str
    module: str
    summary: str
    example: str = ""


STAGES: dict[str, StageInfo] = {
    info.name: info
    for info in (
        StageInfo(
            "programs",
            "seqpatch.stages.programs",
            "sampled programs of one family, with answers and intermediates",
            "--family arithmetic --seq-lens 1-10 --n-per-len 200 --seed 0",
        ),
        StageInfo(
            "benchmark",
            "seqpatch.stages.benchmark",
            "greedy answers, answer log-probabilities and ranks of each model on each program",
            "--models builtin --programs latest",
        ),
        StageInfo(
            "pairs",
            "seqpatch.stages.pairs",
            "counterfactual program pairs that the model answers correctly",
            "--model builtin --seq-len 8 --divergence-index all --n-pairs 2000",
        ),
        StageInfo(
            "activations",
            "seqpatch.stages.activations",
            "both programs' cached activations for every pair",
            "--sites resid_pre,mlp_out --dtype float16",
        ),
        StageInfo(
            "patching",
            "seqpatch.stages.patching",
            "effect of patching A into B at every (layer, position), per site",
            "--sites resid_pre",
        ),
    )
}


def get_stage(name: str) -> ModuleType:
    """The module implementing stage ``name``."""
    try:
        info = STAGES[name]
    except KeyError:
        raise SeqpatchError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}") from None
    return importlib.import_module(info.module)


def build_command(stage: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The CLI command that builds ``stage`` (with ``--data-dir`` unless it is the default)."""
    from seqpatch.store import resolve_data_dir

    info = STAGES.get(stage)
    parts = ["seqpatch build", stage]
    if info is not None and info.example:
        parts.append(info.example)
    if data_dir is not None and Path(data_dir) != resolve_data_dir(None):
        parts.append(f"--data-dir {data_dir}")
    return " ".join(parts)


def build_stage(
    stage: str,
    cfg: Any,
    *,
    store: Store | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    parent: StageRef | tuple[Dataset, Mapping[str, Any]] | None = None,
    model: Any = None,
    **build_kwargs: Any,
) -> StageRef:
    """Build stage ``stage`` from ``cfg`` into the store, or find it already stored.

    ``parent`` is a stored ``StageRef`` (its rows are loaded from the store) or a
    ``(dataset, provenance)`` pair such as ``seqpatch.hub.resolve_parent`` returns. ``model`` is
    recorded in provenance and in the version; ``build_kwargs`` go to the stage's ``build``.
    """
    from seqpatch.store import StageRef, Store

    module = get_stage(stage)
    store = store if store is not None else Store(data_dir)
    parent_rows: Dataset | None = None
    parent_identity: StageRef | Mapping[str, Any] | None = None
    if isinstance(parent, StageRef):
        parent_identity = parent
    elif parent is not None:
        parent_rows, parent_identity = parent

    def build() -> Any:
        rows = parent_rows
        if rows is None and isinstance(parent, StageRef):
            rows = store.load(parent.stage, parent.version)
        return module.build(rows, cfg, **build_kwargs)

    return store.get_or_build(
        stage, module.SCHEMA_VERSION, cfg, build, parent=parent_identity, model=model
    )
