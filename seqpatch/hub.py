"""Publish stages as configs of one Hugging Face dataset repo, and continue from published ones.

One study is one dataset repo; each stage is one *config*, so ``load_dataset("user/name",
"pairs", split="train")`` works. The Hub and an exported folder hold exactly the same files,
built by the same functions; ``push_stage`` uploads them in a single commit:

```
README.md                                   card: ``configs:`` lists every stage, one section each
<stage>/train-00000-of-0000N.parquet        rows; features (Array3D included) ride in the schema
<stage>/seqpatch.json                       the stage's provenance, as the store wrote it
<stage>/heatmap.npy, heatmap.json, *.png    artifacts of the stage's version folder
```

**Lineage.** Exporting or pushing a stage also publishes the stored versions it was built from
(following provenance ``parents``), so a repo never pairs ``patching`` with another ``pairs``
than the one it was computed on. ``lineage=False`` publishes the stage alone.

**Nothing is destroyed.** Export refuses the data dir (and any folder inside it, or a folder that
holds a data dir's layout), and a non-empty folder that is not a seqpatch export unless
``force=True``; even then it never deletes a file it did not write (a foreign ``README.md`` is
kept as ``README.before-seqpatch.md``; foreign files in a stage folder stay where they are).
Everything is staged in a temporary folder first: a new export appears by one rename, an update
swaps whole stage folders, and a failure leaves the previous contents as they were.

**Credentials.** They come from ``token=``, ``HF_TOKEN`` or the ``huggingface_hub`` login, in
that order; a token is never printed, logged, or written anywhere: every staged file and every
string in the rows is scanned for it, by export as by push, and push runs all its local checks
(rows, card, files, token) before its first call to the Hub. Every Hub failure becomes one
``HubError`` whose message says what to do, and nothing is half-published: the upload is one
commit.

**Import** (``import_stage``) checks a published stage before registering it: its
``seqpatch.json`` is an object with the store's keys, its schema version is an integer this
seqpatch knows, its config is valid for the stage, its parquet files exist and hold the recorded
number of rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset, load_dataset
from datasets.utils.py_utils import convert_file_size_to_int
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_token,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import httpx

from seqpatch.cards import (
    SPLIT,
    CardError,
    build_card,
    existing_card_data,
    heatmap_summary,
    lineage_of_card,
    stage_sort_key,
    stage_stats,
)
from seqpatch.errors import SeqpatchError

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
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_TMP_PREFIX = ".seqpatch-export-"


class HubError(SeqpatchError):
    """Publishing to, or loading from, the Hub (or an exported folder) failed; says what to do."""


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
# The token never leaves


def _token_for_scan(token: str | None) -> str | None:
    """The token that must not appear in what is written: given, ``HF_TOKEN``, or the login."""
    return token or os.environ.get("HF_TOKEN") or get_token() or None


def _file_contains(path: Path, needle: bytes) -> bool:
    if path.stat().st_size < len(needle):
        return False
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return mm.find(needle) >= 0


def _array_contains(array: Any, needle: str) -> bool:
    """Whether any string inside ``array`` (lists and structs included) contains ``needle``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return bool(pc.any(pc.match_substring(array, needle)).as_py())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _array_contains(pc.list_flatten(array), needle)
    if pa.types.is_struct(kind):
        return any(
            _array_contains(pc.struct_field(array, [i]), needle) for i in range(kind.num_fields)
        )
    return False


