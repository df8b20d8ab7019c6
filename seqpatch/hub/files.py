"""The published layout of a stage, shared by export and push: snapshots, shards, card, lineage.

One study is one dataset repo (or an exported folder with the same files); each stage is one
*config*:

```
README.md                                   card: ``configs:`` lists every stage, one section each
<stage>/train-00000-of-0000N.parquet        rows; features (Array3D included) ride in the schema
<stage>/seqpatch.json                       the stage's provenance, as the store wrote it
<stage>/heatmap.npy, heatmap.json, *.png    artifacts of the stage's version folder
```

Exporting or pushing a stage also publishes the stored versions it was built from (following
provenance ``parents``), so a repo never pairs ``patching`` with another ``pairs`` than the one
it was computed on. Everything is written under a staging root and scanned for the token
(``seqpatch.hub.token``) before it goes anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset
from datasets.utils.py_utils import convert_file_size_to_int

from seqpatch.cards import (
    SPLIT,
    build_card,
    heatmap_summary,
    stage_sort_key,
    stage_stats,
)
from seqpatch.hub.token import HubError, check_no_token

if TYPE_CHECKING:
    from seqpatch.store import StageRef, Store


PROVENANCE_FILE = "seqpatch.json"
README = "README.md"
README_BACKUP = "README.before-seqpatch.md"
DEFAULT_MAX_SHARD_SIZE = "500MB"  # the Hub's own default for parquet shards
ARTIFACT_SUFFIXES = (".png", ".svg", ".npy", ".json", ".csv")  # HTML charts stay local
REQUIRED_PROVENANCE = ("stage", "version", "schema_version", "config", "row_count")
_STORE_FILES = {PROVENANCE_FILE, "dataset_info.json", "state.json"}
_SHARD_FILE = re.compile(rf"^{SPLIT}-\d{{5}}-of-\d{{5}}\.parquet$")


@dataclass(frozen=True)
class StageSnapshot:
    """One stage's rows, provenance and artifact files: everything that gets published."""

    stage: str
    dataset: Dataset
    provenance: Mapping[str, Any]
    artifacts: tuple[Path, ...] = field(default=())

    @property
    def version(self) -> str | None:
        return self.provenance.get("version")


@dataclass(frozen=True)
class Exported:
    """What ``export_stage`` wrote: the folder, each stage's version, and what it could not.

    ``str(exported)`` is the folder, so it reads like the path older callers got back.
    """

    folder: Path
    versions: Mapping[str, str | None]
    """Every exported stage (pipeline order) and its version."""
    missing: tuple[str, ...] = ()
    """Ancestors named by provenance but not stored locally (``stage version``)."""
    notes: tuple[str, ...] = ()
    """What ``force`` kept aside (a foreign README, foreign files left in a stage folder)."""

    def __fspath__(self) -> str:
        return str(self.folder)

    def __str__(self) -> str:
        return str(self.folder)

    def summary(self) -> str:
        """One line for the terminal: every stage with its version, then what is missing."""
        stages = ", ".join(f"{s} {v or '(no version)'}" for s, v in self.versions.items())
        line = f"exported {stages} to {self.folder}"
        if self.missing:
            line += f" (ancestors not stored here, not exported: {', '.join(self.missing)})"
        return line


# ---------------------------------------------------------------------------------------------
# The file set (shared by export and push)


def num_shards(dataset: Dataset, max_shard_size: str | int) -> int:
    """How many parquet shards keep each under ``max_shard_size`` (estimated from Arrow bytes)."""
    try:
        limit = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        raise HubError(
            f"max_shard_size {max_shard_size!r} is not a size; use e.g. 500MB or 2GB"
        ) from None
    if limit <= 0:
        raise HubError(f"max_shard_size must be positive, got {max_shard_size!r}")
    shards = max(1, math.ceil(_dataset_bytes(dataset) / limit))
    return min(shards, max(1, dataset.num_rows))


def _dataset_bytes(dataset: Dataset) -> int:
    table = dataset.data
    if table.num_rows == 0:
        return 0
    return int(table.nbytes * dataset.num_rows / table.num_rows)


