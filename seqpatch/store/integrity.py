"""What a stored version must match: its provenance's checksum, its files' sizes and SHA-256.

Two depths of checking, both against ``seqpatch.json``:

- **cheap** (every time a version is found): provenance parses, has every required key — its
  ``checksum`` and ``files`` included: provenance without a checksum is damaged, not trusted —
  its checksum matches its content, and every recorded file exists with its recorded size;
- **content** (every time a version is read: loaded, resolved for a command, or used as a
  parent of a build; and by ``seqpatch verify``): every recorded file's SHA-256.

Content hashes are memoized by file state (``seqpatch.hashing``: resolved path, size, mtime_ns,
ctime_ns, inode, device), so an unchanged activations file is hashed once, not at every build
that reads it, while a file rewritten in any way is hashed again. A commit seeds the memo with
the hashes it just computed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seqpatch.hashing import (
    CACHE_ENV,
    MEMO_ENV,
    RACY_NS,
    content_hash,
    hash_memo_dir,
    remember,
    sha256_of,
)
from seqpatch.store.refs import PROVENANCE_FILE, canonical_json

__all__ = [  # the hash memo's names, kept importable from here
    "CACHE_ENV",
    "MEMO_ENV",
    "RACY_NS",
    "content_hash",
    "content_problem",
    "file_records",
    "files_problem",
    "hash_memo_dir",
    "provenance_checksum",
    "provenance_problem",
    "remember_records",
    "sha256_of",
]

_REQUIRED_KEYS = ("stage", "version", "schema_version", "config", "row_count", "files", "checksum")


def file_records(folder: Path, skip: tuple[str, ...] = (PROVENANCE_FILE,)) -> dict[str, Any]:
    """``{relative name: {"size", "sha256"}}`` of every file under ``folder`` but ``skip``."""
    return {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in skip
    }


def remember_records(folder: Path, records: Mapping[str, Any]) -> None:
    """Seed the memo with hashes just computed for ``folder``'s files (now at their final
    place), for the files whose size is still the recorded one."""
    for name, record in records.items():
        path = folder / name
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_size == record["size"]:
            remember(path, st, record["sha256"])


def provenance_checksum(provenance: Mapping[str, Any]) -> str:
    """SHA-256 of the provenance's canonical JSON without the checksum itself and the creation
    time (so that, apart from ``created``, provenance stays a function of the inputs)."""
    body = {k: v for k, v in provenance.items() if k not in ("checksum", "created")}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def provenance_problem(provenance: Any, stage: str, version: str) -> str | None:
    """What is wrong with a version's parsed ``seqpatch.json``, or ``None``."""
    if not isinstance(provenance, dict):
        return f"{PROVENANCE_FILE} is not a JSON object"
    missing = [key for key in _REQUIRED_KEYS if key not in provenance]
    if missing:
        return f"{PROVENANCE_FILE} lacks {', '.join(missing)} (unverifiable, so not trusted)"
    if provenance["stage"] != stage or provenance["version"] != version:
        return f"{PROVENANCE_FILE} describes {provenance['stage']}/{provenance['version']}"
    if not isinstance(provenance["row_count"], int) or not isinstance(provenance["config"], dict):
        return f"{PROVENANCE_FILE} has a malformed row_count or config"
    if provenance["checksum"] != provenance_checksum(provenance):
        return f"{PROVENANCE_FILE} was edited after the commit (its checksum does not match)"
    if not isinstance(provenance["files"], dict) or not all(
        isinstance(r, dict) for r in provenance["files"].values()
    ):
        return f"{PROVENANCE_FILE} has a malformed file list"
    if any(Path(name).is_absolute() or ".." in Path(name).parts for name in provenance["files"]):
        return f"{PROVENANCE_FILE} lists a file outside its version folder"
    return None


def files_problem(path: Path, records: Mapping[str, Any]) -> str | None:
    """The cheap check: every recorded file exists with its recorded size."""
    for name, record in records.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != record.get("size"):
            return f"{name} has changed size"
    return None


def content_problem(path: Path, records: Mapping[str, Any]) -> str | None:
    """The content check: sizes, then every recorded file's SHA-256 (memoized)."""
    problem = files_problem(path, records)
    if problem is not None:
        return problem
    for name, record in records.items():
        if content_hash(path / name) != record.get("sha256"):
            return f"{name} does not match its recorded SHA-256"
    return None
