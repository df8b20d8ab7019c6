"""A local model folder's revision is a hash of every weight byte, memoized by file state.

A weight changed in place (same size, mtime set back) is a new model: a new revision, and a
stage built from the old weights is not reused. An unchanged large folder is read once.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest

from seqpatch import hashing
from seqpatch.executor import execute
from seqpatch.models import identify
from seqpatch.stages.benchmark import BenchmarkConfig
from seqpatch.stages.programs import ProgramsConfig

BIG = 64 * 2**20  # the size at which the loader used to stop reading weights


def _big_tiny_model(folder: Path) -> Path:
    """A tiny Llama whose ``model.safetensors`` is over 64 MB: its real tensors plus a buffer
    the model does not use (so the file is large and the model still loads and runs fast)."""
    import torch
    from safetensors.torch import load_file, save_file

    from seqpatch.testing import save_tiny_model

    save_tiny_model("llama", folder, tokenizer="wordlevel")
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["zz_padding"] = torch.zeros(BIG, dtype=torch.uint8)
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size > BIG
    return weights


def _flip_byte_of(weights: Path, tensor: str) -> None:
    """Change one byte of ``tensor``'s data in place: same size, mtime set back."""
    st = weights.stat()
    with open(weights, "r+b") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
        offset = 8 + header_len + header[tensor]["data_offsets"][0]
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x40]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size


def test_a_weight_changed_in_place_is_a_new_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "model"
    weights = _big_tiny_model(folder)
    spec = f"{folder}:compact"
    data = tmp_path / "data"
    execute("programs", ProgramsConfig("binding", (1, 2), 3, 0), data_dir=data)
    cfg = BenchmarkConfig((spec,), batch_size=4, max_new_tokens=2)
    before = identify(str(folder))["revision"]
    old = execute("benchmark", cfg, data_dir=data, progress=False)
    assert old is not None and not old.reused

    time.sleep(hashing.RACY_NS / 1e9)  # the memo keeps only files settled for a clock tick
    identify(str(folder))
    reads: list[Path] = []
    real = hashing.sha256_of
    monkeypatch.setattr(hashing, "sha256_of", lambda p: reads.append(p) or real(p))
    assert identify(str(folder))["revision"] == before
    again = execute("benchmark", cfg, data_dir=data, progress=False)
    assert again is not None and again.reused and again.version == old.version
    assert weights not in reads  # the big file is hashed once, not per command

    _flip_byte_of(weights, "model.embed_tokens.weight")
    after = identify(str(folder))["revision"]
    assert after != before
    new = execute("benchmark", cfg, data_dir=data, progress=False)
    assert new is not None and not new.reused and new.version != old.version
    assert new.provenance["model"]["revision"] == after
