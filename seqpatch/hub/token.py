"""The token scan: nothing published carries the Hugging Face token.

Export and push write every file under a staging root first; ``check_no_token`` refuses the
whole publication if any staged file's bytes, or any string of the rows (parquet pages may be
compressed, so the rows are scanned as well), holds the token. The token is the one given,
``HF_TOKEN``, or the saved login (``seqpatch.redact.hub_token``). Locally, the store takes the
token out instead (``seqpatch.redact``); a publication refuses, because a published stage must
be exactly the stored one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from seqpatch.errors import SeqpatchError
from seqpatch.redact import file_contains, hub_token, leaking_columns

if TYPE_CHECKING:
    from datasets import Dataset


class HubError(SeqpatchError):
    """Publishing to, or loading from, the Hub (or an exported folder) failed; says what to do."""


def token_for_scan(token: str | None) -> str | None:
    """The token that must not appear in what is written: given, ``HF_TOKEN``, or the login."""
    return hub_token(token)


def check_no_token(
    root: Path, paths: Iterable[str], token: str | None, rows: Mapping[str, Dataset] | None = None
) -> None:
    """Refuse to write anything that would carry the token: any staged file's bytes, or any
    string in the rows of each stage in ``rows`` (parquet pages may be compressed, so the rows
    are scanned too)."""
    if not token:
        return
    needle = token.encode()
    leaks = [p for p in paths if file_contains(root / p, needle)]
    for stage, dataset in (rows or {}).items():
        leaks += [f"{stage} column {name!r}" for name in leaking_columns(dataset, token)]
    if leaks:
        raise HubError(
            f"{leaks[0]} would contain your Hugging Face token; nothing was written. Remove the "
            "token from the stage's config, model path or rows and rebuild the stage."
        )