def _shard_name(index: int, total: int) -> str:
    return f"{SPLIT}-{index:05d}-of-{total:05d}.parquet"


@dataclass
class _Staged:
    """One stage written under a staging root, with what its card section needs."""

    snapshot: StageSnapshot
    paths: list[str]
    stats: dict[str, Any]
    download_bytes: int

    @property
    def files(self) -> list[str]:
        return sorted(p.split("/", 1)[1] for p in self.paths)


def _write_stage(snapshot: StageSnapshot, root: Path, max_shard_size: str | int) -> _Staged:
    """Write ``root/<stage>/``: parquet shards, provenance and artifacts."""
    _check_publishable(snapshot)
    stage = snapshot.stage
    stage_dir = root / stage
    stage_dir.mkdir(parents=True, exist_ok=False)
    total = num_shards(snapshot.dataset, max_shard_size)
    written: list[str] = []
    for index in range(total):
        shard = snapshot.dataset.shard(num_shards=total, index=index, contiguous=True)
        shard.to_parquet(stage_dir / _shard_name(index, total))
        written.append(f"{stage}/{_shard_name(index, total)}")
    (stage_dir / PROVENANCE_FILE).write_text(
        json.dumps(dict(snapshot.provenance), indent=2, sort_keys=True, default=str) + "\n"
    )
    written.append(f"{stage}/{PROVENANCE_FILE}")
    charts = []
    for artifact in snapshot.artifacts:
        shutil.copyfile(artifact, stage_dir / artifact.name)
        written.append(f"{stage}/{artifact.name}")
        if artifact.suffix in (".png", ".svg"):
            charts.append(f"{stage}/{artifact.name}")
    stats = stage_stats(
        snapshot.dataset,
        snapshot.provenance,
        charts=charts,
        heatmap=heatmap_summary(stage_dir, stage),
    )
    download = sum((root / p).stat().st_size for p in written if p.endswith(".parquet"))
    return _Staged(snapshot, written, stats, download)


def _write_readme(
    root: Path, staged: Sequence[_Staged], *, repo_id: str, existing_readme: str | None
) -> str:
    """Render the merged card for every staged stage (in order) into ``root/README.md``."""
    readme = existing_readme
    for item in staged:
        card = build_card(
            stage=item.snapshot.stage,
            features=item.snapshot.dataset.features,
            stats=item.stats,
            provenance=item.snapshot.provenance,
            data_pattern=f"{item.snapshot.stage}/{SPLIT}-*.parquet",
            dataset_bytes=_dataset_bytes(item.snapshot.dataset),
            download_bytes=item.download_bytes,
            repo_id=repo_id,
            existing_readme=readme,
            files=item.files,
        )
        readme = str(card) + "\n"
    assert readme is not None
    (root / README).write_text(readme)
    return README


