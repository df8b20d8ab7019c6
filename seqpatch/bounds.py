"""The limits every config checks when it is made, so a bad value costs no work.

Configs are checked in their ``__post_init__`` (the one definition of an option, whatever
parses it: the CLI, ``seqpatch run``, a notebook, an import): numbers must be finite and in
range (``nan`` passes every ``x > 0`` test and ``inf`` every ``x >= 0``, so ranges alone are not
enough), and counts must fit what one machine can hold. Size limits are fixed numbers rather
than a reading of this machine's memory, so that a config valid here is valid everywhere (an
imported stage is checked with the same rules); each is far above any study seqpatch runs and
far below what exhausts memory before the first row (a billion programs is a terabyte of rows).
"""

from __future__ import annotations

import math
from typing import Any

MAX_PROGRAMS = 10_000_000  # rows of one programs stage (~1 KB each: ~10 GB)
MAX_PAIRS = 1_000_000  # kept pairs; each costs forwards of two programs and a row of logits
MAX_CANDIDATES = 10_000_000  # pairs drawn before giving up (n_pairs x max_candidates_factor)
MAX_NOISE_SCALE = 1_000.0  # tracing noise in embedding stds: ROME uses 3; above, only overflow


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool) that is neither nan nor infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_finite(
    name: str,
    value: Any,
    error: type[Exception],
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> None:
    """Raise ``error`` unless ``value`` is finite and inside the given bounds."""
    parts = [
        f"> {above:g}" if above is not None else "",
        f">= {at_least:g}" if at_least is not None else "",
    ]
    parts += [f"<= {at_most:g}" if at_most is not None else ""]
    wanted = " and ".join(p for p in parts if p)
    ok = finite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (at_most is None or value <= at_most)
    if not ok:
        rule = f"a finite number {wanted}" if wanted else "a finite number"
        raise error(f"{name} must be {rule}, got {value!r}")


def check_count(name: str, value: Any, limit: int, error: type[Exception], why: str) -> None:
    """Raise ``error`` unless ``value`` is an integer in ``1..limit`` (``why``: what it counts)."""
    if not is_int(value) or value < 1:
        raise error(f"{name} must be an integer >= 1, got {value!r}")
    if value > limit:
        raise error(
            f"{name} {value:,} is more than one machine can hold ({why}; at most {limit:,}); "
            "build the study in parts with several seeds"
        )
