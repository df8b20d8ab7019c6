"""Publish stages as configs of one Hugging Face dataset repo, and continue from published ones.

One study is one dataset repo; each stage is one *config*, so ``load_dataset("user/name",
"pairs", split="train")`` works. The Hub and an exported folder hold exactly the same files,
built by the same functions. The package is one module per job:

- ``files``: the published layout (snapshots, parquet shards, card, lineage), shared by all;
- ``token``: the scan that refuses to publish anything carrying the Hugging Face token;
- ``export``: write stages into a folder without destroying anything there;
- ``push``: publish stages to a Hub repo in one commit, every local check first;
- ``importing``: check a published stage and register it in the local store.

**Credentials.** They come from ``token=``, ``HF_TOKEN`` or the ``huggingface_hub`` login, in
that order; a token is never printed, logged, or written anywhere: every staged file and every
string in the rows is scanned for it, by export as by push. Every Hub failure becomes one
``HubError`` whose message says what to do.
"""

from seqpatch.cards import CardError
from seqpatch.hub.export import export_snapshot, export_snapshots, export_stage
from seqpatch.hub.files import (
    ARTIFACT_SUFFIXES,
    DEFAULT_MAX_SHARD_SIZE,
    PROVENANCE_FILE,
    README,
    README_BACKUP,
    REQUIRED_PROVENANCE,
    Exported,
    StageSnapshot,
    artifact_files,
    lineage,
    num_shards,
    snapshot_from_store,
    snapshot_of,
    write_stage_files,
)
from seqpatch.hub.importing import (
    check_published_provenance,
    check_stage_provenance,
    import_stage,
    resolve_parent,
)
from seqpatch.hub.push import push_snapshot, push_snapshots, push_stage, resolve_token
from seqpatch.hub.token import HubError, check_no_token

__all__ = [
    "ARTIFACT_SUFFIXES",
    "DEFAULT_MAX_SHARD_SIZE",
    "PROVENANCE_FILE",
    "README",
    "README_BACKUP",
    "REQUIRED_PROVENANCE",
    "CardError",
    "Exported",
    "HubError",
    "StageSnapshot",
    "artifact_files",
    "check_no_token",
    "check_published_provenance",
    "check_stage_provenance",
    "export_snapshot",
    "export_snapshots",
    "export_stage",
    "import_stage",
    "lineage",
    "num_shards",
    "push_snapshot",
    "push_snapshots",
    "push_stage",
    "resolve_parent",
    "resolve_token",
    "snapshot_from_store",
    "snapshot_of",
    "write_stage_files",
]
