"""The versioned store: every stage's output as a folder that is complete or absent.

Layout (``data_dir`` defaults to ``./seqpatch-data``; ``SEQPATCH_DATA`` or an argument overrides)::

    <data_dir>/<stage>/<version>/            Arrow files (``Dataset.save_to_disk``) + seqpatch.json
    <data_dir>/<stage>/<version>.partial/    work folder of a sharded build: shard-00000/, ...
    <data_dir>/<stage>/.<version>.tmp-*/     a build in progress (or killed); never read

``version`` is a short hash of the stage name, its schema version, the canonical JSON of its config,
the parent's version and the model identity. The same inputs therefore find the stored version and
do no work; different inputs get a new folder; nothing is ever overwritten.

Atomicity: a version is built in a temporary folder beside its target — rows, artifacts (charts,
arrays) and, last, ``seqpatch.json`` — and the folder is renamed into place. A version folder is
complete iff it holds ``seqpatch.json``; a killed build leaves only a hidden ``.tmp-`` folder,
which the next build of that version removes. Nothing is written into a committed version.

Integrity: ``seqpatch.json`` lists every file of the version with its size and SHA-256. Finding a
version checks that the files exist with their sizes (cheap); loading it checks the row count;
``Store.verify`` checks the hashes. A damaged version is never reused: the error names it and the
command that clears it.

Secrets: nothing written holds the Hugging Face token (rows, artifacts and provenance pass
``seqpatch.redact`` before their hashes are taken); provenance read back is restored, so a
child finds the model folder its parent was built from, and versions never depend on the token.

Concurrency: a build holds ``.<version>.lock`` (``filelock``) while it commits, and a sharded build
holds one lock per shard while computing it, so identical builds started together share the
shards (none is computed twice) and the second to finish reuses the first's commit.

Sharded builds (``Store.build_sharded``) write each finished shard atomically under
``<version>.partial/``; a rerun skips the shards already there (after checking they load), then
concatenates them.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqpatch.errors import SeqpatchError
from seqpatch.redact import redact, redact_files, redact_rows, restore, restore_rows
from seqpatch.stages.base import Artifact, Built

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "seqpatch.json"
DATA_DIR_ENV = "SEQPATCH_DATA"
DEFAULT_DATA_DIR = "seqpatch-data"
VERSION_LENGTH = 12  # 48 bits of sha256: collisions are negligible for a few thousand versions
PARTIAL_SUFFIX = ".partial"
SHARD_MANIFEST = "manifest.json"
SHARD_EXTRA = "extra.json"
LATEST = "latest"
LOCK_SUFFIX = ".lock"
TMP_MARK = ".tmp-"
_PROVENANCE_KEYS = ("stage", "version", "schema_version", "config", "row_count")
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


class StoreError(SeqpatchError):
    """The store cannot read or write what was asked (unwritable folder, corrupt provenance)."""


class StageNotFoundError(StoreError):
    """The requested stage or version is not stored; the message says how to build it."""


class DamagedVersionError(StoreError):
    """A stored version's files do not match its provenance; the message says how to clear it."""


@dataclass(frozen=True)
class StageRef:
    """A complete stored version of a stage. ``reused`` says the last call found it stored."""

    stage: str
    version: str
    path: Path
    provenance: Mapping[str, Any]
    reused: bool = False

    @property
    def fingerprint(self) -> str | None:
        return self.provenance.get("fingerprint")

    @property
    def parents(self) -> list[dict[str, Any]]:
        """The parent records of its provenance (``[]`` for a root stage)."""
        return parents_of(self.provenance)


