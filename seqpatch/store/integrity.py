"""What a stored version must match: its provenance's checksum, its files' sizes and SHA-256.

Two depths of checking, both against ``seqpatch.json``:

- **cheap** (every time a version is found): provenance parses, has every required key — its
  ``checksum`` and ``files`` included: provenance without a checksum is damaged, not trusted —
  its checksum matches its content, and every recorded file exists with its recorded size;
- **content** (every time a version is read: loaded, resolved for a command, or used as a
  parent of a build; and by ``seqpatch verify``): every recorded file's SHA-256.

Content hashes are memoized in ``$SEQPATCH_HASH_MEMO``, else ``<cache>/hashes/``
(``$SEQPATCH_CACHE``, else ``~/.cache/seqpatch``), under the file's (resolved path, size, mtime_ns, ctime_ns, inode,
device): a file rewritten in any way — even at the same size with its mtime set back — gets a
new ctime and is hashed again, while an unchanged activations file is hashed once, not at every
build that reads it. A commit seeds the memo with the hashes it just computed. An unwritable
cache only costs the memo.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seqpatch.store.refs import PROVENANCE_FILE, canonical_json

CACHE_ENV = "SEQPATCH_CACHE"
MEMO_ENV = "SEQPATCH_HASH_MEMO"
_REQUIRED_KEYS = ("stage", "version", "schema_version", "config", "row_count", "files", "checksum")
_BLOCK = 1 << 20
RACY_NS = 100_000_000  # 0.1 s: well above the coarse clock's tick (1-10 ms) that stamps files

_memo: dict[tuple[Any, ...], str] = {}  # this process's memo, in front of the cache folder


def hash_memo_dir() -> Path:
    """Where content hashes are memoized: ``$SEQPATCH_HASH_MEMO``, else ``<cache>/hashes``."""
    if os.environ.get(MEMO_ENV):
        return Path(os.environ[MEMO_ENV]).expanduser()
    cache = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "seqpatch"
    return Path(cache).expanduser() / "hashes"


def _key(path: Path, st: os.stat_result) -> tuple[Any, ...]:
    return (
        os.path.realpath(path),
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
        st.st_dev,
    )


def _memo_file(key: tuple[Any, ...]) -> Path:
    name = hashlib.sha256(canonical_json(list(key)).encode()).hexdigest()
    return hash_memo_dir() / name[:2] / name[2:]


def _recall(key: tuple[Any, ...]) -> str | None:
    if key in _memo:
        return _memo[key]
    try:
        digest = _memo_file(key).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return None
    _memo[key] = digest
    return digest


def _remember(key: tuple[Any, ...], digest: str) -> None:
    _memo[key] = digest
    target = _memo_file(key)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(digest)
        os.replace(tmp, target)
    except OSError:  # no cache, no memo: the next read hashes again
        tmp.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    """A file's SHA-256 (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(path: Path) -> str:
    """``sha256_of(path)``, memoized while the file stays the same (see the module docstring).

    Not memoized: a file that changes while it is hashed, and one changed less than
    ``RACY_NS`` ago — file times tick with the kernel's coarse clock (a few ms), so a rewrite
    at the same size within one tick would keep the same key (git's "racy clean" problem).
    """
    before = os.stat(path)
    key = _key(path, before)
    known = _recall(key)
    if known is not None:
        return known
    digest = sha256_of(path)
    changed_lately = time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) < RACY_NS
    if _key(path, os.stat(path)) == key and not changed_lately:
        _remember(key, digest)
    return digest


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
            _remember(_key(path, st), record["sha256"])


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
