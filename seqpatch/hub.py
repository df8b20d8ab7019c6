"""Publish stages as configs of one Hugging Face dataset repo, and continue from published ones.

One study is one dataset repo; each stage is one *config*, so ``load_dataset("user/name",
"pairs", split="train")`` works. The Hub and an exported folder hold exactly the same files,
built by one function (``write_stage_files``); ``push_stage`` uploads them in a single commit:

```
README.md                                   card: ``configs:`` lists every stage, one section each
<stage>/train-00000-of-0000N.parquet        rows; features (Array3D included) ride in the schema
<stage>/seqpatch.json                       the stage's provenance, as the store wrote it
<stage>/<chart>.png, <stage>/heatmap.npy    artifacts of the stage's version folder
```

Publishing a stage replaces only that stage's folder, config and card section; the other stages
of the repo are kept. Shards are bounded by ``max_shard_size`` (activations can be large).

Credentials come from ``token=``, ``HF_TOKEN`` or the ``huggingface_hub`` login, in that order;
a token is never printed, logged, or written to a card or a provenance file (the staged text
files are scanned for it before anything is uploaded). Every Hub failure becomes one
``HubError`` whose message says what to do, and nothing is half-published: the upload is one
commit.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
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

from seqpatch.cards import SPLIT, build_card, stage_stats
from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    from seqpatch.store import StageRef


PROVENANCE_FILE = "seqpatch.json"
README = "README.md"
DEFAULT_MAX_SHARD_SIZE = "500MB"  # the Hub's own default for parquet shards
ARTIFACT_SUFFIXES = (".png", ".svg", ".npy")  # charts and the heatmap array; HTML charts stay local
_STORE_FILES = {PROVENANCE_FILE, "dataset_info.json", "state.json"}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubError(SeqpatchError):
    """Publishing to, or loading from, the Hub (or an exported folder) failed; says what to do."""


@dataclass(frozen=True)
class StageSnapshot:
    """One stage's rows, provenance and artifact files: everything that gets published."""

    stage: str
    dataset: Dataset
    provenance: Mapping[str, Any]
    artifacts: tuple[Path, ...] = field(default=())


# ---------------------------------------------------------------------------------------------
# The file set (shared by export and push)


def num_shards(dataset: Dataset, max_shard_size: str | int) -> int:
    """How many parquet shards keep each under ``max_shard_size`` (estimated from Arrow bytes)."""
    limit = convert_file_size_to_int(max_shard_size)
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
    card = build_card(
        stage=stage,
        features=snapshot.dataset.features,
        stats=stage_stats(snapshot.dataset, snapshot.provenance, charts=charts),
        provenance=snapshot.provenance,
        data_pattern=f"{stage}/{SPLIT}-*.parquet",
        dataset_bytes=_dataset_bytes(snapshot.dataset),
        download_bytes=sum((root / p).stat().st_size for p in written if p.endswith(".parquet")),
        repo_id=repo_id,
        existing_readme=existing_readme,
    )
    (root / README).write_text(str(card) + "\n")
    written.append(README)
    return written


def _check_publishable(snapshot: StageSnapshot) -> None:
    if snapshot.dataset.num_rows == 0:
        raise HubError(
            f"stage {snapshot.stage} has no rows; `datasets` cannot load an empty config, so "
            "there is nothing to publish. Rebuild the stage with settings that keep some rows."
        )


def _check_no_token(root: Path, paths: list[str], token: str | None) -> None:
    """Refuse to publish when a text file would carry the token (e.g. a config that stored it)."""
    if not token:
        return
    for path in paths:
        if path.endswith((".json", ".md")) and token in (root / path).read_text(errors="ignore"):
            raise HubError(
                f"{path} would contain your Hugging Face token; nothing was published. Remove the "
                "token from the stage's config or provenance and rebuild the stage."
            )


# ---------------------------------------------------------------------------------------------
# The store side


def artifact_files(version_dir: Path) -> tuple[Path, ...]:
    """Charts and arrays a stage's version folder holds next to its Arrow files."""
    return tuple(
        sorted(
            p
            for p in version_dir.iterdir()
            if p.is_file() and p.suffix in ARTIFACT_SUFFIXES and p.name not in _STORE_FILES
        )
    )


def snapshot_from_store(
    stage: str, version: str = "latest", data_dir: str | Path | None = None
) -> StageSnapshot:
    """The stored stage ``stage``/``version`` with its provenance and artifacts."""
    from seqpatch.store import Store

    store = Store(data_dir)
    ref = store.resolve(stage, version)
    dataset = store.load(stage, ref.version)
    return StageSnapshot(stage, dataset, dict(ref.provenance), artifact_files(Path(ref.path)))


# ---------------------------------------------------------------------------------------------
# Export


