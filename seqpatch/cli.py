"""The ``seqpatch`` command line: a thin layer that parses options and calls library functions.

Layout (add a command by decorating a function with the matching sub-app)::

    seqpatch build <stage>      build_app      one pipeline stage into the store
    seqpatch list               app            stored stage versions
    seqpatch organism ...       organism_app   the built-in model
    seqpatch plot ...           plot_app       charts read from stored stages
    seqpatch run / choose / push / export      app

Every ``SeqpatchError`` raised by any command becomes one line on stderr and exit code 2 (see
``SeqpatchGroup``). Heavy libraries (datasets, torch, transformers) are imported inside commands
so that ``seqpatch --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from seqpatch.errors import SeqpatchError

USER_ERROR_EXIT_CODE = 2


class SeqpatchGroup(TyperGroup):
    """The root command group: turns a ``SeqpatchError`` from any sub-command into one line."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SeqpatchError as err:
            message = " ".join(str(err).split())
            typer.echo(f"Error: {message}", err=True)
            raise typer.Exit(USER_ERROR_EXIT_CODE) from None


def examples(*commands: str) -> str:
    """An epilog listing example commands (shown at the end of ``--help``)."""
    return "Examples:\n\n" + "\n\n".join(f"  $ {c}" for c in commands)


app = typer.Typer(
    cls=SeqpatchGroup,
    name="seqpatch",
    help="Find where and how a language model tracks the values of variables.",
    epilog=examples(
        "seqpatch build programs --family arithmetic --seq-lens 1-10 --n-per-len 200",
        "seqpatch list",
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
build_app = typer.Typer(
    help="Build one pipeline stage into the store (reuses a stored version with the same config).",
    no_args_is_help=True,
)
organism_app = typer.Typer(help="The built-in model: train it, inspect it.", no_args_is_help=True)
plot_app = typer.Typer(help="Charts read from stored stages.", no_args_is_help=True)
app.add_typer(build_app, name="build")
app.add_typer(organism_app, name="organism")
app.add_typer(plot_app, name="plot")


# ---------------------------------------------------------------------------------------------
# Shared options

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder of the versioned store \\[default: $SEQPATCH_DATA or ./seqpatch-data].",
        show_default=False,
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random choice.")]
FamilyOpt = Annotated[
    str,
    typer.Option("--family", help="Program family: arithmetic, binding or modular."),
]


# ---------------------------------------------------------------------------------------------
# build


@build_app.command(
    "programs",
    epilog=examples(
        "seqpatch build programs --family arithmetic --seq-lens 1-10 --n-per-len 200 --seed 0",
        "seqpatch build programs --family binding --seq-lens 3,5,8 --n-per-len 50",
        "seqpatch build programs --family modular --seq-lens 1-4,8 --data-dir /tmp/sp",
    ),
)
def build_programs(
    family: FamilyOpt = "arithmetic",
    seq_lens: Annotated[
        str, typer.Option("--seq-lens", help="Lengths: a range 1-10, a list 3,5,8, or 1-4,8.")
    ] = "1-10",
    n_per_len: Annotated[
        int, typer.Option("--n-per-len", help="Programs sampled per length.")
    ] = 200,
    seed: SeedOpt = 0,
    data_dir: DataDirOpt = None,
) -> None:
    """Sample programs of one family: the task rows every later stage starts from."""
    from seqpatch.stages import build_stage
    from seqpatch.stages.programs import ProgramsConfig, parse_seq_lens

    cfg = ProgramsConfig(family, parse_seq_lens(seq_lens), n_per_len, seed)
    ref = build_stage("programs", cfg, data_dir=data_dir)
    _report(ref)


def _report(ref: Any) -> None:
    action = "reused" if ref.reused else "built"
    rows = ref.provenance.get("row_count")
    typer.echo(f"{action} {ref.stage} version {ref.version} ({rows} rows): {ref.path}")


# ---------------------------------------------------------------------------------------------
# list


@app.command("list", epilog=examples("seqpatch list", "seqpatch list --data-dir /tmp/sp"))
def list_stages(data_dir: DataDirOpt = None) -> None:
    """Show every stored stage version with its row count, parent and config."""
    from rich.console import Console
    from rich.table import Table

    from seqpatch.store import Store

    store = Store(data_dir)
    refs = store.refs()
    if not refs:
        typer.echo(
            f"no stages stored in {store.data_dir}; start with `seqpatch build programs`", err=True
        )
        return
    rows = [_list_row(ref.stage, ref.version, ref.provenance) for ref in refs]
    columns = ["stage", "version", "rows", "created", "parent", "model", "config"]
    shown = [i for i, name in enumerate(columns) if any(row[i] for row in rows)]
    table = Table(title=f"stages in {store.data_dir}")
    for i in shown:
        wraps = columns[i] in ("parent", "model", "config")
        table.add_column(columns[i], no_wrap=not wraps, overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    Console().print(table)


def _list_row(stage: str, version: str, prov: Any) -> list[str]:
    from seqpatch.store import canonical_json

    parent = prov.get("parent") or {}
    model = prov.get("model") or {}
    config = prov.get("config") or {}
    return [
        stage,
        version,
        str(prov.get("row_count", "?")),
        str(prov.get("created", ""))[:16].replace("T", " "),
        f"{parent.get('stage')}/{parent.get('version')}" if parent else "",
        str(model.get("id") or ""),
        " ".join(
            f"{k}={v if isinstance(v, str) else canonical_json(v)}" for k, v in config.items()
        ),
    ]


# ---------------------------------------------------------------------------------------------
# push / export / import (seqpatch.hub)

StageArg = Annotated[
    str, typer.Argument(help="Stage: programs, benchmark, pairs, activations or patching.")
]
VersionOpt = Annotated[
    str, typer.Option("--version", help="Stored version (or a unique prefix), or 'latest'.")
]
ShardSizeOpt = Annotated[
    str, typer.Option("--max-shard-size", help="Largest parquet shard, e.g. 500MB or 2GB.")
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
) -> None:
    """Publish a stored stage as a config of a Hub dataset repo, in one commit.

    Afterwards load_dataset("USER/NAME", "STAGE") works. Token: HF_TOKEN or `hf auth login`.
    """
    from seqpatch.hub import push_stage

    url = push_stage(
        stage,
        repo_id,
        version=version,
        private=private,
        data_dir=data_dir,
        max_shard_size=max_shard_size,
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
    to: Annotated[Path, typer.Option("--to", help="Folder; other stages already there are kept.")],
    version: VersionOpt = "latest",
    data_dir: DataDirOpt = None,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Repo id shown in the card's examples.")
    ] = None,
    max_shard_size: ShardSizeOpt = "500MB",
) -> None:
    """Write a stored stage to a folder in exactly the layout `seqpatch push` uploads.

    Afterwards load_dataset("FOLDER", "STAGE", split="train") works.
    """
    from seqpatch.hub import export_stage

    folder = export_stage(
        stage,
        to,
        version=version,
        data_dir=data_dir,
        repo_id=repo_id,
        max_shard_size=max_shard_size,
    )
    typer.echo(f"exported {stage} to {folder} (load_dataset({str(folder)!r}, {stage!r}))")


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

    _report(import_stage(source, stage, data_dir, revision=revision))


def main() -> None:
    app()
