"""``seqpatch verify``: every version against its recorded hashes and row count, and debris.

A stage folder holds version folders (``VERSION_LENGTH`` hex digits), work folders of sharded
builds (``<version>.partial``), temporary folders of builds in progress (``.<version>.tmp-*``)
and locks. Anything standing at a version's name that is not a complete, matching version — no
``seqpatch.json``, a file instead of a folder, a changed byte — is reported as damaged; work
and temporary folders that no build holds are debris. ``clean`` removes both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from seqpatch.store.files import permission_errors, remove
from seqpatch.store.refs import (
    LOCK_SUFFIX,
    PARTIAL_SUFFIX,
    TMP_MARK,
    StageNotFoundError,
    StoreError,
)
from seqpatch.store.shards import shard_lock_at


@dataclass
class VerifyReport:
    """What ``Store.verify`` found: good versions, damaged ones (with the problem) and debris."""

    ok: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    debris: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.damaged and not self.debris


def debris_version(name: str) -> str | None:
    """The version a leftover folder belongs to: ``.<v>.tmp-*`` or ``<v>.partial``."""
    if name.startswith(".") and TMP_MARK in name:
        return name[1:].split(TMP_MARK, 1)[0]
    if name.endswith(PARTIAL_SUFFIX):
        return name[: -len(PARTIAL_SUFFIX)]
    return None


def _remove(path: Path) -> None:
    """``remove``, or one line saying it could not be removed."""
    remove(path)
    if path.exists() or path.is_symlink():
        raise StoreError(
            f"cannot remove {path}; its owner (or someone with write permission on "
            f"{path.parent}) can run `seqpatch verify --clean`"
        )


class Verifying:
    """``Store.verify`` and what it needs (mixed into ``seqpatch.store.Store``)."""

    @permission_errors("check the store")
    def verify(self, stages: Iterable[str] | None = None, clean: bool = False) -> VerifyReport:
        """Check every version's files against their recorded hashes and row counts, and find
        debris (temporary folders of killed builds, unfinished ``.partial`` work folders that no
        build holds). With ``clean`` damaged versions and debris are removed. A stage named in
        ``stages`` that is not stored raises ``StageNotFoundError``."""
        report = VerifyReport()
        names = self._stages_to_verify(stages)
        for stage in names:
            folder = self.stage_dir(stage)
            for entry in self._version_entries(stage):
                problem = self._deep_problem(stage, entry)
                if problem is None:
                    report.ok.append(f"{stage}/{entry.name}")
                    continue
                report.damaged.append(f"{stage}/{entry.name}: {problem}")
                if clean:
                    _remove(entry)
            if not folder.is_dir():
                continue
            for child in sorted(folder.iterdir()):
                version = debris_version(child.name)
                if version is None:
                    continue
                if not self._idle(stage, version):
                    continue  # a build is working in it right now
                report.debris.append(str(child))
                if clean:
                    _remove(child)
        return report

    def _stages_to_verify(self, stages: Iterable[str] | None) -> list[str]:
        if stages is None:
            return self.stages()
        names = list(stages)
        stored = self.stages()
        for stage in names:
            if not self.stage_dir(stage).is_dir():
                raise StageNotFoundError(
                    f"no stage {stage!r} is stored in {self.data_dir} (stored: "
                    f"{', '.join(stored) or 'none'}); name a stored stage or leave it out"
                )
        return names

    def _deep_problem(self, stage: str, entry: Path) -> str | None:
        ref, problem = self._inspect(stage, entry.name)
        if problem is not None or ref is None:
            return problem
        _, problem = self._open(ref)
        return problem

    def _idle(self, stage: str, version: str) -> bool:
        """True when no process holds ``stage/version``'s lock (nor, for work folders, a shard's).

        A reader of a shared store who may not open the locks cannot tell: the folder is
        reported (it is left over or in use; only its owner can remove it either way)."""
        from filelock import Timeout

        lock = self.lock(stage, version)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        except PermissionError:
            return True
        try:
            work = self.stage_dir(stage) / f"{version}{PARTIAL_SUFFIX}"
            for path in work.parent.glob(f".{work.name}.shard-*{LOCK_SUFFIX}"):
                shard = shard_lock_at(path)
                try:
                    shard.acquire(timeout=0)
                except Timeout:
                    return False
                shard.release()
            return True
        finally:
            lock.release()
