"""Publish stages as configs of one Hugging Face dataset repo, in one commit.

Push runs all its local checks (rows, card, files, token) before its first call to the Hub.
Every Hub failure becomes one ``HubError`` whose message says what to do, and nothing is
half-published: the upload is one commit, based on the head the card was read from.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import httpx

from seqpatch.cards import CardError
from seqpatch.hub.files import (
    DEFAULT_MAX_SHARD_SIZE,
    README,
    HubError,
    StageSnapshot,
    _check_publishable,
    _snapshots,
    _stage_all,
    _write_readme,
)
from seqpatch.hub.token import check_no_token
from seqpatch.redact import hub_token

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_api(token: str | None) -> HfApi:
    """The Hub client every call of push and import goes through."""
    return HfApi(token=token)


def resolve_token(token: str | None = None) -> str:
    """``token``, else ``HF_TOKEN``, else the saved login; ``HubError`` when there is none."""
    found = hub_token(token)
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
        api = hub_api(token)
        with _hub_errors("publish to", repo_id, token):
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            head = api.dataset_info(repo_id).sha
            existing = _remote_readme(api, repo_id, head)
            remote_files = api.list_repo_files(repo_id, repo_type="dataset", revision=head)
            if existing is not None:
                _write_readme(root, staged, repo_id=repo_id, existing_readme=existing)
                check_no_token(root, [README], token)
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
