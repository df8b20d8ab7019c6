"""The main job, ``run``: programs → benchmark → choose → pairs → activations → patching.

The stages' own entry points (``build_programs`` … ``build_das``, ``stage_options``) live in
``seqpatch.builds`` and are importable from here as well; ``run`` chains them with one model
cache. Every function is usable from a notebook; the CLI only parses options.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqpatch.bounds import MAX_PAIRS, MAX_PROGRAMS, check_count, check_finite
from seqpatch.builds import (
    DataDir,
    PipelineError,
    build_activations,
    build_benchmark,
    build_das,
    build_pairs,
    build_patching,
    build_programs,
    build_tracing,
    default_family,
    find_activations,
    import_parents,
    pairs_config,
    parse_shard,
    stage_options,
)

__all__ = [
    "DataDir",
    "PipelineError",
    "RunConfig",
    "RunReport",
    "build_activations",
    "build_benchmark",
    "build_das",
    "build_pairs",
    "build_patching",
    "build_programs",
    "build_tracing",
    "default_family",
    "find_activations",
    "import_parents",
    "pairs_config",
    "parse_shard",
    "run",
    "stage_options",
]


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
    tracing: bool = False  # add ROME's causal trace of the same pairs after patching
    tracing_programs: int = 60  # ~1 s each unloaded (1-7 s on a busy 2-core box): +1-2 min

    def __post_init__(self) -> None:
        """Every option is checked before the first step runs (a bad one costs no work)."""
        for name, value, low in (
            ("n_per_len", self.n_per_len, 1),
            ("min_seq_len", self.min_seq_len, 1),
            ("max_seq_len", self.max_seq_len, 1),
            ("n_pairs", self.n_pairs, 1),
            ("seed", self.seed, 0),
            ("tracing_programs", self.tracing_programs, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise PipelineError(f"{name} must be an integer >= {low}, got {value!r}")
        check_finite("min_accuracy", self.min_accuracy, PipelineError, at_least=0, at_most=1)
        check_count("n_pairs", self.n_pairs, MAX_PAIRS, PipelineError, "kept pairs")
        from seqpatch.stages.programs import parse_seq_lens

        lengths = parse_seq_lens(self.seq_lens)
        check_count(
            "n_per_len x lengths",
            self.n_per_len * len(lengths),
            MAX_PROGRAMS,
            PipelineError,
            "one row per program",
        )

    def divergence_for(self, seq_len: int) -> str:
        if self.divergence is not None:
            return self.divergence
        return ",".join(str(k) for k in sorted({min(1, seq_len - 1), seq_len // 2, seq_len - 1}))


@dataclass
class RunReport:
    steps: list[tuple[str, str, float]] = field(default_factory=list)  # (step, what, seconds)
    charts: list[Path] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # step -> the stored version it gave


def run(
    cfg: RunConfig = RunConfig(),
    data_dir: DataDir = None,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    device: str = "auto",
) -> RunReport:
    """programs → benchmark → choose → pairs → activations → patching → charts, on the organism
    (then ``tracing`` of the same pairs when ``cfg.tracing``).

    One ``ModelCache`` serves every step, so the organism is loaded at most once; a step whose
    version is stored loads nothing. ``device`` is where it runs (``RuntimeSettings.device``).
    """
    from seqpatch.choose import choose, read_chosen
    from seqpatch.options import RuntimeSettings
    from seqpatch.plots import default_charts_dir
    from seqpatch.stages.activations import ActivationsConfig
    from seqpatch.stages.base import ModelCache
    from seqpatch.stages.benchmark import BenchmarkConfig, accuracy_chart_artifacts
    from seqpatch.stages.patching import PatchingConfig
    from seqpatch.stages.programs import ProgramsConfig, parse_seq_lens
    from seqpatch.store import Store, write_artifacts

    ActivationsConfig(sites=cfg.sites, dtype=cfg.activations_dtype)  # bad options fail first
    PatchingConfig(sites=cfg.sites)
    family, params = default_family("builtin")
    if params:
        raise PipelineError(
            "the shipped organism was trained on a non-stock family; `seqpatch run` needs the "
            "programs stage to sample that family"
        )
    programs_cfg = ProgramsConfig(family, parse_seq_lens(cfg.seq_lens), cfg.n_per_len, cfg.seed)
    report = RunReport()
    store = Store(data_dir)
    models = ModelCache(device=RuntimeSettings(device=device).resolved_device())

    def step(name: str, action: Callable[[], Any]) -> Any:
        if progress:
            echo(f"▶ {name}")
        start = time.perf_counter()
        result = action()
        seconds = time.perf_counter() - start
        what = _describe(result)
        report.steps.append((name, what, seconds))
        if hasattr(result, "version"):
            report.versions[name] = result.version
        echo(f"  {what} ({seconds:.1f} s)")
        return result

    programs = step("programs", lambda: build_programs(programs_cfg, data_dir=store.data_dir))
    bench = step(
        "benchmark",
        lambda: build_benchmark(
            BenchmarkConfig(models=("builtin",)),
            programs=programs.version,
            data_dir=store.data_dir,
            models=models,
            progress=progress,
        ),
    )
    choice, _ = step(
        "choose",
        lambda: choose(cfg.min_accuracy, cfg.min_seq_len, bench.version, store.data_dir),
    )
    seq_len = min(choice.seq_len, cfg.max_seq_len)
    charts = accuracy_chart_artifacts(
        bench,
        ("png",),
        chosen=read_chosen(store.data_dir),
        studied=seq_len,
        cap_reason=f"capped by --max-seq-len {cfg.max_seq_len}",
    )
    report.charts += write_artifacts(default_charts_dir(bench), charts)
    if seq_len < choice.seq_len:
        echo(
            f"  studying seq_len {seq_len}: the chosen length {choice.seq_len} is capped by "
            f"--max-seq-len {cfg.max_seq_len} to keep the sweep short"
        )
    else:
        echo(f"  studying the chosen seq_len {seq_len}")
    pairs = step(
        "pairs",
        lambda: build_pairs(
            "chosen",
            seq_len,
            cfg.divergence_for(seq_len),
            cfg.n_pairs,
            cfg.seed,
            data_dir=store.data_dir,
            models=models,
            progress=progress,
        ),
    )
    acts = step(
        "activations",
        lambda: build_activations(
            cfg.sites,
            cfg.activations_dtype,
            pairs=pairs.version,
            data_dir=store.data_dir,
            models=models,
            progress=progress,
        ),
    )
    patch = step(
        "patching",
        lambda: build_patching(
            cfg.sites,
            pairs=pairs.version,
            activations=acts.version,
            data_dir=store.data_dir,
            models=models,
            progress=progress,
        ),
    )
    report.charts += sorted(patch.path.glob("*.png"))
    if cfg.tracing:
        traced = step(
            "tracing",
            lambda: build_tracing(
                n_programs=cfg.tracing_programs,
                pairs=pairs.version,
                data_dir=store.data_dir,
                models=models,
                progress=progress,
            ),
        )
        report.charts += sorted(traced.path.glob("*.png"))
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
