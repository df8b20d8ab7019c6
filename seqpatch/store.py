"""The versioned store: every stage's output as a folder that is complete or absent.

Layout (``data_dir`` defaults to ``./seqpatch-data``; ``SEQPATCH_DATA`` or an argument overrides)::

    <data_dir>/<stage>/<version>/            Arrow files (``Dataset.save_to_disk``) + seqpatch.json
    <data_dir>/<stage>/<version>.partial/    work folder of a sharded build: shard-00000/, ...
    <data_dir>/<stage>/.<version>.tmp-*/     a build in progress (or killed); never read

``version`` is a short hash of the stage name, its schema version, the canonical JSON of its config,
the parent's version and the model identity. The same inputs therefore find the stored version and
do no work; different inputs get a new folder; nothing is ever overwritten.

Atomicity: a version is built in a temporary folder beside its target, ``seqpatch.json`` is
written last, and the folder is renamed into place. A version folder is complete iff it holds
``seqpatch.json``; a killed build leaves only a hidden ``.tmp-`` folder that is ignored.

Sharded builds (``Store.build_sharded``) write each finished shard atomically under
``<version>.partial/``; a rerun skips the shards already there, then concatenates them.
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
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


class StoreError(SeqpatchError):
    """The store cannot read or write what was asked (unwritable folder, corrupt provenance)."""


class StageNotFoundError(StoreError):
    """The requested stage or version is not stored; the message says how to build it."""


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


@dataclass(frozen=True)
class Built:
    """What a builder may return instead of a bare ``Dataset``: rows plus statistics.

    ``extra`` lands in the provenance (e.g. how many candidates were rejected, and why).
    """

    dataset: Dataset
    extra: Mapping[str, Any] = field(default_factory=dict)


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


def _unpack(result: Any) -> tuple[Dataset, dict[str, Any]]:
    if isinstance(result, Built):
        return result.dataset, dict(result.extra)
    return result, {}


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
        parent: Parent | None = None,
        model: Any = None,
    ) -> str:
        """The version folder name for these inputs (a pure function of them)."""
        parent_rec = parent_record(parent)
        key = {
            "stage": stage,
            "schema_version": schema_version,
            "config": config_dict(config),
            "parent": None
            if parent_rec is None
            else parent_rec.get("version") or parent_rec["fingerprint"],
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
        parent: Parent | None = None,
        model: Any = None,
    ) -> StageRef:
        """The stored version for these inputs, built by ``build_fn()`` only if absent.

        ``build_fn`` returns a ``Dataset`` or a ``Built`` (dataset + statistics for ``extra``).
        """
        version = self.version_for(stage, schema_version, config, parent, model)
        found = self.find(stage, version)
        if found is not None:
            return dataclasses.replace(found, reused=True)
        self._make_stage_dir(stage)
        dataset, extra = _unpack(build_fn())
        provenance = self._provenance(
            stage, version, schema_version, config, parent, model, dataset, extra
        )
        return self._commit(stage, version, dataset, provenance)

    def build_sharded(
        self,
        stage: str,
        schema_version: int,
        config: Any,
        n_shards: int,
        build_shard_fn: Callable[[int], Any],
        parent: Parent | None = None,
        model: Any = None,
        only_shards: Iterable[int] | None = None,
    ) -> StageRef | None:
        """Like ``get_or_build``, one shard at a time, resuming after an interruption.

        ``build_shard_fn(i)`` returns shard ``i`` of ``n_shards`` (a ``Dataset`` or ``Built``).
        Finished shards are kept under ``<version>.partial/shard-0000i/`` and skipped on a rerun;
        when all are there they are concatenated in index order into the version folder, their
        ``extra`` statistics merged (see ``merge_extra``), and the work folder is removed.
        With ``only_shards`` just those shards are built (one job of several sharing the work
        folder); the version is committed, and returned, only once every shard exists.
        """
        if n_shards < 1:
            raise StoreError(f"n_shards must be >= 1, got {n_shards}")
        wanted = range(n_shards) if only_shards is None else sorted(set(only_shards))
        if any(not 0 <= index < n_shards for index in wanted):
            raise StoreError(f"shard indices must lie in 0..{n_shards - 1}, got {list(wanted)}")
        version = self.version_for(stage, schema_version, config, parent, model)
        found = self.find(stage, version)
        if found is not None:
            return dataclasses.replace(found, reused=True)
        self._make_stage_dir(stage)
        work = self.stage_dir(stage) / f"{version}{PARTIAL_SUFFIX}"
        self._check_manifest(work, version, n_shards)
        for index in wanted:
            shard_dir = work / f"shard-{index:05d}"
            if shard_dir.is_dir():
                logger.info("%s/%s: shard %d/%d already built", stage, version, index, n_shards)
                continue
            logger.info("%s/%s: building shard %d/%d", stage, version, index, n_shards)
            shard, extra = _unpack(build_shard_fn(index))
            with self._staging(work, f".shard-{index:05d}.tmp-") as tmp:
                shard.save_to_disk(str(tmp))
                _write_json(tmp / SHARD_EXTRA, extra)
                _rename_or_discard(tmp, shard_dir)

        from datasets import Dataset, concatenate_datasets

        shard_dirs = [work / f"shard-{i:05d}" for i in range(n_shards)]
        if only_shards is not None and not all(d.is_dir() for d in shard_dirs):
            return None  # this job's shards are done; a later call joins all of them
        dataset = concatenate_datasets([Dataset.load_from_disk(str(d)) for d in shard_dirs])
        extra = merge_extra([json.loads((d / SHARD_EXTRA).read_text()) for d in shard_dirs])
        extra["n_shards"] = n_shards
        provenance = self._provenance(
            stage, version, schema_version, config, parent, model, dataset, extra
        )
        ref = self._commit(stage, version, dataset, provenance)
        shutil.rmtree(work, ignore_errors=True)
        return ref

    # -- reading ----------------------------------------------------------------------------

    def find(self, stage: str, version: str) -> StageRef | None:
        """The complete version ``version`` of ``stage``, or ``None``."""
        path = self.stage_dir(stage) / version
        provenance_path = path / PROVENANCE_FILE
        if not provenance_path.is_file():
            return None
        try:
            provenance = json.loads(provenance_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(
                f"{provenance_path} is unreadable ({err}); delete {path} and rebuild the stage"
            ) from err
        return StageRef(stage, version, path, provenance)

    def versions(self, stage: str) -> list[StageRef]:
        """Complete versions of ``stage``, oldest first (by creation time)."""
        folder = self.stage_dir(stage)
        if not folder.is_dir():
            return []
        refs = [
            ref
            for child in sorted(folder.iterdir())
            if child.is_dir() and not child.name.startswith(".")
            if not child.name.endswith(PARTIAL_SUFFIX)
            if (ref := self.find(stage, child.name)) is not None
        ]
        return sorted(refs, key=lambda r: (str(r.provenance.get("created", "")), r.version))

    def stages(self) -> list[str]:
        if not self.data_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def refs(self) -> list[StageRef]:
        """Every complete version of every stage (stages by name, versions oldest first)."""
        return [ref for stage in self.stages() for ref in self.versions(stage)]

    def list(self) -> list[dict[str, Any]]:
        """The provenance of every stored version (see ``refs`` for paths too)."""
        return [dict(ref.provenance) for ref in self.refs()]

    def resolve(self, stage: str, version: str = LATEST) -> StageRef:
        """``version`` (``latest``, a full version or a unique prefix) of ``stage``."""
        available = self.versions(stage)
        if not available:
            raise StageNotFoundError(
                f"no stored {stage!r} stage in {self.data_dir}; build it first with "
                f"`{_build_hint(stage, self.data_dir)}`"
            )
        if version == LATEST:
            return available[-1]
        matches = [ref for ref in available if ref.version.startswith(version)]
        if len(matches) == 1 and version:
            return matches[0]
        known = ", ".join(ref.version for ref in available)
        what = "matches several versions" if matches else "is not stored"
        raise StageNotFoundError(
            f"{stage} version {version!r} {what} in {self.data_dir}; stored versions: {known} "
            f"(or build it with `{_build_hint(stage, self.data_dir)}`)"
        )

    def load(self, stage: str, version: str = LATEST) -> Dataset:
        """The rows of a stored version (memory-mapped Arrow)."""
        from datasets import Dataset

        return Dataset.load_from_disk(str(self.resolve(stage, version).path))

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
        parent: Parent | None,
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
            "parent": parent_record(parent),
            "model": model_record(model),
            "seqpatch_version": __version__,
            "row_count": dataset.num_rows,
            "fingerprint": dataset._fingerprint,
            "created": datetime.now(UTC).isoformat(timespec="microseconds"),
            "extra": json.loads(canonical_json(dict(extra))),
        }

    def _commit(
        self, stage: str, version: str, dataset: Dataset, provenance: dict[str, Any]
    ) -> StageRef:
        target = self.stage_dir(stage) / version
        with self._staging(self.stage_dir(stage), f".{version}.tmp-") as tmp:
            dataset.save_to_disk(str(tmp))
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
        """Refuse to mix shards cut for a different ``n_shards`` into one version."""
        manifest = work / SHARD_MANIFEST
        wanted = {"version": version, "n_shards": n_shards}
        if manifest.is_file():
            found = json.loads(manifest.read_text())
            if found != wanted:
                raise StoreError(
                    f"{work} holds shards of an interrupted build with n_shards="
                    f"{found.get('n_shards')}, not {n_shards}; rerun with the same number of "
                    f"shards, or delete {work} to start over"
                )
            return
        work.mkdir(exist_ok=True)
        _write_json(manifest, wanted)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write deterministic JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
