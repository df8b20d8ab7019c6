"""The versioned store: every stage's output as a folder that is complete or absent.

Layout (``data_dir`` defaults to ``./seqpatch-data``; ``SEQPATCH_DATA`` or an argument overrides)::

    <data_dir>/<stage>/<version>/            Arrow files (``Dataset.save_to_disk``) + seqpatch.json
    <data_dir>/<stage>/<version>.partial/    work folder of a sharded build: shard-00000/, ...
    <data_dir>/<stage>/.<version>.tmp-*/     a build in progress (or killed); never read

``version`` is a short hash of the stage name, its schema version, the canonical JSON of its config,
the parents' versions and the model identity. The same inputs therefore find the stored version and
do no work; different inputs get a new folder; nothing is ever overwritten.

Atomicity: a version is built in a temporary folder beside its target — rows, artifacts (charts,
arrays) and, last, ``seqpatch.json`` — and the folder is renamed into place. A version folder is
complete iff it holds ``seqpatch.json``; a killed build leaves only a hidden ``.tmp-`` folder,
which the next build of that version removes. Nothing is written into a committed version, by a
build or by any command (``Store.output_folder`` refuses an output folder inside a stage folder).
Folders and files follow the user's umask, so a group can share a data dir.

Integrity: ``seqpatch.json`` lists every file of the version with its size and SHA-256, and a
checksum of itself; provenance without them is damaged, not trusted. Finding a version checks
its provenance and file sizes; reading one — resolving it for a command, loading it, or building
on it as a parent — also checks the hashes (memoized per file state) and the row count. A damaged
version is never reused or read, and ``latest`` never skips one: the error names it and the
command that clears it (``seqpatch verify STAGE --clean``).

Secrets: nothing written holds the Hugging Face token (rows, artifacts, provenance and every JSON
file pass ``seqpatch.redact`` before their hashes are taken, artifacts written elsewhere too);
provenance and rows read back are restored, so a child finds the model folder its parent was
built from, and versions never depend on whether the token is set.

Concurrency: a build holds ``.<version>.lock`` (``filelock``) while it commits, and a sharded build
holds one lock per shard while computing it, so identical builds started together share the
shards (none is computed twice) and the second to finish reuses the first's commit.

Modules: ``refs`` (names, canonical forms, ``StageRef``, errors), ``integrity`` (checksums, content
hashes and their memo), ``files`` (atomic writes, umask, permission errors), ``shards`` (sharded,
resumable builds whose shards carry their own hashes), ``verify`` (``seqpatch verify``) and
``core`` (the ``Store``).
"""

from seqpatch.store.core import Store, load_stage
from seqpatch.store.files import write_artifacts, write_json
from seqpatch.store.integrity import content_hash, hash_memo_dir
from seqpatch.store.refs import (
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    LATEST,
    LOCK_SUFFIX,
    PARTIAL_SUFFIX,
    PROVENANCE_FILE,
    SHARD_EXTRA,
    SHARD_FILES,
    SHARD_MANIFEST,
    TMP_MARK,
    VERSION_LENGTH,
    Artifact,
    Built,
    DamagedVersionError,
    Parent,
    StageNotFoundError,
    StageRef,
    StoreError,
    canonical_json,
    config_dict,
    merge_extra,
    model_record,
    parent_record,
    parents_of,
    resolve_data_dir,
)
from seqpatch.store.verify import VerifyReport

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "LATEST",
    "LOCK_SUFFIX",
    "PARTIAL_SUFFIX",
    "PROVENANCE_FILE",
    "SHARD_EXTRA",
    "SHARD_FILES",
    "SHARD_MANIFEST",
    "TMP_MARK",
    "VERSION_LENGTH",
    "Artifact",
    "Built",
    "DamagedVersionError",
    "Parent",
    "StageNotFoundError",
    "StageRef",
    "Store",
    "StoreError",
    "VerifyReport",
    "canonical_json",
    "config_dict",
    "content_hash",
    "hash_memo_dir",
    "load_stage",
    "merge_extra",
    "model_record",
    "parent_record",
    "parents_of",
    "resolve_data_dir",
    "write_artifacts",
    "write_json",
]
