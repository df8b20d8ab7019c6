"""SHA-256 of files, memoized by file state in the seqpatch cache: each file state is hashed once.

The memo lives in ``$SEQPATCH_HASH_MEMO``, else ``<cache>/hashes/`` (``$SEQPATCH_CACHE``, else
``~/.cache/seqpatch``), keyed by the file's (resolved path, size, mtime_ns, ctime_ns, inode,
device): a file rewritten in any way — even at the same size with its mtime set back — gets a
new ctime and is hashed again. An unwritable cache only costs the memo. The store checks stored
versions with it (``seqpatch.store.integrity``) and the model loader identifies a local model
folder by it (``seqpatch.models.loading``), so neither hashes a big unchanged file twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

CACHE_ENV = "SEQPATCH_CACHE"
MEMO_ENV = "SEQPATCH_HASH_MEMO"
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
    text = json.dumps(list(key), sort_keys=True, separators=(",", ":"))  # the store's canonical
    name = hashlib.sha256(text.encode()).hexdigest()
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
    except OSError:  # no cache (or a file in its place), no memo: the next read hashes again
        with contextlib.suppress(OSError):
            tmp.unlink()


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


def remember(path: Path, st: os.stat_result, digest: str) -> None:
    """Seed the memo: ``digest`` is the SHA-256 of ``path`` in the state ``st`` describes."""
    _remember(_key(path, st), digest)
