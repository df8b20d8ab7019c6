"""Writing files the store's way: atomically, with the user's permissions, errors as one line.

- every folder and file the store creates follows the process umask, as ``mkdir`` and ``open``
  do (``tempfile`` creates 0700 folders and 0600 files, which would hide a shared store from the
  group that reads it);
- JSON is written to a temporary file of the writer's own and renamed over its target, so two
  processes writing the same file never see each other's half;
- permission problems become ``StoreError`` naming the path (``permission_errors``).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from seqpatch.redact import redact, redact_file
from seqpatch.store.refs import PROVENANCE_FILE, Artifact, StoreError

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def current_umask() -> int:
    """The process umask, read without changing it where the kernel says it (Linux 4.7+)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> Path:
    """Give a folder made by ``tempfile.mkdtemp`` (always 0700) the mode ``mkdir`` would give."""
    os.chmod(path, 0o777 & ~current_umask())
    return path


@contextmanager
def staging(parent_dir: Path, prefix: str) -> Iterator[Path]:
    """A fresh folder ``parent_dir/<prefix>*`` (mode by umask), removed unless renamed away."""
    tmp = follow_umask(Path(tempfile.mkdtemp(prefix=prefix, dir=parent_dir)))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write deterministic JSON atomically: a temporary file of this writer's own (two processes
    may write the same file at once, e.g. a work folder's manifest), then one rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from the group
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(redact(payload), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_artifacts(
    folder: str | os.PathLike[str], artifacts: Mapping[str, Artifact]
) -> list[Path]:
    """Write artifacts (as a stage module returns them) into ``folder`` — charts and tables
    redrawn outside a version folder; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, artifact in artifacts.items():
        write_artifact(folder, name, artifact)
    return [folder / name for name in artifacts]


def write_artifact(folder: Path, name: str, artifact: Artifact) -> None:
    target = folder / name
    if target.resolve().parent != folder.resolve() or name in (PROVENANCE_FILE,):
        raise StoreError(f"artifact name {name!r} must be a plain file name")
    if isinstance(artifact, bytes):
        target.write_bytes(artifact)
    elif isinstance(artifact, str):
        target.write_text(artifact)
    else:
        artifact(target)
    redact_file(target)  # a chart or table may name a path that held the token


def rename_or_discard(tmp: Path, target: Path) -> bool:
    """Move a finished folder into place (``True``); if another process got there first, keep
    theirs (``False``)."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        logger.info("%s appeared while building; keeping it", target)
        return False
    return True


def remove(path: Path) -> None:
    """Remove a folder tree, or a file or link standing where a folder should be."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def permission_message(err: OSError, doing: str) -> str:
    """``cannot <doing>: permission denied on <path>`` and what to do."""
    where = err.filename if err.filename is not None else "a file of the data dir"
    reason = "read-only file system" if err.errno == errno.EROFS else "permission denied"
    return (
        f"cannot {doing}: {reason} on {where}; ask its owner for access (a shared data dir "
        "needs group read permission on every stage folder) or use another --data-dir"
    )


def permission_errors(doing: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn a permission problem inside the wrapped call into one ``StoreError`` line naming the
    path (the CLI prints it and exits 2), instead of a ``PermissionError`` traceback."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except OSError as err:
                if err.errno not in _DENIED:
                    raise
                raise StoreError(permission_message(err, doing)) from err

        return wrapped

    return wrap
