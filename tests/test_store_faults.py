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
import time
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


def test_a_shard_waited_for_is_not_rebuilt_once_the_racing_build_committed(
    tmp_path: Path, reference: tuple[str, list[int]]
) -> None:
    """The interleaving behind a flaky race: this process waited for a shard's lock while the
    other build finished every shard, committed the version and removed its work folder. The
    shard now looks missing, but the version exists: nothing may be computed again."""
    store = Store(tmp_path)
    version = sharded_build(str(tmp_path))
    assert version == reference[0]
    work = store.stage_dir("toy") / f"{version}{PARTIAL_SUFFIX}"
    assert not work.exists()
    computed: list[int] = []
    store._build_shard("toy", version, work, 3, N_SHARDS, lambda i: computed.append(i))
    assert computed == [] and not work.exists()


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


def _unchecked_edit(path: Path) -> None:
    provenance = json.loads((path / PROVENANCE_FILE).read_text())
    del provenance["checksum"]
    provenance["config"]["n"] = 9
    (path / PROVENANCE_FILE).write_text(json.dumps(provenance))


DAMAGE = {
    "provenance is a list": lambda path: (path / PROVENANCE_FILE).write_text("[]"),
    "provenance is garbage": lambda path: (path / PROVENANCE_FILE).write_bytes(b"\x00{]"),
    "provenance nested 100000 deep": lambda path: (path / PROVENANCE_FILE).write_text(
        "[" * 100_000 + "]" * 100_000
    ),
    "arrow file deleted": lambda path: next(path.glob("*.arrow")).unlink(),
    "arrow file truncated": lambda path: next(path.glob("*.arrow")).write_bytes(b"ARROW1"),
    "state.json deleted": lambda path: (path / "state.json").unlink(),
    "row_count edited": lambda path: (path / PROVENANCE_FILE).write_text(
        json.dumps({**json.loads((path / PROVENANCE_FILE).read_text()), "row_count": 50})
    ),
    "checksum removed and config edited": _unchecked_edit,
    "version folder replaced by a file": lambda path: (shutil.rmtree(path), path.touch()),
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


# ---------------------------------------------------------------------------------------------
# Readers check what they read: a damaged parent stops every command that would read it


def _flip(path: Path, offset: int = -64, n: int = 64) -> None:
    """Invert ``n`` bytes of ``path`` from ``offset`` on, keeping its size."""
    data = bytearray(path.read_bytes())
    start = offset % len(data)
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _data_arrow(version_dir: Path) -> Path:
    return max(version_dir.glob("*.arrow"), key=lambda p: p.stat().st_size)


def _flip_rows(path: Path) -> None:
    """Flip 64 bytes in the middle of an Arrow file's data (not its schema): it still loads."""
    _flip(path, path.stat().st_size // 2)


CORRUPT = {"truncated": _truncate, "flipped at the same size": _flip_rows}


@pytest.fixture(scope="module")
def study_source(tmp_path_factory: pytest.TempPathFactory):
    """pairs → activations (resid_pre) → patching (resid_pre, without the cache) on a tiny
    model, built once; tests damage a copy."""
    from seqpatch import pipeline
    from tests.test_patching_stage import build_pairs, model_cache, tiny_handle

    root = tmp_path_factory.mktemp("study")
    handle = tiny_handle(root, "llama")
    data_dir = build_pairs(handle, root / "data")
    models = model_cache(handle)
    pipeline.build_activations(("resid_pre",), data_dir=data_dir, models=models, progress=False)
    pipeline.build_patching(
        ("resid_pre",), activations="none", data_dir=data_dir, models=models, progress=False
    )
    return data_dir, handle


@pytest.fixture
def study(study_source, tmp_path: Path):
    from tests.test_patching_stage import model_cache

    source, handle = study_source
    data_dir = tmp_path / "data"
    shutil.copytree(source, data_dir, symlinks=True)
    return Store(data_dir), model_cache(handle)


def _only(store: Store, stage: str) -> Path:
    (ref,) = store.versions(stage)
    return ref.path


@pytest.mark.parametrize("damage", list(CORRUPT))
def test_build_patching_refuses_damaged_cached_activations(study, damage: str) -> None:
    from seqpatch import pipeline

    store, models = study
    activations = _only(store, "activations")
    before = sorted(p.name for p in store.stage_dir("patching").iterdir())
    CORRUPT[damage](_data_arrow(activations))
    with pytest.raises(DamagedVersionError, match=rf"activations/{activations.name}.*--clean"):
        pipeline.build_patching(("resid_pre",), data_dir=store.data_dir, models=models)
    # neither read, nor silently replaced by a build without the cache
    assert sorted(p.name for p in store.stage_dir("patching").iterdir()) == before


@pytest.mark.parametrize("damage", list(CORRUPT))
def test_build_das_refuses_a_damaged_patching_parent(study, damage: str) -> None:
    from seqpatch.executor import execute
    from seqpatch.stages.das import DasConfig

    store, models = study
    patching = _only(store, "patching")
    CORRUPT[damage](_data_arrow(patching))
    with pytest.raises(DamagedVersionError, match=rf"patching/{patching.name}.*--clean"):
        # what `seqpatch build das` does: the newest rankable patching version, then execute
        ref = store.versions("patching")[-1]
        cfg = DasConfig(epochs=1, allow_small=True)  # a 6-pair study: the damage is the point
        execute("das", cfg, {"patching": ref}, store=store, models=models)
    assert not store.stage_dir("das").exists()


def test_a_damaged_parent_is_refused_by_a_dependent_build_and_by_readers(study) -> None:
    from seqpatch.executor import execute
    from seqpatch.stages.activations import ActivationsConfig

    store, models = study
    pairs = _only(store, "pairs")
    _flip_rows(_data_arrow(pairs))
    ref = store.find("pairs", pairs.name)  # the cheap check sees the same sizes
    cfg = ActivationsConfig(sites=("attn_out",))
    with pytest.raises(DamagedVersionError, match=rf"pairs/{pairs.name}.*SHA-256"):
        execute("activations", cfg, {"pairs": ref}, store=store, models=models, progress=False)
    for read in (store.load, store.resolve):
        with pytest.raises(DamagedVersionError, match=rf"pairs/{pairs.name}"):
            read("pairs", pairs.name[:6])


@pytest.mark.parametrize("damage", list(CORRUPT))
def test_latest_never_skips_a_damaged_newest_version(tmp_path: Path, damage: str) -> None:
    from typer.testing import CliRunner

    from seqpatch.cli import app

    runner = CliRunner()
    data = ["--data-dir", str(tmp_path)]
    for seed in ("1", "2"):
        args = ["build", "programs", "--family", "arithmetic", "--seq-lens", "2", "--seed", seed]
        assert runner.invoke(app, [*args, "--n-per-len", "3", *data]).exit_code == 0
    newest = Store(tmp_path).versions("programs")[-1].path
    CORRUPT[damage](_data_arrow(newest))
    result = runner.invoke(app, ["build", "benchmark", "--models", "builtin", *data])
    assert result.exit_code == 2, result.output
    assert f"programs/{newest.name}" in result.output and "--clean" in result.output
    assert not (tmp_path / "benchmark").exists()


# ---------------------------------------------------------------------------------------------
# The content-hash memo: hashed once per file state, rehashed after any change


def test_content_hashes_are_memoized_per_file_state(tmp_path: Path, monkeypatch) -> None:
    from seqpatch import hashing as integrity

    calls: list[Path] = []
    real = integrity.sha256_of
    monkeypatch.setattr(integrity, "sha256_of", lambda p: calls.append(p) or real(p))
    monkeypatch.setenv("SEQPATCH_HASH_MEMO", str(tmp_path / "memo"))
    file = tmp_path / "rows.arrow"
    file.write_bytes(b"a" * 4096)
    assert integrity.content_hash(file) and len(calls) == 1
    assert integrity.content_hash(file) and len(calls) == 2  # just written: not memoized yet
    time.sleep(integrity.RACY_NS / 1e9)
    first = integrity.content_hash(file)
    calls.clear()
    assert integrity.content_hash(file) == first and calls == []
    integrity._memo.clear()  # another process: the memo folder answers
    assert integrity.content_hash(file) == first and calls == []
    time.sleep(integrity.RACY_NS / 1e9)

    st = file.stat()
    file.write_bytes(b"b" * 4096)  # same size, mtime set back: the ctime still moves
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert integrity.content_hash(file) == integrity.sha256_of(file) != first
    copy = tmp_path / "copy"
    shutil.copy(file, copy)
    os.replace(copy, file)  # same content, new inode
    time.sleep(integrity.RACY_NS / 1e9)
    hashed = len(calls)
    integrity.content_hash(file)
    assert len(calls) == hashed + 1


def test_a_commit_seeds_the_memo_so_readers_do_not_rehash(tmp_path: Path, monkeypatch) -> None:
    from seqpatch import hashing as integrity

    store = Store(tmp_path)
    ref = store.get_or_build("toy", 1, FaultConfig(), lambda: shard_rows(0).rows)
    calls: list[Path] = []
    monkeypatch.setattr(integrity, "sha256_of", lambda p: calls.append(p))
    integrity._memo.clear()
    assert store.load("toy", ref.version)["x"] == [0, 1]
    assert calls == []


# ---------------------------------------------------------------------------------------------
# Shards carry their own hashes


def _work(tmp_path: Path) -> Path:
    (work,) = (tmp_path / "toy").glob(f"*{PARTIAL_SUFFIX}")
    return work


def _resume(tmp_path: Path) -> tuple[str, list[int]]:
    log = tmp_path / "log"
    log.mkdir()
    version = sharded_build(str(tmp_path), str(log))
    return version, sorted(int(n.split("-")[1]) for n in os.listdir(log))


def _value_offset(arrow: Path, value: int) -> int:
    return bytes(arrow.read_bytes()).index(value.to_bytes(8, "little", signed=True))


def test_a_finished_shard_flipped_at_the_same_size_is_rebuilt_not_merged(
    tmp_path: Path, reference: tuple[str, list[int]]
) -> None:
    assert _in_subprocess(tmp_path, "shard-3") == -signal.SIGKILL
    arrow = next((_work(tmp_path) / "shard-00001").glob("*.arrow"))
    _flip(arrow, _value_offset(arrow, 10), 64)  # its values and padding: it still loads
    version, recomputed = _resume(tmp_path)
    assert recomputed == [1, 3]
    assert (version, _rows(Store(tmp_path), version)) == reference
    assert Store(tmp_path).verify().clean


def test_a_file_where_a_shard_folder_was_is_rebuilt(
    tmp_path: Path, reference: tuple[str, list[int]]
) -> None:
    assert _in_subprocess(tmp_path, "shard-3") == -signal.SIGKILL
    shard = _work(tmp_path) / "shard-00002"
    shutil.rmtree(shard)
    shard.write_text("not a shard")
    version, recomputed = _resume(tmp_path)
    assert recomputed == [2, 3]
    assert (version, _rows(Store(tmp_path), version)) == reference


def test_a_file_where_the_work_folder_was_is_one_line(
    tmp_path: Path, reference: tuple[str, list[int]]
) -> None:
    assert _in_subprocess(tmp_path, "shard-3") == -signal.SIGKILL
    work = _work(tmp_path)
    shutil.rmtree(work)
    work.write_text("not a folder")
    with pytest.raises(StoreError, match=rf"{work.name} .*not a folder.*verify toy --clean"):
        sharded_build(str(tmp_path))
    assert Store(tmp_path).verify().debris == [str(work)]
    Store(tmp_path).verify(clean=True)
    assert sharded_build(str(tmp_path)) == reference[0]


# ---------------------------------------------------------------------------------------------
# Provenance that cannot be checked is damaged; verify sees everything at a version's name


def test_provenance_without_checksum_is_refused_by_verify_list_and_builds(study) -> None:
    from typer.testing import CliRunner

    from seqpatch import pipeline
    from seqpatch.cli import app

    store, models = study
    pairs = _only(store, "pairs")
    provenance = json.loads((pairs / PROVENANCE_FILE).read_text())
    del provenance["checksum"]
    provenance["config"]["seed"] = 7
    (pairs / PROVENANCE_FILE).write_text(json.dumps(provenance))
    runner = CliRunner()
    data = ["--data-dir", str(store.data_dir)]
    verified = runner.invoke(app, ["verify", *data])
    assert verified.exit_code == 1 and f"damaged: pairs/{pairs.name}" in verified.output
    assert "lacks checksum" in verified.output
    listed = runner.invoke(app, ["list", *data])
    assert f"pairs/{pairs.name} in {store.data_dir} is damaged" in listed.output
    assert "seed=7" not in listed.output
    with pytest.raises(DamagedVersionError, match=f"pairs/{pairs.name}.*lacks checksum"):
        pipeline.build_patching(("attn_out",), data_dir=store.data_dir, models=models)


def test_verify_reports_a_version_without_provenance_or_not_a_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from seqpatch.cli import app

    store = Store(tmp_path)
    good = store.get_or_build("toy", 1, FaultConfig(), lambda: shard_rows(0).rows).version
    (tmp_path / "toy" / "0123456789ab").mkdir()  # a version folder without seqpatch.json
    (tmp_path / "toy" / "ba9876543210").write_text("")  # a file at a version's name
    (tmp_path / "charts" / f"toy-{good}").mkdir(parents=True)  # not a stage folder's version
    report = store.verify()
    assert report.ok == [f"toy/{good}"]
    assert report.damaged == [
        f"toy/0123456789ab: no {PROVENANCE_FILE}",
        "toy/ba9876543210: not a folder",
    ]
    with pytest.raises(DamagedVersionError, match="toy/ba9876543210"):
        store.resolve("toy")  # latest is ambiguous while something is damaged
    runner = CliRunner()
    cleaned = runner.invoke(app, ["verify", "--clean", "--data-dir", str(tmp_path)])
    assert cleaned.exit_code == 0, cleaned.output
    assert store.verify().clean and store.resolve("toy").version == good


def test_verify_of_a_stage_that_is_not_stored_is_one_line(stored: tuple[Store, str]) -> None:
    from typer.testing import CliRunner

    from seqpatch.cli import app

    store, _ = stored
    result = CliRunner().invoke(app, ["verify", "nosuchstage", "--data-dir", str(store.data_dir)])
    assert result.exit_code == 2
    assert result.output.startswith("Error: no stage 'nosuchstage' is stored") and (
        result.output.count("\n") == 1
    )


# ---------------------------------------------------------------------------------------------
# No command writes into a stored version


def _spellings(version_dir: Path, tmp_path: Path, monkeypatch) -> list[str]:
    link = tmp_path / "link"
    link.symlink_to(version_dir)
    monkeypatch.chdir(version_dir.parent.parent)
    data = version_dir.parent.parent
    return [
        str(version_dir),
        str(data / "charts" / ".." / version_dir.parent.name / version_dir.name),
        str(link),
        f"{version_dir.parent.name}/{version_dir.name}/figures",  # relative, not yet existing
        str(version_dir.parent),  # the stage folder itself
    ]


@pytest.mark.parametrize("command", ["heatmap", "traces", "accuracy", "tracing"])
def test_plot_out_into_a_stored_version_is_refused(
    study, tmp_path: Path, monkeypatch, command: str
) -> None:
    from typer.testing import CliRunner

    from seqpatch.cli import app

    store, _ = study
    stage = {"accuracy": "benchmark", "tracing": "tracing"}.get(command, "patching")
    if stage != "patching":  # any stored version of that stage
        store.get_or_build(stage, 1, FaultConfig(), lambda: shard_rows(0).rows)
    version_dir = _only(store, stage)
    files = {p: p.read_bytes() for p in version_dir.iterdir()}
    for out in _spellings(version_dir, tmp_path, monkeypatch):
        result = CliRunner().invoke(
            app, ["plot", command, "--out", out, "--data-dir", str(store.data_dir)]
        )
        assert result.exit_code == 2, (out, result.output)
        assert "stored versions never change" in result.output, out
    assert {p: p.read_bytes() for p in version_dir.iterdir()} == files
    assert store.verify().clean


def test_plot_out_elsewhere_still_works(study, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from seqpatch.cli import app

    store, _ = study
    out = tmp_path / "figures"
    result = CliRunner().invoke(
        app, ["plot", "heatmap", "--out", str(out), "--data-dir", str(store.data_dir)]
    )
    assert result.exit_code == 0, result.output
    assert any(out.glob("*.html"))


# ---------------------------------------------------------------------------------------------
# Shared stores: the umask decides who reads, and permission problems are one line


def test_version_folders_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        version = sharded_build(str(tmp_path))
    finally:
        os.umask(old)
    folder = tmp_path / "toy" / version
    assert folder.stat().st_mode & 0o777 == 0o750
    for file in folder.iterdir():
        assert file.stat().st_mode & 0o777 == 0o640, file.name


@pytest.fixture
def shared_dir():
    """A folder under /tmp that another user may enter (pytest's tmp_path is private)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="seqpatch-shared-"))
    folder.chmod(0o777)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o777)
    shutil.rmtree(folder)


def _as_another_user(args: list[str]):
    """Run the CLI as a user without access (root ignores permissions: drop to nobody)."""
    import rich.console
    import rich.table  # noqa: F401
    from typer.testing import CliRunner

    from seqpatch.cli import app

    if os.geteuid() != 0:
        return CliRunner().invoke(app, args)
    os.setegid(65534)
    os.seteuid(65534)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.mark.parametrize("folder", ["data", "data/toy"])
@pytest.mark.parametrize("command", ["list", "verify"])
def test_an_unreadable_data_dir_or_stage_folder_is_one_line(
    shared_dir: Path, command: str, folder: str
) -> None:
    store = Store(shared_dir / "data")
    store.get_or_build("toy", 1, FaultConfig(), lambda: shard_rows(0).rows)
    (shared_dir / folder).chmod(0o111)  # can be entered, not listed
    result = _as_another_user([command, "--data-dir", str(shared_dir / "data")])
    assert result.exit_code == 2, result.output
    assert f"permission denied on {shared_dir / folder}" in result.output
    assert result.output.count("\n") == 1


def test_a_reader_of_a_shared_store_sees_debris_and_cannot_clean_it(shared_dir: Path) -> None:
    assert _in_subprocess(shared_dir / "data", "shard-2") == -signal.SIGKILL
    (work,) = (shared_dir / "data" / "toy").glob(f"*{PARTIAL_SUFFIX}")
    listed = _as_another_user(["verify", "--data-dir", str(shared_dir / "data")])
    assert listed.exit_code == 0 and f"debris: {work}" in listed.output, listed.output
    cleaned = _as_another_user(["verify", "--clean", "--data-dir", str(shared_dir / "data")])
    assert cleaned.exit_code == 2 and cleaned.output.count("\n") == 1, cleaned.output
    assert f"cannot remove {work}" in cleaned.output
    assert work.is_dir()


def test_choose_into_an_unwritable_data_dir_is_one_line(shared_dir: Path) -> None:
    from seqpatch.choose import ChooseError, write_chosen

    data = shared_dir / "data"
    data.mkdir()
    data.chmod(0o555)
    if os.geteuid() == 0:
        os.setegid(65534)
        os.seteuid(65534)
    try:
        with pytest.raises(ChooseError, match=rf"cannot write {data}/chosen_model.json"):
            write_chosen(_choice(), data, "0123456789ab")
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_plot_into_an_unwritable_folder_is_one_line(shared_dir: Path) -> None:
    out = shared_dir / "figures"
    out.mkdir()
    out.chmod(0o555)
    result = _as_another_user(["plot", "heatmap", "--out", str(out), "--data-dir", str(out)])
    assert result.exit_code == 2, result.output
    assert f"cannot write to {out} (Permission denied" in result.output
    assert "with --out" in result.output


# ---------------------------------------------------------------------------------------------
# choose: locked, a temporary file of its own, and a readable result


def _choice():
    from seqpatch.choose import Choice

    return Choice("builtin", "organism", None, 1, "arithmetic", 4, 1.0, 0.9, 1.0, 10, 0.8, 4)


def _choose_many(data_dir: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    from seqpatch.choose import write_chosen

    barrier.wait(timeout=60)
    for _ in range(40):
        write_chosen(_choice(), data_dir, "0123456789ab")


def test_concurrent_chooses_never_fail(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    racers = [context.Process(target=_choose_many, args=(str(tmp_path), barrier)) for _ in range(3)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=240)
    assert [racer.exitcode for racer in racers] == [0, 0, 0]
    assert json.loads((tmp_path / "chosen_model.json").read_text())["seq_len"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_choose_waits_for_the_stores_lock(tmp_path: Path) -> None:
    import threading
    import time

    from seqpatch.choose import CHOSEN_FILE, write_chosen

    writer = threading.Thread(target=write_chosen, args=(_choice(), tmp_path, "0123456789ab"))
    with Store(tmp_path).file_lock(CHOSEN_FILE):
        writer.start()
        time.sleep(0.5)
        assert not (tmp_path / CHOSEN_FILE).exists()
    writer.join(timeout=30)
    assert (tmp_path / CHOSEN_FILE).is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["plot", "accuracy"],
        ["build", "pairs", "--model", "chosen", "--n-pairs", "2"],
    ],
)
def test_a_chosen_model_with_a_string_seq_len_is_one_line(tmp_path: Path, args) -> None:
    from typer.testing import CliRunner

    from seqpatch.cli import app

    Store(tmp_path).get_or_build("benchmark", 1, FaultConfig(), lambda: shard_rows(0).rows)
    chosen = {
        **_choice().__dict__,
        "seq_len": "4",
        "benchmark_version": "0123456789ab",
    }
    (tmp_path / "chosen_model.json").write_text(json.dumps(chosen))
    result = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "seq_len is '4', not a positive integer" in result.output
    assert result.output.count("\n") == 1


def test_a_damaged_version_is_never_reused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from seqpatch.cli import app

    args = ["build", "programs", "--family", "arithmetic", "--seq-lens", "2", "--n-per-len", "3"]
    args += ["--data-dir", str(tmp_path)]
    assert CliRunner().invoke(app, args).exit_code == 0
    (ref,) = Store(tmp_path).versions("programs")
    _flip_rows(_data_arrow(ref.path))
    result = CliRunner().invoke(app, args)  # would say "reused" and print its rows' path
    assert result.exit_code == 2 and f"programs/{ref.version}" in result.output
    store = Store(tmp_path)
    version = sharded_build(str(tmp_path))
    _flip(_arrow(store, version), _value_offset(_arrow(store, version), 10), 16)
    with pytest.raises(DamagedVersionError, match=f"toy/{version}.*SHA-256"):
        sharded_build(str(tmp_path))
