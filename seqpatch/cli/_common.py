"""What every command group shares: the root group's error handling, option aliases, parsers.

Option aliases are ``Annotated`` types (the way ``huggingface_hub.cli`` writes ``RepoIdArg``), so
an option reads the same in every command that takes it. Nothing here imports a heavy library.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from seqpatch.errors import SeqpatchError
from seqpatch.options import csv as csv  # re-exported: the CLI modules read lists with it

try:  # typer >= 0.22 runs on its own copy of click, whose usage errors it does not re-export
    from typer._click.exceptions import UsageError
except ImportError:  # older typer: plain click
    from click.exceptions import UsageError

USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
INTERRUPTED_MESSAGE = "interrupted; rerun the same command to resume"
MAX_SEED = 2**63 - 1  # the programs stage's bound (numpy and torch seeds are 64-bit)
MAX_SEQ_LEN = 256  # statements per program; longer prompts are far beyond any model studied


class OptionError(SeqpatchError):
    """An option's value is wrong; the message names the option and what it accepts."""


class SeqpatchGroup(TyperGroup):
    """The root command group: every user error becomes one line on stderr and exit code 2.

    User errors are a ``SeqpatchError`` from any command (library code included) and click's
    usage errors (a missing option, a value out of range). Ctrl-C ends with exit code 130 and
    one line: every stage resumes where it stopped. Anything else is a bug and keeps its
    traceback. Help texts are reflowed here, once for every command (``reflow``). Nothing
    printed while a command runs shows the Hugging Face token (``seqpatch.redact``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _reflow_help(self)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        from seqpatch.redact import redacting_console

        with redacting_console():  # the token never reaches the terminal, whoever prints
            return super().main(*args, **kwargs)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _user_errors():
            return super().make_context(*args, **kwargs)  # the root's own options

    def invoke(self, ctx: typer.Context) -> Any:
        with _user_errors():
            return super().invoke(ctx)  # every sub-command: its options, then its work


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except SeqpatchError as err:
        _fail(_with_build_example(err))
    except UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # the help text, shown by click
            raise
        where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        _fail(err.format_message() + where)
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED_MESSAGE, err=True)
        raise typer.Exit(INTERRUPTED_EXIT_CODE) from None


def _with_build_example(err: SeqpatchError) -> str:
    """The error's text, where the store named a bare ``seqpatch build <stage>``, completed
    with the stage's example options (the registry's, which the store does not import)."""
    from seqpatch.store import StageNotFoundError

    if not isinstance(err, StageNotFoundError) or not err.command or not err.stage:
        return str(err)
    from seqpatch.stages import STAGES

    info = STAGES.get(err.stage)
    if info is None or not info.example:
        return str(err)
    prefix = f"seqpatch build {err.stage}"
    full = f"{prefix} {info.example}{err.command[len(prefix) :]}"
    return str(err).replace(err.command, full)


def _fail(message: str) -> None:
    typer.echo("Error: " + " ".join(message.split()), err=True)
    raise typer.Exit(USER_ERROR_EXIT_CODE) from None


def reflow(text: str | None) -> str | None:
    """Join a docstring's hard-wrapped lines, so the terminal (not the source) wraps them.

    Paragraphs stay apart; a paragraph starting with ``\\b`` keeps its line breaks (click's
    convention).
    """
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split("\n")) for p in paragraphs)


def _reflow_help(command: Any) -> None:
    command.help = reflow(command.help)
    for sub in getattr(command, "commands", {}).values():
        _reflow_help(sub)


def examples(*commands: str) -> str:
    """An epilog listing example commands (shown at the end of ``--help``)."""
    return "Examples:\n\n" + "\n\n".join(f"  $ {c}" for c in commands)


def report(ref: Any) -> None:
    """One line saying whether a stage version was built or reused, and where it is."""
    action = "reused" if ref.reused else "built"
    rows = ref.provenance.get("row_count")
    typer.echo(f"{action} {ref.stage} version {ref.version} ({rows} rows): {ref.path}")


def check_seq_lens(lens: tuple[int, ...], option: str) -> tuple[int, ...]:
    """Refuse program lengths above ``MAX_SEQ_LEN`` before any program is sampled."""
    if lens and max(lens) > MAX_SEQ_LEN:
        raise OptionError(
            f"{option} {max(lens)} is too long: programs have at most {MAX_SEQ_LEN} statements"
        )
    return lens


# ---------------------------------------------------------------------------------------------
# Option checks: each runs while the options are parsed, so a bad value stops the command
# before any work starts.


def _parse_data_dir(text: str) -> Path:
    """``--data-dir``: not empty (it would write into the current folder), not a file."""
    if not text.strip():
        raise OptionError(
            "--data-dir is empty; give a folder, or leave it out to use $SEQPATCH_DATA or "
            "./seqpatch-data"
        )
    return check_data_dir(Path(text))


def check_data_dir(path: Path) -> Path:
    """A data dir that exists must be a folder."""
    if path.exists() and not path.is_dir():
        raise OptionError(f"data dir {path} is a file, not a folder; give a folder with --data-dir")
    return path


def _check_seed(param: typer.CallbackParam, value: int | None) -> int | None:
    if value is not None and not 0 <= value <= MAX_SEED:
        raise OptionError(f"{param.opts[0]}: seed must be an integer in 0..2**63-1, got {value}")
    return value


def check_out_folder(param: typer.CallbackParam, value: Path | None) -> Path | None:
    """An output folder may not exist yet, but it (or its nearest existing parent) is a folder."""
    if value is None:
        return value
    for path in (value, *value.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == value else f"is inside {path}, which is a file"
                raise OptionError(f"{param.opts[0]} {value} {what}; give a folder")
            break
    return value


def _check_shard_size(param: typer.CallbackParam, value: str) -> str:
    """``500MB``, ``2GB``, ``1GiB`` or a number of bytes, read as ``datasets`` reads it."""
    from datasets.utils.py_utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(value.strip())
    except ValueError:
        size = 0
    if size <= 0:
        raise OptionError(
            f"cannot read {param.opts[0]} {value!r}; give a positive size like 500MB or 2GB"
        )
    return value


def _check_metric(param: typer.CallbackParam, value: str) -> str:
    from seqpatch.stages.patching import METRICS

    if value not in METRICS:
        raise OptionError(f"unknown {param.opts[0]} {value!r}; use one of {', '.join(METRICS)}")
    return value


def _check_stage(value: str) -> str:
    from seqpatch.stages import STAGES

    if value not in STAGES:
        raise OptionError(f"unknown stage {value!r}; known stages: {', '.join(STAGES)}")
    return value


# ---------------------------------------------------------------------------------------------
# Option aliases

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder of the versioned store \\[default: $SEQPATCH_DATA or ./seqpatch-data].",
        show_default=False,
        parser=_parse_data_dir,
        metavar="PATH",
    ),
]
SeedOpt = Annotated[
    int,
    typer.Option("--seed", help="Seed of every random choice (0..2**63-1).", callback=_check_seed),
]
FamilyOpt = Annotated[
    str,
    typer.Option("--family", help="Program family: arithmetic, binding or modular."),
]
RemoteOpt = Annotated[
    bool,
    typer.Option(
        "--remote",
        help="Run the model's forward passes on NDIF's hosted copy through nnsight "
        "(remote=True) instead of here. Needs NDIF_API_KEY and the network; Hub ids only "
        "(not builtin or a local folder). Same version as a local run.",
    ),
]
BenchmarkVersionOpt = Annotated[
    str, typer.Option("--benchmark", help="Stored benchmark version (or a prefix), or 'latest'.")
]
SitesOpt = Annotated[
    str,
    typer.Option(
        "--sites",
        help="Comma-separated sites: resid_pre, resid_post, attn_out, mlp_out; for patching "
        "also the attention heads head_z, head_q, head_k, head_v (with --axes layer,head).",
    ),
]
PairsVersionOpt = Annotated[
    str, typer.Option("--pairs", help="Pairs version (or unique prefix), or 'latest'.")
]
PatchingVersionOpt = Annotated[
    str, typer.Option("--patching", help="Patching version (or unique prefix), or 'latest'.")
]
MetricOpt = Annotated[
    str,
    typer.Option(
        "--metric",
        help="normalised, prob_delta (whole vocabulary), prob_delta_candidates or logit_diff.",
        callback=_check_metric,
    ),
]
FromOpt = Annotated[
    str | None,
    typer.Option(
        "--from",
        help="Take the parent stage(s) from a Hub dataset repo (USER/NAME) or an exported folder.",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Output folder \\[default: <data_dir>/charts/<stage>-<version>].",
        callback=check_out_folder,
    ),
]
StageArg = Annotated[
    str,
    typer.Argument(
        help="Stage: programs, benchmark, pairs, activations, patching, tracing, … "
        "(`seqpatch list` shows the stored ones).",
        callback=_check_stage,
    ),
]
VersionOpt = Annotated[
    str, typer.Option("--version", help="Stored version (or a unique prefix), or 'latest'.")
]
ShardSizeOpt = Annotated[
    str,
    typer.Option(
        "--max-shard-size",
        help="Largest parquet shard, e.g. 500MB or 2GB.",
        callback=_check_shard_size,
    ),
]
