"""Fault injection: kills at every point of a build, concurrent identical builds, and damage.

The store promises that a stored version is complete, immutable and says where it came from;
these tests try to break that the way a laptop or a cluster does — SIGKILL before any shard,
in the middle of a shard and during the commit, two identical builds started at once, and
every kind of file damaged afterwards — and check that a rerun gives the same version and rows,
that no shard is computed twice, and that damage is named with the command that clears it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from datasets import Dataset

from seqpatch.errors import SeqpatchError
from seqpatch.store import (
    PARTIAL_SUFFIX,
    PROVENANCE_FILE,
    Built,
    DamagedVersionError,
    Store,
    StoreError,
)

N_SHARDS = 4
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FaultConfig:
    n: int = 8


def shard_rows(index: int) -> Built:
    rows = Dataset.from_dict({"x": [index * 10 + i for i in range(2)]})
    return Built(rows, {"computed": 1})


def sharded_build(data_dir: str, log_dir: str | None = None, kill_at: str = "") -> str | None:
    """The build every scenario runs: 4 shards of a toy stage, logging which shards it computed.

    ``kill_at`` SIGKILLs this process at ``before`` (the pre-shard check), ``shard-2`` (inside
    shard 2, after shards 0 and 1 are stored) or ``commit`` (while the version's provenance is
    written into the temporary folder).
    """
    from seqpatch.store import files as store_files

    def build_shard(index: int) -> Built:
        if log_dir is not None:
            Path(log_dir, f"{os.getpid()}-{index}").touch()
        if kill_at == f"shard-{index}":
            os.kill(os.getpid(), signal.SIGKILL)
        return shard_rows(index)

    def before() -> None:
        if kill_at == "before":
            os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "commit":
        real = store_files.write_json

        def write_then_die(path: Path, payload: dict) -> None:
            real(path, payload)
            if path.name == PROVENANCE_FILE:
                os.kill(os.getpid(), signal.SIGKILL)

        store_files.write_json = write_then_die
    ref = Store(data_dir).build_sharded(
        "toy", 1, FaultConfig(), N_SHARDS, build_shard, before=before
    )
    return ref.version if ref is not None else None


def _in_subprocess(data_dir: Path, kill_at: str) -> int:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from tests.test_store_faults import sharded_build; "
        f"sharded_build({str(data_dir)!r}, kill_at={kill_at!r})"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode


def _rows(store: Store, version: str) -> list[int]:
    return store.load("toy", version)["x"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[int]]:
    """An uninterrupted build: the version and rows every interrupted one must end with."""
    data_dir = tmp_path_factory.mktemp("reference")
    version = sharded_build(str(data_dir))
    return version, _rows(Store(data_dir), version)


@pytest.mark.parametrize("kill_at", ["before", "shard-2", "commit"])
def test_a_killed_build_resumes_to_the_same_version_and_rows(
    tmp_path: Path, kill_at: str, reference: tuple[str, list[int]]
) -> None:
    assert _in_subprocess(tmp_path, kill_at) == -signal.SIGKILL
    store = Store(tmp_path)
    assert store.versions("toy") == []  # nothing that looks complete was left behind
    log = tmp_path / "log"
    log.mkdir()
    version = sharded_build(str(tmp_path), str(log))
    assert (version, _rows(store, version)) == reference
    recomputed = sorted(int(name.split("-")[1]) for name in os.listdir(log))
    expected = {"before": [0, 1, 2, 3], "shard-2": [2, 3], "commit": []}[kill_at]
    assert recomputed == expected  # finished shards are never recomputed
    leftovers = [p.name for p in (tmp_path / "toy").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [version]  # temporary folders and the work folder are gone


def _racer(data_dir: str, log_dir: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    """One of two identical builds started together; the barrier makes their shards overlap."""
    from seqpatch.store import Store

    def build_shard(index: int) -> Built:
        Path(log_dir, f"{os.getpid()}-{index}").touch()
        if index < 2:
            barrier.wait(timeout=60)  # each process holds one shard until the other does too
        return shard_rows(index)

    ref = Store(data_dir).build_sharded("toy", 1, FaultConfig(), N_SHARDS, build_shard)
    Path(log_dir, f"done-{os.getpid()}-{ref.version}-{int(ref.reused)}").touch()


def test_two_identical_builds_at_once_share_the_shards(
    tmp_path: Path, reference: tuple[str, list[int]]
) -> None:
    context = multiprocessing.get_context("spawn")
    log = tmp_path / "log"
    log.mkdir()
    barrier = context.Barrier(2)
    racers = [
        context.Process(target=_racer, args=(str(tmp_path / "data"), str(log), barrier))
        for _ in range(2)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=240)
    assert [racer.exitcode for racer in racers] == [0, 0]
    done = sorted(name for name in os.listdir(log) if name.startswith("done-"))
    assert len(done) == 2 and {name.split("-")[2] for name in done} == {reference[0]}
    assert sorted(name.split("-")[3] for name in done) == ["0", "1"]  # one built, one reused
    computed = sorted(int(n.split("-")[1]) for n in os.listdir(log) if not n.startswith("done"))
    assert computed == [0, 1, 2, 3]  # every shard exactly once, by one of the two
    assert _rows(Store(tmp_path / "data"), reference[0]) == reference[1]
    assert Store(tmp_path / "data").verify().clean  # no work folder or temporary file left


# ---------------------------------------------------------------------------------------------
# Damage after the commit: named, never reused, cleared by `verify --clean`


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Store, str]:
    store = Store(tmp_path)
    version = sharded_build(str(tmp_path))
    return store, version


def _arrow(store: Store, version: str) -> Path:
    return next((store.stage_dir("toy") / version).glob("*.arrow"))


DAMAGE = {
    "provenance is a list": lambda path: (path / PROVENANCE_FILE).write_text("[]"),
    "provenance is garbage": lambda path: (path / PROVENANCE_FILE).write_bytes(b"\x00{]"),
    "arrow file deleted": lambda path: next(path.glob("*.arrow")).unlink(),
    "arrow file truncated": lambda path: next(path.glob("*.arrow")).write_bytes(b"ARROW1"),
    "state.json deleted": lambda path: (path / "state.json").unlink(),
    "row_count edited": lambda path: (path / PROVENANCE_FILE).write_text(
        json.dumps({**json.loads((path / PROVENANCE_FILE).read_text()), "row_count": 50})
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_named_never_reused_and_cleared(stored: tuple[Store, str], damage: str) -> None:
    store, version = stored
    DAMAGE[damage](store.stage_dir("toy") / version)
    with pytest.raises(DamagedVersionError, match=rf"toy/{version}.*verify toy --clean"):
        store.load("toy", version)
    with pytest.raises(DamagedVersionError):
        sharded_build(str(store.data_dir))  # a rebuild never "reuses" a damaged version
    report = store.verify()
    assert [line.split(":")[0] for line in report.damaged] == [f"toy/{version}"]
    store.verify(clean=True)
    assert store.verify().clean
    assert sharded_build(str(store.data_dir)) == version  # rebuilt after the clean


def test_a_file_swapped_for_another_versions_is_detected(stored: tuple[Store, str]) -> None:
    store, version = stored
    other = store.get_or_build("toy", 1, FaultConfig(3), lambda: Dataset.from_dict({"x": [1]}))
    shutil.copy(_arrow(store, other.version), _arrow(store, version))
    with pytest.raises(DamagedVersionError, match="changed size"):
        store.resolve("toy", version)


def test_verify_finds_same_size_corruption_by_hash(stored: tuple[Store, str]) -> None:
    store, version = stored
    arrow = _arrow(store, version)
    data = bytearray(arrow.read_bytes())
    data[-20] ^= 0xFF
    arrow.write_bytes(bytes(data))
    assert store.find("toy", version) is not None  # cheap checks see the same size
    assert any("SHA-256" in line for line in store.verify().damaged)


def test_bad_shards_and_manifests_are_rebuilt_on_resume(tmp_path: Path) -> None:
    assert _in_subprocess(tmp_path, "shard-3") == -signal.SIGKILL
    work = (
        tmp_path
        / "toy"
        / next(p.name for p in (tmp_path / "toy").iterdir() if p.name.endswith(PARTIAL_SUFFIX))
    )
    (work / "shard-00000" / "extra.json").write_text("garbage")
    next((work / "shard-00001").glob("*.arrow")).unlink()
    log = tmp_path / "log"
    log.mkdir()
    version = sharded_build(str(tmp_path), str(log))
    assert sorted(int(n.split("-")[1]) for n in os.listdir(log)) == [0, 1, 3]
    assert _rows(Store(tmp_path), version) == [0, 1, 10, 11, 20, 21, 30, 31]


def test_a_garbage_manifest_restarts_the_work_folder(tmp_path: Path) -> None:
    assert _in_subprocess(tmp_path, "shard-2") == -signal.SIGKILL
    (manifest,) = (tmp_path / "toy").glob(f"*{PARTIAL_SUFFIX}/manifest.json")
    manifest.write_text("{oops")
    version = sharded_build(str(tmp_path))
    assert _rows(Store(tmp_path), version) == [0, 1, 10, 11, 20, 21, 30, 31]


def test_verify_lists_debris_of_killed_builds_and_cleans_it(tmp_path: Path) -> None:
    assert _in_subprocess(tmp_path, "shard-2") == -signal.SIGKILL
    (tmp_path / "toy" / ".0123456789ab.tmp-x").mkdir()
    store = Store(tmp_path)
    report = store.verify()
    assert len(report.debris) == 2 and not report.damaged
    store.verify(clean=True)
    assert store.verify().clean
    assert [p for p in (tmp_path / "toy").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("content", ["{}", "[1, 2]", "not json"])
def test_a_damaged_chosen_model_file_is_one_clear_error(tmp_path: Path, content: str) -> None:
    from seqpatch.choose import read_chosen

    (tmp_path / "chosen_model.json").write_text(content)
    with pytest.raises(SeqpatchError, match="rerun `seqpatch choose`"):
        read_chosen(tmp_path)


def test_cli_verify_reports_damage_and_exit_codes(stored: tuple[Store, str]) -> None:
    from typer.testing import CliRunner

    from seqpatch.cli import app

    store, version = stored
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", "--data-dir", str(store.data_dir)])
    assert ok.exit_code == 0 and "1 versions ok, 0 damaged" in ok.output
    _arrow(store, version).write_bytes(b"x")
    bad = runner.invoke(app, ["verify", "--data-dir", str(store.data_dir)])
    assert bad.exit_code == 1 and f"damaged: toy/{version}" in bad.output
    listed = runner.invoke(app, ["list", "--data-dir", str(store.data_dir)])
    assert f"toy/{version}" in listed.output and "damaged" in listed.output
    cleaned = runner.invoke(app, ["verify", "--clean", "--data-dir", str(store.data_dir)])
    assert cleaned.exit_code == 0 and f"removed: toy/{version}" in cleaned.output
    with pytest.raises(StoreError):
        store.resolve("toy", version)
