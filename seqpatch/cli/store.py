"""``seqpatch list`` and ``seqpatch merge``: what the store holds, and joining sharded builds."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from seqpatch.cli._common import DataDirOpt, check_data_dir, examples, report

app = typer.Typer()


@app.command("list", epilog=examples("seqpatch list", "seqpatch list --data-dir /tmp/sp"))
def list_stages(data_dir: DataDirOpt = None) -> None:
    """Show every stored stage version with its row count, parents, model and config.

    A table when the terminal is wide enough for it, else one block per version.
    """
    from rich.console import Console

    from seqpatch.store import Store

    store = Store(data_dir)
    check_data_dir(store.data_dir)  # also when it comes from $SEQPATCH_DATA
    refs = store.refs()
    damaged = [problem for stage in store.stages() for _, problem in store.damaged(stage)]
    for problem in damaged:
        typer.echo(problem, err=True)
    if not refs and damaged:
        raise typer.Exit(1)
    if not refs:
        typer.echo(
            f"no stages stored in {store.data_dir}; start with `seqpatch build programs`", err=True
        )
        return
    console = Console()
    rows = [_list_row(ref.stage, ref.version, ref.provenance) for ref in refs]
    title = f"stages in {store.data_dir}"
    shown = [i for i, _ in enumerate(_COLUMNS) if any(row[i] for row in rows)]
    if _table_width(rows, shown) <= console.width:
        console.print(_table(title, rows, shown))
    else:
        _print_blocks(console, title, rows)


_COLUMNS = ("stage", "version", "rows", "created", "parents", "model", "config")


def _table_width(rows: list[list[str]], shown: list[int]) -> int:
    """Characters the table needs with no cell wrapped: each column, its padding and border."""
    widths = [
        max(
            len(line)
            for text in (_COLUMNS[i], *(row[i] for row in rows))
            for line in text.split("\n")
        )
        for i in shown
    ]
    return 1 + sum(w + 3 for w in widths)


def _table(title: str, rows: list[list[str]], shown: list[int]) -> Any:
    """The columns ``shown``; the caller has checked that the terminal fits every cell."""
    from rich.table import Table

    table = Table(title=title)
    for i in shown:
        table.add_column(_COLUMNS[i], no_wrap=True)
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table


def _print_blocks(console: Any, title: str, rows: list[list[str]]) -> None:
    """One block per version for a narrow terminal: a header line, then model, parents, config.

    Lines wrap between ``key=value`` items, never inside a word.
    """
    from rich.padding import Padding
    from rich.text import Text

    console.print(Text(title, style="italic"))
    for stage, version, n_rows, created, parents, model, config in rows:
        console.print(
            Text(f"{stage}/{version}", style="bold") + Text(f"  {n_rows} rows  {created}")
        )
        details = (("model", model), ("parents", parents.replace("\n", " ")), ("config", config))
        for label, value in details:
            if value:
                text = Text(f"{label}: {value}", overflow="fold")
                console.print(Padding(text, (0, 0, 0, 2), expand=False))


def _list_row(stage: str, version: str, prov: Any) -> list[str]:
    from seqpatch.store import canonical_json, parents_of

    model = prov.get("model") or {}
    config = prov.get("config") or {}
    return [
        stage,
        version,
        str(prov.get("row_count", "?")),
        str(prov.get("created", ""))[:16].replace("T", " "),
        "\n".join(f"{p.get('stage')}/{p.get('version')}" for p in parents_of(prov)),
        str(model.get("id") or ""),
        " ".join(
            f"{k}={v if isinstance(v, str) else canonical_json(v)}" for k, v in config.items()
        ),
    ]


@app.command(
    "merge",
    epilog=examples(
        "seqpatch merge patching",
        "seqpatch merge tracing --data-dir /shared/sp",
        "seqpatch merge patching --version 3f2a   # when several builds left shards",
    ),
)
def merge(
    stage: Annotated[
        str, typer.Argument(help="The sharded stage the jobs built: patching, tracing, ….")
    ],
    version: Annotated[
        str | None,
        typer.Option(
            "--version",
            help=r"The version (or a prefix) whose shards to join \[default: the only one].",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Join the shards that `seqpatch build STAGE --shard i/n` jobs built into their version.

    The config, parents and shard size come from the shards' manifest, so merge commits exactly
    the version the jobs were building; it computes nothing and never builds another version.
    """
    from seqpatch.merge import merge_shards

    report(merge_shards(stage, version, data_dir))


@app.command(
    "verify",
    epilog=examples(
        "seqpatch verify                   # every stage",
        "seqpatch verify pairs patching",
        "seqpatch verify --clean           # remove damaged versions and debris",
    ),
)
def verify(
    stages: Annotated[
        list[str] | None, typer.Argument(help="Stages to check \\[default: every stage].")
    ] = None,
    clean: Annotated[
        bool,
        typer.Option(
            "--clean",
            help="Remove damaged versions and debris (temporary folders of killed builds, "
            "unfinished shard folders that no build is using).",
        ),
    ] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Check every stored version against the SHA-256 and row count recorded at its commit.

    Anything standing at a version's name that is not a complete version (no seqpatch.json, a
    file instead of a folder, provenance without its checksum) is damaged too. Also lists debris
    that interrupted builds left. Exits 1 when anything is damaged (after --clean: when
    anything could not be removed), 2 for a stage that is not stored.
    """
    from seqpatch.store import Store

    store = Store(data_dir)
    check_data_dir(store.data_dir)
    for stage in stages or []:
        store.stage_dir(stage)  # a bad name is one line, exit 2
    report = store.verify(stages, clean=clean)
    verb = "removed" if clean else "damaged"
    for line in report.damaged:
        typer.echo(f"{verb}: {line}")
    for path in report.debris:
        typer.echo(f"{'removed debris' if clean else 'debris'}: {path}")
    typer.echo(
        f"{len(report.ok)} versions ok, {len(report.damaged)} damaged, "
        f"{len(report.debris)} debris" + (" (removed)" if clean and not report.clean else "")
    )
    if report.damaged and not clean:
        typer.echo(
            f"repair: `seqpatch verify --clean --data-dir {store.data_dir}`, then rerun the builds"
        )
        raise typer.Exit(1)
