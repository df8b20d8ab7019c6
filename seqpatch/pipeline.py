"""Chaining stages: what ``seqpatch build activations|patching``, ``plot`` and ``run`` call.

Each function resolves its parent in the store, loads the model recorded in the parent's
provenance (the model that made the pairs is the model that is patched), builds or reuses the
stage, and writes derived artifacts (``heatmap.npy``, charts) into the version folder. Every
function is usable from a notebook; the CLI only parses options.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    from seqpatch.models import ModelHandle
    from seqpatch.store import StageRef, Store

DataDir = str | os.PathLike[str] | None


class PipelineError(SeqpatchError):
    """A stage's inputs are missing or inconsistent."""


def _store(data_dir: DataDir) -> Store:
    from seqpatch.store import Store

    return Store(data_dir)


def pairs_model(pairs_ref: StageRef, remote: bool = False) -> ModelHandle:
    """Load the model that built ``pairs_ref`` (its spec is in the pairs config).

    ``remote=True`` opens NDIF's copy of it instead (a Hub id only, see ``load_model``).
    """
    from seqpatch.models import load_model

    spec = pairs_ref.provenance["config"]["model"]
    return load_model(spec, remote=remote)


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


def build_activations(
    sites: Sequence[str] = ("resid_pre",),
    dtype: str = "float32",
    layers: Sequence[int] = (),
    pairs: str = "latest",
    data_dir: DataDir = None,
    handle: ModelHandle | None = None,
    from_source: str | None = None,
    remote: bool = False,
) -> StageRef:
    """Cache both programs' activations of every pair of a stored ``pairs`` version.

    ``from_source`` (a Hub repo id or an exported folder) imports the pairs from there first.
    ``remote=True`` runs the pairs' model on NDIF through nnsight (``get_activations`` is one
    trace per batch); a given ``handle`` runs wherever it was loaded for. Where it runs is not
    part of ``ActivationsConfig`` and so not of the version: the same nnsight trace on the same
    weights (model id and revision) caches the same activations, as on any device.
    """
    from seqpatch.models import require_ndif_key
    from seqpatch.stages import build_stage
    from seqpatch.stages.activations import ActivationsConfig

    if remote and handle is None:
        require_ndif_key()  # before importing anything into the store
    if from_source is not None:
        pairs = import_parents(from_source, ["pairs"], data_dir)["pairs"]
    store = _store(data_dir)
    cfg = ActivationsConfig(sites=tuple(sites), dtype=dtype, layers=tuple(layers))
    pairs_ref = store.resolve("pairs", pairs)
    handle = handle or pairs_model(pairs_ref, remote)
    return build_stage(
        "activations",
        cfg,
        store=store,
        parent=pairs_ref,
        model=handle.describe(),
        handle=handle,
    )


def find_activations(store: Store, pairs_ref: StageRef, sites: Sequence[str]) -> StageRef | None:
    """The newest activations version built from ``pairs_ref`` that caches every site, float32
    first (exact), else any dtype."""
    candidates = [
        ref
        for ref in store.versions("activations")
        if (ref.provenance.get("parent") or {}).get("version") == pairs_ref.version
        and set(sites) <= set(ref.provenance["config"]["sites"])
        and not ref.provenance["config"].get("layers")
    ]
    candidates.sort(
        key=lambda r: (r.provenance["config"]["dtype"] == "float32", r.provenance.get("created"))
    )
    return candidates[-1] if candidates else None


