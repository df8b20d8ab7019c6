"""Options defined once, execution settings apart from the version, merge, the stage contract.

The merge test is the issue's reproduction: a ``head_z --axes layer,head`` build split into two
``--shard i/2`` jobs once merged into the *default* grid's version, built from scratch.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from seqpatch import pipeline
from seqpatch.cli import app
from seqpatch.options import RuntimeSettings, csv, option
from seqpatch.stages.base import ModelCache
from seqpatch.store import Store
from tests.cli_output import error_line, snapshot

runner = CliRunner()
N_PAIRS = 10


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("options")
    pipeline.build_pairs("builtin", 4, "1,3", N_PAIRS, data_dir=data_dir, progress=False)
    return data_dir


def fresh(pairs_dir: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(pairs_dir / "pairs", tmp_path / "data" / "pairs")
    return tmp_path / "data"


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# Execution settings: not in the version, recorded under runtime


def test_shard_size_and_engine_path_do_not_change_the_version(pairs_dir: Path, tmp_path) -> None:
    models = ModelCache()
    built = {}
    for name, settings in {
        "small shards": dict(shard_size=3),
        "one shard, full forwards": dict(shard_size=50, engine="full"),
    }.items():
        data_dir = fresh(pairs_dir, tmp_path / name)
        ref = pipeline.build_patching(
            ("resid_pre",), activations="none", data_dir=data_dir, models=models, progress=False,
            device="cpu", **settings,
        )  # fmt: skip
        built[name] = ref
        runtime = ref.provenance["runtime"]
        assert runtime["shard_size"] == settings["shard_size"]
        assert runtime["device"] == "cpu"
        assert runtime["engine"] == settings.get("engine", "auto")
        assert "shard_size" not in ref.provenance["config"]
    small, whole = built.values()
    assert small.version == whole.version
    assert small.provenance["extra"]["n_shards"] == 4 and whole.provenance["extra"]["n_shards"] == 1
    a, b = (np.asarray(Store(r.path.parents[1]).load_ref(r)["logits"]) for r in (small, whole))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_auto_device_is_resolved_and_recorded() -> None:
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and torch.backends.mps.is_available():
        expected = "mps"
    assert RuntimeSettings().resolved_device() == expected
    assert RuntimeSettings(device="cpu").record(7) | {"device": "cpu", "shard_size": 7} == (
        RuntimeSettings(device="cpu").record(7)
    )


def test_attribution_is_a_config_method_and_engine_paths_are_runtime() -> None:
    from seqpatch.errors import SeqpatchError
    from seqpatch.stages.patching import PatchingConfig

    assert PatchingConfig(method="attribution") != PatchingConfig()
    with pytest.raises(SeqpatchError, match=r"unknown method 'full'.*engine path is --engine"):
        PatchingConfig(method="full")
    with pytest.raises(SeqpatchError, match="unknown --engine 'attribution'"):
        RuntimeSettings(engine="attribution")


# ---------------------------------------------------------------------------------------------
# seqpatch merge STAGE


HEADS = ["--sites", "head_z", "--axes", "layer,head", "--activations", "none", "--shard-size", "5"]


def test_merging_two_jobs_gives_the_version_and_rows_of_one_build(pairs_dir, tmp_path) -> None:
    jobs = fresh(pairs_dir, tmp_path / "jobs")
    for index in (0, 1):
        result = invoke("build", "patching", *HEADS, "--shard", f"{index}/2", "--data-dir", jobs)
        assert result.exit_code == 0, result.output
        assert "run `seqpatch merge patching`" in result.output
    assert not Store(jobs).versions("patching")
    merged = invoke("merge", "patching", "--data-dir", jobs)
    assert merged.exit_code == 0, merged.output

    one = fresh(pairs_dir, tmp_path / "one")
    whole = invoke("build", "patching", *HEADS, "--data-dir", one)
    assert whole.exit_code == 0, whole.output
    (merged_ref,) = Store(jobs).versions("patching")
    (one_ref,) = Store(one).versions("patching")
    assert merged_ref.version == one_ref.version
    assert merged_ref.provenance["config"]["axes"] == ["layer", "head"]
    assert merged_ref.provenance["extra"]["n_shards"] == 2
    rows, expected = Store(jobs).load_ref(merged_ref), Store(one).load_ref(one_ref)
    assert rows["pair_id"] == expected["pair_id"]
    np.testing.assert_array_equal(np.asarray(rows["logits"]), np.asarray(expected["logits"]))

    before = snapshot(jobs)
    again = invoke("merge", "patching", "--data-dir", jobs)  # nothing left to merge
    assert again.exit_code == 2
    assert "no shards of patching to merge" in error_line(again.stderr)
    assert snapshot(jobs) == before


def test_merge_refuses_an_ambiguous_or_unfinished_work_folder(pairs_dir, tmp_path) -> None:
    data_dir = fresh(pairs_dir, tmp_path)
    for axes in ("layer,head", "layer"):
        args = ["--sites", "head_z", "--axes", axes, "--activations", "none", "--shard-size", "5"]
        result = invoke("build", "patching", *args, "--shard", "0/2", "--data-dir", data_dir)
        assert result.exit_code == 0, result.output
    before = snapshot(data_dir)
    ambiguous = invoke("merge", "patching", "--data-dir", data_dir)
    assert ambiguous.exit_code == 2
    assert "shards of 2 patching versions" in error_line(ambiguous.stderr)
    (version, _, missing), _ = Store(data_dir).unfinished("patching")
    assert missing == [1]
    unfinished = invoke("merge", "patching", "--version", version, "--data-dir", data_dir)
    assert unfinished.exit_code == 2
    assert "shard(s) 1 of 2 are not built yet" in error_line(unfinished.stderr)
    assert snapshot(data_dir) == before  # nothing built, nothing committed
    assert not Store(data_dir).versions("patching")


# ---------------------------------------------------------------------------------------------
# Adding an option is one edit: the field is the CLI flag and the build_* keyword


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    sites: tuple[str, ...] = option(("a",), "Sites, comma-separated.", parse=csv)
    n: int = option(3, "How many.", min=1)
    label: str | None = option(None, "A label [default: none].", show_default=False)


def test_a_config_field_is_a_command_line_option() -> None:
    from seqpatch.cli._common import SeqpatchGroup
    from seqpatch.cli._options import command

    seen = []
    toy = typer.Typer(cls=SeqpatchGroup)
    command(
        toy,
        "toy",
        ToyConfig,
        lambda cfg, runtime: seen.append((cfg, runtime)),
        doc="A toy.",
        epilog="",
        runtime=("shard_size", "device"),
    )
    toy.command("other")(lambda: None)  # a group, so `toy` is a sub-command
    result = runner.invoke(toy, ["toy", "--sites", "x, y", "--n", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == (ToyConfig(("x", "y"), 5), RuntimeSettings(device="cpu"))
    assert runner.invoke(toy, ["toy"]).exit_code == 0
    assert seen[-1][0] == ToyConfig()
    bad = runner.invoke(toy, ["toy", "--n", "0"])
    assert bad.exit_code == 2 and "'--n'" in bad.output
    help_text = runner.invoke(toy, ["toy", "--help"]).output
    assert "How many." in help_text and "--shard-size" in help_text and "--label" in help_text

    # raw: the options reach the command as given (pairs resolves some before its config)
    command(toy, "raw", ToyConfig, lambda cfg, rt: seen.append(cfg), doc="", epilog="", raw=True)
    assert runner.invoke(toy, ["raw", "--sites", "x"]).exit_code == 0
    assert seen[-1] == {"sites": ("x",), "n": 3, "label": None}


def test_build_functions_take_every_config_field_and_runtime_setting() -> None:
    from seqpatch.errors import SeqpatchError
    from seqpatch.stages.patching import PatchingConfig

    cfg, runtime = pipeline.stage_options(
        PatchingConfig, [("head_z",)], {"axes": ("layer", "head"), "shard_size": 5}, None
    )
    assert cfg == PatchingConfig(sites=("head_z",), axes=("layer", "head"))
    assert runtime == RuntimeSettings(shard_size=5)
    with pytest.raises(SeqpatchError, match="has no option 'axis'"):
        pipeline.stage_options(PatchingConfig, [], {"axis": ("layer",)}, None)


# ---------------------------------------------------------------------------------------------
# The stage contract, checked when a stage module is loaded


TOY_STAGE = """
from dataclasses import dataclass