def _check_no_token(
    root: Path, paths: Iterable[str], token: str | None, snapshots: Iterable[StageSnapshot] = ()
) -> None:
    """Refuse to write anything that would carry the token: any staged file's bytes, or any
    string in the rows (parquet pages may be compressed, so the rows are scanned too)."""
    if not token:
        return
    needle = token.encode()
    leaks = [p for p in paths if _file_contains(root / p, needle)]
    for snapshot in snapshots:
        table = snapshot.dataset.with_format(None).data.table
        leaks += [
            f"{snapshot.stage} column {name!r}"
            for name, column in zip(table.column_names, table.columns, strict=True)
            if needle.decode() in name or _array_contains(column, token)
        ]
    if leaks:
        raise HubError(
            f"{leaks[0]} would contain your Hugging Face token; nothing was written. Remove the "
            "token from the stage's config, model path or rows and rebuild the stage."
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


# ---------------------------------------------------------------------------------------------
# Export


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _holds_store_layout(folder: Path) -> bool:
    """``folder/<stage>/<version>/seqpatch.json``: a data dir, whatever ``--data-dir`` said."""
    for stage_dir in (p for p in folder.iterdir() if p.is_dir()):
        for version_dir in (p for p in stage_dir.iterdir() if p.is_dir()):
            if (version_dir / PROVENANCE_FILE).is_file():
                return True
    return False


def _check_destination(folder: Path, stages: Iterable[str], data_dir: Path | None) -> None:
    """Refuse a destination an export could damage: a file, the data dir, a store layout."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise HubError(f"--to {folder}: {existing} is a file, not a folder; choose a folder")
    if data_dir is not None:
        if _inside(folder, data_dir):
            raise HubError(
                f"--to {folder} is inside the data dir {data_dir}; exporting there would replace "
                "stored versions. Choose a folder outside the data dir."
            )
        for stage in stages:
            if _inside(data_dir, folder / stage) or _inside(data_dir, folder / README):
                raise HubError(
                    f"--to {folder} would replace {folder / stage}, which holds the data dir "
                    f"{data_dir}; choose another folder"
                )
    if folder.is_dir() and _holds_store_layout(folder):
        raise HubError(
            f"--to {folder} holds a seqpatch data dir (stage/version/{PROVENANCE_FILE}); exporting "
            "there would replace stored versions. Choose an empty folder."
        )


def _our_files(folder: Path, stage: str, card_files: Mapping[str, list[str]] | None) -> set[str]:
    """Names in ``folder/<stage>/`` that an earlier export wrote (so it may replace them)."""
    stage_dir = folder / stage
    if card_files is None or not (stage_dir / PROVENANCE_FILE).is_file():
        return set()
    if stage in card_files:
        return set(card_files[stage]) | {PROVENANCE_FILE}
    # an export written before the card listed its files: seqpatch's own names
    return {
        p.name
        for p in stage_dir.iterdir()
        if p.name == PROVENANCE_FILE
        or _SHARD_FILE.match(p.name)
        or (p.suffix in ARTIFACT_SUFFIXES and p.name.startswith(("heatmap", "trace", "accuracy")))
    }


def _is_visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _backup_name(folder: Path) -> Path:
    candidate, n = folder / README_BACKUP, 1
    while candidate.exists():
        n += 1
        candidate = folder / f"README.before-seqpatch-{n}.md"
    return candidate


def export_snapshots(
    snapshots: Sequence[StageSnapshot],
    folder: str | Path,
    *,
    repo_id: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    token: str | None = None,
    data_dir: str | Path | None = None,
) -> Exported:
    """Write ``snapshots`` into ``folder`` in the Hub layout, keeping other stages already there.

    ``folder`` must be empty, absent, or an earlier seqpatch export (a ``README.md`` whose front
    matter holds a ``seqpatch:`` block); any other folder needs ``force=True``, and even then no
    file seqpatch did not write is deleted. ``data_dir`` (the store the snapshots come from) and
    anything inside it are refused. All files are staged first and scanned for the token.
    """
    folder = Path(folder)
    stages = [s.stage for s in snapshots]
    _check_destination(folder, stages, None if data_dir is None else Path(data_dir))
    visible = sorted(p.name for p in folder.iterdir() if _is_visible(p)) if folder.is_dir() else []
    readme_path = folder / README
    existing = readme_path.read_text(errors="replace") if readme_path.is_file() else None
    card_files = lineage_of_card(existing)  # None: not a seqpatch card
    if visible and card_files is None and not force:
        raise HubError(
            f"--to {folder} is not empty ({', '.join(visible[:3])}{', …' if len(visible) > 3 else ''}) "
            "and is not a seqpatch export; choose an empty folder, or pass --force to add the "
            "export beside those files (none of them is deleted)"
        )
    plans = {stage: _stage_plan(folder, stage, card_files) for stage in stages}
    token = _token_for_scan(token)
    repo = repo_id or "USER/NAME"
    merge_from = existing
    if existing is not None and card_files is None:
        try:
            existing_card_data(existing)
        except CardError:
            merge_from = None  # a foreign README whose YAML does not parse: kept aside, not merged
    try:
        if not folder.exists() or not any(folder.iterdir()):
            return _export_fresh(snapshots, folder, repo, max_shard_size, token)
        return _export_update(
            snapshots, folder, repo, max_shard_size, token, merge_from, card_files, plans
        )
    except CardError as err:
        raise HubError(f"cannot write the card in {folder}: {err}") from err


def _stage_plan(folder: Path, stage: str, card_files: Mapping[str, list[str]] | None) -> list[Path]:
    """The foreign entries of ``folder/<stage>/`` (kept through the swap)."""
    stage_dir = folder / stage
    if not stage_dir.exists():
        return []
    if not stage_dir.is_dir():
        raise HubError(f"{stage_dir} is a file; move it away to export stage {stage} here")
    ours = _our_files(folder, stage, card_files)
    return sorted(p for p in stage_dir.iterdir() if p.name not in ours)


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
    _check_no_token(root, paths, token, snapshots)
    return staged


def _versions(snapshots: Sequence[StageSnapshot]) -> dict[str, str | None]:
    return {s.stage: s.version for s in sorted(snapshots, key=lambda s: stage_sort_key(s.stage))}


def _export_fresh(
    snapshots: Sequence[StageSnapshot],
    folder: Path,
    repo_id: str,
    max_shard_size: str | int,
    token: str | None,
) -> Exported:
    """A new export: staged beside ``folder``, then renamed into place in one step."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_TMP_PREFIX}", dir=folder.parent))
    try:
        _stage_all(snapshots, tmp, repo_id, max_shard_size, token, None)
        os.rename(tmp, folder)  # replaces an empty folder in the same step
    except OSError as err:
        raise HubError(f"cannot write the export to {folder}: {err.strerror or err}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Exported(folder, _versions(snapshots))


def _export_update(
    snapshots: Sequence[StageSnapshot],
    folder: Path,
    repo_id: str,
    max_shard_size: str | int,
    token: str | None,
    existing: str | None,
    card_files: Mapping[str, list[str]] | None,
    foreign: Mapping[str, list[Path]],
) -> Exported:
    """Add stages to an existing folder: stage inside it, then swap stage folders and README."""
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=folder))
    old = tmp / ".replaced"
    try:
        staged = _stage_all(snapshots, tmp, repo_id, max_shard_size, token, existing)
        for item in staged:
            clash = [p.name for p in foreign[item.snapshot.stage] if p.name in item.files]
            if clash:
                raise HubError(
                    f"{folder / item.snapshot.stage / clash[0]} was not written by seqpatch and "
                    "would be replaced; move it away first (nothing was exported)"
                )
        old.mkdir()
        for item in staged:
            stage = item.snapshot.stage
            target = folder / stage
            if target.exists():
                os.rename(target, old / stage)
            os.rename(tmp / stage, target)
            for entry in foreign[stage]:
                os.rename(old / stage / entry.name, target / entry.name)
                notes.append(f"kept {target / entry.name} (not written by seqpatch)")
        readme = folder / README
        if readme.is_file() and card_files is None:
            backup = _backup_name(folder)
            os.rename(readme, backup)
            notes.append(f"kept the previous {README} as {backup.name}")
        os.replace(tmp / README, readme)
    except OSError as err:
        raise HubError(f"cannot write the export to {folder}: {err.strerror or err}") from err
    finally:
        stranded = [
            p
            for p in old.glob("*/*")
            if any(p.name == e.name for e in foreign.get(p.parent.name, []))
        ]
        if stranded:  # never delete what the user put there: say where it is instead
            raise HubError(
                f"the export to {folder} was interrupted; files of yours were left in {old} "
                f"({', '.join(p.name for p in stranded[:3])}); move them back and rerun"
            )
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(folder, _versions(snapshots), notes=tuple(notes))


