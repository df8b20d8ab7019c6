"""``Store``: find, build, read and commit versions under one data folder.

Reading is checked at two depths (``seqpatch.store.integrity``): finding a version (``find``,
``versions``, ``refs``) checks provenance and file sizes; reading one (``resolve``, ``load``,
``load_ref``, ``check``, and every stored parent of a build) also checks every file's SHA-256
(memoized) and the row count. A damaged version is never reused or read: the error names it and
``seqpatch verify STAGE --clean``. ``latest`` never skips a damaged version to pick an older one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqpatch.redact import redact, redact_files, redact_rows, restore, restore_rows
from seqpatch.store.files import (
    permission_errors,
    remove,
    rename_or_discard,
    staging,
    write_artifact,
)
from seqpatch.store.integrity import (
    content_problem,
    file_records,
    files_problem,
    provenance_checksum,
    provenance_problem,
    remember_records,
)
from seqpatch.store.refs import (
    _STAGE_NAME,
    DATA_DIR_ENV,
    LATEST,
    LOCK_SUFFIX,
    PARTIAL_SUFFIX,
    PROVENANCE_FILE,
    TMP_MARK,
    VERSION_LENGTH,
    Artifacts,
    DamagedVersionError,
    Parent,
    StageNotFoundError,
    StageRef,
    StoreError,
    canonical_json,
    config_dict,
    damaged_error,
    is_version_name,
    model_record,
    parent_record,
    resolve_data_dir,
    unpack,
)
from seqpatch.store.shards import ShardedBuilds
from seqpatch.store.verify import Verifying

if TYPE_CHECKING:
    from datasets import Dataset


class Store(ShardedBuilds, Verifying):
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
        finish: Callable[[Dataset], Artifacts] | None = None,
        runtime: Callable[[], Mapping[str, Any]] | None = None,
    ) -> StageRef:
        """The stored version for these inputs, built by ``build_fn()`` only if absent.

        ``build_fn`` returns a ``Dataset`` or a ``Built`` (rows, statistics for ``extra``,
        artifacts). ``finish(rows)`` may add artifacts computed from the final rows. An identical
        build running in another process is waited for, then reused. A reused version, and every
        stored parent before ``build_fn`` runs, is checked (content hashes, row count).
        """
        parents = list(parents)
        version = self.version_for(stage, schema_version, config, parents, model)
        found = self.find(stage, version)
        if found is not None:
            return dataclasses.replace(self.check(found), reused=True)
        self.check_parents(parents)
        self._make_stage_dir(stage)
        with self.lock(stage, version):
            found = self.find(stage, version)
            if found is not None:
                return dataclasses.replace(self.check(found), reused=True)
            self._remove_debris(self.stage_dir(stage), f".{version}{TMP_MARK}")
            built = unpack(build_fn())
            artifacts = {**built.artifacts, **(finish(built.rows) if finish else {})}
            provenance = self._provenance(
                stage, version, schema_version, config, parents, model, built.rows, built.stats
            )
            if runtime is not None:
                provenance["runtime"] = dict(runtime())
            return self._commit(stage, version, built.rows, provenance, artifacts)

    def check_parents(self, parents: Iterable[Parent]) -> None:
        """Raise ``DamagedVersionError`` unless every stored parent (a ``StageRef``; published
        provenance mappings have no files here) matches its hashes and row count."""
        for parent in parents:
            if isinstance(parent, StageRef):
                self.check(parent)

    # -- locking ----------------------------------------------------------------------------

    def lock(self, stage: str, version: str) -> Any:
        """The lock a process holds while it commits ``stage/version`` (a ``filelock``)."""
        from filelock import FileLock

        return FileLock(str(self.stage_dir(stage) / f".{version}{LOCK_SUFFIX}"))

    def file_lock(self, name: str) -> Any:
        """The lock of a file of the data dir itself (``chosen_model.json``), beside it."""
        from filelock import FileLock

        return FileLock(str(self.data_dir / f".{name}{LOCK_SUFFIX}"))

    # -- finding (cheap checks) -------------------------------------------------------------

    @permission_errors("read the store")
    def find(self, stage: str, version: str) -> StageRef | None:
        """The complete version ``version`` of ``stage``, or ``None`` if it is not stored.

        Raises ``DamagedVersionError`` when something stands at its name that does not match
        its provenance (a file instead of a folder, unreadable or unchecked ``seqpatch.json``, a
        recorded file missing or of another size). A folder without ``seqpatch.json`` is not a
        version (``None``; ``verify`` reports it).
        """
        path = self.stage_dir(stage) / version
        if not is_version_name(version) or not (path.exists() or path.is_symlink()):
            return None
        if path.is_dir() and not path.is_symlink() and not (path / PROVENANCE_FILE).exists():
            return None
        ref, problem = self._inspect(stage, version)
        if problem is not None:
            raise damaged_error(stage, version, self.data_dir, problem)
        return ref

    def _inspect(self, stage: str, version: str) -> tuple[StageRef | None, str | None]:
        """``(ref, None)`` for a version that passes the cheap checks, else ``(None, problem)``."""
        path = self.stage_dir(stage) / version
        if path.is_symlink() or not path.is_dir():
            return None, "not a folder"
        provenance_path = path / PROVENANCE_FILE
        if not provenance_path.is_file():
            return None, f"no {PROVENANCE_FILE}"
        try:
            provenance = json.loads(provenance_path.read_text())
        except PermissionError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            return None, f"unreadable {PROVENANCE_FILE} ({type(err).__name__}: {err})"
        problem = provenance_problem(provenance, stage, version) or files_problem(
            path, provenance["files"]
        )
        if problem is not None:
            return None, problem
        return StageRef(stage, version, path, restore(provenance)), None

    def _version_entries(self, stage: str) -> list[Path]:
        """Everything at a version's name in ``stage``'s folder, whatever it is."""
        folder = self.stage_dir(stage)
        if not folder.is_dir():
            return []
        return [child for child in sorted(folder.iterdir()) if is_version_name(child.name)]

    def _scan(self, stage: str) -> tuple[list[StageRef], list[tuple[str, str]]]:
        refs, damaged = [], []
        for entry in self._version_entries(stage):
            ref, problem = self._inspect(stage, entry.name)
            if problem is not None:
                error = damaged_error(stage, entry.name, self.data_dir, problem)
                damaged.append((entry.name, str(error)))
            elif ref is not None:
                refs.append(ref)
        refs.sort(key=lambda r: (str(r.provenance.get("created", "")), r.version))
        return refs, damaged

    @permission_errors("read the store")
    def versions(self, stage: str) -> list[StageRef]:
        """Complete versions of ``stage``, oldest first (by creation time).

        Raises ``DamagedVersionError`` naming a damaged version when there is one: a choice
        among versions (``latest``, the newest matching cache) must not silently skip it.
        """
        refs, damaged = self._scan(stage)
        if damaged:
            raise DamagedVersionError(damaged[-1][1])
        return refs

    @permission_errors("read the store")
    def damaged(self, stage: str) -> list[tuple[str, str]]:
        """``(version, problem)`` of every damaged version of ``stage`` (cheap checks)."""
        return self._scan(stage)[1]

    @permission_errors("read the store")
    def stages(self) -> list[str]:
        if not self.data_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.data_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and _STAGE_NAME.match(p.name)
        )

    @permission_errors("read the store")
    def refs(self) -> list[StageRef]:
        """Every complete, undamaged version of every stage (stages by name, versions oldest
        first); ``damaged`` lists the others."""
        return [ref for stage in self.stages() for ref in self._scan(stage)[0]]

    def list(self) -> list[dict[str, Any]]:
        """The provenance of every stored version (see ``refs`` for paths too)."""
        return [dict(ref.provenance) for ref in self.refs()]

    # -- reading (content checks) -----------------------------------------------------------

    @permission_errors("read the store")
    def resolve(self, stage: str, version: str = LATEST) -> StageRef:
        """``version`` (``latest``, a full version or a unique prefix) of ``stage``, checked
        for reading (content hashes and row count)."""
        if not version:
            raise StageNotFoundError(
                f"an empty {stage} version was given; give a version or 'latest'"
            )
        if version == LATEST:
            available = self.versions(stage)  # raises if any version is damaged
            if not available:
                raise _not_stored(stage, self.data_dir)
            return self.check(available[-1])
        names = [entry.name for entry in self._version_entries(stage)]
        matches = [name for name in names if name == version] or [
            name for name in names if name.startswith(version)
        ]
        if len(matches) == 1:
            found = self.find(stage, matches[0])
            if found is None:  # a folder without provenance stands at that name
                raise damaged_error(stage, matches[0], self.data_dir, f"no {PROVENANCE_FILE}")
            return self.check(found)
        if not names:
            raise _not_stored(stage, self.data_dir)
        what = "matches several versions" if matches else "is not stored"
        command = _build_hint(stage, self.data_dir)
        raise StageNotFoundError(
            f"{stage} version {version!r} {what} in {self.data_dir}; stored versions: "
            f"{', '.join(names)} (or build it with `{command}`)",
            stage=stage,
            command=command,
        )

    def load(self, stage: str, version: str = LATEST) -> Dataset:
        """The rows of a stored version (memory-mapped Arrow), checked for reading."""
        return self.load_ref(self.resolve(stage, version))

    @permission_errors("read the store")
    def load_ref(self, ref: StageRef) -> Dataset:
        """``ref``'s rows after its content check (hashes, row count); ``DamagedVersionError``
        naming it otherwise."""
        rows, problem = self._open(ref)
        if problem is not None:
            raise damaged_error(ref.stage, ref.version, ref.path.parent.parent, problem)
        return rows

    def check(self, ref: StageRef) -> StageRef:
        """``ref`` itself once its files match their hashes and its rows their count."""
        self.load_ref(ref)
        return ref

    def _open(self, ref: StageRef) -> tuple[Dataset | None, str | None]:
        from datasets import Dataset

        problem = content_problem(ref.path, ref.provenance.get("files") or {})
        if problem is not None:
            return None, problem
        try:
            rows = Dataset.load_from_disk(str(ref.path))
        except Exception as err:  # pyarrow/datasets raise many types for a damaged file
            return None, f"its rows do not load ({err})"
        if rows.num_rows != ref.provenance.get("row_count"):
            recorded = ref.provenance.get("row_count")
            return None, f"{rows.num_rows} rows where its provenance records {recorded}"
        return restore_rows(rows), None

    # -- writing elsewhere ------------------------------------------------------------------

    def output_folder(self, out: str | os.PathLike[str], option: str = "--out") -> Path:
        """``out`` as a folder a command may write into (created, probed): never a stage folder
        of this data dir nor anything inside one, however the path is spelled (``..``,
        symlinks, relative): a stored version never changes after its commit. Errors name the
        folder and ``option``, the way to choose another."""
        given = Path(out).expanduser()
        target = given.resolve()
        data = self.data_dir.expanduser().resolve()
        if target.is_relative_to(data) and target != data:
            stage_folder = data / target.relative_to(data).parts[0]
            if _holds_versions(stage_folder):
                raise StoreError(
                    f"{given} is inside the stage folder {stage_folder} of the data dir, and "
                    "stored versions never change after their commit; give another folder with "
                    f"{option} (the default is under {data / 'charts'})"
                )
        try:
            _probe_writable(target)
        except OSError as err:
            raise StoreError(
                f"cannot write to {given} ({err.strerror or err} on {err.filename or target}); "
                f"give a folder you can write with {option}"
            ) from err
        return given

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _remove_debris(folder: Path, prefix: str) -> None:
        """Remove ``prefix*`` entries: temporary folders of killed builds of what the caller
        now holds the lock for."""
        for child in folder.glob(f"{prefix}*"):
            remove(child)

    def _make_stage_dir(self, stage: str) -> None:
        folder = self.stage_dir(stage)
        try:
            _probe_writable(folder)
        except OSError as err:
            raise StoreError(
                f"cannot write to data dir {self.data_dir} ({err.strerror or err}); "
                f"pass a writable --data-dir or set {DATA_DIR_ENV}"
            ) from err

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
        artifacts: Artifacts | None = None,
    ) -> StageRef:
        from seqpatch.store import files as file_ops

        target = self.stage_dir(stage) / version
        with staging(self.stage_dir(stage), f".{version}{TMP_MARK}") as tmp:
            redact_rows(dataset).save_to_disk(str(tmp))
            for name, artifact in (artifacts or {}).items():
                write_artifact(tmp, name, artifact)
            redact_files(tmp)  # the token never stays in a file, whoever wrote it
            records = file_records(tmp)
            provenance = redact({**provenance, "files": records})
            provenance["checksum"] = provenance_checksum(provenance)
            file_ops.write_json(tmp / PROVENANCE_FILE, provenance)
            renamed = rename_or_discard(tmp, target)
        if renamed:
            remember_records(target, records)
        found = self.find(stage, version)
        if found is None:
            raise StoreError(
                f"{target} exists but has no {PROVENANCE_FILE} (not written by seqpatch, or "
                "damaged); delete it and rerun"
            )
        return found


def _holds_versions(folder: Path) -> bool:
    """A stage folder of the store: it holds versions, work folders, builds or their locks."""
    if not folder.is_dir():
        return False
    return any(
        is_version_name(name)
        or name.endswith((PARTIAL_SUFFIX, LOCK_SUFFIX))
        or (name.startswith(".") and TMP_MARK in name)
        for name in os.listdir(folder)
    )


def _build_hint(stage: str, data_dir: Path) -> str:
    """``seqpatch build <stage>`` (with ``--data-dir`` unless it is the default); the CLI
    completes it with the stage's required options (``StageNotFoundError.command``)."""
    where = "" if data_dir == resolve_data_dir(None) else f" --data-dir {data_dir}"
    return f"seqpatch build {stage}{where}"


def _not_stored(stage: str, data_dir: Path) -> StageNotFoundError:
    command = _build_hint(stage, data_dir)
    return StageNotFoundError(
        f"no stored {stage!r} stage in {data_dir}; build it first with `{command}`",
        stage=stage,
        command=command,
    )


def load_stage(
    stage: str, data_dir: str | os.PathLike[str] | None = None, version: str = LATEST
) -> Dataset:
    """Rows of a stored stage: ``load_stage("programs")`` in a notebook."""
    return Store(data_dir).load(stage, version)


def _probe_writable(folder: Path) -> None:
    """Create ``folder`` and a throwaway file in it, so that a folder this user cannot write
    fails here (``OSError``), before any work, rather than at the commit."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
        pass
