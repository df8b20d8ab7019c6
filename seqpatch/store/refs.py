"""Names, identities and canonical forms: what a stored version is called and what it records.

Everything here is pure (no file is read or written): the data dir's location, the layout's
names, the canonical JSON that versions and checksums hash, the records provenance keeps of a
config, a parent and a model, and ``StageRef``, the handle every reader gets for a version.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqpatch.contract import Artifact, Built
from seqpatch.errors import SeqpatchError

PROVENANCE_FILE = "seqpatch.json"
DATA_DIR_ENV = "SEQPATCH_DATA"
DEFAULT_DATA_DIR = "seqpatch-data"
VERSION_LENGTH = 12  # 48 bits of sha256: collisions are negligible for a few thousand versions
PARTIAL_SUFFIX = ".partial"
SHARD_MANIFEST = "manifest.json"
SHARD_EXTRA = "extra.json"
SHARD_FILES = "files.json"  # a finished shard's own file hashes, written last
LATEST = "latest"
LOCK_SUFFIX = ".lock"
TMP_MARK = ".tmp-"
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_VERSION_NAME = re.compile(rf"^[0-9a-f]{{{VERSION_LENGTH}}}$")


class StoreError(SeqpatchError):
    """The store cannot read or write what was asked (unwritable folder, corrupt provenance)."""


class StageNotFoundError(StoreError):
    """The requested stage or version is not stored; the message says how to build it.

    ``command`` is the plain ``seqpatch build <stage>`` the message names; the CLI, which knows
    each stage's required options, replaces it with a complete example (the store does not know
    the stages)."""

    def __init__(
        self, message: str, *, stage: str | None = None, command: str | None = None
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.command = command


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

Artifacts = Mapping[str, Artifact]
"""Files a build writes beside its rows, by file name."""


def is_version_name(name: str) -> bool:
    """True for a version folder's name (``VERSION_LENGTH`` hex digits)."""
    return bool(_VERSION_NAME.match(name))


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


def unpack(result: Any) -> Built:
    """What a build function returned, as a ``Built`` (a bare ``Dataset`` is its rows)."""
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


def repair_hint(stage: str, data_dir: Path) -> str:
    """The command that clears a damaged version of ``stage`` (said by every damage error)."""
    return f"`seqpatch verify {stage} --clean --data-dir {data_dir}`"


def damaged_error(stage: str, version: str, data_dir: Path, problem: str) -> DamagedVersionError:
    """One line naming the damaged version, what is wrong with it and the repair."""
    return DamagedVersionError(
        f"stored version {stage}/{version} in {data_dir} is damaged: {problem}; "
        f"{repair_hint(stage, data_dir)} removes it, then rerun the command that built it"
    )