def export_snapshot(
    snapshot: StageSnapshot,
    folder: str | Path,
    *,
    repo_id: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    token: str | None = None,
) -> Exported:
    """Write one ``snapshot`` into ``folder`` (see ``export_snapshots``)."""
    return export_snapshots(
        [snapshot],
        folder,
        repo_id=repo_id,
        max_shard_size=max_shard_size,
        force=force,
        token=token,
    )


def export_stage(
    stage: str,
    folder: str | Path,
    version: str = "latest",
    data_dir: str | Path | None = None,
    *,
    repo_id: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    lineage: bool = True,
    token: str | None = None,
) -> Exported:
    """Export a stored stage (and, with ``lineage``, the stored versions it was built from) to
    ``folder`` so ``load_dataset(folder, stage)`` loads it.

    ``repo_id`` only fills the card's loading snippets (default ``USER/NAME``). ``force`` allows a
    non-empty folder that is not a seqpatch export (nothing of its own is deleted). The result
    names every exported stage's version (``Exported.summary()``).
    """
    from seqpatch.store import Store

    store = Store(data_dir)
    snapshots, missing = _snapshots(store, stage, version, lineage)
    exported = export_snapshots(
        snapshots,
        folder,
        repo_id=repo_id,
        max_shard_size=max_shard_size,
        force=force,
        token=token,
        data_dir=store.data_dir,
    )
    return dataclasses.replace(exported, missing=tuple(missing))


def _snapshots(
    store: Store, stage: str, version: str, with_lineage: bool
) -> tuple[list[StageSnapshot], list[str]]:
    ref = store.resolve(stage, version)
    refs, missing = lineage(store, ref) if with_lineage else ([ref], [])
    return [snapshot_of(store, r) for r in refs], missing


# ---------------------------------------------------------------------------------------------
# Push


def resolve_token(token: str | None = None) -> str:
    """``token``, else ``HF_TOKEN``, else the saved login; ``HubError`` when there is none."""
    found = token or os.environ.get("HF_TOKEN") or get_token()
    if not found:
        raise HubError(
            "no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (in Python, "
            "token= also works); the token needs write access to the dataset repo"
        )
    return found


def _scrub(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message


@contextmanager
def _hub_errors(action: str, repo_id: str, token: str | None = None) -> Iterator[None]:
    """Turn any Hub or network failure into one ``HubError`` that says what to do."""
    try:
        yield
    except HubError:
        raise
    except OfflineModeIsEnabled as err:
        raise HubError(
            f"cannot {action} {repo_id}: HF_HUB_OFFLINE is set. Unset it, or export to a folder "
            "with `seqpatch export STAGE --to FOLDER` instead."
        ) from err
    except RevisionNotFoundError as err:
        raise HubError(f"cannot {action} {repo_id}: the revision does not exist.") from err
    except RepositoryNotFoundError as err:
        raise HubError(
            f"cannot {action} {repo_id}: the dataset repo does not exist or your token cannot see "
            "it. Check the repo id (USER/NAME) and that you are logged in as its owner."
        ) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 412:
            raise HubError(
                f"cannot {action} {repo_id}: the repo changed while publishing (another push?); "
                "nothing was published, run the command again"
            ) from err
        if status in (401, 403):
            raise HubError(
                f"cannot {action} {repo_id}: the Hub refused the token (HTTP {status}). Use a "
                "token with write access (HF_TOKEN or `hf auth login`)."
            ) from err
        detail = _scrub(str(err).splitlines()[0], token)
        raise HubError(f"cannot {action} {repo_id}: the Hub answered {detail}") from err
    except (httpx.HTTPError, ConnectionError, TimeoutError) as err:
        raise HubError(
            f"cannot {action} {repo_id}: the Hub is unreachable ({type(err).__name__}). Check "
            "your network, or export to a folder with `seqpatch export` and upload it later."
        ) from err


def _remote_readme(api: HfApi, repo_id: str, revision: str | None) -> str | None:
    try:
        path = api.hf_hub_download(repo_id, README, repo_type="dataset", revision=revision)
    except EntryNotFoundError:
        return None
    return Path(path).read_text()


def push_snapshots(
    snapshots: Sequence[StageSnapshot],
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    commit_message: str | None = None,
) -> str:
    """Publish ``snapshots`` as configs of ``repo_id`` in one commit; return the commit URL.

    Everything local is checked before the first Hub call: rows, shards, the card (rendered as
    for a new repo) and the token scan. Old shards of a published stage that the new version does
    not overwrite are deleted in the same commit, so rows of two versions never mix. The commit
    is based on the head the card was read from, so a concurrent push of another stage is never
    silently dropped from the card (the Hub answers 412 and nothing is published).
    """
    _check_repo_id(repo_id)
    for snapshot in snapshots:
        _check_publishable(snapshot)
    token = resolve_token(token)
    with tempfile.TemporaryDirectory(prefix="seqpatch-push-") as tmp:
        root = Path(tmp)
        try:
            staged = _stage_all(snapshots, root, repo_id, max_shard_size, token, None)
        except CardError as err:
            raise HubError(f"cannot render the card for {repo_id}: {err}") from err
        paths = [p for item in staged for p in item.paths] + [README]
        api = HfApi(token=token)
        with _hub_errors("publish to", repo_id, token):
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            head = api.dataset_info(repo_id).sha
            existing = _remote_readme(api, repo_id, head)
            remote_files = api.list_repo_files(repo_id, repo_type="dataset", revision=head)
            if existing is not None:
                _write_readme(root, staged, repo_id=repo_id, existing_readme=existing)
                _check_no_token(root, [README], token)
            prefixes = tuple(f"{item.snapshot.stage}/" for item in staged)
            stale = sorted(f for f in remote_files if f.startswith(prefixes) and f not in paths)
            operations: list[CommitOperationAdd | CommitOperationDelete] = [
                CommitOperationDelete(path_in_repo=f) for f in stale
            ]
            operations += [
                CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(root / p)) for p in paths
            ]
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or _commit_message(snapshots),
                repo_type="dataset",
                parent_commit=head,  # the Hub refuses it if another push landed meanwhile
            )
    return str(getattr(info, "commit_url", info))