def export_snapshot(
    snapshot: StageSnapshot,
    folder: str | Path,
    *,
    repo_id: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``snapshot`` into ``folder`` in the Hub layout, keeping other stages already there.

    The stage folder is built aside and swapped in, so a failure leaves the previous export whole.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    readme = folder / README
    existing = readme.read_text() if readme.is_file() else None
    with tempfile.TemporaryDirectory(dir=folder, prefix=".seqpatch-export-") as tmp:
        staged = Path(tmp)
        write_stage_files(
            snapshot,
            staged,
            repo_id=repo_id or "USER/NAME",
            existing_readme=existing,
            max_shard_size=max_shard_size,
        )
        target = folder / snapshot.stage
        if target.exists():
            shutil.rmtree(target)
        (staged / snapshot.stage).rename(target)
        (staged / README).replace(readme)
    return folder


def export_stage(
    stage: str,
    folder: str | Path,
    version: str = "latest",
    data_dir: str | Path | None = None,
    *,
    repo_id: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Export a stored stage to ``folder`` so ``load_dataset(folder, stage)`` loads it.

    ``repo_id`` only fills the card's loading snippets (default ``USER/NAME``).
    """
    snapshot = snapshot_from_store(stage, version, data_dir)
    return export_snapshot(snapshot, folder, repo_id=repo_id, max_shard_size=max_shard_size)


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


def push_snapshot(
    snapshot: StageSnapshot,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    commit_message: str | None = None,
) -> str:
    """Publish ``snapshot`` as config ``snapshot.stage`` of ``repo_id`` in one commit.

    Returns the commit URL. Old shards of the same stage that the new version does not
    overwrite are deleted in the same commit, so rows of two versions never mix. The commit is
    based on the head the card was read from, so a concurrent push of another stage is never
    silently dropped from the card (the Hub answers 412 and nothing is published).
    """
    _check_repo_id(repo_id)
    _check_publishable(snapshot)
    token = resolve_token(token)
    stage = snapshot.stage
    api = HfApi(token=token)
    with _hub_errors("publish to", repo_id, token):
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        head = api.dataset_info(repo_id).sha
        existing = _remote_readme(api, repo_id, head)
        remote_files = api.list_repo_files(repo_id, repo_type="dataset", revision=head)
        with tempfile.TemporaryDirectory(prefix="seqpatch-push-") as tmp:
            root = Path(tmp)
            paths = write_stage_files(
                snapshot,
                root,
                repo_id=repo_id,
                existing_readme=existing,
                max_shard_size=max_shard_size,
            )
            _check_no_token(root, paths, token)
            stale = sorted(f for f in remote_files if f.startswith(f"{stage}/") and f not in paths)
            operations: list[CommitOperationAdd | CommitOperationDelete] = [
                CommitOperationDelete(path_in_repo=f) for f in stale
            ]
            operations += [
                CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(root / p)) for p in paths
            ]
            version = snapshot.provenance.get("version")
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message
                or f"seqpatch: publish {stage}" + (f" version {version}" if version else ""),
                repo_type="dataset",
                parent_commit=head,  # the Hub refuses it if another push landed meanwhile
            )
    return str(getattr(info, "commit_url", info))


def push_stage(
    stage: str,
    repo_id: str,
    version: str = "latest",
    private: bool = False,
    data_dir: str | Path | None = None,
    token: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> str:
    """Publish a stored stage as config ``stage`` of the dataset repo ``repo_id``; return the
    commit URL."""
    _check_repo_id(repo_id)
    snapshot = snapshot_from_store(stage, version, data_dir)
    return push_snapshot(
        snapshot, repo_id, private=private, token=token, max_shard_size=max_shard_size
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
    record as the parent. The row count is checked against the provenance.
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
    expected = provenance.get("row_count", provenance.get("num_rows"))
    if expected is not None and int(expected) != dataset.num_rows:
        raise HubError(
            f"{source} stage {stage} has {dataset.num_rows} rows but its {PROVENANCE_FILE} says "
            f"{expected}; the published copy is incomplete or mixed. Re-export or re-push it."
        )
    provenance["published_source"] = origin
    return dataset, provenance


def _load_config(path: str, stage: str, **kwargs: Any) -> Dataset:
    try:
        return load_dataset(path, stage, split=SPLIT, **kwargs)
    except ValueError as err:
        if "config" in str(err).lower():
            raise HubError(f"{path} has no stage {stage!r}: {err}") from err
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
    dataset = _load_config(str(folder), stage, cache_dir=cache_dir)
    provenance = json.loads(provenance_path.read_text())
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
        dataset = _load_config(repo_id, stage, revision=sha, token=token, cache_dir=cache_dir)
    provenance = json.loads(Path(path).read_text())
    origin = {"kind": "hub", "source": repo_id, "stage": stage, "revision": sha}
    return dataset, provenance, origin


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

    The version is recomputed by the store from the published schema version, config, parent
    and model, so it equals the publisher's version and stages built on top of it chain the same
    way. The provenance keeps the published parent; ``extra["imported_from"]`` records where the
    rows came from (kind, source, stage, revision) and the publisher's version, fingerprint and
    creation time. Artifacts (charts, heatmaps) are not imported.
    """
    from seqpatch.store import Built, Store

    dataset, provenance = resolve_parent(
        source, stage, revision=revision, token=token, cache_dir=cache_dir
    )
    published_stage = provenance.get("stage", stage)
    if published_stage != stage:
        raise HubError(f"{source} stage {stage} says it is a {published_stage!r} stage")
    if "schema_version" not in provenance or "config" not in provenance:
        raise HubError(
            f"{source} stage {stage}: {PROVENANCE_FILE} lacks schema_version or config, so its "
            "version cannot be reproduced; re-export it with this seqpatch"
        )
    imported_from = {
        **provenance.pop("published_source"),
        "version": provenance.get("version"),
        "fingerprint": provenance.get("fingerprint"),
        "created": provenance.get("created"),
    }
    extra = {**(provenance.get("extra") or {}), "imported_from": imported_from}
    parent = provenance.get("parent")
    if parent is not None and not isinstance(parent, Mapping):
        raise HubError(f"{source} stage {stage}: unreadable parent record {parent!r}")
    return Store(data_dir).get_or_build(
        stage,
        int(provenance["schema_version"]),
        provenance["config"],
        lambda: Built(dataset, extra),
        parent=parent,
        model=provenance.get("model"),
    )
