"""``seqpatch organism``: the built-in model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from seqpatch.cli._common import OptionError, SeedOpt, examples


def _check_lr(param: typer.CallbackParam, value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise OptionError(f"{param.opts[0]} must be > 0, got {value}")
    return value


app = typer.Typer(help="The built-in model: train it, inspect it.", no_args_is_help=True)


@app.command(
    "train",
    epilog=examples(
        "seqpatch organism train --out ./organism",
        "seqpatch organism train --seed 1 --steps 600 --max-len 6 --out /tmp/organism",
    ),
)
def organism_train(
    out: Annotated[Path, typer.Option("--out", help="Folder that receives the trained model.")],
    family: Annotated[
        str,
        typer.Option("--family", help="Program family with one-digit answers: binding, modular."),
    ] = "binding",
    seed: SeedOpt = 0,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            help="Optimiser steps \\[default: the shipped model's].",
            show_default=False,
            min=1,
        ),
    ] = None,
    max_len: Annotated[
        int | None,
        typer.Option(
            "--max-len",
            help="Longest program trained on \\[default: the shipped model's].",
            show_default=False,
            min=1,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Programs per step \\[default: the shipped model's].",
            show_default=False,
            min=1,
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Peak learning rate \\[default: the shipped model's].",
            show_default=False,
            callback=_check_lr,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="torch threads; the weights depend on it \\[default: the shipped model's].",
            show_default=False,
            min=1,
        ),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Also write into a non-empty folder not written by seqpatch (none of its files "
            "is replaced or deleted).",
        ),
    ] = False,
) -> None:
    """Train the built-in organism from scratch (deterministic from the seed on one machine).

    Every other setting is the shipped model's (seqpatch.organism.OrganismTrainConfig; all of
    them are options of scripts/train_organism.py). Writes the model, tokenizer, training.json
    and a model card to --out: an absent or empty folder, or one it wrote before (checked
    before training).
    """
    from seqpatch.organism import OrganismTrainConfig, train_organism

    overrides = {
        "steps": steps,
        "max_len": max_len,
        "batch_size": batch_size,
        "lr": lr,
        "threads": threads,
    }
    cfg = OrganismTrainConfig(
        family=family, seed=seed, **{k: v for k, v in overrides.items() if v is not None}
    )
    metrics = train_organism(cfg, out, progress=progress, force=force)
    accuracy = " ".join(f"{k}:{v:.3f}" for k, v in metrics["accuracy_by_length"].items())
    typer.echo(f"trained {metrics['n_params']:,} parameters in {metrics['train_wall_s']:.0f} s")
    typer.echo(f"held-out accuracy by length: {accuracy}")
    typer.echo(f"saved to {out}")