def parents_of(provenance: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``provenance["parents"]``; stages stored before it existed had one ``parent`` record."""
    if "parents" in provenance:
        return [dict(p) for p in provenance["parents"] or []]
    parent = provenance.get("parent")
    return [dict(parent)] if parent else []


Parent = StageRef | Mapping[str, Any]
"""A parent is a stored ``StageRef`` or a provenance mapping (e.g. of a published stage)."""


# ---------------------------------------------------------------------------------------------
# Canonical forms


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data_dir``, else ``$SEQPATCH_DATA``, else ``./seqpatch-data``."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"cannot store {type(obj).__name__} {obj!r} in a config; use plain values")


def canonical_json(obj: Any) -> str:
    """One JSON text per value: sorted keys, no spaces, tuples as lists."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def config_dict(config: Any) -> dict[str, Any]:
    """A config (frozen dataclass or mapping) as the plain JSON dict stored in provenance."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"a stage config must be a dataclass or a mapping, got {type(config)}")
    return json.loads(canonical_json(dict(config)))


def parent_record(parent: Parent | None) -> dict[str, Any] | None:
    """The parent's identity as stored in provenance: stage, version, fingerprint (and source).

    No path: the parent of a stored stage is ``<data_dir>/<stage>/<version>``, and provenance
    must not depend on where the data dir is.
    """
    if parent is None:
        return None
    if isinstance(parent, StageRef):
        return {"stage": parent.stage, "version": parent.version, "fingerprint": parent.fingerprint}
    record = {
        "stage": parent.get("stage"),
        "version": parent.get("version"),
        "fingerprint": parent.get("fingerprint"),
    }
    if parent.get("published_source") is not None:
        record["source"] = dict(parent["published_source"])
    if record["version"] is None and record["fingerprint"] is None:
        raise StoreError(
            f"parent {record['stage']!r} has neither a version nor a fingerprint in its "
            "provenance; load it from the store or from a folder written by `seqpatch export`"
        )
    return record


def model_record(model: Any) -> dict[str, Any] | None:
    """``{"id", "revision"}`` from a mapping or an object with ``model_id``/``revision``."""
    if model is None:
        return None
    if isinstance(model, Mapping):
        model_id = model.get("id", model.get("model_id"))
        revision = model.get("revision")
    else:
        model_id = getattr(model, "model_id", None)
        revision = getattr(model, "revision", None)
    if model_id is None:
        raise TypeError(f"model {model!r} has no id: pass {{'id': ..., 'revision': ...}}")
    return {"id": str(model_id), "revision": None if revision is None else str(revision)}


def _unpack(result: Any) -> Built:
    return result if isinstance(result, Built) else Built(result)


def merge_extra(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine per-shard statistics: numbers add up, dicts merge key by key, equal values stay,
    differing values become the list of per-shard values."""
    merged: dict[str, Any] = {}
    for key in sorted({k for part in parts for k in part}):
        values = [part[key] for part in parts if key in part]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            merged[key] = sum(values)
        elif all(isinstance(v, Mapping) for v in values):
            merged[key] = merge_extra(values)
        elif all(v == values[0] for v in values):
            merged[key] = values[0]
        else:
            merged[key] = values
    return merged


# ---------------------------------------------------------------------------------------------
# The store


class Store:
    """Versioned stage outputs under one data folder. Creating a ``Store`` writes nothing."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None) -> None:
        self.data_dir = resolve_data_dir(data_dir)

    def __repr__(self) -> str:
        return f"Store({str(self.data_dir)!r})"

    def stage_dir(self, stage: str) -> Path:
        if not _STAGE_NAME.match(stage):
            raise StoreError(
                f"stage name {stage!r} must be lowercase letters, digits, '_' or '-' "
                "(it names a folder of the data dir)"
            )
        return self.data_dir / stage

    # -- identity ---------------------------------------------------------------------------

    def version_for(
        self,
        stage: str,
        schema_version: int,
        config: Any,
        parents: Iterable[Parent] = (),
        model: Any = None,
    ) -> str:
        """The version folder name for these inputs (a pure function of them)."""
        key = {
            "stage": stage,
            "schema_version": schema_version,
            "config": config_dict(config),
            "parents": [
                [rec["stage"], rec.get("version") or rec["fingerprint"]]
                for rec in map(parent_record, parents)
            ],
            "model": model_record(model),
        }
        return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:VERSION_LENGTH]

    # -- building ---------------------------------------------------------------------------

    def get_or_build(
        self,
        stage: str,
        schema_version: int,
        config: Any,
        build_fn: Callable[[], Any],
        parents: Iterable[Parent] = (),
        model: Any = None,
        finish: Callable[[Dataset], Mapping[str, Artifact]] | None = None,
        runtime: Callable[[], Mapping[str, Any]] | None = None,
    ) -> StageRef:
        """The stored version for these inputs, built by ``build_fn()`` only if absent.

        ``build_fn`` returns a ``Dataset`` or a ``Built`` (rows, statistics for ``extra``,
        artifacts). ``finish(rows)`` may add artifacts computed from the final rows. An identical
        build running in another process is waited for, then reused.
        """
        parents = list(parents)
        version = self.version_for(stage, schema_version, config, parents, model)
        found = self.find(stage, version)
        if found is not None:
            return dataclasses.replace(found, reused=True)
        self._make_stage_dir(stage)
        with self.lock(stage, version):
            found = self.find(stage, version)
            if found is not None:
                return dataclasses.replace(found, reused=True)
            self._remove_debris(self.stage_dir(stage), f".{version}{TMP_MARK}")
            built = _unpack(build_fn())
            artifacts = {**built.artifacts, **(finish(built.rows) if finish else {})}
            provenance = self._provenance(
                stage, version, schema_version, config, parents, model, built.rows, built.stats
            )
            if runtime is not None:
                provenance["runtime"] = dict(runtime())
            return self._commit(stage, version, built.rows, provenance, artifacts)

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
        finish: Callable[[Dataset], Mapping[str, Artifact]] | None = None,
        before: Callable[[], None] | None = None,
        runtime: Callable[[], Mapping[str, Any]] | None = None,
    ) -> StageRef | None:
        """Like ``get_or_build``, one shard at a time, resuming after an interruption.

        ``build_shard_fn(i)`` returns shard ``i`` of ``n_shards`` (a ``Dataset`` or ``Built``).
        Finished shards are kept under ``<version>.partial/shard-0000i/`` and skipped on a rerun
        (a shard that no longer loads is rebuilt); when all are there they are concatenated in
        index order into the version folder, their statistics merged (see ``merge_extra``), and
        the work folder is removed. ``before()`` runs once before the first shard is computed
        (checks that must pass before anything is written). With ``only_shards`` just those
        shards are built (one job of several sharing the work folder); the version is committed,
        and returned, only once every shard exists. Shards another process is computing are
        waited for, never computed twice.
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
            return dataclasses.replace(found, reused=True)
        work = self.stage_dir(stage) / f"{version}{PARTIAL_SUFFIX}"
        if work.is_dir():
            self._check_manifest(work, version, n_shards)  # may start a damaged folder over
        missing = [i for i in wanted if not _shard_ok(work / _shard_name(i))]
        if missing and before is not None:
            before()  # a failing check leaves nothing behind
        self._make_stage_dir(stage)
        if missing:
            self._check_manifest(work, version, n_shards)
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

        with self.lock(stage, version):
            found = self.find(stage, version)
            if found is not None:
                shutil.rmtree(work, ignore_errors=True)  # a racing build may have remade it
                return dataclasses.replace(found, reused=True)
            shard_dirs = [work / _shard_name(i) for i in range(n_shards)]
            if not all(_shard_ok(d) for d in shard_dirs):
                if only_shards is not None:
                    return None  # this job's shards are done; a later call joins all of them
                raise StoreError(f"{work}: shards went missing while building; rerun to resume")
            from datasets import Dataset, concatenate_datasets

            rows = concatenate_datasets([Dataset.load_from_disk(str(d)) for d in shard_dirs])
            extra = merge_extra([json.loads((d / SHARD_EXTRA).read_text()) for d in shard_dirs])
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
            shutil.rmtree(work, ignore_errors=True)
            return ref

    def _build_shard(
        self,
        stage: str,
        version: str,
        work: Path,
        index: int,
        n_shards: int,
        build_shard_fn: Callable[[int], Any],
    ) -> None:
        shard_dir = work / _shard_name(index)
        if _shard_ok(shard_dir):
            return
        if shard_dir.exists():
            logger.warning("%s: shard %d does not load; rebuilding it", work, index)
            shutil.rmtree(shard_dir)
        work.mkdir(parents=True, exist_ok=True)
        self._remove_debris(work, f".{_shard_name(index)}{TMP_MARK}")
        logger.info("%s/%s: building shard %d/%d", stage, version, index, n_shards)
        built = _unpack(build_shard_fn(index))
        with self._staging(work, f".{_shard_name(index)}{TMP_MARK}") as tmp:
            redact_rows(built.rows).save_to_disk(str(tmp))
            _write_json(tmp / SHARD_EXTRA, dict(built.stats))
            _rename_or_discard(tmp, shard_dir)

    def missing_shards(self, stage: str, version: str, n_shards: int) -> list[int]:
        """Shards of ``stage/version`` not yet finished in its work folder (which this prepares,
        refusing one cut for another ``n_shards``), for executors that compute shards in other
        processes (``seqpatch.ray_executor``); ``build_sharded`` then commits them."""
        self._make_stage_dir(stage)
        work = self.stage_dir(stage) / f"{version}{PARTIAL_SUFFIX}"
        self._check_manifest(work, version, n_shards)
        return [i for i in range(n_shards) if not _shard_ok(work / _shard_name(i))]

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
            if _shard_ok(work / _shard_name(index)):
                return False
            self._build_shard(stage, version, work, index, n_shards, build_shard_fn)
            return True

    # -- locking ----------------------------------------------------------------------------

    def lock(self, stage: str, version: str) -> Any:
        """The lock a process holds while it commits ``stage/version`` (a ``filelock``)."""
        from filelock import FileLock

        return FileLock(str(self.stage_dir(stage) / f".{version}{LOCK_SUFFIX}"))

    @staticmethod
    def _shard_lock(work: Path, index: int) -> Any:
        """Shard ``index``'s lock, beside (not inside) the work folder, which a finished build
        removes while a racing one may still be taking locks."""
        from filelock import FileLock

        return FileLock(str(work.parent / f".{work.name}.{_shard_name(index)}{LOCK_SUFFIX}"))

    # -- reading ----------------------------------------------------------------------------

    def find(self, stage: str, version: str) -> StageRef | None:
        """The complete version ``version`` of ``stage``, or ``None`` if it is not stored.

        Raises ``DamagedVersionError`` when the folder exists but does not match its provenance
        (unreadable ``seqpatch.json``, a recorded file missing or of another size).
        """
        path = self.stage_dir(stage) / version
        provenance_path = path / PROVENANCE_FILE
        if not provenance_path.is_file():
            return None
        try:
            provenance = json.loads(provenance_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._damaged(stage, version, f"unreadable {PROVENANCE_FILE} ({err})") from err
        problem = _provenance_problem(provenance, stage, version) or _files_problem(
            path, provenance
        )
        if problem:
            raise self._damaged(stage, version, problem)
        return StageRef(stage, version, path, restore(provenance))

    def _damaged(self, stage: str, version: str, problem: str) -> DamagedVersionError:
        return DamagedVersionError(
            f"stored version {stage}/{version} in {self.data_dir} is damaged: {problem}; "
            f"`seqpatch verify {stage} --clean --data-dir {self.data_dir}` removes it, then rerun "
            "the command that built it"
        )

    def _version_dirs(self, stage: str) -> list[Path]:
        folder = self.stage_dir(stage)
        if not folder.is_dir():
            return []
        return [
            child
            for child in sorted(folder.iterdir())
            if child.is_dir() and not child.name.startswith(".")
            if not child.name.endswith(PARTIAL_SUFFIX)
            if (child / PROVENANCE_FILE).is_file()
        ]

    def versions(self, stage: str) -> list[StageRef]:
        """Complete, undamaged versions of ``stage``, oldest first (by creation time)."""
        refs = []
        for child in self._version_dirs(stage):
            try:
                ref = self.find(stage, child.name)
            except DamagedVersionError:
                continue
            if ref is not None:
                refs.append(ref)
        return sorted(refs, key=lambda r: (str(r.provenance.get("created", "")), r.version))

    def damaged(self, stage: str) -> list[tuple[str, str]]:
        """``(version, problem)`` of every damaged version of ``stage`` (cheap checks)."""
        out = []
        for child in self._version_dirs(stage):
            try:
                self.find(stage, child.name)
            except DamagedVersionError as err:
                out.append((child.name, str(err)))
        return out

    def stages(self) -> list[str]:
        if not self.data_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.data_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and _STAGE_NAME.match(p.name)
        )

    def refs(self) -> list[StageRef]:
        """Every complete version of every stage (stages by name, versions oldest first)."""
        return [ref for stage in self.stages() for ref in self.versions(stage)]

    def list(self) -> list[dict[str, Any]]:
        """The provenance of every stored version (see ``refs`` for paths too)."""
        return [dict(ref.provenance) for ref in self.refs()]

    def resolve(self, stage: str, version: str = LATEST) -> StageRef:
        """``version`` (``latest``, a full version or a unique prefix) of ``stage``."""
        if not version:
            raise StageNotFoundError(
                f"an empty {stage} version was given; give a version or 'latest'"
            )
        if version != LATEST and _STAGE_NAME.match(version):
            found = self.find(stage, version)  # raises if that exact version is damaged
            if found is not None:
                return found
        available = self.versions(stage)
        if not available and (damaged := self.damaged(stage)):
            raise DamagedVersionError(damaged[-1][1])
        if not available:
            raise StageNotFoundError(
                f"no stored {stage!r} stage in {self.data_dir}; build it first with "
                f"`{_build_hint(stage, self.data_dir)}`"
            )
        if version == LATEST:
            return available[-1]
        matches = [ref for ref in available if ref.version.startswith(version)]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(ref.version for ref in available)
        what = "matches several versions" if matches else "is not stored"
        raise StageNotFoundError(
            f"{stage} version {version!r} {what} in {self.data_dir}; stored versions: {known} "
            f"(or build it with `{_build_hint(stage, self.data_dir)}`)"
        )

    def load(self, stage: str, version: str = LATEST) -> Dataset:
        """The rows of a stored version (memory-mapped Arrow), checked against its row count."""
        return self.load_ref(self.resolve(stage, version))

    def load_ref(self, ref: StageRef) -> Dataset:
        from datasets import Dataset

        try:
            rows = Dataset.load_from_disk(str(ref.path))
        except Exception as err:  # pyarrow/datasets raise many types for a damaged file
            raise self._damaged(ref.stage, ref.version, f"its rows do not load ({err})") from err
        if rows.num_rows != ref.provenance.get("row_count"):
            raise self._damaged(
                ref.stage,
                ref.version,
                f"{rows.num_rows} rows where its provenance records {ref.provenance.get('row_count')}",
            )
        return restore_rows(rows)

    # -- checking and cleaning --------------------------------------------------------------

    def verify(self, stages: Iterable[str] | None = None, clean: bool = False) -> VerifyReport:
        """Check every version's files against their recorded hashes and row counts, and find
        debris (temporary folders of killed builds, unfinished ``.partial`` work folders that no
        build holds). With ``clean`` damaged versions and debris are removed."""
        report = VerifyReport()
        for stage in list(stages) if stages is not None else self.stages():
            folder = self.stage_dir(stage)
            for child in self._version_dirs(stage):
                problem = self._deep_problem(stage, child.name)
                if problem is None:
                    report.ok.append(f"{stage}/{child.name}")
                    continue
                report.damaged.append(f"{stage}/{child.name}: {problem}")
                if clean:
                    shutil.rmtree(child)
            if not folder.is_dir():
                continue
            for child in sorted(folder.iterdir()):
                version = _debris_version(child.name)
                if version is None:
                    continue
                if not self._idle(stage, version):
                    continue  # a build is working in it right now
                report.debris.append(str(child))
                if clean:
                    shutil.rmtree(child, ignore_errors=True)
        return report

    def _deep_problem(self, stage: str, version: str) -> str | None:
        try:
            ref = self.find(stage, version)
            if ref is None:
                return f"no {PROVENANCE_FILE}"
            self.load_ref(ref)
        except DamagedVersionError as err:
            return str(err).split(" is damaged: ", 1)[-1].split("; `seqpatch verify", 1)[0]
        for name, record in (ref.provenance.get("files") or {}).items():
            if _sha256(ref.path / name) != record.get("sha256"):
                return f"{name} does not match its recorded SHA-256"
        return None

    def _idle(self, stage: str, version: str) -> bool:
        """True when no process holds ``stage/version``'s lock (nor, for work folders, a shard's)."""
        from filelock import Timeout

        lock = self.lock(stage, version)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            work = self.stage_dir(stage) / f"{version}{PARTIAL_SUFFIX}"
            for path in work.parent.glob(f".{work.name}.shard-*{LOCK_SUFFIX}"):
                shard = _shard_lock_at(path)
                try:
                    shard.acquire(timeout=0)
                except Timeout:
                    return False
                shard.release()
            return True
        finally:
            lock.release()

    @staticmethod
    def _remove_debris(folder: Path, prefix: str) -> None:
        """Remove ``prefix*`` folders: temporary folders of killed builds of what the caller
        now holds the lock for."""
        for child in folder.glob(f"{prefix}*"):
            shutil.rmtree(child, ignore_errors=True)

    # -- internals --------------------------------------------------------------------------

    def _make_stage_dir(self, stage: str) -> None:
        folder = self.stage_dir(stage)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
                pass
        except OSError as err:
            raise StoreError(
                f"cannot write to data dir {self.data_dir} ({err.strerror or err}); "
                f"pass a writable --data-dir or set {DATA_DIR_ENV}"
            ) from err

    @staticmethod
    @contextmanager
    def _staging(parent_dir: Path, prefix: str) -> Iterator[Path]:
        """A fresh hidden folder in ``parent_dir``, removed unless renamed away."""
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent_dir))
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _provenance(
        self,
        stage: str,
        version: str,
        schema_version: int,
        config: Any,
        parents: list[Parent],
        model: Any,
        dataset: Dataset,
        extra: Mapping[str, Any],
    ) -> dict[str, Any]:
        from seqpatch import __version__

        return {
            "stage": stage,
            "version": version,
            "schema_version": schema_version,
            "config": config_dict(config),
            "parents": [parent_record(p) for p in parents],
            "model": model_record(model),
            "seqpatch_version": __version__,
            "row_count": dataset.num_rows,
            "fingerprint": dataset._fingerprint,
            "created": datetime.now(UTC).isoformat(timespec="microseconds"),
            "extra": json.loads(canonical_json(dict(extra))),
        }

    def _commit(
        self,
        stage: str,
        version: str,
        dataset: Dataset,
        provenance: dict[str, Any],
        artifacts: Mapping[str, Artifact] | None = None,
    ) -> StageRef:
        target = self.stage_dir(stage) / version
        with self._staging(self.stage_dir(stage), f".{version}{TMP_MARK}") as tmp:
            redact_rows(dataset).save_to_disk(str(tmp))
            for name, artifact in (artifacts or {}).items():
                _write_artifact(tmp, name, artifact)
            redact_files(tmp)  # the token never stays in a file, whoever wrote it
            provenance = redact({**provenance, "files": _file_records(tmp)})
            provenance["checksum"] = _provenance_checksum(provenance)
            _write_json(tmp / PROVENANCE_FILE, provenance)
            _rename_or_discard(tmp, target)
        found = self.find(stage, version)
        if found is None:
            raise StoreError(
                f"{target} exists but has no {PROVENANCE_FILE} (not written by seqpatch, or "
                "damaged); delete it and rerun"
            )
        return found

    def _check_manifest(self, work: Path, version: str, n_shards: int) -> None:
        """Refuse to mix shards cut for a different ``n_shards`` into one version; a manifest
        that does not parse means the work folder cannot be trusted, so it starts over."""
        manifest = work / SHARD_MANIFEST
        wanted = {"version": version, "n_shards": n_shards}
        if manifest.is_file():
            try:
                found = json.loads(manifest.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                found = None
            if not isinstance(found, dict) or found.get("version") != version:
                logger.warning("%s has an unreadable manifest; starting its shards over", work)
                shutil.rmtree(work, ignore_errors=True)
            elif found != wanted:
                raise StoreError(
                    f"{work} holds shards of an interrupted build with n_shards="
                    f"{found.get('n_shards')}, not {n_shards}; rerun with the same number of "
                    f"shards, or delete {work} to start over"
                )
            else:
                return
        for attempt in range(3):  # a finished racing build may remove the folder meanwhile
            work.mkdir(parents=True, exist_ok=True)
            try:
                _write_json(manifest, wanted)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise


@dataclass
class VerifyReport:
    """What ``Store.verify`` found: good versions, damaged ones (with the problem) and debris."""

    ok: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    debris: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.damaged and not self.debris


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _shard_lock_at(path: Path) -> Any:
    from filelock import FileLock

    return FileLock(str(path))


def _lock_timeout() -> type[Exception]:
    from filelock import Timeout

    return Timeout


def _shard_ok(shard_dir: Path) -> bool:
    """A finished shard loads and has readable statistics."""
    if not shard_dir.is_dir():
        return False
    try:
        from datasets import Dataset

        Dataset.load_from_disk(str(shard_dir))
        return isinstance(json.loads((shard_dir / SHARD_EXTRA).read_text()), dict)
    except Exception:  # any damage means: rebuild this shard
        return False


def _debris_version(name: str) -> str | None:
    """The version a leftover folder belongs to: ``.<v>.tmp-*`` or ``<v>.partial``."""
    if name.startswith(".") and TMP_MARK in name:
        return name[1:].split(TMP_MARK, 1)[0]
    if name.endswith(PARTIAL_SUFFIX):
        return name[: -len(PARTIAL_SUFFIX)]
    return None


def _provenance_problem(provenance: Any, stage: str, version: str) -> str | None:
    if not isinstance(provenance, dict):
        return f"{PROVENANCE_FILE} is not a JSON object"
    missing = [key for key in _PROVENANCE_KEYS if key not in provenance]
    if missing:
        return f"{PROVENANCE_FILE} lacks {', '.join(missing)}"
    if provenance["stage"] != stage or provenance["version"] != version:
        return f"{PROVENANCE_FILE} describes {provenance['stage']}/{provenance['version']}"
    if not isinstance(provenance["row_count"], int) or not isinstance(provenance["config"], dict):
        return f"{PROVENANCE_FILE} has a malformed row_count or config"
    if "checksum" in provenance and provenance["checksum"] != _provenance_checksum(provenance):
        return f"{PROVENANCE_FILE} was edited after the commit (its checksum does not match)"
    return None


def _provenance_checksum(provenance: Mapping[str, Any]) -> str:
    """SHA-256 of the provenance's canonical JSON without the checksum itself and the creation
    time (so that, apart from ``created``, provenance stays a function of the inputs)."""
    body = {k: v for k, v in provenance.items() if k not in ("checksum", "created")}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _files_problem(path: Path, provenance: Mapping[str, Any]) -> str | None:
    files = provenance.get("files")
    if files is None:
        return None  # stored before file records existed
    if not isinstance(files, dict):
        return f"{PROVENANCE_FILE} has a malformed file list"
    for name, record in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if not isinstance(record, dict) or file.stat().st_size != record.get("size"):
            return f"{name} has changed size"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != PROVENANCE_FILE
    }


def _write_artifact(folder: Path, name: str, artifact: Artifact) -> None:
    target = folder / name
    if target.resolve().parent != folder.resolve() or name in (PROVENANCE_FILE,):
        raise StoreError(f"artifact name {name!r} must be a plain file name")
    if isinstance(artifact, bytes):
        target.write_bytes(artifact)
    elif isinstance(artifact, str):
        target.write_text(artifact)
    else:
        artifact(target)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write deterministic JSON atomically: a temporary file of this writer's own (two processes
    may write the same file at once, e.g. a work folder's manifest), then one rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide provenance from collaborators
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(redact(payload), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rename_or_discard(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        logger.info("%s appeared while building; keeping it", target)


def _build_hint(stage: str, data_dir: Path) -> str:
    from seqpatch.stages import build_command

    return build_command(stage, data_dir)


def load_stage(
    stage: str, data_dir: str | os.PathLike[str] | None = None, version: str = LATEST
) -> Dataset:
    """Rows of a stored stage: ``load_stage("programs")`` in a notebook."""
    return Store(data_dir).load(stage, version)
