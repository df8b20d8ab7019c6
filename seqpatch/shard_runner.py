"""How a sharded stage's missing shards may be computed outside this process.

``seqpatch.executor.execute`` hands the shards still missing to a ``ShardRunner`` (``--executor
ray``: ``seqpatch.ray_executor.RayExecutor``) and then commits them itself through the store, so
a runner only computes and writes shards; it never decides a version. The pieces a runner shares
with the executor live here, below both, so neither imports the other for them: the model
identity a version is computed from (a worker checks its models against it) and ``datasets``
caching switched off while a stage builds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from seqpatch.stages.base import ModelCache, split_model_spec

if TYPE_CHECKING:
    from seqpatch.stages.base import Inputs
    from seqpatch.store import Store


class ShardRunner(Protocol):
    """Computes the shards ``shards`` (default all) of ``module``'s version ``inputs.version``
    that the store lacks, writing each with ``Store.write_shard``; returns those it built."""

    def run(
        self,
        store: Store,
        module: Any,
        cfg: Any,
        inputs: Inputs,
        n_shards: int,
        shards: Sequence[int] | None = None,
        progress: bool = True,
    ) -> list[int]: ...


@contextmanager
def datasets_caching_off() -> Iterator[None]:
    """Disable ``datasets``' cache files for the block (maps write to a temporary folder)."""
    from datasets import fingerprint

    was = fingerprint.is_caching_enabled()
    fingerprint.disable_caching()
    try:
        yield
    finally:
        if was:
            fingerprint.enable_caching()


def model_identity(specs: tuple[str, ...], models: ModelCache) -> dict[str, str] | None:
    """``{"id", "revision"}`` of the models a stage runs (several models: one combined record)."""
    if not specs:
        return None
    records = [_identify(spec, models) for spec in specs]
    if len(records) == 1:
        return records[0]
    from seqpatch.store import canonical_json

    key = canonical_json(
        [[spec, r["id"], r["revision"]] for spec, r in zip(specs, records, strict=True)]
    )
    return {
        "id": ",".join(r["id"] for r in records),
        "revision": "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:16],
    }


def _identify(spec: str, models: ModelCache) -> dict[str, str]:
    from seqpatch.store import model_record

    name, _ = split_model_spec(spec)
    if spec in models or models.remote:
        return model_record(models.get(spec))
    from seqpatch import models as model_api

    identify = getattr(model_api, "identify", None)
    if identify is None:  # no cheap identity for this kind of model: load it (kept in the cache)
        return model_record(models.get(spec))
    return model_record(identify(name))
