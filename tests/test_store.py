"""The versioned store: reuse, new versions, atomic writes, resumable shards, provenance."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from datasets import Dataset

import seqpatch
from seqpatch.executor import execute as build_stage
from seqpatch.stages.programs import ProgramsConfig
from seqpatch.store import (
    PROVENANCE_FILE,
    Built,
    StageNotFoundError,
    Store,
    StoreError,
    load_stage,
    merge_extra,
)
from seqpatch.store import files as store_files


@dataclass(frozen=True)
class ToyConfig:
    n: int
    label: str = "toy"


class Builder:
    """A build function that counts its calls and can be told to crash."""

    def __init__(self, n: int, crash: bool = False) -> None:
        self.n, self.crash, self.calls = n, crash, 0

    def __call__(self) -> Dataset:
        self.calls += 1
        if self.crash:
            raise RuntimeError("killed mid-build")
        return Dataset.from_dict({"x": list(range(self.n))})


def visible(path: Path) -> list[str]:
    """Entries a reader could mistake for data (hidden temp folders excluded)."""
    return (
        sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        if path.is_dir()
        else []
    )


def without_created(path: Path) -> dict:
    prov = json.loads((path / PROVENANCE_FILE).read_text())
    prov.pop("created")
    return prov


# ---------------------------------------------------------------------------------------------
# Reuse and versions


def test_same_config_reuses_without_building(tmp_path: Path) -> None:
    store = Store(tmp_path)
    builder = Builder(5)
    first = store.get_or_build("toy", 1, ToyConfig(5), builder)
    second = store.get_or_build("toy", 1, ToyConfig(5), builder)
    assert builder.calls == 1
    assert (first.reused, second.reused) == (False, True)
    assert second.path == first.path == tmp_path / "toy" / first.version
    assert second.fingerprint == first.fingerprint is not None
    state = json.loads((first.path / "state.json").read_text())
    assert state["_fingerprint"] == first.fingerprint  # the saved rows are the ones described
    assert store.load("toy")._fingerprint == store.load("toy", first.version)._fingerprint
    assert store.load("toy")["x"] == list(range(5))


def test_programs_stage_fingerprint_is_stable_across_stores(tmp_path: Path) -> None:
    cfg = ProgramsConfig("binding", (2, 3), n_per_len=4, seed=0)
    first = build_stage("programs", cfg, data_dir=tmp_path / "a")
    again = build_stage("programs", cfg, data_dir=tmp_path / "a")
    elsewhere = build_stage("programs", cfg, data_dir=tmp_path / "b")
    assert again.reused and not elsewhere.reused
    assert first.version == elsewhere.version
    assert first.fingerprint == again.fingerprint == elsewhere.fingerprint
    assert without_created(first.path) == without_created(elsewhere.path)
    text = (elsewhere.path / PROVENANCE_FILE).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_any_input_change_makes_a_new_version(tmp_path: Path) -> None:
    store = Store(tmp_path)
    base = store.get_or_build("toy", 1, ToyConfig(3), Builder(3))
    parent = store.get_or_build("parent", 1, {"p": 1}, Builder(1))
    other_parent = store.get_or_build("parent", 1, {"p": 2}, Builder(1))
    variants = {
        "config": store.version_for("toy", 1, ToyConfig(4)),
        "default field": store.version_for("toy", 1, ToyConfig(3, label="other")),
        "schema": store.version_for("toy", 2, ToyConfig(3)),
        "parent": store.version_for("toy", 1, ToyConfig(3), parents=[parent]),
        "other parent": store.version_for("toy", 1, ToyConfig(3), parents=[other_parent]),
        "model": store.version_for("toy", 1, ToyConfig(3), model={"id": "m", "revision": "a"}),
        "revision": store.version_for("toy", 1, ToyConfig(3), model={"id": "m", "revision": "b"}),
    }
    assert base.version not in variants.values()
    assert len(set(variants.values())) == len(variants)
    built = store.get_or_build("toy", 1, ToyConfig(4), Builder(4))
    assert built.version == variants["config"]
    assert [r.version for r in store.versions("toy")] == [base.version, built.version]
    assert store.load("toy", base.version).num_rows == 3  # never overwritten


def test_version_depends_on_values_not_spelling(tmp_path: Path) -> None:
    store = Store(tmp_path)
    as_dataclass = store.version_for("toy", 1, ToyConfig(3))
    as_mapping = store.version_for("toy", 1, {"label": "toy", "n": 3})
    assert as_dataclass == as_mapping
    assert re.fullmatch(r"[0-9a-f]{12}", as_dataclass)  # 12 lowercase hex digits, a folder name
    lens = store.version_for("programs", 1, ProgramsConfig("arithmetic", (3, 1), 2))
    assert lens == store.version_for("programs", 1, ProgramsConfig("arithmetic", (1, 3), 2))


def test_store_construction_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEQPATCH_DATA", raising=False)
    store = Store()
    assert store.data_dir == Path("seqpatch-data")
    assert store.list() == [] and store.refs() == []
    assert not (tmp_path / "seqpatch-data").exists()


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_crash_in_builder_leaves_nothing_complete(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        store.get_or_build("toy", 1, ToyConfig(3), Builder(3, crash=True))
    assert visible(tmp_path / "toy") == []
    with pytest.raises(StageNotFoundError):
        store.load("toy")
    builder = Builder(3)
    ref = store.get_or_build("toy", 1, ToyConfig(3), builder)
    assert builder.calls == 1 and not ref.reused
    assert store.load("toy")["x"] == [0, 1, 2]


def test_crash_while_writing_leaves_nothing_complete(tmp_path: Path, monkeypatch) -> None:
    def fail(path: Path, payload: dict) -> None:
        raise OSError("disk full")

    store = Store(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(store_files, "write_json", fail)
        with pytest.raises(OSError, match="disk full"):
            store.get_or_build("toy", 1, ToyConfig(3), Builder(3))
    left = [p for p in (tmp_path / "toy").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # the temp folder is cleaned up too
    assert store.get_or_build("toy", 1, ToyConfig(3), Builder(3)).provenance["row_count"] == 3


def test_killed_build_leftovers_are_ignored(tmp_path: Path) -> None:
    store = Store(tmp_path)
    version = store.version_for("toy", 1, ToyConfig(3))
    Dataset.from_dict({"x": [9]}).save_to_disk(str(tmp_path / "toy" / f".{version}.tmp-dead"))
    assert store.versions("toy") == [] and store.find("toy", version) is None
    ref = store.get_or_build("toy", 1, ToyConfig(3), Builder(3))
    assert store.load("toy", ref.version)["x"] == [0, 1, 2]


def test_folder_without_provenance_is_not_complete_nor_overwritten(tmp_path: Path) -> None:
    store = Store(tmp_path)
    version = store.version_for("toy", 1, ToyConfig(3))
    stray = tmp_path / "toy" / version
    Dataset.from_dict({"x": [9]}).save_to_disk(str(stray))
    assert store.find("toy", version) is None
    with pytest.raises(StoreError, match=f"{version} exists but has no {PROVENANCE_FILE}"):
        store.get_or_build("toy", 1, ToyConfig(3), Builder(3))
    assert Dataset.load_from_disk(str(stray))["x"] == [9]


def test_unwritable_data_dir_is_a_clear_error_and_builds_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    builder = Builder(3)
    with pytest.raises(StoreError, match=r"cannot write to data dir .*a-file/data"):
        Store(blocker / "data").get_or_build("toy", 1, ToyConfig(3), builder)
    assert builder.calls == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# ---------------------------------------------------------------------------------------------
# Sharded, resumable builds


class ShardBuilder:
    def __init__(self, rows_per_shard: int = 2, crash_at: int | None = None) -> None:
        self.rows, self.crash_at, self.calls = rows_per_shard, crash_at, []

    def __call__(self, index: int) -> Built:
        self.calls.append(index)
        if index == self.crash_at:
            raise RuntimeError(f"killed in shard {index}")
        start = index * self.rows
        rows = Dataset.from_dict({"x": list(range(start, start + self.rows))})
        return Built(rows, {"rejected": {"too_long": index}, "tried": self.rows, "kind": "toy"})


def test_sharded_build_resumes_after_a_crash(tmp_path: Path) -> None:
    store = Store(tmp_path)
    crashing = ShardBuilder(crash_at=2)
    with pytest.raises(RuntimeError, match="shard 2"):
        store.build_sharded("toy", 1, ToyConfig(8), 4, crashing)
    assert crashing.calls == [0, 1, 2]
    version = store.version_for("toy", 1, ToyConfig(8))
    assert visible(tmp_path / "toy") == [f"{version}.partial"]
    assert store.versions("toy") == []
    assert visible(tmp_path / "toy" / f"{version}.partial") == [
        "manifest.json",
        "shard-00000",
        "shard-00001",
    ]

    resumed = ShardBuilder()
    ref = store.build_sharded("toy", 1, ToyConfig(8), 4, resumed)
    assert resumed.calls == [2, 3]
    assert ref.version == version and not ref.reused
    assert store.load("toy")["x"] == list(range(8))
    assert ref.provenance["row_count"] == 8
    assert ref.provenance["extra"] == {
        "kind": "toy",
        "n_shards": 4,
        "rejected": {"too_long": 0 + 1 + 2 + 3},
        "tried": 8,
    }
    assert visible(tmp_path / "toy") == [version]  # the work folder is gone

    again = ShardBuilder()
    assert store.build_sharded("toy", 1, ToyConfig(8), 4, again).reused
    assert again.calls == []


def test_sharded_build_refuses_mixed_shard_counts(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(RuntimeError):
        store.build_sharded("toy", 1, ToyConfig(8), 4, ShardBuilder(crash_at=1))
    with pytest.raises(StoreError, match="n_shards=4, not 2"):
        store.build_sharded("toy", 1, ToyConfig(8), 2, ShardBuilder())
    with pytest.raises(StoreError, match="n_shards must be >= 1"):
        store.build_sharded("toy", 1, ToyConfig(8), 0, ShardBuilder())


def test_sharded_build_split_across_jobs(tmp_path: Path) -> None:
    """Jobs that each build some shards: only the call that completes the set commits."""
    store = Store(tmp_path)
    first, second = ShardBuilder(), ShardBuilder()
    assert store.build_sharded("toy", 1, ToyConfig(8), 4, first, only_shards=[0, 2]) is None
    assert store.versions("toy") == []
    ref = store.build_sharded("toy", 1, ToyConfig(8), 4, second, only_shards=[1, 3, 2])
    assert (first.calls, second.calls) == ([0, 2], [1, 3])
    assert ref is not None and store.load("toy")["x"] == list(range(8))
    with pytest.raises(StoreError, match=r"shard indices must lie in 0\.\.3"):
        store.build_sharded("toy", 1, ToyConfig(9), 4, ShardBuilder(), only_shards=[4])


def test_merge_extra() -> None:
    merged = merge_extra([{"a": 1, "b": {"c": 2}, "s": "x"}, {"a": 2, "b": {"c": 3, "d": 1}}])
    assert merged == {"a": 3, "b": {"c": 5, "d": 1}, "s": "x"}
    assert merge_extra([{"s": "x"}, {"s": "y"}]) == {"s": ["x", "y"]}


# ---------------------------------------------------------------------------------------------
# Provenance


def test_provenance_records_inputs_and_outputs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    parent = store.get_or_build("parent", 3, {"p": 1}, Builder(2))

    def build() -> Built:
        return Built(Dataset.from_dict({"x": [1, 2, 3]}), {"rejected": {"wrong_answer": 4}})

    ref = store.get_or_build(
        "toy", 2, ToyConfig(3), build, parents=[parent], model={"id": "org/m", "revision": "abc"}
    )
    prov = json.loads((ref.path / PROVENANCE_FILE).read_text())
    assert prov == dict(ref.provenance)
    assert set(prov) == {
        "stage",
        "version",
        "schema_version",
        "config",
        "parents",
        "files",
        "checksum",
        "model",
        "seqpatch_version",
        "row_count",
        "fingerprint",
        "created",
        "extra",
    }
    assert prov["stage"] == "toy" and prov["version"] == ref.version
    assert prov["schema_version"] == 2
    assert prov["config"] == {"n": 3, "label": "toy"}
    assert prov["parents"] == [
        {"stage": "parent", "version": parent.version, "fingerprint": parent.fingerprint}
    ]
    assert set(prov["files"]) == {"data-00000-of-00001.arrow", "dataset_info.json", "state.json"}
    for name, record in prov["files"].items():
        data = (ref.path / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert prov["model"] == {"id": "org/m", "revision": "abc"}
    assert prov["seqpatch_version"] == seqpatch.__version__
    assert prov["row_count"] == 3
    assert prov["fingerprint"] == json.loads((ref.path / "state.json").read_text())["_fingerprint"]
    assert prov["extra"] == {"rejected": {"wrong_answer": 4}}
    assert prov["created"].endswith("+00:00")
    assert store.list() == [dict(parent.provenance), prov]


def test_parent_may_be_a_published_provenance(tmp_path: Path) -> None:
    published = {
        "stage": "programs",
        "version": "0123456789ab",
        "fingerprint": "f" * 16,
        "published_source": {"kind": "hub", "source": "user/name", "revision": "deadbeef"},
    }
    store = Store(tmp_path)
    ref = store.get_or_build("toy", 1, ToyConfig(1), Builder(1), parents=[published])
    assert ref.provenance["parents"][0]["source"]["source"] == "user/name"
    assert ref.version == store.version_for("toy", 1, ToyConfig(1), parents=[published])
    with pytest.raises(StoreError, match="neither a version nor a fingerprint"):
        store.version_for("toy", 1, ToyConfig(1), parents=[{"stage": "programs"}])


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_stage_latest_prefix_and_env(tmp_path: Path, monkeypatch) -> None:
    store = Store(tmp_path)
    old = store.get_or_build("toy", 1, ToyConfig(1), Builder(1))
    new = store.get_or_build("toy", 1, ToyConfig(2), Builder(2))
    store.get_or_build("toy", 1, ToyConfig(1), Builder(1))  # reuse does not make it latest
    assert load_stage("toy", tmp_path).num_rows == 2
    assert store.resolve("toy").version == new.version
    assert load_stage("toy", tmp_path, version=old.version[:6]).num_rows == 1
    monkeypatch.setenv("SEQPATCH_DATA", str(tmp_path))
    assert load_stage("toy", version=old.version).num_rows == 1


def test_missing_stage_error_says_how_to_build_it(tmp_path: Path) -> None:
    """The store names the command; the CLI (which knows the stages, the store does not)
    completes it with the stage's required options."""
    from typer.testing import CliRunner

    from seqpatch.cli import app

    with pytest.raises(StageNotFoundError) as err:
        load_stage("programs", tmp_path)
    message = str(err.value)
    assert "'programs'" in message and str(tmp_path) in message
    assert f"`seqpatch build programs --data-dir {tmp_path}`" in message
    result = CliRunner().invoke(app, ["build", "activations", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert (
        f"seqpatch build pairs --model builtin --seq-len 8 --divergence-index all "
        f"--n-pairs 2000 --data-dir {tmp_path}" in " ".join(result.output.split())
    )


def test_missing_version_error_lists_stored_versions(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ref = store.get_or_build("toy", 1, ToyConfig(1), Builder(1))
    with pytest.raises(StageNotFoundError, match=f"'nope' is not stored.*{ref.version}"):
        store.load("toy", "nope")


def test_corrupt_provenance_is_a_clear_error(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ref = store.get_or_build("toy", 1, ToyConfig(1), Builder(1))
    (ref.path / PROVENANCE_FILE).write_text("{not json")
    with pytest.raises(
        StoreError, match=rf"toy/{ref.version}.*damaged.*unreadable.*verify toy --clean"
    ):
        store.load("toy")


def test_stage_names_are_plain_folder_names(tmp_path: Path) -> None:
    for bad in ("../escape", "Programs", "", "a/b"):
        with pytest.raises(StoreError, match="must be lowercase letters"):
            Store(tmp_path).get_or_build(bad, 1, ToyConfig(1), Builder(1))
    assert list(tmp_path.iterdir()) == []


def test_build_stage_unknown_stage(tmp_path: Path) -> None:
    with pytest.raises(seqpatch.errors.SeqpatchError, match="unknown stage 'nope'"):
        build_stage("nope", ToyConfig(1), data_dir=tmp_path)
    assert not tmp_path.joinpath("nope").exists()
