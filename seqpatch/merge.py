"""``seqpatch merge STAGE``: commit the version that ``--shard i/n`` jobs built, and only it.

The jobs' work folder (``<stage>/<version>.partial``) keeps a manifest with the config, the
parents' versions and the shard size that cut it (``Store.build_sharded``). Merging rebuilds the
config from that manifest, so no option can drift between the jobs and the merge; it refuses,
in one line and before any work, when there is nothing to merge, when several builds left
shards and none was chosen, or when a shard is still missing (merge computes nothing).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    from seqpatch.store import StageRef


class MergeError(SeqpatchError):
    """Nothing to merge, an ambiguous work folder, or shards still missing."""


def config_from_manifest(cls: type, stored: dict[str, Any]) -> Any:
    """The config ``cls`` whose canonical JSON is ``stored`` (JSON lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(stored) - names)
    if unknown:
        raise MergeError(
            f"the shards' manifest names option {unknown[0]!r}, which {cls.__name__} does not "
            "have (built by another seqpatch version); rerun the jobs"
        )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


def merge_shards(
    stage: str, version: str | None = None, data_dir: str | os.PathLike[str] | None = None
) -> StageRef:
    """Join the finished shards of ``stage`` (of ``version``, a prefix, when several builds
    left shards) into their version; returns it."""
    from seqpatch.executor import execute
    from seqpatch.options import RuntimeSettings
    from seqpatch.stages import get_stage, is_sharded
    from seqpatch.store import Store

    module = get_stage(stage)
    if not is_sharded(module):
        raise MergeError(f"stage {stage!r} is not built in shards; there is nothing to merge")
    store = Store(data_dir)
    found = [w for w in store.unfinished(stage) if version is None or w[0].startswith(version)]
    which = f" of version {version}" if version else ""
    if not found:
        raise MergeError(
            f"no shards of {stage}{which} to merge in {store.data_dir}; build them with "
            f"`seqpatch build {stage} ... --shard INDEX/COUNT` first"
        )
    if len(found) > 1:
        versions = ", ".join(v for v, _, _ in found)
        raise MergeError(
            f"shards of {len(found)} {stage} versions in {store.data_dir} ({versions}); "
            "choose one with --version"
        )
    found_version, manifest, missing = found[0]
    if "config" not in manifest:
        raise MergeError(
            f"{stage}/{found_version}'s shards record no config (an older seqpatch cut them); "
            f"rerun one of their `seqpatch build {stage} --shard` commands without --shard"
        )
    if missing:
        raise MergeError(
            f"{stage}/{found_version}: shard(s) {', '.join(map(str, missing))} of "
            f"{manifest['n_shards']} are not built yet; finish every --shard job, then merge"
        )
    cfg = config_from_manifest(module.CONFIG, manifest["config"])
    shard_size = (manifest.get("runtime") or {}).get("shard_size") or None
    ref = execute(
        stage,
        cfg,
        manifest["parents"],
        store=store,
        runtime=RuntimeSettings(shard_size=shard_size, progress=False),
        expect_version=found_version,
    )
    assert ref is not None  # every shard exists, so the version is committed
    return ref
