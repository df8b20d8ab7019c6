"""Export stages to a folder in the Hub layout, without destroying anything there.

Export refuses the data dir (and any folder inside it, or a folder that holds a data dir's
layout), and a non-empty folder that is not a seqpatch export unless ``force=True``; even then
it never deletes a file it did not write (a foreign ``README.md`` is kept as
``README.before-seqpatch.md``; foreign files in a stage folder stay where they are).
Everything is staged in a temporary folder first: a new export appears by one rename, an update
swaps whole stage folders, and a failure leaves the previous contents as they were.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from seqpatch.cards import CardError, existing_card_data, lineage_of_card
from seqpatch.hub.files import (
    _SHARD_FILE,
    ARTIFACT_SUFFIXES,
    DEFAULT_MAX_SHARD_SIZE,
    PROVENANCE_FILE,
    README,
    README_BACKUP,
    Exported,
    HubError,
    StageSnapshot,
    _snapshots,
    _stage_all,
    _versions,
)
from seqpatch.hub.token import token_for_scan

_TMP_PREFIX = ".seqpatch-export-"


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
    try:
        return _export(snapshots, folder, repo_id, max_shard_size, force, token, data_dir)
    except OSError as err:  # a folder that cannot be read or written: one line naming it
        where = err.filename or folder
        raise HubError(
            f"--to {folder}: cannot use {where} ({err.strerror or err}); choose a folder you can "
            "read and write (nothing was exported)"
        ) from None


def _export(
    snapshots: Sequence[StageSnapshot],
    folder: Path,
    repo_id: str | None,
    max_shard_size: str | int,
    force: bool,
    token: str | None,
    data_dir: str | Path | None,
) -> Exported:
    stages = [s.stage for s in snapshots]
    _check_destination(folder, stages, None if data_dir is None else Path(data_dir))
    visible = sorted(p.name for p in folder.iterdir() if _is_visible(p)) if folder.is_dir() else []
    readme_path = folder / README
    existing = readme_path.read_text(errors="replace") if readme_path.is_file() else None
    card_files = lineage_of_card(existing)  # None: not a seqpatch card
    if visible and card_files is None and not force:
        shown = ", ".join(visible[:3]) + (", …" if len(visible) > 3 else "")
        raise HubError(
            f"--to {folder} is not empty ({shown}) and is not a seqpatch export; choose an empty "
            "folder, or pass --force to add the export beside those files (none of them is "
            "deleted)"
        )
    plans = {stage: _stage_plan(folder, stage, card_files) for stage in stages}
    _refuse_links(folder, stages, plans, card_files)
    token = token_for_scan(token)
    repo = repo_id or "USER/NAME"
    merge_from = existing
    if existing is not None and card_files is None:
        try:
            existing_card_data(existing)
        except CardError:
            merge_from = None  # a foreign README whose YAML does not parse: kept aside, not merged
    try:
        if not folder.is_symlink() and (not folder.exists() or not any(folder.iterdir())):
            return _export_fresh(snapshots, folder, repo, max_shard_size, token)
        return _export_update(
            snapshots, folder, repo, max_shard_size, token, merge_from, card_files, plans
        )
    except CardError as err:
        raise HubError(f"cannot write the card in {folder}: {err}") from err


def _refuse_links(
    folder: Path,
    stages: Sequence[str],
    foreign: Mapping[str, list[Path]],
    card_files: Mapping[str, list[str]] | None,
) -> None:
    """Refuse to replace a symlink (a stage folder, the card, a file of ours): swapping it would
    move or hide files that live elsewhere. Checked before anything is staged."""
    replaced = [folder / README, *(folder / stage for stage in stages)]
    for stage in stages:
        stage_dir = folder / stage
        if stage_dir.is_dir() and not stage_dir.is_symlink():
            kept = {p.name for p in foreign[stage]}
            replaced += [p for p in stage_dir.iterdir() if p.name not in kept]
    for path in replaced:
        if path.is_symlink():
            raise HubError(
                f"{path} is a symlink (to {os.readlink(path)}); export never replaces a link. "
                "Remove the link or export to another folder (nothing was exported)"
            )


def _stage_plan(folder: Path, stage: str, card_files: Mapping[str, list[str]] | None) -> list[Path]:
    """The foreign entries of ``folder/<stage>/`` (kept through the swap)."""
    stage_dir = folder / stage
    if not stage_dir.exists():
        return []
    if not stage_dir.is_dir():
        raise HubError(f"{stage_dir} is a file; move it away to export stage {stage} here")
    ours = _our_files(folder, stage, card_files)
    return sorted(p for p in stage_dir.iterdir() if p.name not in ours)


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
