"""The pipeline's stages: one module per stage, registered here by name, in pipeline order.

A stage module declares its schema version, config, parents and models and builds its rows
(``seqpatch.stages.base`` states the contract); ``seqpatch.executor.execute`` is the only code
that chains stages. To add a stage: write ``seqpatch/stages/<name>.py``, add one ``StageInfo``
to ``STAGES`` and a card template ``datasets_cards/<name>.md``. Modules are imported only when a
stage is used, so the registry stays cheap.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    from seqpatch.store import StageRef


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
        StageInfo(
            "tracing",
            "seqpatch.stages.tracing",
            "ROME causal trace per program: corrupt the changed statement, restore each state",
            "--corrupt changed --n-programs 100",
        ),
        StageInfo(
            "das",
            "seqpatch.stages.das",
            "distributed alignment search at the heatmap's top cells: IIA by subspace dimension",
            "--top-n 3 --ks 1,2,4,8,16,32,64,128",
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


def build_stage(stage: str, cfg: Any, **kwargs: Any) -> StageRef | None:
    """``seqpatch.executor.execute``, importable beside the registry for notebooks."""
    from seqpatch.executor import execute

    return execute(stage, cfg, **kwargs)
