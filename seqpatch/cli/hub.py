"""``seqpatch push / export / import``: stored stages to and from the Hub or a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from seqpatch.cli._common import (
    DataDirOpt,
    ShardSizeOpt,
    StageArg,
    VersionOpt,
    check_out_folder,
    examples,
    report,
)

app = typer.Typer()

LineageOpt = Annotated[
    bool,
    typer.Option(
        "--lineage/--no-lineage",
        help="Also write the exact stored versions the stage was built from.",
    ),
]


@app.command(
    "push",
    epilog=examples(
        "seqpatch push programs --repo-id alice/seqpatch-arithmetic",
        "seqpatch push activations --repo-id alice/seqpatch-arithmetic --version 3f2a --private",
        "HF_TOKEN=hf_... seqpatch push patching --repo-id alice/seqpatch-arithmetic",
    ),
)
def push(
    stage: StageArg,
    repo_id: Annotated[
        str, typer.Option("--repo-id", help="Dataset repo USER/NAME; one repo holds every stage.")
    ],
    version: VersionOpt = "latest",
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    data_dir: DataDirOpt = None,
    max_shard_size: ShardSizeOpt = "500MB",
    lineage: LineageOpt = True,
) -> None:
    """Publish a stored stage as a config of a Hub dataset repo, in one commit.

    With it go the exact stored versions it was built from (its lineage), so the repo is
    consistent. Afterwards load_dataset("USER/NAME", "STAGE") works. Token: HF_TOKEN or
    `hf auth login`; every local check (token never written, card renders) runs before the
    first Hub call.
    """
    from seqpatch.hub import push_stage

    url = push_stage(
        stage,
        repo_id,
        version=version,
        private=private,
        data_dir=data_dir,
        max_shard_size=max_shard_size,
        lineage=lineage,
    )
    typer.echo(f"published {stage} as config {stage!r} of {repo_id}: {url}")


@app.command(
    "export",
    epilog=examples(
        "seqpatch export pairs --to ./study",
        "seqpatch export patching --to ./study --version 3f2a --repo-id alice/study",
    ),
)
def export(
    stage: StageArg,
    to: Annotated[
        Path,
        typer.Option(
            "--to",
            help="Folder; other stages already there are kept.",
            callback=check_out_folder,
        ),
    ],
    version: VersionOpt = "latest",
    data_dir: DataDirOpt = None,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Repo id shown in the card's examples.")
    ] = None,
    max_shard_size: ShardSizeOpt = "500MB",
    lineage: LineageOpt = True,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Also write into a non-empty folder that is not a seqpatch export (files "
            "seqpatch did not write are never deleted).",
        ),
    ] = False,
) -> None:
    """Write a stored stage, and the stored versions it was built from, to a folder in exactly
    the layout `seqpatch push` uploads.

    Refuses the data dir and any folder inside it, and a non-empty folder that is not an
    export (unless --force). Afterwards load_dataset("FOLDER", "STAGE", split="train") works.
    """
    from seqpatch.hub import export_stage

    exported = export_stage(
        stage,
        to,
        version=version,
        data_dir=data_dir,
        repo_id=repo_id,
        max_shard_size=max_shard_size,
        force=force,
        lineage=lineage,
    )
    typer.echo(exported.summary())
    typer.echo(f"load it with load_dataset({str(to)!r}, {stage!r}, split='train')")


@app.command(
    "import",
    epilog=examples(
        "seqpatch import activations --from alice/seqpatch-arithmetic",
        "seqpatch import pairs --from ./study --data-dir /tmp/sp",
    ),
)
def import_(
    stage: StageArg,
    source: Annotated[
        str, typer.Option("--from", help="Hub dataset repo USER/NAME, or a folder from export.")
    ],
    revision: Annotated[
        str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Register a published stage in the local store, so later stages build on it."""
    from seqpatch.hub import import_stage

    report(import_stage(source, stage, data_dir, revision=revision))
