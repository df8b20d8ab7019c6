"""Builds of a study that have not finished: a sharded build's ``<version>.partial`` work folder.

A long build (a real model's patching grid) keeps each finished shard in its work folder until
the last one is done and the version is committed (``seqpatch.store.shards``). ``unfinished``
lists such folders of a ``seqpatch.views.Study`` and ``unfinished_values`` reads their finished
shards as ``Study.pair_values`` reads a stored version. They are never part of the study's
``refs``, ``patching()`` or ``pair_values()``: a reader asks for them by name and must label
what it shows from them as partial.

Only finished shards count, each checked against the hashes it recorded (a damaged or
half-written one is left out); a shard written before shards recorded hashes counts if it
loads, and is listed as ``unchecked``. A folder is the study's when every pair id of those
shards is one of the study's pairs or, with no finished shard yet, when its manifest names the
study's pairs as parent. A folder whose version is stored (finished) is not listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import polars as pl

from seqpatch.cells import values_of_rows
from seqpatch.store.refs import PARTIAL_SUFFIX, SHARD_FILES, SHARD_MANIFEST
from seqpatch.store.shards import shard_ok

if TYPE_CHECKING:
    from datasets import Dataset

    from seqpatch.store import Store
    from seqpatch.views import Study

__all__ = [
    "Unfinished",
    "built_from",
    "grid_of_rows",
    "unfinished",
    "unfinished_rows",
    "unfinished_values",
]


@dataclass(frozen=True)
class Unfinished:
    """A build of the study that has not finished: the work folder ``path``
    (``<version>.partial``, its manifest written at ``started``, seconds since the epoch) with
    ``shards`` of its ``n_shards`` finished (``None`` when its manifest does not say), holding
    ``n_pairs`` distinct pairs; ``unchecked``: those finished shards that carry no hashes."""

    stage: str
    version: str
    path: Path
    n_shards: int | None
    shards: tuple[int, ...]
    n_pairs: int
    unchecked: tuple[int, ...] = ()
    started: float = 0.0


# Per study: its scanned builds by stage, and their rows and pair values (read once per Study:
# a build still running is seen as it was then).
_CACHE: WeakKeyDictionary[Study, dict[Any, Any]] = WeakKeyDictionary()


def _cache(study: Study) -> dict[Any, Any]:
    return _CACHE.setdefault(study, {})


def unfinished(study: Study, stage: str) -> list[Unfinished]:
    """The study's unfinished builds of ``stage`` (see the module docstring), oldest first."""
    cache = _cache(study)
    if ("scan", stage) not in cache:
        cache[("scan", stage)] = _scan(study, stage, cache)
    return cache[("scan", stage)]


def unfinished_rows(study: Study, build: Unfinished) -> Dataset:
    """The rows of an unfinished build's finished shards, in shard order."""
    cache = _cache(study)
    key = ("rows", build.path)
    if key not in cache:
        cache[key] = _load_shards(build.path, build.shards)
    return cache[key]


def unfinished_values(study: Study, build: Unfinished, metric: str = "normalised") -> pl.DataFrame:
    """``Study.pair_values`` of an unfinished patching build's finished shards (``version`` is
    the build's; its stored version does not exist yet); empty before its first shard."""
    cache = _cache(study)
    key = ("values", build.path, metric)
    if key not in cache:
        if not build.shards:
            cache[key] = pl.DataFrame()
        else:
            rows = unfinished_rows(study, build)
            grid = grid_of_rows(rows, build.version)
            cache[key] = values_of_rows(rows, build.version, grid, metric)
    return cache[key]


def grid_of_rows(rows: Dataset, version: str) -> dict[str, Any]:
    """``Study.grid`` read from patching rows (an unfinished build has no provenance yet)."""
    first = rows[0]
    return {
        "version": version,
        "axes": tuple(first["axes"]),
        "method": "attribution" if first["method"] == "attribution" else "exact",
        "positions": first["span"] or "all",
        "sites": tuple(dict.fromkeys(rows["site"])),
    }