def _commit_message(snapshots: Sequence[StageSnapshot]) -> str:
    parts = [s.stage + (f" version {s.version}" if s.version else "") for s in snapshots]
    return "seqpatch: publish " + ", ".join(parts)


def push_snapshot(
    snapshot: StageSnapshot,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    commit_message: str | None = None,
) -> str:
    """Publish one ``snapshot`` as config ``snapshot.stage`` of ``repo_id`` (see
    ``push_snapshots``)."""
    return push_snapshots(
        [snapshot],
        repo_id,
        private=private,
        token=token,
        max_shard_size=max_shard_size,
        commit_message=commit_message,
    )


def push_stage(
    stage: str,
    repo_id: str,
    version: str = "latest",
    private: bool = False,
    data_dir: str | Path | None = None,
    token: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    *,
    lineage: bool = True,
) -> str:
    """Publish a stored stage (and, with ``lineage``, the stored versions it was built from) as
    configs of the dataset repo ``repo_id`` in one commit; return the commit URL."""
    from seqpatch.store import Store

    _check_repo_id(repo_id)
    snapshots, _ = _snapshots(Store(data_dir), stage, version, lineage)
    return push_snapshots(
        snapshots, repo_id, private=private, token=token, max_shard_size=max_shard_size
    )


def _check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id):
        raise HubError(f"repo id must look like USER/NAME, got {repo_id!r}")


# ---------------------------------------------------------------------------------------------
# Continue from a published stage