STAGE = "toy"
SCHEMA_VERSION = 1
PARENTS = ()


@dataclass(frozen=True)
class CONFIG:
    n: int = 1


def model_specs(cfg, parents):
    return ()


def prepare(inputs, cfg):
    pass


def build(inputs, cfg):
    raise AssertionError("never built in this test")


def {artifacts}(rows, cfg, inputs):
    return {{}}
"""


@pytest.mark.parametrize(
    ("name", "hook", "message"),
    [
        ("good", "artifacts", None),
        ("misspelled", "artefacts", "stage module toy_misspelled has no 'artifacts'"),
        (
            "misshapen",
            "artifacts(rows, cfg):\n    pass\n\n\ndef unused",
            "toy_misshapen: artifacts() must take 3 arguments",
        ),
    ],
)
def test_a_stage_with_a_misspelled_or_missing_hook_fails_when_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, hook: str, message: str | None
) -> None:
    from seqpatch.stages import STAGES, StageContractError, StageInfo, get_stage

    name = f"toy_{name}"
    (tmp_path / f"{name}.py").write_text(TOY_STAGE.format(artifacts=hook))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(STAGES, "toy", StageInfo("toy", name, "a toy stage"))
    monkeypatch.delitem(sys.modules, name, raising=False)
    if message is None:
        assert get_stage("toy").STAGE == "toy"
        return
    with pytest.raises(StageContractError) as err:
        get_stage("toy")
    assert message in str(err.value) and "\n" not in str(err.value)
