"""``choose``: pick the model (and program length) that the patching stages will study.

Rule: among the benchmarked models whose exact-match accuracy (point estimate) reaches
``min_accuracy`` at some ``seq_len >= min_seq_len``, take the one with the fewest parameters
(ties: the earlier model in the benchmark), then its longest length that reaches it. Small
models are cheaper to patch; long programs give the most statements to localise. When the
benchmark ran one model under several prompt formats (``model:code,model:code-chat``), the
format is chosen too: the one whose longest qualifying length is longest (ties: the higher
accuracy there, then the earlier spec), so the choice is a (model, format, length).

The choice is written to ``<data_dir>/chosen_model.json`` so that later stages and people read
the same decision; ``read_chosen`` reads it back.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqpatch.errors import SeqpatchError
from seqpatch.redact import restore

if TYPE_CHECKING:
    import polars as pl

CHOSEN_FILE = "chosen_model.json"
CHOSEN_KEYS = ("model_spec", "family", "seq_len", "benchmark_version")  # what later stages read
_CHOSEN_TYPES = {"model_spec": str, "family": str, "seq_len": int, "benchmark_version": str}
_TYPE_NAMES = {str: "non-empty string", int: "positive integer"}


class ChooseError(SeqpatchError):
    """No model qualifies, or no choice has been made yet; the message says what to do."""


@dataclass(frozen=True)
class Choice:
    """The chosen model and length, with the rule that chose them."""

    model_spec: str
    model_id: str
    revision: str | None
    n_params: int
    family: str
    seq_len: int
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    min_accuracy: float
    min_seq_len: int
    prompt_format: str = "default"  # the spec's ``:format`` suffix; "default": the model's own

    @property
    def rule(self) -> str:
        return (
            f"smallest model (by parameter count) with accuracy >= {self.min_accuracy} at some "
            f"seq_len >= {self.min_seq_len}; then its largest such seq_len, over its prompt "
            "formats (ties: the higher accuracy)"
        )


def _describe(row: dict[str, Any]) -> str:
    return f"{row['model_id']} at seq_len {row['seq_len']} (accuracy {row['accuracy']:.3f})"


def choose_model(summary: pl.DataFrame, min_accuracy: float, min_seq_len: int) -> Choice:
    """Apply the rule above to a benchmark summary (``seqpatch.stages.benchmark.summarize``).

    Raises ``ChooseError`` naming the closest (model, seq_len, accuracy) when none qualifies.
    """
    import polars as pl

    if not 0.0 <= min_accuracy <= 1.0:
        raise ChooseError(f"--min-accuracy must be between 0 and 1, got {min_accuracy}")
    ranked = summary.with_row_index("_order")
    long_enough = ranked.filter(pl.col("seq_len") >= min_seq_len)
    if long_enough.is_empty():
        longest = int(summary["seq_len"].max()) if not summary.is_empty() else None
        raise ChooseError(
            f"the benchmark has no programs with seq_len >= {min_seq_len} (longest: {longest}); "
            "lower --min-seq-len or benchmark longer programs"
        )
    passing = long_enough.filter(pl.col("accuracy") >= min_accuracy)
    if passing.is_empty():
        closest = long_enough.sort(
            ["accuracy", "n_params", "seq_len"], descending=[True, False, True]
        ).row(0, named=True)
        raise ChooseError(
            f"no model reaches accuracy {min_accuracy} at seq_len >= {min_seq_len}; closest: "
            f"{_describe(closest)}. Lower --min-accuracy or --min-seq-len, or benchmark "
            "another model"
        )
    smallest = passing.sort("n_params", "_order").row(0, named=True)["model_id"]
    row = (
        passing.filter(pl.col("model_id") == smallest)
        .sort(["seq_len", "accuracy", "_order"], descending=[True, True, False])
        .row(0, named=True)
    )
    from seqpatch.stages.base import split_model_spec

    return Choice(
        prompt_format=split_model_spec(row["model_spec"])[1] or "default",
        model_spec=row["model_spec"],
        model_id=row["model_id"],
        revision=row["model_revision"],
        n_params=int(row["n_params"]),
        family=row["family"],
        seq_len=int(row["seq_len"]),
        accuracy=float(row["accuracy"]),
        ci_low=float(row["ci_low"]),
        ci_high=float(row["ci_high"]),
        n=int(row["n"]),
        min_accuracy=min_accuracy,
        min_seq_len=min_seq_len,
    )


def write_chosen(
    choice: Choice, data_dir: str | os.PathLike[str] | None, benchmark_version: str
) -> Path:
    """Write ``chosen_model.json`` into the data folder under the store's lock for it, through
    a temporary file of this writer's own (concurrent ``choose`` runs never collide); returns
    its path."""
    from seqpatch.store import Store, write_json

    store = Store(data_dir)
    payload = {
        **asdict(choice),
        "rule": choice.rule,
        "benchmark_version": benchmark_version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path = store.data_dir / CHOSEN_FILE
    try:
        store.data_dir.mkdir(parents=True, exist_ok=True)
        with store.file_lock(CHOSEN_FILE):
            write_json(path, payload)
    except OSError as err:
        raise ChooseError(
            f"cannot write {path} ({err.strerror or err} on {err.filename or path}); "
            "give a data dir you can write with --data-dir"
        ) from err
    return path


def choose(
    min_accuracy: float,
    min_seq_len: int,
    benchmark: str = "latest",
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[Choice, Path]:
    """Choose from a stored benchmark version and write ``chosen_model.json``."""
    from seqpatch.stages.benchmark import STAGE, load_summary
    from seqpatch.store import Store

    ref = Store(data_dir).resolve(STAGE, benchmark)
    choice = choose_model(load_summary(ref), min_accuracy, min_seq_len)
    return choice, write_chosen(choice, data_dir, ref.version)


def read_chosen(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The contents of ``<data_dir>/chosen_model.json``; ``ChooseError`` if it is missing."""
    from seqpatch.store import resolve_data_dir

    path = resolve_data_dir(data_dir) / CHOSEN_FILE
    if not path.is_file():
        raise ChooseError(
            f"no model has been chosen yet ({path} does not exist); run `seqpatch choose "
            "--min-accuracy 0.8 --min-seq-len 6` after `seqpatch build benchmark`"
        )
    try:
        chosen = restore(json.loads(path.read_text()))
    except OSError as err:
        raise ChooseError(f"cannot read {path} ({err.strerror or err})") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ChooseError(f"{path} is not valid JSON ({err}); rerun `seqpatch choose`") from err
    missing = [key for key in CHOSEN_KEYS if not isinstance(chosen, dict) or key not in chosen]
    if missing:
        raise ChooseError(
            f"{path} is damaged (no {', '.join(missing)}); rerun `seqpatch choose` to rewrite it"
        )
    for key, kind in _CHOSEN_TYPES.items():
        value = chosen[key]
        wrong_type = not isinstance(value, kind) or isinstance(value, bool)
        if wrong_type or (value < 1 if kind is int else not value):
            raise ChooseError(
                f"{path} is damaged ({key} is {value!r}, not a {_TYPE_NAMES[kind]}); rerun "
                "`seqpatch choose` to rewrite it"
            )
    return chosen