def build_patching(
    sites: Sequence[str] = ("resid_pre",),
    layers: Sequence[int] = (),
    pairs: str = "latest",
    activations: str = "auto",
    method: str = "auto",
    shard_size: int = 250,
    shard: tuple[int, int] | None = None,
    data_dir: DataDir = None,
    handle: ModelHandle | None = None,
    charts: bool = True,
    from_source: str | None = None,
) -> StageRef | None:
    """Sweep every (layer, position) of ``sites`` for every pair; resumable, in shards.

    ``activations``: ``auto`` (use a cached activations stage of these pairs if one exists),
    ``none`` (recompute sources), or a version. With ``shard=(i, n)`` only shards ``i, i+n, …``
    are built and ``None`` is returned; a later call without ``shard`` (``seqpatch merge``)
    joins them once every shard exists. ``from_source`` (a Hub repo id or an exported folder)
    imports the pairs, and the activations when published, from there first.
    """
    from seqpatch.stages import patching as stage

    if from_source is not None:
        imported = import_parents(from_source, ["pairs", "activations"], data_dir)
        pairs = imported["pairs"]
    store = _store(data_dir)
    pairs_ref = store.resolve("pairs", pairs)
    if activations == "none":
        act_ref = None
    elif activations == "auto":
        act_ref = find_activations(store, pairs_ref, sites)
    else:
        act_ref = store.resolve("activations", activations)
    cfg = stage.PatchingConfig(
        sites=tuple(sites),
        layers=tuple(layers),
        method=method,
        shard_size=shard_size,
        activations=act_ref.version if act_ref else None,
    )
    parent = store.load("pairs", pairs_ref.version)
    act_rows = store.load("activations", act_ref.version) if act_ref else None
    handle = handle or pairs_model(pairs_ref)
    n_shards = stage.shard_count(len(parent), cfg)

    def build_shard(index: int) -> Any:
        return stage.build_shard(index, parent, cfg, handle, act_rows)

    only = None if shard is None else range(shard[0], n_shards, shard[1])
    ref = store.build_sharded(
        stage.STAGE,
        stage.SCHEMA_VERSION,
        cfg,
        n_shards,
        build_shard,
        parent=pairs_ref,
        model=handle.describe(),
        only_shards=only,
    )
    if ref is not None and charts:
        write_patching_artifacts(ref, store)
    return ref


def write_patching_artifacts(ref: StageRef, store: Store | None = None) -> list[Path]:
    """``heatmap.npy``/``heatmap.json`` and the heatmap + trace charts in the version folder."""
    from seqpatch.stages.patching import write_heatmap

    store = store or _store(None)
    rows = store.load(ref.stage, ref.version)
    written = write_heatmap(ref.path, rows)
    written += plot_heatmap(rows, ref.path)
    written += plot_traces(rows, ref.path)
    return written


def plot_heatmap(
    rows: Any, out_dir: Path, metric: str = "normalised", name: str = "heatmap"
) -> list[Path]:
    from seqpatch import charts
    from seqpatch.stages.patching import aggregate, effect_cells

    agg = aggregate(rows, metric)
    n_pairs = len(set(rows["pair_id"]))
    title = f"Activation patching A → B, {n_pairs} pairs: {charts.METRIC_TITLES[metric]}"
    chart = charts.heatmap_chart(effect_cells(agg), metric, title=title)
    return charts.save_chart(chart, Path(out_dir), name)


def plot_traces(
    rows: Any,
    out_dir: Path,
    metric: str = "normalised",
    pair_id: str | None = None,
    name: str = "traces",
) -> list[Path]:
    """Token traces of one pair: the changed token(s), the last token, and the strongest cells."""
    import polars as pl

    from seqpatch import charts
    from seqpatch.stages.patching import example_frame

    frame, row = example_frame(rows, metric, pair_id)
    strongest = (
        frame.group_by("position")
        .agg(pl.col("value").abs().max().alias("peak"))
        .sort("peak", descending=True)["position"]
        .head(3)
        .to_list()
    )
    highlight = sorted({*row["diff_positions"], row["n_tokens"] - 1, *strongest})
    title = (
        f"Token traces, pair {row['pair_id']}: "
        f"`{row['tokens_a'][row['diff_positions'][0]] if row['diff_positions'] else ''}` → "
        f"answers {row['ground_truth_a']} (A) vs {row['ground_truth_b']} (B)"
    )
    chart = charts.trace_chart(frame, metric, highlight, title=title)
    return charts.save_chart(chart, Path(out_dir), name)


# ---------------------------------------------------------------------------------------------
# seqpatch run