def resolve_parent(
    source: str | Path,
    stage: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Dataset, dict[str, Any]]:
    """Load ``stage`` and its provenance from an exported folder or a Hub repo id.

    ``source`` is a folder (as written by ``export_stage``) when it exists locally, else a
    ``USER/NAME`` dataset repo. The returned provenance is the published ``seqpatch.json`` plus a
    ``published_source`` entry (kind, source, stage, resolved revision) for the importer to
    record as the parent. The provenance's shape and the row count are checked; every problem is
    one ``HubError`` line.
    """
    folder = Path(source)
    if folder.is_dir():
        dataset, provenance, origin = _from_folder(folder, stage, cache_dir)
    elif _REPO_ID.match(str(source)):
        dataset, provenance, origin = _from_hub(str(source), stage, revision, token, cache_dir)
    else:
        raise HubError(
            f"--from {source!r} is neither an existing folder nor a Hub repo id (USER/NAME)"
        )
    expected = provenance["row_count"]
    if expected != dataset.num_rows:
        raise HubError(
            f"{source} stage {stage} has {dataset.num_rows} rows but its {PROVENANCE_FILE} says "
            f"{expected}; the published copy is incomplete or mixed. Re-export or re-push it."
        )
    provenance["published_source"] = origin
    return dataset, provenance


