"""Where a trained organism is written: a folder of its own, never over someone else's files.

``check_out(out, force)`` runs before training (minutes of work must not end in "that is a
file"): ``out`` must be absent, empty, or an organism folder written before (its
``training.json`` is an organism's metrics), unless ``force``; and even with ``force`` no file
of a foreign folder is replaced — a name the organism would write that already exists there is
refused. ``save(out, write)`` has ``write(folder)`` write everything into a staging folder
beside ``out``, checks again, then moves the files in (a new folder appears by one rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from seqpatch.errors import SeqpatchError

TRAINING_JSON = "training.json"
MODEL_CARD = "README.md"
WRITES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    TRAINING_JSON,
    MODEL_CARD,
)
"""The names an organism folder holds (``save_pretrained`` of model and tokenizer, metrics, card)."""


class OrganismOutError(SeqpatchError):
    """``--out`` cannot receive a trained organism; the message says which path and why."""


def is_organism_folder(folder: Path) -> bool:
    """Whether ``folder`` was written by ``train_organism`` (its metrics file says so)."""
    try:
        metrics = json.loads((folder / TRAINING_JSON).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(metrics, dict) and {"config", "accuracy_by_length"} <= metrics.keys()


def check_out(out: Path, force: bool = False, names: tuple[str, ...] = WRITES) -> bool:
    """Refuse an ``out`` the organism cannot be written to; whether it is a foreign folder."""
    existing = next((p for p in (out, *out.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        raise OrganismOutError(
            f"--out {out}: {existing} is a file, not a folder; choose a folder for the organism"
        )
    if not out.is_dir():
        return False
    try:
        entries = sorted(p.name for p in out.iterdir())
    except PermissionError:
        raise OrganismOutError(f"--out {out} cannot be read (permission denied)") from None
    if not entries or is_organism_folder(out):
        return False
    if not force:
        shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        raise OrganismOutError(
            f"--out {out} is not empty ({shown}) and was not written by `seqpatch organism "
            "train`; choose an empty folder, or pass --force to add the organism beside those "
            "files (none of them is replaced)"
        )
    clash = sorted(set(names) & set(entries))
    if clash:
        raise OrganismOutError(
            f"--out {out}: {out / clash[0]} was not written by seqpatch and the organism would "
            "replace it; move it away, or choose another folder"
        )
    return True


def save(out: Path, write: Callable[[Path], None], force: bool = False) -> None:
    """Write the organism with ``write(staging)``, then move it into ``out`` (see module)."""
    foreign = check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(staging)
        written = tuple(sorted(p.name for p in staging.iterdir()))
        if foreign:
            check_out(out, force, written)
        if not out.exists():
            os.rename(staging, out)
            return
        for name in written:
            os.replace(staging / name, out / name)
    except OSError as err:
        raise OrganismOutError(
            f"cannot write the organism to {out}: {err.strerror or err}"
        ) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
