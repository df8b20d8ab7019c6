"""``seqpatch report``: the study page, one self-contained HTML file read from stored stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from seqpatch.cli._common import DataDirOpt, examples

app = typer.Typer()


@app.command(
    "report",
    epilog=examples(
        "seqpatch report",
        "seqpatch report --pairs 1279 --out /tmp/study.html",
        "seqpatch report --metric prob_delta --data-dir /tmp/sp",
    ),
)
def report(
    pairs: Annotated[
        str,
        typer.Option("--pairs", help="The pairs version whose study is shown (or a prefix)."),
    ] = "latest",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Page file (.html) or folder \\[default: <data_dir>/reports/<pairs>/index.html].",
            show_default=False,
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            help="Patching metric drawn and drilled into: normalised, prob_delta, logit_diff, "
            "prob_delta_candidates.",
        ),
    ] = "normalised",
    data_dir: DataDirOpt = None,
) -> None:
    """Write one HTML page of a study: findings, accuracy and the choice, pairs, every patching
    grid with a drill-down to the pairs behind each cell, tracing, DAS and the lineage.

    Reads stored stages only (nothing is recomputed) and opens without a network.
    """
    from seqpatch.report import build_report
    from seqpatch.views import Study

    path = build_report(Study(data_dir, pairs=pairs), out, metric)
    typer.echo(f"report: {path}")
