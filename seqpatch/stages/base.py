"""What every stage module shares: its declared parents, what it returns, what it is handed.

A stage is a module ``seqpatch/stages/<name>.py`` following the ``Stage`` protocol (checked by
``seqpatch.stages.get_stage``):

- ``STAGE`` (its name), ``SCHEMA_VERSION`` (bumped when its rows change meaning), ``CONFIG`` (a
  frozen dataclass of ``seqpatch.options.option`` fields; its canonical JSON is part of the
  version) and ``PARENTS`` (``ParentSpec``s);
- ``model_specs(cfg, parents) -> tuple[str, ...]``: the models it runs (their identities enter the
  version, and the executor loads them only when the version is not stored);
- ``build(inputs, cfg) -> Built``, or for a resumable stage ``SHARD_SIZE``,
  ``n_shards(inputs, cfg)`` and ``build_shard(inputs, cfg, index) -> Built`` (shards are
  concatenated in index order; ``inputs.shard_size`` is the size to cut);
- ``prepare(inputs, cfg)`` (checks that must pass before anything is written) and
  ``artifacts(rows, cfg, inputs) -> {file name: Artifact}`` (charts, arrays, csv written into the
  version folder before it is committed); ``no_models``, ``no_checks`` and ``no_artifacts`` are
  the hooks of a stage that needs none.

``inputs.runtime`` (``RuntimeSettings``) says how to run (engine path, device) and never changes
a row. Stage modules never resolve parents, load models or write files: ``seqpatch.executor``
and the store do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqpatch.contract import Artifact as Artifact  # defined below the store, re-exported here
from seqpatch.contract import Built as Built
from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    from datasets import Dataset

    from seqpatch.models import ModelHandle
    from seqpatch.options import RuntimeSettings
    from seqpatch.store import StageRef


class StageError(SeqpatchError):
    """A stage's inputs are missing or inconsistent."""


@dataclass(frozen=True)
class ParentSpec:
    """A parent stage a stage is built from; ``optional`` parents may be absent."""

    stage: str
    optional: bool = False


def _runtime_settings() -> RuntimeSettings:
    from seqpatch.options import RuntimeSettings

    return RuntimeSettings()


class ModelCache:
    """Models loaded at most once per process run (``seqpatch run`` chains stages on one model).

    ``get(spec)`` loads on first use; ``release(spec)`` drops one (the benchmark runs several
    large models one after another).
    """

    def __init__(self, remote: bool = False, device: str = "auto") -> None:
        self.remote = remote
        self.device = device  # where load_model puts a model this cache loads
        self._handles: dict[str, ModelHandle] = {}

    def get(self, spec: str) -> ModelHandle:
        """The loaded model of ``spec``; torch's thread count follows its size (``threads``)."""
        if spec not in self._handles:
            from seqpatch.models import load_model

            name, fmt = split_model_spec(spec)
            self.put(
                spec, load_model(name, prompt_format=fmt, remote=self.remote, device=self.device)
            )
        return self._handles[spec]

    def put(self, spec: str, handle: ModelHandle) -> None:
        from seqpatch.threads import use_threads

        self._handles[spec] = handle
        if not self.remote:
            use_threads(handle.n_params)

    def release(self, spec: str) -> None:
        handle = self._handles.pop(spec, None)
        if handle is not None:
            import gc

            device = handle.device
            del handle
            gc.collect()
            if getattr(device, "type", "cpu") == "cuda":
                import torch

                torch.cuda.empty_cache()

    def __contains__(self, spec: object) -> bool:
        return spec in self._handles


FORMAT_SEPARATOR = ":"


def split_model_spec(spec: str) -> tuple[str, str | None]:
    """``"model:code-chat"`` → ``("model", "code-chat")``; a spec without a known format suffix
    is returned whole (Windows drive letters and ``user/name:rev`` stay intact)."""
    from seqpatch.prompts import is_format_name

    head, sep, tail = spec.rpartition(FORMAT_SEPARATOR)
    if sep and head and is_format_name(tail):
        return head, tail
    return spec, None


@dataclass
class Inputs:
    """What the executor hands a stage: its resolved parents, their rows and its models."""

    parents: dict[str, StageRef]
    models: ModelCache
    specs: tuple[str, ...] = ()
    progress: bool = True
    version: str = ""
    runtime: RuntimeSettings = field(default_factory=lambda: _runtime_settings())
    shard_size: int = 0  # the runtime's shard size, else the stage's SHARD_SIZE (sharded stages)
    _rows: dict[str, Dataset] = field(default_factory=dict)

    def fingerprint(self, *parts: Any) -> str:
        """A ``new_fingerprint`` for a ``.map`` of this build: the version being built (config,
        parents, models) plus ``parts`` naming the step, so the same inputs give the same
        dataset fingerprint in every run and process."""
        from datasets.fingerprint import Hasher

        return Hasher.hash([self.version, *parts])[:16]

    def has(self, stage: str) -> bool:
        return stage in self.parents

    def rows(self, stage: str) -> Dataset:
        """A parent's rows, memory-mapped from its version folder (read-only by contract)."""
        if stage not in self._rows:
            from datasets import Dataset

            if stage not in self.parents:
                raise StageError(f"this stage was built without a {stage!r} parent")
            self._rows[stage] = Dataset.load_from_disk(str(self.parents[stage].path))
        return self._rows[stage]

    @property
    def model(self) -> ModelHandle:
        """The stage's (first) model, loaded on first use."""
        if not self.specs:
            raise StageError("this stage runs no model")
        return self.models.get(self.specs[0])

    def each_model(self) -> Iterator[ModelHandle]:
        for spec in self.specs:
            yield self.models.get(spec)


def no_models(cfg: Any, parents: Mapping[str, StageRef]) -> tuple[str, ...]:
    """``model_specs`` of a stage that runs no model."""
    return ()


def no_checks(inputs: Inputs, cfg: Any) -> None:
    """``prepare`` of a stage with nothing to check before it writes."""


def no_artifacts(rows: Dataset, cfg: Any, inputs: Inputs) -> dict[str, Artifact]:
    """``artifacts`` of a stage that stores its rows only."""
    return {}


def chart_artifacts(
    chart: Any, name: str, formats: tuple[str, ...] = ("html", "png")
) -> dict[str, Artifact]:
    """An altair chart as artifacts ``<name>.<format>`` (written by ``charts.save_chart``)."""

    def writer(fmt: str) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            from seqpatch.charts import save_chart

            save_chart(chart, path.parent, name, (fmt,))

        return write

    return {f"{name}.{fmt}": writer(fmt) for fmt in formats}
