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
from seqpatch.cli._stages import DeviceOpt, LazyStageGroup

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


@app.command(
    "pairs",
    epilog=examples(
        "seqpatch build pairs --model builtin --seq-len 8 --divergence-index all --n-pairs 2000",
        "seqpatch build pairs --model chosen --seq-len 6 --divergence-index 2 --n-pairs 500",
        "seqpatch build pairs --model ./my-model --family binding --seq-len 5 --allow-equal-answers",
    ),
)
def build_pairs(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="builtin, chosen (reads chosen_model.json), a local folder or a Hub id.",
        ),
    ] = "builtin",
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            help="Statements per program \\[default: the chosen length with --model chosen, else 8].",
            show_default=False,
            min=1,
            max=MAX_SEQ_LEN,
        ),
    ] = None,
    divergence_index: Annotated[
        str,
        typer.Option(
            "--divergence-index",
            help="Statement changed between A and B: 'all' (balanced), '3' or '0,2,5'.",
        ),
    ] = "all",
    n_pairs: Annotated[int, typer.Option("--n-pairs", help="Pairs to keep.", min=1)] = 2000,
    family: Annotated[
        str | None,
        typer.Option(
            "--family",
            help="Program family \\[default: the organism's own for builtin, else binding].",
            show_default=False,
        ),
    ] = None,
    allow_equal_answers: Annotated[
        bool,
        typer.Option("--allow-equal-answers", help="Also keep pairs whose two answers are equal."),
    ] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
) -> None:
    """Counterfactual pairs (A, B) differing in one statement, both answered correctly.

    Token lengths of A and B are verified equal under the model's tokenizer; rejected
    candidates are counted by reason and stored in the stage's provenance.
    """
    from seqpatch.options import RuntimeSettings
    from seqpatch.pipeline import build_pairs as build_pairs_stage

    ref = build_pairs_stage(
        model,
        seq_len,
        divergence_index,
        n_pairs,
        seed,
        family,
        allow_equal_answers,
        data_dir,
        runtime=RuntimeSettings(device=device),
    )
    report(ref)
    extra = ref.provenance.get("extra", {})
    if "rejections" in extra:
        typer.echo(
            f"candidates {extra['candidates']}, accepted {extra['accepted']}; rejections: "
            + ", ".join(f"{k}={v}" for k, v in extra["rejections"].items())
        )
