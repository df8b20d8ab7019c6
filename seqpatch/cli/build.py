"""``seqpatch build <stage>``: build one pipeline stage into the store, or reuse a stored one."""

from __future__ import annotations

from typing import Annotated

import typer

from seqpatch.cli._common import (
    MAX_SEQ_LEN,
    DataDirOpt,
    FamilyOpt,
    SeedOpt,
    check_seq_lens,
    examples,
    report,
)
from seqpatch.cli._stages import LazyStageGroup

app = typer.Typer(
    cls=LazyStageGroup,
    help="Build one pipeline stage into the store (reuses a stored version with the same config).",
    no_args_is_help=True,
)


@app.command(
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
        str,
        typer.Option(
            "--seq-lens",
            help=f"Lengths: a range 1-10, a list 3,5,8, or 1-4,8 (each at most {MAX_SEQ_LEN}).",
        ),
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

    lens = check_seq_lens(parse_seq_lens(seq_lens), "--seq-lens")
    cfg = ProgramsConfig(family, lens, n_per_len, seed)
    report(build_stage("programs", cfg, data_dir=data_dir))