def manifest_of(build: Unfinished) -> dict[str, Any]:
    """The build's work-folder manifest (``{}`` when it cannot be read)."""
    from seqpatch.store.refs import SHARD_MANIFEST

    return _read_manifest(build.path / SHARD_MANIFEST)


def built_from(store: Store, stage: str, pairs_version: str) -> list[Unfinished]:
    """Unfinished builds of ``stage`` whose manifest names ``pairs_version`` as their pairs, for
    stages whose rows carry no pair ids (``das``: one shard per cell; ``n_pairs`` is 0), oldest
    first."""
    out = []
    for work, version in _work_folders(store, stage):
        manifest = _read_manifest(work / SHARD_MANIFEST)
        parents = manifest.get("parents")
        if not isinstance(parents, dict) or parents.get("pairs") != pairs_version:
            continue
        shards, unchecked = _finished_shards(work)
        out.append(_unfinished(stage, version, work, manifest, shards, 0, unchecked))
    return sorted(out, key=lambda build: (build.started, build.version))


def _unfinished(
    stage: str,
    version: str,
    work: Path,
    manifest: dict[str, Any],
    shards: list[int],
    n_pairs: int,
    unchecked: list[int],
) -> Unfinished:
    """The ``Unfinished`` of a work folder: its shard count and start from its manifest."""
    n_shards = manifest.get("n_shards")
    started = (work / SHARD_MANIFEST).stat().st_mtime if manifest else 0.0
    return Unfinished(
        stage, version, work, n_shards if isinstance(n_shards, int) else None,
        tuple(shards), n_pairs, tuple(unchecked), started,
    )  # fmt: skip


def _work_folders(store: Store, stage: str) -> list[tuple[Path, str]]:
    """``(work folder, version)`` of every build of ``stage`` not stored yet."""
    folder = store.stage_dir(stage)
    if not folder.is_dir():
        return []
    found = []
    for work in sorted(folder.glob(f"*{PARTIAL_SUFFIX}")):
        version = work.name[: -len(PARTIAL_SUFFIX)]
        if work.is_dir() and store.find(stage, version) is None:
            found.append((work, version))
    return found


def _finished_shards(work: Path) -> tuple[list[int], list[int]]:
    """The finished shards of a work folder and, of those, the ones without recorded hashes."""
    shards, unchecked = [], []
    for shard in sorted(work.glob("shard-*")):
        index = shard.name.removeprefix("shard-")
        if not index.isdigit():
            continue
        if shard_ok(shard):
            shards.append(int(index))
        elif not (shard / SHARD_FILES).exists() and _loads(shard):
            shards.append(int(index))
            unchecked.append(int(index))
    return shards, unchecked


def _scan(study: Study, stage: str, cache: dict[Any, Any]) -> list[Unfinished]:
    out = []
    for work, version in _work_folders(study.store, stage):
        shards, unchecked = _finished_shards(work)
        manifest = _read_manifest(work / SHARD_MANIFEST)
        ids: set[str] = set()
        if shards:
            rows = _load_shards(work, shards)
            ids = set(rows["pair_id"]) if "pair_id" in rows.column_names else set()
            if "pair_ids" not in cache:  # the study's pairs, read once and only when needed
                cache["pair_ids"] = set(study.rows(study.pairs_ref)["pair_id"])
            if not ids or not ids <= cache["pair_ids"]:
                continue
            cache[("rows", work)] = rows
        else:
            parents = manifest.get("parents")
            if not isinstance(parents, dict) or parents.get("pairs") != study.pairs_ref.version:
                continue
        out.append(_unfinished(stage, version, work, manifest, shards, len(ids), unchecked))
    return sorted(out, key=lambda build: (build.started, build.version))


def _load_shards(work: Path, shards: tuple[int, ...] | list[int]) -> Dataset:
    from datasets import Dataset, concatenate_datasets

    return concatenate_datasets(
        [Dataset.load_from_disk(str(work / f"shard-{i:05d}")) for i in shards]
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _loads(shard: Path) -> bool:
    from datasets import Dataset

    try:
        Dataset.load_from_disk(str(shard))
    except Exception:  # any damage: not a finished shard
        return False
    return True