def check_published_provenance(text: str, where: str, stage: str) -> dict[str, Any]:
    """Parse a published ``seqpatch.json`` and check the shape the store writes.

    ``where`` names the file in messages. Returns the provenance dict.
    """
    fix = "re-export or re-push the stage with seqpatch"
    try:
        provenance = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HubError(f"{where} is not valid JSON ({err.msg}); {fix}") from None
    if not isinstance(provenance, dict):
        raise HubError(f"{where} must be a JSON object, found {type(provenance).__name__}; {fix}")
    absent = [key for key in REQUIRED_PROVENANCE if key not in provenance]
    if absent:
        raise HubError(f"{where} lacks {', '.join(absent)}; {fix}")
    if provenance["stage"] != stage:
        raise HubError(f"{where} describes a {provenance['stage']!r} stage, not {stage!r}; {fix}")
    for key in ("schema_version", "row_count"):
        value = provenance[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise HubError(f"{where}: {key} must be a non-negative integer, got {value!r}; {fix}")
    if not isinstance(provenance["config"], dict):
        raise HubError(f"{where}: config must be a JSON object, got {provenance['config']!r}")
    parents = provenance.get("parents", [])
    parent = provenance.get("parent")
    records = parents if isinstance(parents, list) else [None]
    records = [*records, *([parent] if parent is not None else [])]
    if any(not isinstance(r, dict) or not isinstance(r.get("stage"), str) for r in records):
        raise HubError(f"{where}: parents must be a list of {{stage, version}} objects; {fix}")
    return provenance


def _load_config(path: str, stage: str, **kwargs: Any) -> Dataset:
    from datasets.exceptions import DataFilesNotFoundError

    try:
        return load_dataset(path, stage, split=SPLIT, **kwargs)
    except DataFilesNotFoundError as err:
        raise HubError(
            f"{path} has no parquet files for stage {stage!r}; re-export or re-push it"
        ) from err
    except ValueError as err:
        if "config" in str(err).lower():
            raise HubError(f"{path} has no stage {stage!r}: {str(err).splitlines()[0]}") from err
        raise


def _from_folder(
    folder: Path, stage: str, cache_dir: str | Path | None
) -> tuple[Dataset, dict[str, Any], dict[str, Any]]:
    provenance_path = folder / stage / PROVENANCE_FILE
    if not (folder / README).is_file() or not provenance_path.is_file():
        raise HubError(
            f"{folder} holds no exported stage {stage!r} (expected {README} and "
            f"{stage}/{PROVENANCE_FILE}); export it with `seqpatch export {stage} --to {folder}`"
        )
    provenance = check_published_provenance(
        provenance_path.read_bytes().decode("utf-8", errors="replace"), str(provenance_path), stage
    )
    if not any(_SHARD_FILE.match(p.name) for p in (folder / stage).iterdir()):
        raise HubError(
            f"{folder / stage} holds no {SPLIT}-*.parquet files; re-export the stage there"
        )
    dataset = _load_config(str(folder), stage, cache_dir=cache_dir)
    origin = {"kind": "folder", "source": str(folder.resolve()), "stage": stage}
    return dataset, provenance, origin


def _from_hub(
    repo_id: str,
    stage: str,
    revision: str | None,
    token: str | None,
    cache_dir: str | Path | None,
) -> tuple[Dataset, dict[str, Any], dict[str, Any]]:
    token = token or os.environ.get("HF_TOKEN") or get_token()  # public repos need none
    api = HfApi(token=token)
    with _hub_errors("load from", repo_id, token):
        sha = api.dataset_info(repo_id, revision=revision).sha
        try:
            path = api.hf_hub_download(
                repo_id, f"{stage}/{PROVENANCE_FILE}", repo_type="dataset", revision=sha
            )
        except EntryNotFoundError as err:
            raise HubError(
                f"{repo_id} has no {stage}/{PROVENANCE_FILE}: it was not published by seqpatch, "
                f"or has no stage {stage!r}"
            ) from err
        provenance = check_published_provenance(
            Path(path).read_bytes().decode("utf-8", errors="replace"),
            f"{repo_id}: {stage}/{PROVENANCE_FILE}",
            stage,
        )
        dataset = _load_config(repo_id, stage, revision=sha, token=token, cache_dir=cache_dir)
    origin = {"kind": "hub", "source": repo_id, "stage": stage, "revision": sha}
    return dataset, provenance, origin


def _config_class(module: Any) -> type | None:
    """The stage's config dataclass: ``CONFIG``, else its one ``*Config`` dataclass."""
    declared = getattr(module, "CONFIG", None)
    if declared is not None:
        return declared
    found = [
        value
        for name, value in vars(module).items()
        if name.endswith("Config")
        and dataclasses.is_dataclass(value)
        and getattr(value, "__module__", None) == module.__name__
    ]
    return found[0] if len(found) == 1 else None


def check_stage_provenance(provenance: Mapping[str, Any], stage: str, where: str) -> None:
    """The stage's own checks: a schema version this seqpatch reads, a config its dataclass
    accepts (``n_per_len -1`` is refused as a build would refuse it)."""
    from seqpatch.stages import get_stage

    module = get_stage(stage)
    known = module.SCHEMA_VERSION
    if provenance["schema_version"] != known:
        raise HubError(
            f"{where}: schema_version {provenance['schema_version']} is not the {stage} schema "
            f"this seqpatch reads ({known}); use the seqpatch version that published it"
        )
    config_class = _config_class(module)
    if config_class is None:
        return
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(provenance["config"]) - names)
    if unknown:
        raise HubError(f"{where}: config has keys the {stage} stage does not know: {unknown}")
    try:
        config_class(**provenance["config"])
    except (SeqpatchError, TypeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HubError(f"{where}: its config is not valid for {stage}: {message}") from None


def import_stage(
    source: str | Path,
    stage: str,
    data_dir: str | Path | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
) -> StageRef:
    """Register a published stage in the local store, as if it had been built here.

    The published stage is checked first (``resolve_parent`` and ``check_stage_provenance``).
    The version is recomputed by the store from the published schema version, config, parents
    and model, so it equals the publisher's version and stages built on top of it chain the same
    way. The provenance keeps the published parents; ``extra["imported_from"]`` records where the
    rows came from (kind, source, stage, revision) and the publisher's version, fingerprint and
    creation time. Artifacts (charts, heatmaps) are not imported.
    """
    from seqpatch.stages.base import Built
    from seqpatch.store import Store

    dataset, provenance = resolve_parent(
        source, stage, revision=revision, token=token, cache_dir=cache_dir
    )
    check_stage_provenance(provenance, stage, f"{source} stage {stage}")
    imported_from = {
        **provenance.pop("published_source"),
        "version": provenance.get("version"),
        "fingerprint": provenance.get("fingerprint"),
        "created": provenance.get("created"),
    }
    extra = {**(provenance.get("extra") or {}), "imported_from": imported_from}
    return Store(data_dir).get_or_build(
        stage,
        provenance["schema_version"],
        provenance["config"],
        lambda: Built(dataset, extra),
        parents=_parent_records(provenance),
        model=provenance.get("model"),
    )
