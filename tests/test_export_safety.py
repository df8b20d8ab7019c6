"""Export, push and import that cannot destroy or leak (issue 13 item 1, issue 12 items 5-6).

Each test reproduces one failure of the adversarial probe: an export into the data dir or into a
folder of someone else's files, a token in an exported file, a push that called the Hub before
its local checks, an import of a malformed folder, an export whose ancestors were not the ones
the stage was built from.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from seqpatch import hub
from seqpatch.hub import HubError, StageSnapshot, export_snapshot, export_stage, push_snapshot
from seqpatch.stages.base import Built
from seqpatch.store import DamagedVersionError, Store
from tests.test_hub import (
    TOKEN,
    FakeHub,
    fake_hub,  # noqa: F401  (fixture)
    load_exported,
    pairs_snapshot,
    programs_snapshot,
)


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A store with a real programs stage (two versions)."""
    from seqpatch.executor import execute as build_stage
    from seqpatch.stages.programs import ProgramsConfig

    data = tmp_path / "data"
    build_stage("programs", ProgramsConfig("binding", (1, 2, 3), 5, 0), data_dir=data)
    build_stage("programs", ProgramsConfig("binding", (1, 2, 3), 5, 1), data_dir=data)
    return data


# ---------------------------------------------------------------------------------------------
# Export never destroys


@pytest.mark.parametrize("where", [".", "programs", "programs/sub"])
def test_export_into_the_data_dir_is_refused_and_changes_nothing(
    data_dir: Path, where: str
) -> None:
    before = _tree(data_dir)
    with pytest.raises(HubError, match="inside the data dir"):
        export_stage("programs", data_dir / where, data_dir=data_dir)
    assert _tree(data_dir) == before
    assert len(Store(data_dir).versions("programs")) == 2


