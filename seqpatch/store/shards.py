"""Sharded, resumable builds: ``<version>.partial/shard-0000i/`` folders joined into a version.

Each finished shard is written atomically (a temporary folder renamed into place) and carries
its own file hashes (``files.json``, written last). A shard is reused — by a rerun after an
interruption, by another job of a split build, or when the shards are joined — only if every
file still matches its hash, its rows load and its statistics parse; anything else (bytes
flipped at the same size, a file deleted, a file standing where the shard folder should be) is
rebuilt, never merged. A work folder's ``manifest.json`` pins its ``n_shards``.

Locks: one per shard while it is computed (beside the work folder, which a finished build
removes), so identical builds started together share the shards and none is computed twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqpatch.redact import redact_rows
from seqpatch.store.files import remove, rename_or_discard, staging, write_json
from seqpatch.store.integrity import content_problem, file_records, remember_records
from seqpatch.store.refs import (
    LOCK_SUFFIX,
    PARTIAL_SUFFIX,
    SHARD_EXTRA,
    SHARD_FILES,
    SHARD_MANIFEST,
    TMP_MARK,
    Artifacts,
    Parent,
    StageRef,
    StoreError,
    merge_extra,
    repair_hint,
    unpack,
)

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_lock_at(path: Path) -> Any:
    from filelock import FileLock

    return FileLock(str(path))


def _lock_timeout() -> type[Exception]:
    from filelock import Timeout

    return Timeout


def shard_problem(shard_dir: Path) -> str | None:
    """Why a finished shard cannot be merged (``None``: it can): it must be a folder whose files
    match the hashes it recorded, whose rows load and whose statistics are a JSON object."""
    if not shard_dir.is_dir():
        return "is not a folder" if shard_dir.exists() or shard_dir.is_symlink() else "is missing"
    try:
        records = json.loads((shard_dir / SHARD_FILES).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"has no readable {SHARD_FILES}"
    if (
        not isinstance(records, dict)
        or not records
        or not all(isinstance(r, dict) for r in records.values())
    ):
        return f"has a malformed {SHARD_FILES}"
    try:
        problem = content_problem(shard_dir, records)
        if problem is not None:
            return problem
        from datasets import Dataset

        Dataset.load_from_disk(str(shard_dir))
        if not isinstance(json.loads((shard_dir / SHARD_EXTRA).read_text()), dict):
            return f"{SHARD_EXTRA} is not a JSON object"
    except Exception as err:  # any damage means: rebuild this shard
        return f"does not load ({type(err).__name__})"
    return None


def shard_ok(shard_dir: Path) -> bool:
    return shard_problem(shard_dir) is None


class ShardedBuilds:
    """``Store``'s sharded builds (mixed into ``seqpatch.store.Store``)."""

    def build_sharded(
        self,
        stage: str,
        schema_version: int,
        config: Any,
        n_shards: int,
        build_shard_fn: Callable[[int], Any],
        parents: Iterable[Parent] = (),
        model: Any = None,
        only_shards: Iterable[int] | None = None,
        finish: Callable[[Dataset], Artifacts] | None = None,
        before: Callable[[], None] | None = None,
        runtime: Callable[[], Mapping[str, Any]] | None = None,
        manifest: Mapping[str, Any] | None = None,
        join: bool = True,
        merge: Callable[[list[Mapping[str, Any]], Dataset], dict[str, Any]] | None = None,
    ) -> StageRef | None:
        """Like ``get_or_build``, one shard at a time, resuming after an interruption.

        ``build_shard_fn(i)`` returns shard ``i`` of ``n_shards`` (a ``Dataset`` or ``Built``).
        Finished shards are kept under ``<version>.partial/shard-0000i/`` and skipped on a rerun
        (a shard that no longer matches its hashes or loads is rebuilt); when all are there they
        are concatenated in index order into the version folder, their statistics merged
        (``merge(per-shard statistics, rows)``, by default ``merge_extra``), and the work folder
        is removed. ``before()`` runs once before the
        first shard is computed (checks that must pass before anything is written). With
        ``only_shards`` just those shards are built (one job of several sharing the work
        folder); the version is committed, and returned, only once every shard exists. Shards
        another process is computing are waited for, never computed twice. Every stored parent
        is checked (content hashes) before anything is computed. ``manifest`` (the config,
        parents and shard size) is kept in the work folder's manifest, so ``seqpatch merge`` can
        join the shards exactly; ``join=False`` builds shards only and returns ``None`` (a
        ``--shard i/n`` job).
        """
        if n_shards < 1:
            raise StoreError(f"n_shards must be >= 1, got {n_shards}")
        wanted = range(n_shards) if only_shards is None else sorted(set(only_shards))
        if any(not 0 <= index < n_shards for index in wanted):
            raise StoreError(f"shard indices must lie in 0..{n_shards - 1}, got {list(wanted)}")
        parents = list(parents)
        version = self.version_for(stage, schema_version, config, parents, model)
        found = self.find(stage, version)
        if found is not None:
            return dataclasses.replace(self.check(found), reused=True)
        self.check_parents(parents)
        work = self.stage_dir(stage) / f"{version}{PARTIAL_SUFFIX}"
        self._check_work_folder(stage, work)
        if work.is_dir():
            self._check_manifest(work, version, n_shards, manifest)  # may start a damaged one over
        missing = [i for i in wanted if not shard_ok(work / shard_name(i))]
        if missing and before is not None:
            before()  # a failing check leaves nothing behind
        self._make_stage_dir(stage)
        if missing:
            self._check_manifest(work, version, n_shards, manifest)
        waiting = []
        for index in missing:
            if self.find(stage, version) is not None:
                break
            lock = self._shard_lock(work, index)
            try:
                lock.acquire(timeout=0)
            except _lock_timeout():
                waiting.append(index)  # another process is computing it
                continue
            try:
                self._build_shard(stage, version, work, index, n_shards, build_shard_fn)
            finally:
                lock.release()
        for index in waiting:
            with self._shard_lock(work, index):
                if self.find(stage, version) is None:
                    self._build_shard(stage, version, work, index, n_shards, build_shard_fn)
        if not join:
            return None

        with self.lock(stage, version):
            found = self.find(stage, version)
            if found is not None:
                remove(work)  # a racing build may have remade it
                return dataclasses.replace(self.check(found), reused=True)
            shard_dirs = [work / shard_name(i) for i in range(n_shards)]
            if not all(shard_ok(d) for d in shard_dirs):
                if only_shards is not None:
                    return None  # this job's shards are done; a later call joins all of them
                raise StoreError(
                    f"{work}: shards went missing or were damaged while building; rerun to "
                    "rebuild them"
                )
            from datasets import Dataset, concatenate_datasets

            rows = concatenate_datasets([Dataset.load_from_disk(str(d)) for d in shard_dirs])
            parts = [json.loads((d / SHARD_EXTRA).read_text()) for d in shard_dirs]
            extra = merge(parts, rows) if merge is not None else merge_extra(parts)
            extra["n_shards"] = n_shards
            artifacts = finish(rows) if finish else {}
            provenance = self._provenance(
                stage, version, schema_version, config, parents, model, rows, extra
            )
            if runtime is not None:
                provenance["runtime"] = dict(runtime())
            self._remove_debris(self.stage_dir(stage), f".{version}{TMP_MARK}")
            ref = self._commit(stage, version, rows, provenance, artifacts)
            del rows
            remove(work)
            return ref

    def _check_work_folder(self, stage: str, work: Path) -> None:
        """A file (or link) where the work folder belongs is not the store's to delete."""
        if (work.exists() or work.is_symlink()) and (work.is_symlink() or not work.is_dir()):
            raise StoreError(
                f"{work} should be the work folder of an interrupted build but is not a folder; "
                f"{repair_hint(stage, self.data_dir)} removes it, then rerun"
            )

    def _build_shard(
        self,
        stage: str,
        version: str,
        work: Path,
        index: int,
        n_shards: int,
        build_shard_fn: Callable[[int], Any],
    ) -> None:
        shard_dir = work / shard_name(index)
        problem = shard_problem(shard_dir)
        if problem is None:
            return
        if self.find(stage, version) is not None:
            return  # a racing build committed the version, then removed the work folder
        if problem != "is missing":
            logger.warning("%s: shard %d %s; rebuilding it", work, index, problem)
            remove(shard_dir)
        work.mkdir(parents=True, exist_ok=True)
        self._remove_debris(work, f".{shard_name(index)}{TMP_MARK}")
        logger.info("%s/%s: building shard %d/%d", stage, version, index, n_shards)
        built = unpack(build_shard_fn(index))
        with staging(work, f".{shard_name(index)}{TMP_MARK}") as tmp:
            redact_rows(built.rows).save_to_disk(str(tmp))
            write_json(tmp / SHARD_EXTRA, dict(built.stats))
            records = file_records(tmp, skip=(SHARD_FILES,))
            write_json(tmp / SHARD_FILES, records)
            renamed = rename_or_discard(tmp, shard_dir)
        if renamed:
            remember_records(shard_dir, records)

    def missing_shards(self, stage: str, version: str, n_shards: int) -> list[int]:
        """Shards of ``stage/version`` not yet finished in its work folder (which this prepares,
        refusing one cut for another ``n_shards``), for executors that compute shards in other
        processes (``seqpatch.ray_executor``); ``build_sharded`` then commits them."""
        self._make_stage_dir(stage)
        work = self.stage_dir(stage) / f"{version}{PARTIAL_SUFFIX}"
        self._check_work_folder(stage, work)
        self._check_manifest(work, version, n_shards)
        return [i for i in range(n_shards) if not shard_ok(work / shard_name(i))]

    def write_shard(
        self,
        stage: str,
        version: str,
        n_shards: int,
        index: int,
        build_shard_fn: Callable[[int], Any],
    ) -> bool:
        """Build shard ``index`` and write it atomically where ``build_sharded`` keeps it, under
        the shard's lock; ``False`` when it was already finished (nothing computed)."""
        work = self.stage_dir(stage) / f"{version}{PARTIAL_SUFFIX}"
        with self._shard_lock(work, index):
            if shard_ok(work / shard_name(index)):
                return False
            self._build_shard(stage, version, work, index, n_shards, build_shard_fn)
            return True

    @staticmethod
    def _shard_lock(work: Path, index: int) -> Any:
        """Shard ``index``'s lock, beside (not inside) the work folder, which a finished build
        removes while a racing one may still be taking locks."""
        return shard_lock_at(work.parent / f".{work.name}.{shard_name(index)}{LOCK_SUFFIX}")

    def unfinished(self, stage: str) -> list[tuple[str, dict[str, Any], list[int]]]:
        """Work folders of ``stage`` holding shards: ``(version, manifest, missing shards)``."""
        found = []
        stage_dir = self.stage_dir(stage)
        for work in sorted(stage_dir.glob(f"*{PARTIAL_SUFFIX}")) if stage_dir.is_dir() else []:
            try:
                manifest = json.loads((work / SHARD_MANIFEST).read_text())
                version, n_shards = manifest["version"], int(manifest["n_shards"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            missing = [i for i in range(n_shards) if not shard_ok(work / shard_name(i))]
            found.append((version, manifest, missing))
        return found

    def _check_manifest(
        self, work: Path, version: str, n_shards: int, extra: Mapping[str, Any] | None = None
    ) -> None:
        """Refuse to mix shards cut for a different ``n_shards`` into one version; a manifest
        that does not parse means the work folder cannot be trusted, so it starts over.
        ``extra`` (what built the shards) is added to the manifest when it lacks it."""
        manifest = work / SHARD_MANIFEST
        key = {"version": version, "n_shards": n_shards}
        wanted = {**(extra or {}), **key}
        if manifest.exists() or manifest.is_symlink():
            try:
                found = json.loads(manifest.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                found = None
            if not isinstance(found, dict) or found.get("version") != version:
                logger.warning("%s has an unreadable manifest; starting its shards over", work)
                remove(work)
            elif {k: found.get(k) for k in key} != key:
                raise StoreError(
                    f"{work} holds shards of an interrupted build with n_shards="
                    f"{found.get('n_shards')}, not {n_shards}; rerun with the same number of "
                    f"shards (--shard-size), or delete {work} to start over"
                )
            elif set(wanted) <= set(found):
                return
        for attempt in range(3):  # a finished racing build may remove the folder meanwhile
            work.mkdir(parents=True, exist_ok=True)
            try:
                write_json(manifest, wanted)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise
