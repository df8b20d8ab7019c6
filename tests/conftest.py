"""Shared test setup: every RNG seeded before each test, and a deterministic hypothesis profile.

Profiles (choose with ``SEQPATCH_HYPOTHESIS_PROFILE``): ``ci`` (default) is derandomized so a
run is reproducible and independent of test order; ``explore`` draws fresh random examples and
keeps failures in its database, for hunting bugs locally.
"""

from __future__ import annotations

import os
import random
import sys

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP threads
# spinning while descheduled slow small matmuls by up to 100x. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,  # 2 shared cores: wall-clock deadlines would make tests flaky
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("SEQPATCH_HYPOTHESIS_PROFILE", "ci"))

SEED = 0


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed ``random``, ``numpy`` and ``torch`` before every test.

    torch is seeded when it is loaded (tests that use it import it at module level, before any
    test runs); importing it here would add seconds to runs that never touch it.
    """
    random.seed(SEED)
    np.random.seed(SEED)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(SEED)


@pytest.fixture(autouse=True, scope="session")
def _hash_memo_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The store's content-hash memo of test files goes to a temporary folder (subprocesses
    inherit it), not into the user's cache."""
    os.environ["SEQPATCH_HASH_MEMO"] = str(tmp_path_factory.mktemp("hash-memo"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two tiny benchmarkable model specs saved to disk: a word-level Llama read in the compact
    format (the smaller one: its vocabulary is) and a BPE Llama read as code."""
    from seqpatch.testing import save_tiny_model

    root = tmp_path_factory.mktemp("models")
    word = save_tiny_model("llama", root / "word", seed=0, tokenizer="wordlevel")
    bpe = save_tiny_model("llama", root / "bpe", seed=1, tokenizer="bpe")
    return {"word": f"{word}:compact", "bpe": str(bpe)}


@pytest.fixture(scope="session")
def organism_study(tmp_path_factory: pytest.TempPathFactory):
    """A small stored study of the organism with every stage the report shows (about 20 s):
    built once per session, read-only for the tests that share it (copy it to damage it)."""
    from tests.study import build_study

    return build_study(tmp_path_factory.mktemp("study"))