def test_export_into_another_data_dir_is_refused_even_with_force(
    data_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    export_stage("programs", tmp_path / "ok", data_dir=data_dir)  # a normal export works
    Store(other).get_or_build("programs", 1, {"a": 1}, lambda: Dataset.from_dict({"x": [1]}))
    before = _tree(other)
    with pytest.raises(HubError, match="holds a seqpatch data dir"):
        export_stage("programs", other, data_dir=data_dir, force=True)
    assert _tree(other) == before


def test_export_refuses_a_folder_of_other_files_and_force_deletes_none(
    data_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "P"
    (folder / "programs").mkdir(parents=True)
    (folder / "programs" / "important.txt").write_text("notes")
    (folder / "README.md").write_text("# Mine\n")
    with pytest.raises(HubError, match=r"is not a seqpatch export.*--force"):
        export_stage("programs", folder, data_dir=data_dir)
    assert _tree(folder) == {"programs/important.txt": b"notes", "README.md": b"# Mine\n"}

    exported = export_stage("programs", folder, data_dir=data_dir, force=True)
    assert (folder / "programs" / "important.txt").read_text() == "notes"
    assert (folder / "README.before-seqpatch.md").read_text() == "# Mine\n"
    assert load_exported(folder, "programs", tmp_path / "c").num_rows == 15
    assert len(exported.notes) == 2
    # a later export into the (now seqpatch) folder needs no force and still keeps the file
    export_stage(
        "programs",
        folder,
        version=Store(data_dir).versions("programs")[0].version,
        data_dir=data_dir,
    )
    assert (folder / "programs" / "important.txt").read_text() == "notes"
    assert not list(folder.glob(".seqpatch-export-*"))


def test_force_refuses_to_replace_a_file_it_did_not_write(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "P"
    (folder / "programs").mkdir(parents=True)
    shard = folder / "programs" / "train-00000-of-00001.parquet"
    shard.write_bytes(b"someone else's parquet")
    with pytest.raises(HubError, match="was not written by seqpatch"):
        export_stage("programs", folder, data_dir=data_dir, force=True)
    assert _tree(folder) == {"programs/train-00000-of-00001.parquet": b"someone else's parquet"}


@pytest.mark.parametrize("target", ["FILE", "FILE/sub"])
def test_export_to_a_file_is_one_clear_error(data_dir: Path, tmp_path: Path, target: str) -> None:
    (tmp_path / "FILE").write_text("x")
    with pytest.raises(HubError, match="is a file"):
        export_stage("programs", tmp_path / target, data_dir=data_dir)
    assert (tmp_path / "FILE").read_text() == "x"


@pytest.mark.parametrize("size", ["abc", "0", 0])
def test_bad_max_shard_size_is_one_clear_error(tmp_path: Path, size: str | int) -> None:
    with pytest.raises(HubError, match="max_shard_size"):
        export_snapshot(programs_snapshot(), tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists()


def test_a_failed_export_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise hub.CardError("boom")

    export_snapshot(programs_snapshot(), tmp_path / "study")
    before = _tree(tmp_path / "study")
    monkeypatch.setattr(hub.files, "build_card", broken)
    with pytest.raises(HubError, match="boom"):
        export_snapshot(pairs_snapshot(), tmp_path / "fresh")
    with pytest.raises(HubError, match="boom"):
        export_snapshot(pairs_snapshot(), tmp_path / "study")
    assert not (tmp_path / "fresh").exists()
    assert _tree(tmp_path / "study") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]


# ---------------------------------------------------------------------------------------------
# The token is never written, and push checks before it calls the Hub


def _leaky(where: str) -> StageSnapshot:
    rows = {"pair_id": ["a", "b"], "tokens": [["x", "y"], ["z", "w"]], "model": ["m", "m"]}
    provenance = dict(pairs_snapshot(2).provenance)
    if where == "string column":
        rows["model"] = ["m", f"/models/{TOKEN}/llama"]
    elif where == "list column":
        rows["tokens"] = [["x", "y"], ["z", TOKEN]]
    else:
        provenance["model"] = {"id": f"/models/{TOKEN}", "revision": None}
    return StageSnapshot("pairs", Dataset.from_dict(rows), provenance)


@pytest.mark.parametrize("where", ["string column", "list column", "provenance"])
def test_export_refuses_to_write_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(HubError, match="would contain your Hugging Face token") as info:
        export_snapshot(_leaky(where), tmp_path / "X")
    assert TOKEN not in str(info.value)
    assert not tmp_path.joinpath("X").exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


@pytest.mark.parametrize("where", ["string column", "list column", "provenance"])
def test_push_makes_no_hub_call_when_a_local_check_fails(
    fake_hub: Path,  # noqa: F811
    where: str,
) -> None:
    with pytest.raises(HubError, match="would contain your Hugging Face token"):
        push_snapshot(_leaky(where), "alice/study", token=TOKEN)
    assert FakeHub.calls == []


def test_push_renders_the_card_before_calling_the_hub(
    fake_hub: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise hub.CardError("template broke")

    monkeypatch.setattr(hub.files, "build_card", broken)
    with pytest.raises(HubError, match="template broke"):
        push_snapshot(pairs_snapshot(), "alice/study", token=TOKEN)
    assert FakeHub.calls == []


# ---------------------------------------------------------------------------------------------
# Import validates what it registers


def _damage(folder: Path, how: str) -> None:
    path = folder / "programs" / "seqpatch.json"
    provenance = json.loads(path.read_text())
    if how == "garbage":
        path.write_text("{not json")
    elif how == "list":
        path.write_text("[]")
    elif how == "no parquet":
        for shard in (folder / "programs").glob("*.parquet"):
            shard.unlink()
    elif how == "missing keys":
        path.write_text(json.dumps({"stage": "programs"}))
    elif how.startswith("schema "):
        path.write_text(json.dumps({**provenance, "schema_version": json.loads(how[7:])}))
    elif how == "bad config":
        config = {**provenance["config"], "n_per_len": -1}
        path.write_text(json.dumps({**provenance, "config": config}))
    elif how == "unknown config key":
        path.write_text(json.dumps({**provenance, "config": {**provenance["config"], "x": 1}}))
    elif how == "parents not a list":
        path.write_text(json.dumps({**provenance, "parents": "programs"}))
    elif how == "row count":
        path.write_text(json.dumps({**provenance, "row_count": 3}))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("garbage", "is not valid JSON"),
        ("list", "must be a JSON object, found list"),
        ("no parquet", "no train-\\*.parquet files"),
        ("missing keys", "lacks version, schema_version, config, row_count"),
        ('schema "abc"', "schema_version must be a non-negative integer"),
        ("schema null", "schema_version must be a non-negative integer"),
        ("schema 99", "schema_version 99 is not the programs schema"),
        ("bad config", "config is not valid for programs: n_per_len"),
        ("unknown config key", "does not know: \\['x'\\]"),
        ("parents not a list", "parents must be a list"),
        ("row count", "incomplete or mixed"),
    ],
)
def test_import_of_a_malformed_export_is_one_clear_error(
    data_dir: Path, tmp_path: Path, how: str, message: str
) -> None:
    folder = tmp_path / "study"
    export_stage("programs", folder, data_dir=data_dir)
    _damage(folder, how)
    with pytest.raises(HubError, match=message) as info:
        hub.import_stage(folder, "programs", tmp_path / "other", cache_dir=tmp_path / "c")
    assert len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "other" / "programs").exists() or not Store(tmp_path / "other").versions(
        "programs"
    )


# ---------------------------------------------------------------------------------------------
# A consistent lineage, with the heatmap's index


def _child(store: Store, stage: str, parent: object, tag: int, **artifacts: bytes | str) -> object:
    rows = Dataset.from_dict({"pair_id": [f"{stage}{i}" for i in range(3)], "v": [tag] * 3})
    return store.get_or_build(
        stage, 1, {"tag": tag}, lambda: Built(rows, artifacts=artifacts), parents=[parent]
    )


def test_export_follows_the_stages_own_parents_not_the_latest(
    data_dir: Path, tmp_path: Path
) -> None:
    store = Store(data_dir)
    old_programs, new_programs = store.versions("programs")
    pairs_v1 = _child(store, "pairs", old_programs, 1)
    heatmap = np.zeros((1, 1, 3, 2, 4))
    index = {
        "metrics": {"prob_delta": {"file": "heatmap_prob_delta.npy", "meaning": "Δ P(B)"}},
        "axes": ["site", "divergence_index", "statistic", "layer", "position"],
        "sites": ["resid_pre"],
        "divergence_indices": [2],
        "statistic": ["mean", "std", "count"],
        "layers": [0, 1],
        "labels": {"2": ["a", "b", "c", "d"]},
    }
    buffer = tmp_path / "h.npy"
    np.save(buffer, heatmap)
    patching = _child(
        store,
        "patching",
        pairs_v1,
        1,
        **{"heatmap_prob_delta.npy": buffer.read_bytes(), "heatmap.json": json.dumps(index)},
    )
    _child(store, "pairs", new_programs, 2)  # a newer pairs, not patching's
    assert store.resolve("pairs").version != pairs_v1.version

    folder = tmp_path / "study"
    exported = export_stage("patching", folder, data_dir=data_dir)
    assert dict(exported.versions) == {
        "programs": old_programs.version,
        "pairs": pairs_v1.version,
        "patching": patching.version,
    }
    assert pairs_v1.version in exported.summary() and old_programs.version in exported.summary()
    for stage, ref in (("pairs", pairs_v1), ("programs", old_programs)):
        published = json.loads((folder / stage / "seqpatch.json").read_text())
        assert published["version"] == ref.version
    text = (folder / "README.md").read_text()
    assert "Lineage mismatch" not in text
    assert (folder / "patching" / "heatmap.json").is_file()
    assert np.load(folder / "patching" / "heatmap_prob_delta.npy").shape == (1, 1, 3, 2, 4)
    assert "| `patching/heatmap_prob_delta.npy` | prob_delta: Δ P(B) | 1 × 1 × 3 × 2 × 4 |" in text
    assert "| `layer` | 0, 1 |" in text and "| `statistic` | mean, std, count |" in text

    alone = export_stage("patching", tmp_path / "alone", data_dir=data_dir, lineage=False)
    assert list(alone.versions) == ["patching"]


def test_push_stage_publishes_the_lineage_in_one_commit(
    data_dir: Path,
    fake_hub: Path,  # noqa: F811
) -> None:
    store = Store(data_dir)
    pairs = _child(store, "pairs", store.versions("programs")[0], 1)
    hub.push_stage("pairs", "alice/study", data_dir=data_dir, token=TOKEN)
    (commit,) = FakeHub.instances[-1].commits
    paths = {op.path_in_repo for op in commit}
    assert {"programs/seqpatch.json", "pairs/seqpatch.json", "README.md"} <= paths
    published = json.loads((fake_hub / "programs" / "seqpatch.json").read_text())
    assert published["version"] == pairs.provenance["parents"][0]["version"]


def test_a_garbage_heatmap_is_not_exported(data_dir: Path, tmp_path: Path) -> None:
    store = Store(data_dir)
    ref = _child(store, "patching", store.versions("programs")[0], 1, **{"heatmap.npy": b"1234"})
    (ref.path / "heatmap.npy").write_bytes(b"abcd")  # same size, other bytes
    with pytest.raises(DamagedVersionError, match=f"patching/{ref.version}.*heatmap.npy.*SHA-256"):
        export_stage("patching", tmp_path / "study", data_dir=data_dir)
    assert not (tmp_path / "study").exists()


# ---------------------------------------------------------------------------------------------
# Imports stay inside their folder, and their rows are what their config says (issue 27 item 4)


def _front_matter_path(folder: Path, new: str) -> None:
    readme = folder / "README.md"
    text = readme.read_text()
    assert "path: programs/train-*.parquet" in text
    readme.write_text(text.replace("path: programs/train-*.parquet", f"path: {new}"))


def _hostile(folder: Path, how: str, outside: Path) -> None:
    stage_dir = folder / "programs"
    (shard,) = stage_dir.glob("train-*.parquet")
    path = stage_dir / "seqpatch.json"
    provenance = json.loads(path.read_text())
    outside.mkdir(exist_ok=True)
    shutil.copy(shard, outside / shard.name)
    if how == "data_files ../outside":
        _front_matter_path(folder, f"../{outside.name}/train-*.parquet")
    elif how == "data_files programs/../../outside":
        _front_matter_path(folder, f"programs/../../{outside.name}/train-*.parquet")
    elif how == "data_files absolute":
        _front_matter_path(folder, f"{outside}/train-*.parquet")
    elif how == "data file symlinked outside":
        shard.unlink()
        shard.symlink_to(outside / shard.name)
    elif how == "parquet symlinked to a system file":
        shard.unlink()
        shard.symlink_to("/etc/passwd")
    elif how == "stage folder symlinked outside":
        shutil.copy(path, outside / "seqpatch.json")
        shutil.rmtree(stage_dir)
        stage_dir.symlink_to(outside, target_is_directory=True)
    elif how == "parent ../../../x":
        parents = [{"stage": "programs", "version": "../../../x", "fingerprint": None}]
        path.write_text(json.dumps({**provenance, "parents": parents}))
    elif how == "nested brackets":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "another stage's parquet":
        rows = {"pair_id": [f"p{i}" for i in range(provenance["row_count"])]}
        Dataset.from_dict(rows).to_parquet(shard)
    elif how == "not parquet":
        shard.write_bytes(b"PAR1 this is not a parquet file PAR1")
    elif how == "n_per_len 7, 5 rows per length":
        path.write_text(
            json.dumps({**provenance, "config": {**provenance["config"], "n_per_len": 7}})
        )
    elif how == "family arithmetic, binding rows":
        config = {**provenance["config"], "family": "arithmetic"}
        path.write_text(json.dumps({**provenance, "config": config}))
    elif how == "seed 7, rows of another seed":
        path.write_text(json.dumps({**provenance, "config": {**provenance["config"], "seed": 7}}))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("data_files ../outside", "outside the stage's folder"),
        ("data_files programs/../../outside", "outside the stage's folder"),
        ("data_files absolute", "outside the stage's folder"),
        ("data file symlinked outside", "leads outside"),
        ("parquet symlinked to a system file", "leads outside"),
        ("stage folder symlinked outside", "leads outside"),
        ("parent ../../../x", "version '../../../x', not a name"),
        ("nested brackets", "nested too deeply"),
        ("another stage's parquet", "do not load as one dataset \\(Couldn't cast"),
        ("not parquet", "do not load as one dataset"),
        ("n_per_len 7, 5 rows per length", "rows per length"),
        ("family arithmetic, binding rows", "config family 'arithmetic', rows of \\['binding'\\]"),
        ("seed 7, rows of another seed", "is not the one config"),
    ],
)
def test_a_hostile_import_is_one_line_and_registers_nothing(
    data_dir: Path, tmp_path: Path, how: str, message: str
) -> None:
    from typer.testing import CliRunner

    from seqpatch.cli import app
    from tests.cli_output import error_line

    folder = tmp_path / "study"
    export_stage("programs", folder, data_dir=data_dir)
    _hostile(folder, how, tmp_path / "outside")
    with pytest.raises(HubError, match=message) as info:
        hub.import_stage(folder, "programs", tmp_path / "other", cache_dir=tmp_path / "c")
    assert len(str(info.value).splitlines()) == 1
    result = CliRunner().invoke(
        app, ["import", "programs", "--from", str(folder), "--data-dir", str(tmp_path / "other")]
    )
    assert result.exit_code == 2, result.output
    assert message.replace("\\", "") in error_line(result.stderr) or how == "nested brackets"
    assert not Store(tmp_path / "other").versions("programs")


