"""Which known name a misspelled one meant (no imports of the model code: the registry and the
spec parser both ask it)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


def nearest(name: str, names: Sequence[str]) -> str | None:
    """The one of ``names`` that ``name`` misspells: one that starts or ends the same way (a
    prefix either way), or is close by edit distance; ``None`` when nothing is near."""
    lowered = name.lower()
    prefix = [n for n in names if n.startswith(lowered) or lowered.startswith(n)]
    if prefix:
        return prefix[0]
    close = difflib.get_close_matches(lowered, list(names), n=1, cutoff=0.75)
    return close[0] if close else None
