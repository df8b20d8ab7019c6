"""``seqpatch plot``: charts redrawn from stored stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from seqpatch.cli._common import (
    BenchmarkVersionOpt,
    DataDirOpt,
    MetricOpt,
    OutOpt,
    PatchingVersionOpt,
    check_out_folder,
    examples,
)

app = typer.Typer(help="Charts read from stored stages.", no_args_is_help=True)


@app.command(
    "accuracy",
    epilog=examples(
        "seqpatch plot accuracy",
        "seqpatch plot accuracy --benchmark 3f2a --out ./figures",
    ),
)
def plot_accuracy(
    benchmark: BenchmarkVersionOpt = "latest",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for accuracy.html/.png \\[default: <data_dir>/charts/benchmark-<version>].",
            callback=check_out_folder,
        ),
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Redraw accuracy by program length (Wilson 95% intervals) from a stored benchmark."""
    from seqpatch.choose import CHOSEN_FILE, read_chosen
    from seqpatch.plots import default_charts_dir
    from seqpatch.stages.benchmark import STAGE, accuracy_chart_artifacts
    from seqpatch.store import Store, write_artifacts

    store = Store(data_dir)
    out = store.output_folder(out) if out is not None else None
    ref = store.resolve(STAGE, benchmark)
    chosen = read_chosen(data_dir) if (store.data_dir / CHOSEN_FILE).is_file() else None
    charts = accuracy_chart_artifacts(ref, chosen=chosen)
    for path in write_artifacts(out or store.output_folder(default_charts_dir(ref)), charts):
        typer.echo(f"chart: {path}")


@app.command(
    "heatmap",
    epilog=examples(
        "seqpatch plot heatmap",
        "seqpatch plot heatmap --metric logit_diff --out ./figures",
        "seqpatch plot heatmap --k 1,4 --sites resid_pre   # part of a wide study",
    ),
)
def plot_heatmap(
    patching: PatchingVersionOpt = "latest",
    metric: MetricOpt = "normalised",
    k: Annotated[
        str | None,
        typer.Option(
            "--k",
            help="Divergence indices to draw, e.g. 1,4 \\[default: every one].",
            show_default=False,
        ),
    ] = None,
    sites: Annotated[
        str | None,
        typer.Option(
            "--sites",
            help="Sites to draw, e.g. resid_pre \\[default: every one].",
            show_default=False,
        ),
    ] = None,
    out: OutOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Layer x token heatmap of the mean effect over pairs, one panel per site (HTML + PNG)."""
    from seqpatch.options import csv, int_list
    from seqpatch.plots import default_charts_dir
    from seqpatch.plots import plot_heatmap as plot
    from seqpatch.store import Store

    ks = int_list("--k", "1,4")(k) if k is not None else None
    site_list = csv(sites) if sites is not None else None
    store = Store(data_dir)
    out = store.output_folder(out) if out is not None else None
    ref = store.resolve("patching", patching)
    out = out or store.output_folder(default_charts_dir(ref))
    rows = store.load("patching", ref.version)
    for path in plot(rows, out, metric, ks, site_list):
        typer.echo(f"chart: {path}")


@app.command(
    "traces",
    epilog=examples(
        "seqpatch plot traces",
        "seqpatch plot traces --pair-id binding-L8-k3-0000042 --out ./figures",
    ),
)
def plot_traces(
    patching: PatchingVersionOpt = "latest",
    pair_id: Annotated[
        str | None, typer.Option("--pair-id", help="Pair to draw \\[default: the first].")
    ] = None,
    metric: MetricOpt = "normalised",
    out: OutOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """One pair's effect across layers for its changed, last and strongest tokens."""
    from seqpatch.plots import default_charts_dir, parent_rows
    from seqpatch.plots import plot_traces as plot
    from seqpatch.store import Store

    store = Store(data_dir)
    out = store.output_folder(out) if out is not None else None
    ref = store.resolve("patching", patching)
    rows = store.load("patching", ref.version)
    pairs = parent_rows(store, ref, "pairs")
    out = out or store.output_folder(default_charts_dir(ref))
    for path in plot(rows, out, metric, pair_id, pairs):
        typer.echo(f"chart: {path}")


@app.command(
    "tracing",
    epilog=examples(
        "seqpatch plot tracing",
        "seqpatch plot tracing --tracing 3f2a --out ./figures",
    ),
)
def plot_tracing(
    tracing: Annotated[
        str, typer.Option("--tracing", help="Tracing version (or unique prefix), or 'latest'.")
    ] = "latest",
    out: OutOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """ROME's causal-trace chart: average indirect effect of restoring each state (HTML + PNG).

    Three panels per divergence index (single restored state, MLP window, attention window),
    layers across, tokens down, corrupted tokens marked.
    """
    from seqpatch.plots import default_charts_dir
    from seqpatch.plots import plot_tracing as plot
    from seqpatch.store import Store

    store = Store(data_dir)
    out = store.output_folder(out) if out is not None else None
    ref = store.resolve("tracing", tracing)
    rows = store.load("tracing", ref.version)
    model = next(
        (
            found.provenance["config"].get("model")
            for parent in ref.parents
            if parent.get("stage") == "pairs"
            and (found := store.find("pairs", parent.get("version") or "")) is not None
        ),
        (ref.provenance.get("model") or {}).get("id"),
    )
    noise_scale = ref.provenance["config"].get("noise_scale")
    out = out or store.output_folder(default_charts_dir(ref))
    for path in plot(rows, out, model, noise_scale):
        typer.echo(f"chart: {path}")
