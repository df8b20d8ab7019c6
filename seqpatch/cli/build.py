"""``seqpatch build <stage>``: build one pipeline stage into the store, or reuse a stored one."""

from __future__ import annotations

import typer

from seqpatch.cli._stages import LazyStageGroup

app = typer.Typer(
    cls=LazyStageGroup,
    help="Build one pipeline stage into the store (reuses a stored version with the same config).",
    no_args_is_help=True,
)