@dataclass(frozen=True)
class RunConfig:
    """The main job's settings; defaults take the organism end to end in a few CPU minutes."""

    seq_lens: str = "1-16"  # benchmark up to twice the organism's longest trained length
    n_per_len: int = 100
    min_accuracy: float = 0.8  # `seqpatch choose`'s default rule
    min_seq_len: int = 6
    max_seq_len: int = 8  # pairs use the chosen length, capped here to keep the sweep short
    divergence: str | None = None  # default: first-but-one, middle and last statement
    n_pairs: int = 1000
    sites: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")
    activations_dtype: str = "float32"
    seed: int = 0

    def divergence_for(self, seq_len: int) -> str:
        if self.divergence is not None:
            return self.divergence
        return ",".join(str(k) for k in sorted({min(1, seq_len - 1), seq_len // 2, seq_len - 1}))


@dataclass
class RunReport:
    steps: list[tuple[str, str, float]] = field(default_factory=list)  # (step, what, seconds)
    charts: list[Path] = field(default_factory=list)


def run(
    cfg: RunConfig = RunConfig(),
    data_dir: DataDir = None,
    echo: Callable[[str], None] = print,
) -> RunReport:
    """programs → benchmark → choose → pairs → activations → patching → charts, on the organism."""
    from seqpatch.choose import choose
    from seqpatch.models import load_model
    from seqpatch.stages import build_stage
    from seqpatch.stages.activations import ActivationsConfig
    from seqpatch.stages.benchmark import (
        BenchmarkConfig,
        build_benchmark,
        write_accuracy_chart,
        write_summary,
    )
    from seqpatch.stages.pairs import build_pairs, default_family
    from seqpatch.stages.patching import PatchingConfig
    from seqpatch.stages.programs import ProgramsConfig, parse_seq_lens

    ActivationsConfig(sites=cfg.sites, dtype=cfg.activations_dtype)  # bad options fail first
    PatchingConfig(sites=cfg.sites)
    report = RunReport()
    store = _store(data_dir)

    def step(name: str, action: Callable[[], Any]) -> Any:
        echo(f"▶ {name}")
        start = time.perf_counter()
        result = action()
        seconds = time.perf_counter() - start
        what = _describe(result)
        report.steps.append((name, what, seconds))
        echo(f"  {what} ({seconds:.1f} s)")
        return result

    family, params = default_family("builtin")
    if params:
        raise PipelineError(
            "the shipped organism was trained on a non-stock family; `seqpatch run` needs the "
            "programs stage to sample that family"
        )
    programs = step(
        "programs",
        lambda: build_stage(
            "programs",
            ProgramsConfig(family, parse_seq_lens(cfg.seq_lens), cfg.n_per_len, cfg.seed),
            store=store,
        ),
    )
    bench = step(
        "benchmark",
        lambda: build_benchmark(
            BenchmarkConfig(models=("builtin",)), programs=programs.version, store=store
        ),
    )
    report.charts += [write_summary(bench), *write_accuracy_chart(bench)]
    choice, _ = step(
        "choose",
        lambda: choose(cfg.min_accuracy, cfg.min_seq_len, bench.version, store.data_dir),
    )
    handle = load_model(choice.model_spec)
    seq_len = min(choice.seq_len, cfg.max_seq_len)
    pairs = step(
        "pairs",
        lambda: build_pairs(
            "chosen",
            seq_len,
            cfg.divergence_for(seq_len),
            cfg.n_pairs,
            cfg.seed,
            data_dir=store.data_dir,
            handle=handle,
        ),
    )
    acts = step(
        "activations",
        lambda: build_activations(
            cfg.sites,
            cfg.activations_dtype,
            pairs=pairs.version,
            data_dir=store.data_dir,
            handle=handle,
        ),
    )
    patch = step(
        "patching",
        lambda: build_patching(
            cfg.sites,
            pairs=pairs.version,
            activations=acts.version,
            data_dir=store.data_dir,
            handle=handle,
        ),
    )
    report.charts += sorted(patch.path.glob("*.png")) + sorted(patch.path.glob("*.html"))
    return report


def _describe(result: Any) -> str:
    from seqpatch.store import StageRef

    if isinstance(result, StageRef):
        action = "reused" if result.reused else "built"
        return (
            f"{action} {result.stage}/{result.version}: {result.provenance.get('row_count')} rows"
        )
    if isinstance(result, tuple) and hasattr(result[0], "model_spec"):
        choice = result[0]
        return f"chose {choice.model_spec} at seq_len {choice.seq_len} (accuracy {choice.accuracy:.3f})"
    return str(result)
