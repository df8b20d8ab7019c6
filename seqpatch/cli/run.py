"""``seqpatch run`` (the main job, end to end) and ``seqpatch choose`` (its model choice)."""

from __future__ import annotations

from typing import Annotated

import typer

from seqpatch.cli._common import (
    MAX_SEQ_LEN,
    BenchmarkVersionOpt,
    DataDirOpt,
    SeedOpt,
    SitesOpt,
    csv,
    examples,
)
from seqpatch.cli._stages import DeviceOpt

app = typer.Typer()


@app.command(
    "choose",
    epilog=examples(
        "seqpatch choose --min-accuracy 0.8 --min-seq-len 6",
        "seqpatch choose --min-accuracy 0.9 --min-seq-len 4 --benchmark 3f2a --data-dir /tmp/sp",
    ),
)
def choose(
    min_accuracy: Annotated[
        float,
        typer.Option("--min-accuracy", help="Accuracy the model must reach.", min=0, max=1),
    ] = 0.8,
    min_seq_len: Annotated[
        int, typer.Option("--min-seq-len", help="Shortest program length that counts.", min=1)
    ] = 6,
    benchmark: BenchmarkVersionOpt = "latest",
    data_dir: DataDirOpt = None,
) -> None:
    """Pick the smallest model reaching the accuracy, and its longest such length.

    Writes <data_dir>/chosen_model.json.
    """
    from seqpatch.choose import choose as choose_from_store

    choice, path = choose_from_store(min_accuracy, min_seq_len, benchmark, data_dir)
    typer.echo(
        f"chose {choice.model_spec} ({choice.n_params:,} parameters) at seq_len "
        f"{choice.seq_len}: accuracy {choice.accuracy:.3f} "
        f"[{choice.ci_low:.3f}, {choice.ci_high:.3f}], n={choice.n}: {path}"
    )


@app.command(
    "run",
    epilog=examples(
        "seqpatch run",
        "seqpatch run --n-pairs 2000 --sites resid_pre --data-dir /tmp/sp",
        "seqpatch run --tracing   # adds ROME's causal trace of 60 of the pairs",
    ),
)
def run(
    n_pairs: Annotated[int, typer.Option("--n-pairs", help="Counterfactual pairs.", min=1)] = 1000,
    max_seq_len: Annotated[
        int,
        typer.Option(
            "--max-seq-len",
            help="Longest program length for the pairs (the chosen length caps it).",
            min=1,
            max=MAX_SEQ_LEN,
        ),
    ] = 8,
    min_accuracy: Annotated[
        float, typer.Option("--min-accuracy", help="Accuracy `choose` requires.", min=0, max=1)
    ] = 0.8,
    sites: SitesOpt = "resid_pre,attn_out,mlp_out",
    seed: SeedOpt = 0,
    tracing: Annotated[
        bool,
        typer.Option(
            "--tracing/--no-tracing",
            help="Also trace the first --tracing-programs pairs as ROME does (causal tracing).",
        ),
    ] = False,
    tracing_programs: Annotated[
        int,
        typer.Option(
            "--tracing-programs",
            help="Programs --tracing traces (about 1 s each on the organism).",
            min=1,
        ),
    ] = 60,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only results: no progress bars.")
    ] = False,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
) -> None:
    """The main job: the whole pipeline on the built-in model, end to end.

    programs -> benchmark -> choose -> pairs -> activations -> patching -> charts (and, with
    --tracing, tracing), then the study's page (`seqpatch report`), whose path it prints last.
    Every step
    reuses a stored version with the same config, so a rerun (or a run after an interrupt)
    only does what is missing.
    """
    from seqpatch.pipeline import RunConfig
    from seqpatch.pipeline import run as run_pipeline

    cfg = RunConfig(
        min_accuracy=min_accuracy,
        max_seq_len=max_seq_len,
        n_pairs=n_pairs,
        sites=csv(sites),
        seed=seed,
        tracing=tracing,
        tracing_programs=tracing_programs,
    )
    result = run_pipeline(cfg, data_dir, echo=typer.echo, progress=not quiet, device=device)
    total = sum(seconds for _, _, seconds in result.steps)
    typer.echo(f"done in {total:.0f} s. Charts:")
    for path in result.charts:
        typer.echo(f"  {path}")
    from seqpatch.report import build_report
    from seqpatch.views import Study

    page = build_report(Study(data_dir, pairs=result.versions["pairs"]))
    typer.echo(f"Report (open in a browser): {page}")
