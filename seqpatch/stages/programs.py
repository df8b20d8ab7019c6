"""Stage ``programs``: the task rows every later stage starts from.

One row per sampled program: ``n_per_len`` programs for each length in ``seq_lens``, all of one
family. Row ``(seq_len, index)`` is drawn from its own RNG (``program_rng(seed, family, seq_len,
index)``), so any row can be regenerated alone and adding lengths never changes existing rows.
The dataset fingerprint is derived from the version (config and ``SCHEMA_VERSION``): the same
config gives the same fingerprint on any machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from seqpatch.bounds import MAX_PROGRAMS, check_count
from seqpatch.options import SEED_HELP, option
from seqpatch.programs import ProgramError, get_family, make_sequence, program_rng
from seqpatch.stages.base import Built, Inputs, no_artifacts, no_checks, no_models

if TYPE_CHECKING:
    from datasets import Features

STAGE = "programs"
SCHEMA_VERSION = 1
MAX_SEED = 2**63 - 1  # stored as int64


@cache
def features() -> Features:
    """The row schema (``FEATURES``). ``intermediates[i][j]``: value of ``variables[j]`` after
    statement ``i`` (null before its first assignment). ``dependencies``: indices of the
    statements the answer depends on (backward slice); ``depth = len(dependencies)`` (the
    referential depth for ``binding``). Built on first use: the config and ``seqpatch build
    programs --help`` import no ``datasets``."""
    from datasets import Features, List, Value

    return Features(
        {
            "program_id": Value("string"),
            "family": Value("string"),
            "seq_len": Value("int32"),
            "index": Value("int32"),
            "seed": Value("int64"),
            "text": Value("string"),
            "compact": Value("string"),
            "statements": List(Value("string")),
            "query": Value("string"),
            "answer": Value("int64"),
            "variables": List(Value("string")),
            "intermediates": List(List(Value("int64"))),
            "dependencies": List(Value("int32")),
            "depth": Value("int32"),
        }
    )


def __getattr__(name: str) -> Any:
    if name == "FEATURES":
        return features()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def parse_seq_lens(text: str) -> tuple[int, ...]:
    """``"1-10"``, ``"3,5,8"`` or ``"1-4,8"`` → sorted distinct lengths."""
    lens: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if part.isdigit():
            lens.add(int(part))
        elif (m := _RANGE.match(part)) is not None:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise ProgramError(
                    f"seq-lens range {part!r} is empty; write it low-high, e.g. 1-10"
                )
            lens.update(range(lo, hi + 1))
        else:
            raise ProgramError(
                f"cannot read seq-lens {text!r} (bad part {part!r}); "
                "use a range '1-10', a list '3,5,8' or both '1-4,8'"
            )
    if 0 in lens:
        raise ProgramError(f"seq-lens {text!r} includes 0; every length must be >= 1")
    return tuple(sorted(lens))


@dataclass(frozen=True)
class ProgramsConfig:
    """Which programs to sample. ``seq_lens`` is normalised to a sorted tuple of distinct lengths."""

    family: str = option("arithmetic", "Program family: arithmetic, binding or modular.")
    seq_lens: tuple[int, ...] = option(
        tuple(range(1, 11)),
        "Lengths: a range 1-10, a list 3,5,8, or 1-4,8.",
        parse=parse_seq_lens,
        cli_default="1-10",
    )
    n_per_len: int = option(200, "Programs sampled per length.")
    seed: int = option(0, SEED_HELP)

    def __post_init__(self) -> None:
        get_family(self.family)
        lens = tuple(self.seq_lens)
        if not lens:
            raise ProgramError("seq_lens is empty; give at least one length, e.g. --seq-lens 1-10")
        for n in lens:
            if not _is_int(n) or n < 1:
                raise ProgramError(f"every seq_len must be an integer >= 1, got {n!r}")
        if len(set(lens)) != len(lens):
            raise ProgramError(f"seq_lens has repeated lengths: {lens}")
        if not _is_int(self.n_per_len) or self.n_per_len < 1:
            raise ProgramError(f"n_per_len must be an integer >= 1, got {self.n_per_len!r}")
        check_count(
            "n_per_len x lengths",
            self.n_per_len * len(lens),
            MAX_PROGRAMS,
            ProgramError,
            "one row per program",
        )
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ProgramError(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")
        object.__setattr__(self, "seq_lens", tuple(sorted(lens)))


CONFIG = ProgramsConfig
PARENTS = ()
model_specs = no_models
prepare = no_checks
artifacts = no_artifacts


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def program_id(family: str, seq_len: int, index: int) -> str:
    return f"{family}-L{seq_len}-{index:05d}"


def _rows(batch: dict[str, list], cfg: ProgramsConfig) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in features()}
    for seq_len, index in zip(batch["seq_len"], batch["index"], strict=True):
        rng = program_rng(cfg.seed, cfg.family, seq_len, index)
        row = make_sequence(cfg.family, seq_len, rng).to_row()
        row.update(
            program_id=program_id(cfg.family, seq_len, index),
            index=index,
            seed=cfg.seed,
            depth=len(row["dependencies"]),
        )
        for name in features():
            out[name].append(row[name])
    return out


def build(inputs: Inputs, cfg: ProgramsConfig) -> Built:
    """Sample the programs of ``cfg`` (the first stage: no parent, no model)."""
    from datasets import Dataset

    keys = Dataset.from_dict(
        {
            "seq_len": [n for n in cfg.seq_lens for _ in range(cfg.n_per_len)],
            "index": [i for _ in cfg.seq_lens for i in range(cfg.n_per_len)],
        }
    )
    rows = keys.map(
        _rows,
        batched=True,
        fn_kwargs={"cfg": cfg},
        features=features(),
        new_fingerprint=inputs.fingerprint("programs"),
        desc=f"sampling {cfg.family} programs",
    )
    return Built(rows)
