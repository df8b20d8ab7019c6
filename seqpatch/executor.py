"""The one place that chains stages: parents → version → (reuse | load models, build, commit).

``execute(stage, cfg, parents)`` does for every stage what a stage module must not do itself:

1. resolves the stage's declared parents (``PARENTS``) to stored versions — ``latest`` for a
   required parent unless told otherwise, an optional parent only when given;
2. computes the version from the stage's schema version, its config, every parent's version and
   the identities of the models it runs (``seqpatch.models.identify``: no weights loaded);
3. returns the stored version if there is one — no model is loaded for a reused stage;
4. otherwise loads the models once (a shared ``ModelCache``), runs the stage's ``build`` (or its
   shards, resumably), and has the store write rows, artifacts and provenance (every parent's
   ``{stage, version, fingerprint}``) in a temporary folder renamed into place.

``datasets`` caching is off while a stage builds, so ``.map`` over a parent's rows never writes
cache files into the parent's version folder, and a rebuilt version never reuses stale cached
rows: the store's versions are the only cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from seqpatch.options import RuntimeSettings
from seqpatch.progress import progress_bar, quiet_libraries
from seqpatch.shard_runner import ShardRunner, datasets_caching_off, model_identity
from seqpatch.stages import get_stage, is_sharded
from seqpatch.stages.base import Inputs, ModelCache, StageError

if TYPE_CHECKING:
    from types import ModuleType

    from seqpatch.store import StageRef, Store


def resolve_parents(
    module: ModuleType, store: Store, given: Mapping[str, Any]
) -> dict[str, StageRef]:
    """The stage's parents as stored versions, in ``PARENTS`` order."""
    from seqpatch.store import LATEST, StageRef

    declared = {spec.stage: spec for spec in module.PARENTS}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise StageError(
            f"stage {module.STAGE!r} has no parent {unknown[0]!r}; its parents: "
            f"{', '.join(declared) or 'none'}"
        )
    refs: dict[str, StageRef] = {}
    for name, spec in declared.items():
        value = given.get(name, None if spec.optional else LATEST)
        if value is None:
            continue
        refs[name] = value if isinstance(value, StageRef) else store.resolve(name, value)
    return refs


