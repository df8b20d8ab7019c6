"""The Hugging Face token never appears: the one place that knows it and takes it out.

A token can reach seqpatch inside any string a user gives it — a model folder's path, a data
dir, a config value — and from there every place that shows or stores that string. Rather
than guarding each place, everything seqpatch shows or writes passes one of these gates:

- ``redacting_console()``: the CLI's stdout and stderr (results, progress, errors, tracebacks);
- ``SeqpatchError.__str__`` calls ``redact_text``: every error message, in Python as in the CLI;
- ``redact(value)``: JSON-like values (provenance, shard statistics, the chosen model) before
  they are written, and ``restore(value)`` when they are read back;
- ``redact_rows(dataset)``: every string of a stage's rows before the store writes them (and
  ``restore_rows`` when it loads them);
- ``redact_chart(chart)``: a chart's spec before it is rendered (a PNG's pixels cannot be
  scanned);
- ``redact_files(folder)``: the net under all of them — every file of a folder about to be
  committed (charts and csv written by other libraries included).

Each replaces the token by ``MARKER``. The token is ``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``
or the saved ``hf auth login`` (what ``huggingface_hub`` itself would send). Values shorter
than ``MIN_TOKEN_LENGTH`` are not treated as secrets: replacing every ``1`` of a study because
``HF_TOKEN=1`` would destroy it, and no real token is that short.

In memory values stay as given; only what is shown or written is redacted, and what is read
back is restored. So versions are computed from the values as given, never from their redacted
form: a stage built with the token set is the same version (and is reused) when it is not set,
and its children, which read the model from its provenance, find the same folder.
"""

from __future__ import annotations

import io
import mmap
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from datasets import Dataset

MARKER = "[HF_TOKEN]"
MIN_TOKEN_LENGTH = 8  # Hub tokens are ``hf_`` + 34 characters
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
TEXT_SUFFIXES = (".json", ".csv", ".html", ".svg", ".md", ".txt", ".yaml", ".yml", ".jsonl")


def hub_token(token: str | None = None) -> str | None:
    """``token``, else the environment's token, else the saved login; ``None`` without one."""
    if token:
        return token
    for name in TOKEN_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return saved_login()


def saved_login() -> str | None:
    """The token ``hf auth login`` saved, if any. Every command asks (its output is redacted),
    so ``huggingface_hub``'s token reader (a third of a second to import) is loaded only when
    a saved token file exists."""
    from huggingface_hub import constants

    try:  # a login this user cannot read is no token of theirs to leak
        if not Path(constants.HF_TOKEN_PATH).is_file():
            return None
        from huggingface_hub import get_token

        return get_token() or None
    except OSError:
        return None


def secret(token: str | None = None) -> str | None:
    """The token to take out of what is shown or written (``None``: nothing to take out)."""
    found = hub_token(token)
    return found if found and len(found) >= MIN_TOKEN_LENGTH else None


def redact_text(text: str, token: str | None = None) -> str:
    """``text`` with every occurrence of the token replaced by ``MARKER``."""
    found = token if token is not None else secret()
    return text.replace(found, MARKER) if found and found in text else text


def redact(value: Any, token: str | None = None) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings) with the token taken out of
    every string, keys included; other values are returned as they are."""
    found = token if token is not None else secret()
    if not found:
        return value
    if isinstance(value, str):
        return value.replace(found, MARKER)
    if isinstance(value, Mapping):
        return {redact(k, found): redact(v, found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v, found) for v in value)
    return value


def restore(value: Any, token: str | None = None) -> Any:
    """The inverse of ``redact`` for values read back (a stored model path, a chosen model):
    ``MARKER`` becomes the token again when one is set, so what was built with the token set
    is found and reused; without a token the marker stays (and such a path does not exist)."""
    found = token if token is not None else secret()
    if not found:
        return value
    if isinstance(value, str):
        return value.replace(MARKER, found)
    if isinstance(value, Mapping):
        return {restore(k, found): restore(v, found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(restore(v, found) for v in value)
    return value


def contains(value: Any, token: str) -> bool:
    """Whether ``token`` occurs in any string of a JSON-like value (keys included)."""
    if isinstance(value, str):
        return token in value
    if isinstance(value, Mapping):
        return any(contains(k, token) or contains(v, token) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(contains(v, token) for v in value)
    return False


# ---------------------------------------------------------------------------------------------
# Rows


def _holds_strings(kind: Any) -> bool:
    """Whether an Arrow type has strings anywhere inside (checked on the type, not the data)."""
    import pyarrow as pa

    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return True
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _holds_strings(kind.value_type)
    if pa.types.is_struct(kind):
        return any(_holds_strings(kind.field(i).type) for i in range(kind.num_fields))
    return False


def array_contains(array: Any, needle: str) -> bool:
    """Whether any string inside an Arrow array (lists and structs included) contains
    ``needle``; arrays without strings are not read."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if not _holds_strings(kind):
        return False
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return bool(pc.any(pc.match_substring(array, needle)).as_py())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return array_contains(pc.list_flatten(array), needle)
    if pa.types.is_struct(kind):
        return any(
            array_contains(pc.struct_field(array, [i]), needle) for i in range(kind.num_fields)
        )
    return False


def leaking_columns(dataset: Dataset, token: str) -> list[str]:
    """The columns of ``dataset`` whose name or strings contain ``token`` (any string)."""
    table = dataset.with_format(None).data.table
    return [
        name
        for name, column in zip(table.column_names, table.columns, strict=True)
        if token in name or array_contains(column, token)
    ]


def redact_rows(dataset: Dataset, token: str | None = None) -> Dataset:
    """``dataset`` with the token taken out of every string of every row (the same object when
    no row holds it; only the columns that hold it are rewritten, in memory)."""
    found = token if token is not None else secret()
    return _replace_in_rows(dataset, found, MARKER) if found else dataset


def restore_rows(dataset: Dataset, token: str | None = None) -> Dataset:
    """``dataset`` read back with ``MARKER`` replaced by the token (see ``restore``)."""
    found = token if token is not None else secret()
    return _replace_in_rows(dataset, MARKER, found) if found else dataset


def _replace_in_rows(dataset: Dataset, old: str, new: str) -> Dataset:
    """Replace ``old`` by ``new`` in the columns that hold it (rebuilt with Arrow, in memory:
    no ``map``, so no cache file, progress bar or fingerprint warning)."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if not leaking_columns(dataset, old):
        return dataset
    if dataset._indices is not None:
        dataset = dataset.flatten_indices(keep_in_memory=True)
    table = dataset.data.table
    for index, name in enumerate(table.column_names):
        column = table.column(index)
        if old in name or array_contains(column, old):
            values = _replace(column.to_pylist(), old, new)
            table = table.set_column(
                index, name.replace(old, new), pa.array(values, type=column.type)
            )
    info = dataset.info.copy()
    if info.features is not None:
        info.features = type(info.features)(
            {k.replace(old, new): v for k, v in info.features.items()}
        )
    replaced = Dataset(InMemoryTable(table), info=info, split=dataset.split)
    fmt = dataset.format
    columns = fmt["columns"]
    replaced.set_format(
        type=fmt["type"],
        columns=None if columns is None else [c.replace(old, new) for c in columns],
        output_all_columns=fmt["output_all_columns"],
        **fmt["format_kwargs"],
    )
    return replaced


def _replace(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, Mapping):
        return {k: _replace(v, old, new) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replace(v, old, new) for v in value]
    return value


def redact_chart(chart: Any, token: str | None = None) -> Any:
    """An altair chart drawn without the token: a PNG shows its labels as pixels, which no
    scan of the file's bytes can find, so the spec itself is redacted before rendering."""
    found = token if token is not None else secret()
    if not found:
        return chart
    spec = chart.to_dict()
    return type(chart).from_dict(redact(spec, found)) if contains(spec, found) else chart


# ---------------------------------------------------------------------------------------------
# Files


def file_contains(path: Path, needle: bytes) -> bool:
    if path.stat().st_size < len(needle):
        return False
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return mm.find(needle) >= 0


def files_containing(folder: Path, token: str) -> list[Path]:
    """The regular files under ``folder`` (symlinks not followed) whose bytes hold ``token``."""
    needle = token.encode()
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and file_contains(p, needle)
    )


def redact_file(path: Path, token: str | None = None) -> bool:
    """Take the token out of one written file (see ``redact_files``); whether it held it."""
    found = token if token is not None else secret()
    if not found or not path.is_file() or not file_contains(path, found.encode()):
        return False
    data = path.read_bytes()
    if path.suffix.lower() in TEXT_SUFFIXES:
        data = data.replace(found.encode(), MARKER.encode())
    else:
        data = data.replace(found.encode(), b"*" * len(found.encode()))
    path.write_bytes(data)
    return True


def redact_files(folder: Path, token: str | None = None) -> list[Path]:
    """Take the token out of every file under ``folder``; return the files changed.

    Text files get ``MARKER``; in any other file the token's bytes are overwritten in place by
    as many ``*`` (a binary format such as Arrow keeps its offsets valid). Call it before the
    files' hashes are recorded.
    """
    found = token if token is not None else secret()
    if not found:
        return []
    changed = files_containing(folder, found)
    for path in changed:
        redact_file(path, found)
    return changed


# ---------------------------------------------------------------------------------------------
# The terminal


class RedactingStream(io.TextIOBase):
    """A text stream that writes to ``stream`` with the token taken out of every write."""

    def __init__(self, stream: TextIO, token: str) -> None:
        super().__init__()
        self._stream = stream
        self._token = token

    def write(self, text: str) -> int:
        self._stream.write(text.replace(self._token, MARKER))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._stream, "errors", None)


@contextmanager
def redacting_console() -> Iterator[None]:
    """While inside, ``sys.stdout`` and ``sys.stderr`` never show the token."""
    found = secret()
    if not found or isinstance(sys.stdout, RedactingStream):
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout = RedactingStream(saved[0], found)  # type: ignore[assignment]
    sys.stderr = RedactingStream(saved[1], found)  # type: ignore[assignment]
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved
