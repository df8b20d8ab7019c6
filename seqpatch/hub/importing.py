"""Continue from a published stage: load it from a folder or a Hub repo and register it.

Import (``import_stage``) checks a published stage before registering it: its ``seqpatch.json``
is an object with the store's keys, its schema version is an integer this seqpatch knows, its
config is valid for the stage, its parquet files exist and hold the recorded number of rows;
nothing it reads lies outside the published folder, and the rows agree with the config
(``seqpatch.hub.checks``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset, load_dataset
from huggingface_hub.errors import EntryNotFoundError

from seqpatch.cards import SPLIT
from seqpatch.errors import SeqpatchError
from seqpatch.hub.checks import check_data_files, check_inside, check_parent_names, check_rows
from seqpatch.hub.files import (
    _SHARD_FILE,
    PROVENANCE_FILE,
    README,
    REQUIRED_PROVENANCE,
    HubError,
    _parent_records,
)
from seqpatch.hub.push import _REPO_ID, _hub_errors, hub_api
from seqpatch.redact import hub_token

if TYPE_CHECKING:
    from seqpatch.store import StageRef


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
    except RecursionError:
        raise HubError(f"{where} is nested too deeply to be provenance; {fix}") from None
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
    check_parent_names(provenance, where)
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
        raise _unreadable(path, stage, err) from err
    except HubError:
        raise
    except Exception as err:  # pyarrow and datasets raise many types for a file that is not parquet
        raise _unreadable(path, stage, err) from err


def _unreadable(path: str, stage: str, err: BaseException) -> HubError:
    while err.__cause__ is not None or err.__context__ is not None:  # the root cause says most
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return HubError(
        f"{path}: the parquet files of stage {stage!r} do not load as one dataset ({detail}); "
        "re-export or re-push the stage with seqpatch"
    )


def _from_folder(
    folder: Path, stage: str, cache_dir: str | Path | None
) -> tuple[Dataset, dict[str, Any], dict[str, Any]]:
    provenance_path = folder / stage / PROVENANCE_FILE
    if not (folder / README).is_file() or not provenance_path.is_file():
        raise HubError(
            f"{folder} holds no exported stage {stage!r} (expected {README} and "
            f"{stage}/{PROVENANCE_FILE}); export it with `seqpatch export {stage} --to {folder}`"
        )
    check_inside(folder, [folder / README, folder / stage, *(folder / stage).iterdir()])
    patterns = check_data_files(
        (folder / README).read_bytes().decode("utf-8", errors="replace"),
        str(folder / README),
        stage,
    )
    check_inside(folder, [p for pattern in patterns for p in folder.glob(pattern)])
    provenance = check_published_provenance(
        provenance_path.read_bytes().decode("utf-8", errors="replace"), str(provenance_path), stage
    )
    if not any(_SHARD_FILE.match(p.name) for p in (folder / stage).iterdir()):
        raise HubError(
            f"{folder / stage} holds no {SPLIT}-*.parquet files; re-export the stage there"
        )
    # never a cached copy: a folder's files may have changed since, at the same paths
    dataset = _load_config(
        str(folder), stage, cache_dir=cache_dir, download_mode="force_redownload"
    )
    origin = {"kind": "folder", "source": str(folder.resolve()), "stage": stage}
    return dataset, provenance, origin


def _from_hub(
    repo_id: str,
    stage: str,
    revision: str | None,
    token: str | None,
    cache_dir: str | Path | None,
) -> tuple[Dataset, dict[str, Any], dict[str, Any]]:
    token = hub_token(token)  # public repos need none
    api = hub_api(token)
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
        try:
            card = api.hf_hub_download(repo_id, README, repo_type="dataset", revision=sha)
        except EntryNotFoundError as err:
            raise HubError(f"{repo_id} has no {README}: it was not published by seqpatch") from err
        check_data_files(
            Path(card).read_bytes().decode("utf-8", errors="replace"), f"{repo_id}: {README}", stage
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

    # A folder's rows are read through a scratch cache that goes once they are stored: no
    # stale copy is ever read back, and no copy (nor its paths) stays behind in the HF cache.
    with tempfile.TemporaryDirectory(prefix="seqpatch-import-") as scratch:
        if cache_dir is None and Path(source).is_dir():
            cache_dir = scratch
        dataset, provenance = resolve_parent(
            source, stage, revision=revision, token=token, cache_dir=cache_dir
        )
        check_stage_provenance(provenance, stage, f"{source} stage {stage}")
        check_rows(dataset, provenance, stage, f"{source} stage {stage}")
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
