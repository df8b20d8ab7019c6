"""The library's ``build_*`` entry points: user-level options to a stage config and parents.

Each ``build_*`` function turns the options the CLI takes into a stage config and parent
selection and calls ``seqpatch.executor.execute``, which chains the stages. A stage's options
are its config's fields (``stage_options``): a new field is a keyword here at once. Every
function is usable from a notebook and importable from ``seqpatch.pipeline`` too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    from seqpatch.models import ModelHandle
    from seqpatch.options import RuntimeSettings
    from seqpatch.stages.base import ModelCache
    from seqpatch.stages.benchmark import BenchmarkConfig
    from seqpatch.stages.das import DasConfig
    from seqpatch.stages.pairs import PairsConfig
    from seqpatch.store import StageRef, Store

DataDir = str | os.PathLike[str] | None


class PipelineError(SeqpatchError):
    """A stage's inputs are missing or inconsistent."""


def _store(data_dir: DataDir) -> Store:
    from seqpatch.store import Store

    return Store(data_dir)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/8"`` → ``(2, 8)``: this job builds shards ``i, i+n, i+2n, …`` of the stage."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise PipelineError(
            f"cannot read --shard {text!r}; write it as INDEX/COUNT, e.g. 0/4"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise PipelineError(f"--shard {text!r}: need 0 <= INDEX < COUNT")
    return index, count


def import_parents(source: str, stages: Sequence[str], data_dir: DataDir) -> dict[str, str]:
    """Import ``stages`` from a published repo or exported folder into the local store.

    The first stage is required; later ones are optional (e.g. the activations a collaborator
    may or may not have published beside the pairs). Returns ``{stage: local version}``.
    """
    from seqpatch.hub import HubError, import_stage

    versions: dict[str, str] = {}
    for i, stage in enumerate(stages):
        try:
            versions[stage] = import_stage(source, stage, data_dir).version
        except HubError:
            if i == 0:
                raise
    return versions


def stage_options(
    cls: type, args: Sequence[Any], options: Mapping[str, Any], runtime: RuntimeSettings | None
) -> tuple[Any, RuntimeSettings]:
    """The config and execution settings of a ``build_*`` call.

    ``args`` is a config of ``cls``, or its fields positionally in declaration order;
    ``options`` name config fields (``None``: the field's default) or ``RuntimeSettings``
    fields, which update ``runtime``. So a field added to a config is at once an option of its
    ``build_*`` function (and of its CLI command), with no default written twice.
    """
    import dataclasses

    from seqpatch.options import RuntimeSettings, config_from, split_options

    cfg_values, runtime_values = split_options(cls, options)
    base = args[0] if len(args) == 1 and isinstance(args[0], cls) else None
    if base is None:
        names = [f.name for f in dataclasses.fields(cls)]
        if len(args) > len(names):
            raise PipelineError(f"{cls.__name__} takes at most {len(names)} options, got {args}")
        clash = sorted(set(names[: len(args)]) & set(cfg_values))
        if clash:
            raise PipelineError(f"option {clash[0]!r} given twice")
        cfg_values = {**dict(zip(names, args, strict=False)), **cfg_values}
    cfg = config_from(cls, base, **cfg_values)
    runtime = dataclasses.replace(runtime or RuntimeSettings(), **runtime_values)
    return cfg, runtime


def _models(
    models: ModelCache | None, handle: ModelHandle | None = None, remote: bool = False
) -> ModelCache:
    from seqpatch.stages.base import ModelCache

    models = models if models is not None else ModelCache(remote=remote)
    if handle is not None:
        models.put(handle.spec, handle)
    return models


def build_programs(*args: Any, data_dir: DataDir = None, **options: Any) -> StageRef:
    """Sample programs (or find them stored): a ``ProgramsConfig``, or its fields positionally
    or by name (``build_programs(family="binding", n_per_len=50)``; see ``stage_options``)."""
    from seqpatch.executor import execute
    from seqpatch.stages.programs import ProgramsConfig

    cfg, _ = stage_options(ProgramsConfig, args, options, None)
    return execute("programs", cfg, data_dir=data_dir)


def build_benchmark(
    cfg: BenchmarkConfig,
    *,
    programs: str = "latest",
    data_dir: DataDir = None,
    remote: bool = False,
    models: ModelCache | None = None,
    progress: bool | None = None,
    executor: str | Any | None = None,
    ray_address: str | None = None,
    runtime: RuntimeSettings | None = None,
) -> StageRef:
    """Benchmark ``cfg.models`` on a stored ``programs`` version, one resumable shard per model.

    Every model is loaded and checked before anything is written; a stored version with the
    same config, programs and model weights is reused without loading any model.

    ``remote=True`` runs the forward passes and generation on NDIF through nnsight (Hub ids
    only; needs ``NDIF_API_KEY`` and the network). Where it runs is not part of the version:
    the rows are the same nnsight computation on the same weights (model id and revision);
    provenance says ``"remote": true`` per model. ``executor="ray"`` benchmarks the models on
    Ray actors instead, one shard (model) per actor task (``ray_address``: an existing cluster).
    ``progress``, ``executor`` and ``ray_address`` override ``runtime``'s when given.
    """
    from seqpatch.executor import execute

    if remote:
        from seqpatch.models import require_ndif_key

        require_ndif_key()
    models = _models(models, remote=remote)
    return execute(
        "benchmark",
        cfg,
        {"programs": programs},
        data_dir=data_dir,
        models=models,
        progress=progress,
        executor=executor,
        ray_address=ray_address,
        runtime=runtime,
    )


def pairs_config(
    model: str = "builtin",
    seq_len: int | None = None,
    divergence: str = "all",
    n_pairs: int = 2000,
    seed: int = 0,
    family: str | None = None,
    allow_equal_answers: bool = False,
    data_dir: DataDir = None,
    **options: Any,
) -> tuple[PairsConfig, dict[str, str]]:
    """The pairs config for these options and its parents.

    ``model="chosen"`` studies what ``seqpatch choose`` chose — its model, family and length
    (unless ``seq_len`` says otherwise) — and records the benchmark version as the parent.
    Without a family the organism is asked about the family it was trained on, other models
    about ``binding``; ``seq_len`` defaults to 8. ``options`` are any other ``PairsConfig``
    fields (``None``: the field's default).
    """
    from seqpatch.stages.pairs import PairsConfig, parse_divergence_indices

    parents: dict[str, str] = {}
    params: dict[str, Any] = {}
    if model == "chosen":
        from seqpatch.choose import read_chosen

        chosen = read_chosen(data_dir)
        model = chosen["model_spec"]
        family = family or chosen["family"]
        seq_len = seq_len or chosen["seq_len"]
        parents["benchmark"] = chosen["benchmark_version"]
    if family is None:
        family, params = default_family(model)
    seq_len = seq_len or 8
    from seqpatch.options import config_from

    cfg = config_from(
        PairsConfig,
        model=model,
        seq_len=seq_len,
        n_pairs=n_pairs,
        divergence_indices=parse_divergence_indices(divergence, seq_len),
        family=family,
        seed=seed,
        allow_equal_answers=allow_equal_answers,
        family_params=params,
        **options,
    )
    return cfg, parents


def default_family(model: str) -> tuple[str, dict[str, Any]]:
    """The family (name, non-stock parameters) to draw pairs from for ``model``: the organism's
    training family for ``builtin``, ``binding`` for every other model."""
    if model != "builtin":
        return "binding", {}
    from seqpatch.organism import organism_family, training_record
    from seqpatch.programs import get_family

    fam = organism_family()
    stock = get_family(fam.name)
    params = training_record()["family"]["params"]
    return fam.name, ({} if fam is stock else dict(params))


def build_pairs(
    model: str = "builtin",
    seq_len: int | None = None,
    divergence: str = "all",
    n_pairs: int = 2000,
    seed: int = 0,
    family: str | None = None,
    allow_equal_answers: bool = False,
    data_dir: DataDir = None,
    progress: bool = True,
    handle: ModelHandle | None = None,
    models: ModelCache | None = None,
    runtime: RuntimeSettings | None = None,
    **options: Any,
) -> StageRef:
    """Build (or reuse) the pairs stage; see ``pairs_config`` for the options (``options``:
    any other ``PairsConfig`` field)."""
    from seqpatch.executor import execute

    cfg, parents = pairs_config(
        model, seq_len, divergence, n_pairs, seed, family, allow_equal_answers, data_dir, **options
    )
    return execute(
        "pairs",
        cfg,
        parents,
        data_dir=data_dir,
        models=_models(models, handle),
        progress=progress,
        runtime=runtime,
    )


def build_activations(
    *args: Any,
    pairs: str = "latest",
    data_dir: DataDir = None,
    handle: ModelHandle | None = None,
    from_source: str | None = None,
    remote: bool = False,
    models: ModelCache | None = None,
    runtime: RuntimeSettings | None = None,
    **options: Any,
) -> StageRef:
    """Cache both programs' activations of every pair of a stored ``pairs`` version.

    ``args``/``options``: an ``ActivationsConfig`` or its fields, and ``RuntimeSettings``
    fields (``stage_options``). ``from_source`` (a Hub repo id or an exported folder) imports
    the pairs from there first. ``remote=True`` runs the pairs' model on NDIF through nnsight
    (``get_activations`` is one trace per batch); where it runs is not part of the version.
    ``executor="ray"`` builds the shards on Ray actors (``ray_address``: an existing cluster;
    see ``seqpatch.ray_executor``).
    """
    from seqpatch.executor import execute
    from seqpatch.stages.activations import ActivationsConfig

    cfg, runtime = stage_options(ActivationsConfig, args, options, runtime)
    if remote and handle is None:
        from seqpatch.models import require_ndif_key

        require_ndif_key()  # before importing anything into the store
    if from_source is not None:
        pairs = import_parents(from_source, ["pairs"], data_dir)["pairs"]
    return execute(
        "activations",
        cfg,
        {"pairs": pairs},
        data_dir=data_dir,
        models=_models(models, handle, remote),
        runtime=runtime,
    )


def find_activations(store: Store, pairs_ref: StageRef, sites: Sequence[str]) -> StageRef | None:
    """The newest activations version built from ``pairs_ref`` that caches every site of every
    layer, float32 first (exact), else any dtype."""
    candidates = [
        ref
        for ref in store.versions("activations")
        if any(p.get("version") == pairs_ref.version for p in ref.parents)
        and set(sites) <= set(ref.provenance["config"]["sites"])
        and not ref.provenance["config"].get("layers")
    ]
    candidates.sort(
        key=lambda r: (r.provenance["config"]["dtype"] == "float32", r.provenance.get("created"))
    )
    return candidates[-1] if candidates else None


def build_patching(
    *args: Any,
    pairs: str = "latest",
    activations: str = "auto",
    shard: tuple[int, int] | None = None,
    data_dir: DataDir = None,
    handle: ModelHandle | None = None,
    from_source: str | None = None,
    models: ModelCache | None = None,
    runtime: RuntimeSettings | None = None,
    expect_version: str | None = None,
    **options: Any,
) -> StageRef | None:
    """Sweep every cell of ``sites`` over ``axes`` for every pair; resumable, in shards.

    ``args``/``options``: a ``PatchingConfig`` or its fields (``sites``, ``layers``, ``method``,
    ``axes``, ``positions``: see the config), and ``RuntimeSettings`` fields (``shard_size``,
    ``engine``, ``executor``, ``device``, …), which never change the version.

    ``activations``: ``auto`` (use a cached activations stage of these pairs if one exists),
    ``none`` (recompute sources), or a version. With ``shard=(i, n)`` only shards ``i, i+n, …``
    are built and ``None`` is returned; ``seqpatch merge patching`` joins them once every shard
    exists. ``from_source`` (a Hub repo id or an exported folder) imports the pairs, and the
    activations when published, from there first. ``executor="ray"`` builds the missing shards
    on Ray actors (``ray_address``: an existing cluster), then commits here: the same version as
    a local build.
    """
    from seqpatch.executor import execute
    from seqpatch.stages.patching import PatchingConfig

    cfg, runtime = stage_options(PatchingConfig, args, options, runtime)
    if from_source is not None:
        imported = import_parents(from_source, ["pairs", "activations"], data_dir)
        pairs = imported["pairs"]
        activations = imported.get("activations", activations)
    store = _store(data_dir)
    pairs_ref = store.resolve("pairs", pairs)
    if activations == "auto":
        act_ref = find_activations(store, pairs_ref, cfg.sites)
    else:
        act_ref = None if activations == "none" else store.resolve("activations", activations)
    return execute(
        "patching",
        cfg,
        {"pairs": pairs_ref, "activations": act_ref},
        store=store,
        models=_models(models, handle),
        shard=shard,
        runtime=runtime,
        expect_version=expect_version,
    )


def build_tracing(
    *args: Any,
    pairs: str = "latest",
    shard: tuple[int, int] | None = None,
    data_dir: DataDir = None,
    handle: ModelHandle | None = None,
    models: ModelCache | None = None,
    runtime: RuntimeSettings | None = None,
    expect_version: str | None = None,
    **options: Any,
) -> StageRef | None:
    """ROME's causal trace of one program of each of the first ``n_programs`` pairs (0: all).

    ``args``/``options``: a ``seqpatch.stages.tracing.TracingConfig`` or its fields (``None``
    keeps a default: ROME's ν = 3 and 10 noise samples, the depth-scaled window, every kind),
    and ``RuntimeSettings`` fields (``shard_size`` programs per shard, ``engine``, …);
    ``pairs`` is the stored pairs version traced. With ``shard=(i, n)`` only shards ``i, i+n,
    …`` are built and ``None`` is returned until every shard exists. The version holds the rows,
    the AIE arrays and the three-panel chart. ``executor="ray"`` traces the missing shards on
    Ray actors (``ray_address``: an existing cluster; see ``seqpatch.ray_executor``); the
    version is the local build's.
    """
    from seqpatch.executor import execute
    from seqpatch.stages.tracing import TracingConfig

    cfg, runtime = stage_options(TracingConfig, args, options, runtime)
    return execute(
        "tracing",
        cfg,
        {"pairs": pairs},
        data_dir=data_dir,
        models=_models(models, handle),
        shard=shard,
        runtime=runtime,
        expect_version=expect_version,
    )


def build_das(
    cfg: DasConfig,
    patching: str = "latest",
    pairs: str | None = None,
    data_dir: Any = None,
    progress: bool = True,
    runtime: RuntimeSettings | None = None,
) -> StageRef | None:
    """Build (or reuse) the ``das`` stage on a stored patching version; ``pairs`` defaults to the
    pairs that patching version was built from.

    ``patching="latest"`` takes the newest version DAS can rank: exact patching of whole site
    vectors over (layer, position) — not a head grid, a whole-stream grid or attribution.
    """
    from seqpatch.executor import execute
    from seqpatch.stages.das import rankable

    store = _store(data_dir)
    if patching == "latest":
        usable = [ref for ref in store.versions("patching") if rankable(ref.provenance["config"])]
        if not usable:
            raise PipelineError(
                "no stored patching version DAS can rank; build one with "
                "`seqpatch build patching --sites resid_pre,attn_out,mlp_out`"
            )
        patching_ref = usable[-1]
    else:
        patching_ref = store.resolve("patching", patching)
    if pairs is None:
        pairs = next(
            (p["version"] for p in patching_ref.parents if p.get("stage") == "pairs"), "latest"
        )
    return execute(
        "das",
        cfg,
        parents={"pairs": pairs, "patching": patching_ref},
        store=store,
        progress=progress,
        runtime=runtime,
    )