def execute(
    stage: str,
    cfg: Any,
    parents: Mapping[str, Any] | None = None,
    *,
    store: Store | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    models: ModelCache | None = None,
    shard: tuple[int, int] | None = None,
    runtime: RuntimeSettings | None = None,
    expect_version: str | None = None,
    progress: bool | None = None,
    executor: str | ShardRunner | None = None,
    ray_address: str | None = None,
) -> StageRef | None:
    """Build stage ``stage`` from ``cfg`` (or find it stored) and return its ``StageRef``.

    ``parents`` maps parent stage names to a ``StageRef``, a version (prefix or ``latest``) or
    ``None`` (leave an optional parent out). ``models`` shares loaded models between calls.
    ``shard=(i, n)`` builds only shards ``i, i+n, …`` of a sharded stage and returns ``None``
    (a call without ``shard``, e.g. ``seqpatch merge``, commits the version).
    ``runtime`` says how the build runs (``RuntimeSettings``: shard size, engine path, device,
    executor); it never enters the version and is recorded under provenance's ``runtime``.
    ``executor="ray"`` computes a sharded stage's missing shards on Ray before this process
    commits them (``seqpatch.ray_executor``); any ``ShardRunner`` (a configured
    ``RayExecutor``) may be passed instead. ``progress``/``executor``/``ray_address`` override
    the runtime's. ``expect_version`` refuses (before any work) a build whose version differs.
    """
    from seqpatch.store import Store, config_dict

    runtime = runtime if runtime is not None else RuntimeSettings()
    overrides = {"progress": progress, "executor": executor, "ray_address": ray_address}
    runtime = dataclasses.replace(runtime, **{k: v for k, v in overrides.items() if v is not None})
    module = get_stage(stage)
    store = store if store is not None else Store(data_dir)
    models = models if models is not None else ModelCache()
    if not models.remote and models.device == "auto":
        models.device = runtime.resolved_device()
    refs = resolve_parents(module, store, parents or {})
    specs = tuple(module.model_specs(cfg, refs))
    model = model_identity(specs, models)
    version = store.version_for(stage, module.SCHEMA_VERSION, cfg, refs.values(), model)
    if expect_version is not None and version != expect_version:
        raise StageError(
            f"these options give {stage} version {version}, not {expect_version}; nothing built"
        )
    found = store.find(stage, version)
    if found is not None:
        return dataclasses.replace(store.check(found), reused=True)  # reused: read next
    sharded = is_sharded(module)
    # rows per shard; None for a stage built whole or cut its own way (a model per shard)
    shard_size = runtime.shard_size_for(module.SHARD_SIZE) if sharded else None
    inputs = Inputs(refs, models, specs, runtime.progress, version, runtime, shard_size or 0)
    common = {
        "parents": list(refs.values()),
        "model": model,
        "finish": lambda rows: module.artifacts(rows, cfg, inputs),
        "runtime": lambda: runtime.record(shard_size),
    }
    with datasets_caching_off(), quiet_libraries():
        if sharded:
            n_shards = module.n_shards(inputs, cfg)
            only = None if shard is None else range(shard[0], n_shards, shard[1])
            total = n_shards if only is None else len(only)
            remote = _shard_executor(runtime.executor, runtime.ray_address)
            manifest = {
                "config": config_dict(cfg),
                "parents": {name: ref.version for name, ref in refs.items()},
                "runtime": {"shard_size": shard_size},
            }
            if remote is not None:
                remote.run(store, module, cfg, inputs, n_shards, only, runtime.progress)
            local_bar = runtime.progress and remote is None
            with contextlib.ExitStack() as stack:
                bars: list[Any] = []

                def before() -> None:
                    """The stage's checks, then the bar: a refused build prints one line."""
                    module.prepare(inputs, cfg)
                    bar = progress_bar(total, f"{stage} (shards)", enabled=local_bar)
                    bars.append(stack.enter_context(bar))

                def build_shard(index: int) -> Any:
                    built = module.build_shard(inputs, cfg, index)
                    for bar in bars:
                        bar.update()
                    return built

                return store.build_sharded(
                    stage,
                    module.SCHEMA_VERSION,
                    cfg,
                    n_shards,
                    build_shard,
                    only_shards=only,
                    before=before,
                    manifest=manifest,
                    join=shard is None,
                    merge=_merge_stats(module, cfg),
                    **common,
                )
        if shard is not None:
            raise StageError(f"stage {stage!r} is not built in shards; drop --shard")
        if runtime.executor != "local":
            raise StageError(f"stage {stage!r} is not built in shards; drop --executor")

        module.prepare(inputs, cfg)  # before the store creates anything
        return store.get_or_build(
            stage, module.SCHEMA_VERSION, cfg, lambda: module.build(inputs, cfg), **common
        )


def _merge_stats(module: Any, cfg: Any) -> Callable[[list[Any], Any], dict[str, Any]] | None:
    """The stage's own ``merge_stats(per-shard statistics, rows, cfg)``, if it has one (its
    statistics are not sums of the shards'), else ``None`` (``merge_extra``)."""
    merge = getattr(module, "merge_stats", None)
    return None if merge is None else (lambda parts, rows: merge(parts, rows, cfg))


def _shard_executor(executor: str | ShardRunner, ray_address: str | None) -> ShardRunner | None:
    """``None`` for in-process shards, else the ``ShardRunner`` that computes them elsewhere."""
    if executor == "local":
        return None
    if executor == "ray":
        from seqpatch.ray_executor import RayExecutor

        return RayExecutor(address=ray_address)
    if isinstance(executor, str):
        raise StageError(f"unknown executor {executor!r}; use local or ray")
    return executor
