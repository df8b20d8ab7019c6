"""A small organism study with every stage the report shows, built through the Python API.

``build_study(data_dir)`` runs the main job on small settings (with causal tracing), then a
head grid, a whole-stream grid and DAS of the same pairs: a few seconds on the organism.
"""

from __future__ import annotations

from pathlib import Path

from seqpatch.pipeline import RunConfig, build_das, build_patching, run
from seqpatch.stages.das import DasConfig

SITES = ("resid_pre", "attn_out")


def study_config(n_pairs: int = 24) -> RunConfig:
    return RunConfig(
        seq_lens="2-6",
        n_per_len=6,
        min_accuracy=0.0,
        min_seq_len=2,
        max_seq_len=4,
        n_pairs=n_pairs,
        sites=SITES,
        tracing=True,
        tracing_programs=4,
    )


def build_study(data_dir: Path, n_pairs: int = 24) -> Path:
    """Every stage the report reads, on ``n_pairs`` pairs of the organism, in ``data_dir``."""
    run(study_config(n_pairs), data_dir, echo=lambda _: None, progress=False)
    build_patching(("head_z",), axes=("layer", "head"), data_dir=data_dir, progress=False)
    build_patching(
        ("resid_pre",),
        axes=("layer",),
        positions="from-divergence",
        data_dir=data_dir,
        progress=False,
    )
    build_das(
        DasConfig(top_n=1, ks=(1, 2), epochs=2, allow_small=True),  # 8 pairs: a smoke study
        patching=_first_patching(data_dir),
        data_dir=data_dir,
        progress=False,
    )
    return data_dir


def _first_patching(data_dir: Path) -> str:
    from seqpatch.store import Store

    return Store(data_dir).versions("patching")[0].version
