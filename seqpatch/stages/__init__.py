"""The pipeline's stages: one module per stage, registered here by name, in pipeline order.

A stage module declares its schema version, config, parents and models and builds its rows:
the ``Stage`` protocol (``ShardedStage`` for a resumable one) is the contract, checked when a
stage module is first loaded (``get_stage``), so a missing or misspelled hook is one line naming
it, never a silently skipped step. ``seqpatch.executor.execute`` is the only code that chains
stages. To add a stage: write ``seqpatch/stages/<name>.py``, add one ``StageInfo`` to ``STAGES``
and a card template ``datasets_cards/<name>.md``. Modules are imported only when a stage is
used, so the registry stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    from datasets import Dataset

    from seqpatch.stages.base import Artifact, Built, Inputs, ParentSpec
    from seqpatch.store import StageRef


class StageContractError(SeqpatchError):
    """A stage module lacks a hook of the ``Stage`` protocol, or has one of the wrong shape."""


class Stage(Protocol):
    """What every stage module defines (``seqpatch.stages.base`` explains each part)."""

    STAGE: str
    SCHEMA_VERSION: int  # bumped when the rows change meaning
    CONFIG: type  # a frozen dataclass: its canonical JSON is part of the version
    PARENTS: Sequence[ParentSpec]

    def model_specs(self, cfg: Any, parents: Mapping[str, StageRef]) -> Sequence[str]: ...

    def prepare(self, inputs: Inputs, cfg: Any) -> None: ...  # checks before anything is written

    def build(self, inputs: Inputs, cfg: Any) -> Built: ...

    def artifacts(self, rows: Dataset, cfg: Any, inputs: Inputs) -> Mapping[str, Artifact]: ...


class ShardedStage(Protocol):
    """A resumable stage: built shard by shard (``build`` is then not needed)."""

    STAGE: str
    SCHEMA_VERSION: int
    CONFIG: type
    PARENTS: Sequence[ParentSpec]
    SHARD_SIZE: int | None  # rows per shard unless the runtime says otherwise (None: fixed cut)

    def model_specs(self, cfg: Any, parents: Mapping[str, StageRef]) -> Sequence[str]: ...

    def prepare(self, inputs: Inputs, cfg: Any) -> None: ...

    def n_shards(self, inputs: Inputs, cfg: Any) -> int: ...

    def build_shard(self, inputs: Inputs, cfg: Any, index: int) -> Built: ...

    def artifacts(self, rows: Dataset, cfg: Any, inputs: Inputs) -> Mapping[str, Artifact]: ...


def _members(protocol: type) -> dict[str, int | None]:
    """``{name: positional parameter count}`` of a protocol's hooks (``None``: a constant)."""
    names = {n for n in vars(protocol) if not n.startswith("_")} | set(protocol.__annotations__)
    return {
        name: (
            len(inspect.signature(vars(protocol)[name]).parameters) - 1
            if callable(vars(protocol).get(name))
            else None
        )
        for name in sorted(names)
    }


def is_sharded(module: ModuleType) -> bool:
    return hasattr(module, "build_shard")


def check_stage(module: ModuleType, name: str) -> ModuleType:
    """``module`` if it follows ``Stage`` (or ``ShardedStage``), else one line naming the first
    missing or misshapen hook."""
    protocol = ShardedStage if is_sharded(module) else Stage
    for hook, n_params in _members(protocol).items():
        if not hasattr(module, hook):
            raise StageContractError(
                f"stage module {module.__name__} has no {hook!r} "
                f"({protocol.__name__} needs {', '.join(_members(protocol))})"
            )
        value = getattr(module, hook)
        if n_params is None:
            continue
        if not callable(value):
            raise StageContractError(f"stage module {module.__name__}: {hook!r} is not a function")
        try:
            inspect.signature(value).bind(*range(n_params))
        except TypeError:
            raise StageContractError(
                f"stage module {module.__name__}: {hook}() must take {n_params} arguments "
                f"like {protocol.__name__}.{hook}"
            ) from None
    if name != module.STAGE:
        raise StageContractError(
            f"stage module {module.__name__} says STAGE = {module.STAGE!r}, registered as {name!r}"
        )
    return module


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
    return check_stage(importlib.import_module(info.module), name)