def write_stage_files(
    snapshot: StageSnapshot,
    root: Path,
    *,
    repo_id: str,
    existing_readme: str | None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Write the stage folder and the merged README under ``root``; return repo-relative paths.

    ``existing_readme`` is the repo's current card (``None`` for a new repo): its other stages'
    configs and sections are kept.
    """
    staged = _write_stage(snapshot, root, max_shard_size)
    readme = _write_readme(root, [staged], repo_id=repo_id, existing_readme=existing_readme)
    return [*staged.paths, readme]


def _check_publishable(snapshot: StageSnapshot) -> None:
    if snapshot.dataset.num_rows == 0:
        raise HubError(
            f"stage {snapshot.stage} has no rows; `datasets` cannot load an empty config, so "
            "there is nothing to publish. Rebuild the stage with settings that keep some rows."
        )


# ---------------------------------------------------------------------------------------------
# The store side


def artifact_files(version_dir: Path) -> tuple[Path, ...]:
    """Charts, arrays and their index files a stage's version folder holds beside its rows."""
    return tuple(
        sorted(
            p
            for p in version_dir.iterdir()
            if p.is_file()
            and not p.name.startswith(".")
            and p.suffix in ARTIFACT_SUFFIXES
            and p.name not in _STORE_FILES
        )
    )


def _check_artifacts(ref: StageRef, artifacts: Iterable[Path]) -> None:
    """Each artifact must match the SHA-256 its provenance recorded (a garbage ``heatmap.npy``
    is never published)."""
    records = ref.provenance.get("files")
    if not isinstance(records, Mapping):
        return
    for path in artifacts:
        record = records.get(path.name)
        expected = record.get("sha256") if isinstance(record, Mapping) else None
        if expected is None:
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise HubError(
                f"{ref.stage}/{ref.version}/{path.name} does not match the SHA-256 recorded at "
                f"commit (the file was changed or damaged); run `seqpatch verify {ref.stage}` "
                "and rebuild the stage"
            )


def snapshot_of(store: Store, ref: StageRef) -> StageSnapshot:
    """The stored version ``ref`` with its provenance and (checked) artifacts."""
    artifacts = artifact_files(Path(ref.path))
    _check_artifacts(ref, artifacts)
    dataset = store.load(ref.stage, ref.version)
    return StageSnapshot(ref.stage, dataset, dict(ref.provenance), artifacts)


def snapshot_from_store(
    stage: str, version: str = "latest", data_dir: str | Path | None = None
) -> StageSnapshot:
    """The stored stage ``stage``/``version`` with its provenance and artifacts."""
    from seqpatch.store import Store

    store = Store(data_dir)
    return snapshot_of(store, store.resolve(stage, version))


def _parent_records(provenance: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The parents recorded in provenance (``parents`` list, or the older single ``parent``)."""
    from seqpatch.store import parents_of

    records = parents_of(provenance)
    config = provenance.get("config") or {}
    legacy = config.get("activations") if isinstance(config, Mapping) else None
    if isinstance(legacy, str) and not any(r.get("stage") == "activations" for r in records):
        records.append({"stage": "activations", "version": legacy})  # before `parents` existed
    return records


def lineage(store: Store, ref: StageRef) -> tuple[list[StageRef], list[str]]:
    """``ref`` and every stored ancestor, in pipeline order, and the ancestors not stored here.

    Raises ``HubError`` when two ancestors name different versions of one stage: a repo holds
    one version per stage, so that lineage cannot be published whole.
    """
    chosen: dict[str, StageRef] = {ref.stage: ref}
    missing: list[str] = []
    todo = [ref]
    while todo:
        child = todo.pop()
        for record in _parent_records(child.provenance):
            stage, version = record.get("stage"), record.get("version")
            if not isinstance(stage, str) or not isinstance(version, str):
                missing.append(f"{stage} (no version recorded)")
                continue
            if stage in chosen:
                if chosen[stage].version != version:
                    raise HubError(
                        f"the lineage of {ref.stage} {ref.version} uses two versions of {stage} "
                        f"({chosen[stage].version} and {version}); export the stages one by one "
                        "with lineage=False"
                    )
                continue
            parent = store.find(stage, version)
            if parent is None:
                missing.append(f"{stage} {version}")
                continue
            chosen[stage] = parent
            todo.append(parent)
    ordered = [chosen[name] for name in sorted(chosen, key=stage_sort_key)]
    return ordered, sorted(set(missing))


def _stage_all(
    snapshots: Sequence[StageSnapshot],
    root: Path,
    repo_id: str,
    max_shard_size: str | int,
    token: str | None,
    existing_readme: str | None,
) -> list[_Staged]:
    staged = [_write_stage(snapshot, root, max_shard_size) for snapshot in snapshots]
    _write_readme(root, staged, repo_id=repo_id, existing_readme=existing_readme)
    paths = [p for item in staged for p in item.paths] + [README]
    check_no_token(root, paths, token, {s.stage: s.dataset for s in snapshots})
    return staged


def _versions(snapshots: Sequence[StageSnapshot]) -> dict[str, str | None]:
    return {s.stage: s.version for s in sorted(snapshots, key=lambda s: stage_sort_key(s.stage))}


def _snapshots(
    store: Store, stage: str, version: str, with_lineage: bool
) -> tuple[list[StageSnapshot], list[str]]:
    ref = store.resolve(stage, version)
    refs, missing = lineage(store, ref) if with_lineage else ([ref], [])
    return [snapshot_of(store, r) for r in refs], missing