def test_an_untouched_export_still_imports(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    exported = export_stage("programs", folder, data_dir=data_dir)
    ref = hub.import_stage(folder, "programs", tmp_path / "other", cache_dir=tmp_path / "c")
    assert ref.version == exported.versions["programs"]


# ---------------------------------------------------------------------------------------------
# Export never replaces a link, and a folder it cannot use is one line (issue 27 items 5-6)


def _cli(*args: object):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from seqpatch.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("link", ["programs", "README.md", "programs/seqpatch.json"])
def test_export_force_never_replaces_a_symlink(data_dir: Path, tmp_path: Path, link: str) -> None:
    from tests.cli_output import error_line

    study, elsewhere = tmp_path / "study", tmp_path / "elsewhere"
    export_stage("programs", study, data_dir=data_dir)  # a seqpatch export: its files are ours
    elsewhere.mkdir()
    target = elsewhere / Path(link).name
    os_path = study / link
    shutil.move(os_path, target)
    if target.is_dir():
        (target / "mine.txt").write_text("the user's\n")
    os_path.symlink_to(target)
    before, outside = _tree(study), _tree(elsewhere)
    result = _cli("export", "programs", "--to", study, "--force", "--data-dir", data_dir)
    assert result.exit_code == 2, result.output
    assert "is a symlink" in error_line(result.stderr)
    assert os_path.is_symlink() and os_path.resolve() == target.resolve()
    assert _tree(study) == before and _tree(elsewhere) == outside
    assert sorted(p.name for p in study.iterdir() if p.name.startswith(".")) == []


def test_export_into_an_unreadable_subfolder_is_one_line_naming_it(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.cli_output import error_line

    study = tmp_path / "study"
    (study / "private").mkdir(parents=True)
    (study / "notes.txt").write_text("mine\n")
    real_iterdir = Path.iterdir

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        if self.name == "private":  # what a folder of mode 000 does to a non-root user
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    result = _cli("export", "programs", "--to", study, "--force", "--data-dir", data_dir)
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr)
    assert str(study / "private") in line and "Permission denied" in line


def test_export_to_an_unwritable_folder_is_one_line_naming_it(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.cli_output import error_line

    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args: object, dir: object = None, **kwargs: object) -> str:
        if dir is not None and Path(str(dir)) == locked:  # a folder of mode 555
            raise PermissionError(13, "Permission denied", str(locked))
        return real_mkdtemp(*args, dir=dir, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    result = _cli("export", "programs", "--to", locked / "study", "--data-dir", data_dir)
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr)
    assert str(locked) in line and "Permission denied" in line
    assert list(locked.iterdir()) == []
