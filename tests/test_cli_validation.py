"""Bad options and interruptions: one line on stderr, exit 2 (130 for Ctrl-C), no work done.

Each case here once crashed with a traceback, ran for minutes before failing, or printed a
misleading hint (the store issue's table of bad inputs). Every check runs while the options
are parsed, so these tests need no model and no stored stage unless they say so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from seqpatch.cli import app
from seqpatch.cli._common import INTERRUPTED_MESSAGE, MAX_SEQ_LEN
from tests.cli_output import error_line, snapshot

runner = CliRunner()


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def user_error(*args: str | Path) -> str:
    """Run a command that must fail as a user error; its one error line."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    return error_line(result.stderr)


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("keep me\n")
    return path


# ---------------------------------------------------------------------------------------------
# Options checked while parsing: nothing is read or written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plot", "traces", "--metric", "foo"], "unknown --metric 'foo'; use one of normalised"),
        (["plot", "heatmap", "--metric", "foo"], "unknown --metric 'foo'"),
        (["build", "activations", "--layers", "0,0"], "repeats layer 0; give each layer once"),
        (["build", "patching", "--layers", "1,0,1"], "repeats layer 1"),
        (["merge", "patching"], "no shards of patching to merge in"),
        (["merge", "programs"], "stage 'programs' is not built in shards"),
        (["build", "patching", "--method", "full"], "(the engine path is --engine)"),
        (["build", "patching", "--engine", "attribution"], "unknown --engine 'attribution'"),
        (["build", "tracing", "--device", "tpu"], "unknown --device 'tpu'; use one of auto"),
        (["build", "das", "--ks", "1,x"], "cannot read --ks '1,x'"),
        (["build", "pairs", "--seed", "-1"], "seed must be an integer in 0..2**63-1, got -1"),
        (["build", "pairs", "--seed", str(2**64)], f"got {2**64}"),
        (["run", "--seed", "-1"], "seed must be an integer"),
        (["build", "pairs", "--seq-len", "1000000"], "'--seq-len'"),
        (["build", "pairs", "--n-pairs", "0"], "'--n-pairs'"),
        (["build", "pairs", "--n-pairs", "abc"], "'--n-pairs'"),
        (["build", "patching", "--shard-size", "0"], "'--shard-size'"),
        (["export", "programs", "--to", "x", "--max-shard-size", "abc"], "--max-shard-size 'abc'"),
        (["export", "programs", "--to", "x", "--max-shard-size", "0"], "--max-shard-size '0'"),
        (["push", "programs", "--repo-id", "a/b", "--max-shard-size", "0MB"], "positive size"),
        (["export", "foo", "--to", "x"], "unknown stage 'foo'; known stages: programs, benchmark"),
        (["import", "foo", "--from", "x"], "unknown stage 'foo'"),
        (["choose", "--min-accuracy", "2"], "'--min-accuracy'"),
        (["--threads", "0", "list"], "'--threads'"),  # the root's own option
        (["build", "programs", "--bogus"], "No such option: --bogus"),
    ],
)
def test_bad_option_is_one_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    line = user_error(*args, "--data-dir", tmp_path / "data")
    assert message in line
    assert "seqpatch build foo" not in line
    assert snapshot(tmp_path) == []  # no data dir, no export folder


@pytest.mark.parametrize(
    "args",
    [
        ["--n-pairs", "0"],
        ["--max-seq-len", "0"],
        ["--max-seq-len", str(MAX_SEQ_LEN + 1)],
        ["--min-accuracy", "2"],
        ["--min-accuracy", "-0.1"],
    ],
)
def test_run_checks_every_option_before_building_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    def no_work(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the pipeline started")

    monkeypatch.setattr("seqpatch.pipeline.run", no_work)
    line = user_error("run", *args, "--data-dir", tmp_path / "data")
    assert args[0] in line
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "args",
    [["--threads", "0"], ["--steps", "1", "--lr", "-1"], ["--lr", "0"], ["--batch-size", "0"]],
)
def test_organism_train_checks_options_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    def no_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("training started")

    monkeypatch.setattr("seqpatch.organism.train_organism", no_training)
    line = user_error("organism", "train", "--out", tmp_path / "out", *args)
    assert args[-2] in line
    assert not (tmp_path / "out").exists()


def test_seq_lens_above_the_bound_are_refused_at_once(tmp_path: Path) -> None:
    line = user_error(
        "build", "programs", "--seq-lens", "1000000", "--n-per-len", "1", "--data-dir", tmp_path
    )
    assert f"at most {MAX_SEQ_LEN} statements" in line and "1000000" in line
    assert snapshot(tmp_path) == []
    assert f"at most {MAX_SEQ_LEN}" in invoke("build", "programs", "--help").stdout


# ---------------------------------------------------------------------------------------------
# Folders: the data dir, --out and --to


def test_empty_data_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = user_error("build", "programs", "--n-per-len", "1", "--data-dir", "")
    assert "--data-dir is empty" in line
    assert snapshot(tmp_path) == []  # nothing written into the current folder


@pytest.mark.parametrize("command", [["list"], ["build", "programs"], ["plot", "heatmap"]])
def test_data_dir_that_is_a_file_is_refused(a_file: Path, command: list[str]) -> None:
    line = user_error(*command, "--data-dir", a_file)
    assert f"data dir {a_file} is a file" in line
    assert a_file.read_text() == "keep me\n"


def test_list_refuses_a_file_from_the_environment(
    a_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQPATCH_DATA", str(a_file))
    assert "is a file" in user_error("list")


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["plot", "heatmap"], "--out"),
        (["plot", "accuracy"], "--out"),
        (["plot", "traces"], "--out"),
        (["export", "programs"], "--to"),
    ],
)
@pytest.mark.parametrize("below", [False, True])
def test_output_folder_that_is_a_file_is_refused(
    tmp_path: Path, a_file: Path, command: list[str], option: str, below: bool
) -> None:
    target = a_file / "sub" if below else a_file
    line = user_error(*command, option, target, "--data-dir", tmp_path / "data")
    assert f"{option} {target}" in line
    assert ("inside" in line) == below and "give a folder" in line
    assert a_file.read_text() == "keep me\n"
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def test_interrupt_exits_130_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr("seqpatch.executor.execute", interrupted)
    result = invoke("build", "programs", "--data-dir", tmp_path)
    assert result.exit_code == 130
    assert result.stdout == ""
    assert result.stderr == INTERRUPTED_MESSAGE + "\n"


def test_a_real_sigint_exits_130_with_one_line(tmp_path: Path) -> None:
    """The process signals itself mid-command: Python's own SIGINT handling, no timing."""
    code = (
        "import os, signal, sys\n"
        "import seqpatch.executor\n"
        "def build(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "seqpatch.executor.execute = build\n"
        "from seqpatch.cli import app\n"
        "sys.argv = ['seqpatch', 'build', 'programs', '--data-dir', sys.argv[1]]\n"
        "app()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 128 + signal.SIGINT, out.stderr
    assert out.stderr == "interrupted; rerun the same command to resume\n"


# ---------------------------------------------------------------------------------------------
# Messages that used to mislead


def test_custom_code_error_names_no_missing_option(tmp_path: Path) -> None:
    from seqpatch.errors import SeqpatchError
    from seqpatch.models import load_model

    folder = tmp_path / "custom"
    folder.mkdir()
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.X"}
    (folder / "config.json").write_text(
        json.dumps({"model_type": "custom_thing", "auto_map": auto_map})
    )
    (folder / "configuration_x.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(SeqpatchError) as err:
        load_model(str(folder))
    message = str(err.value)
    assert "custom code" in message and "trust_remote_code=True" in message
    assert "--trust-remote-code" not in message  # no such option exists
    assert "--trust-remote-code" not in invoke("build", "benchmark", "--help").stdout


def test_empty_version_is_called_empty(tmp_path: Path) -> None:
    built = invoke(
        "build", "programs", "--seq-lens", "2", "--n-per-len", "1", "--data-dir", tmp_path
    )
    assert built.exit_code == 0, built.output
    line = user_error("export", "programs", "--version", "", "--to", tmp_path / "x",
                      "--data-dir", tmp_path)  # fmt: skip
    assert "empty" in line and "several" not in line


def test_unknown_pair_id_lists_valid_ones() -> None:
    from datasets import Dataset

    from seqpatch.errors import SeqpatchError
    from seqpatch.stages.patching import example_frame

    ids = [f"binding-L4-k{k}-{i:07d}" for k in (1, 2) for i in range(4)]
    rows = Dataset.from_dict({"pair_id": [pid for pid in ids for _ in range(3)]})  # 3 sites
    with pytest.raises(SeqpatchError) as err:
        example_frame(rows, "normalised", "binding-L8-k3-0000042")
    message = str(err.value)
    assert "binding-L8-k3-0000042" in message
    assert ", ".join(ids[:5]) + " and 3 more" in message


# ---------------------------------------------------------------------------------------------
# Terminal layout: list at 80 columns, help texts


def _fake_refs() -> list[SimpleNamespace]:
    config = {
        "allow_equal_answers": False,
        "batch_size": 512,
        "divergence_indices": [0, 1, 2],
        "family": "binding",
        "family_params": {},
        "max_candidates_factor": 10,
        "model": "builtin",
        "n_pairs": 2000,
        "seed": 0,
        "seq_len": 8,
    }
    prov = {
        "row_count": 2000,
        "created": "2026-12-02T02:05:11",
        "parents": [
            {"stage": "benchmark", "version": "12391349b577", "fingerprint": "f"},
            {"stage": "programs", "version": "39ba05e4f767", "fingerprint": "g"},
        ],
        "model": {"id": "seqpatch/organism-binding-4l"},
        "config": config,
    }
    programs = {"row_count": 15, "created": "2026-12-02T02:04", "config": {"family": "binding"}}
    return [
        SimpleNamespace(stage="pairs", version="adf449b69ed9", provenance=prov),
        SimpleNamespace(stage="programs", version="39ba05e4f767", provenance=programs),
    ]


@pytest.mark.parametrize("columns", [80, 60, 400])
def test_list_never_wraps_a_config_one_character_per_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, columns: int
) -> None:
    monkeypatch.setattr("seqpatch.store.Store.refs", lambda self: _fake_refs())
    monkeypatch.setenv("COLUMNS", str(columns))
    result = invoke("list", "--data-dir", tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= columns for line in lines)
    cells = [cell.strip() for line in lines for cell in line.strip("│┃ ").split("│")]
    assert not [c for c in cells if len(c) == 1 and not c.isdigit()], result.stdout
    for item in ("divergence_indices=[0,1,2]", "max_candidates_factor=10", "family=binding"):
        assert item in result.stdout  # never broken across lines
    for name in ("adf449b69ed9", "benchmark/12391349b577", "seqpatch/organism-binding-4l"):
        assert name in result.stdout


def test_run_help_wraps_sentences_at_the_terminal_not_the_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    result = invoke("run", "--help")
    assert result.exit_code == 0
    assert "Every step reuses a stored version with the same config, so a rerun" in result.stdout


# ---------------------------------------------------------------------------------------------
# `organism train --out` writes only into a folder of its own (issue 27 item 5)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("training started")

    monkeypatch.setattr("seqpatch.organism.train._fit", refuse)


def test_organism_train_refuses_a_folder_it_did_not_write(
    tmp_path: Path, no_training: None
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    line = user_error("organism", "train", "--out", out, "--steps", "1")
    assert "not written by `seqpatch organism train`" in line and "--force" in line
    assert (out / "README.md").read_text() == "my notes\n"
    assert snapshot(out) == ["README.md"]
    line = user_error("organism", "train", "--out", out, "--steps", "1", "--force")
    assert f"{out / 'README.md'} was not written by seqpatch" in line  # --force replaces nothing
    assert snapshot(out) == ["README.md"]


@pytest.mark.parametrize("below", ["", "sub"])
def test_organism_train_refuses_a_file_path_before_training(
    a_file: Path, no_training: None, below: str
) -> None:
    line = user_error("organism", "train", "--out", a_file / below if below else a_file)
    assert f"{a_file} is a file, not a folder" in line
    assert a_file.read_text() == "keep me\n"


def test_organism_output_adds_beside_foreign_files_and_replaces_only_its_own(
    tmp_path: Path,
) -> None:
    from seqpatch.organism.output import OrganismOutError, save

    def write(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / "training.json").write_text('{"config": {}, "accuracy_by_length": {}}')
        (folder / "README.md").write_text("card\n")

    fresh = tmp_path / "fresh"
    save(fresh, write)
    assert snapshot(fresh) == ["README.md", "model.safetensors", "training.json"]
    (fresh / "README.md").write_text("old card\n")
    save(fresh, write)  # an organism folder: its own files are replaced
    assert (fresh / "README.md").read_text() == "card\n"

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("mine\n")
    with pytest.raises(OrganismOutError, match="not empty"):
        save(shared, write)
    save(shared, write, force=True)
    assert snapshot(shared) == ["README.md", "model.safetensors", "notes.txt", "training.json"]
    assert (shared / "notes.txt").read_text() == "mine\n"

    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "model.safetensors").write_bytes(b"someone else's")
    with pytest.raises(OrganismOutError, match="would replace it"):
        save(clash, write, force=True)
    assert snapshot(clash) == ["model.safetensors"]
    assert (clash / "model.safetensors").read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clash", "fresh", "shared"]


# ---------------------------------------------------------------------------------------------
# Numbers finite and in range, sizes one machine can hold: checked by the configs themselves
# (issue 27 item 6), so the CLI, `seqpatch run`, notebooks and imports all refuse them at once


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "programs", "--n-per-len", "1000000000"], "more than one machine can hold"),
        (["build", "pairs", "--n-pairs", "1000000000"], "n_pairs 1,000,000,000 is more than"),
        (["build", "das", "--lr", "nan"], "lr must be a finite number > 0, got nan"),
        (["build", "das", "--lr", "inf"], "lr must be a finite number > 0, got inf"),
        (["build", "tracing", "--noise-scale", "inf"], "noise_scale must be a finite number"),
        (["build", "tracing", "--noise-scale", "1e9"], "noise_scale must be a finite number"),
    ],
)
def test_unbounded_or_non_finite_values_are_one_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    line = user_error(*args, "--data-dir", tmp_path / "data")
    assert message in line
    assert snapshot(tmp_path) == []


def test_run_with_too_many_pairs_on_an_existing_store_builds_nothing(tmp_path: Path) -> None:
    from seqpatch.executor import execute as build_stage
    from seqpatch.stages.programs import ProgramsConfig

    build_stage("programs", ProgramsConfig("binding", (1, 2), 3, 0), data_dir=tmp_path)
    before = snapshot(tmp_path)
    line = user_error("run", "--n-pairs", "1000000000", "--data-dir", tmp_path)
    assert "n_pairs 1,000,000,000 is more than one machine can hold" in line
    assert snapshot(tmp_path) == before


def test_organism_train_refuses_an_infinite_learning_rate(
    tmp_path: Path, no_training: None
) -> None:
    line = user_error("organism", "train", "--out", tmp_path / "out", "--lr", "inf")
    assert "lr must be a finite number" in line
    assert not (tmp_path / "out").exists()


def test_the_configs_themselves_refuse_what_the_options_refuse() -> None:
    """The checks live in the config dataclasses, whatever builds them."""
    from seqpatch.organism.train import OrganismTrainConfig, OrganismTrainError
    from seqpatch.pipeline import PipelineError, RunConfig
    from seqpatch.programs import ProgramError
    from seqpatch.stages.das import DasConfig, DasStageError
    from seqpatch.stages.pairs import PairsConfig, PairsStageError
    from seqpatch.stages.programs import ProgramsConfig
    from seqpatch.stages.tracing import TracingConfig, TracingStageError

    nan, inf = float("nan"), float("inf")
    cases = [
        (ProgramError, lambda: ProgramsConfig("binding", (1, 2), 10**9)),
        (PairsStageError, lambda: PairsConfig("builtin", 3, n_pairs=10**9)),
        (
            PairsStageError,
            lambda: PairsConfig("builtin", 3, n_pairs=10**6, max_candidates_factor=99),
        ),
        (DasStageError, lambda: DasConfig(lr=nan)),
        (DasStageError, lambda: DasConfig(lr=inf)),
        (DasStageError, lambda: DasConfig(tolerance=nan)),
        (TracingStageError, lambda: TracingConfig(noise_scale=inf)),
        (TracingStageError, lambda: TracingConfig(noise_scale=nan)),
        (PipelineError, lambda: RunConfig(n_pairs=10**9)),
        (PipelineError, lambda: RunConfig(n_per_len=10**9)),
        (PipelineError, lambda: RunConfig(min_accuracy=nan)),
        (OrganismTrainError, lambda: OrganismTrainConfig(lr=inf)),
        (OrganismTrainError, lambda: OrganismTrainConfig(copy_prob=nan)),
    ]
    for error, make in cases:
        with pytest.raises(error):
            make()


# ---------------------------------------------------------------------------------------------
# A cache that is a file, weights torch refuses: one line


def test_a_cache_that_is_a_file_is_one_line(a_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQPATCH_CACHE", str(a_file))
    for args in (["models", "install", "smollm2-135m-instruct"], ["models", "list"]):
        line = user_error(*args)
        assert f"{a_file} is a file, not a folder" in line and "SEQPATCH_CACHE" in line
    assert a_file.read_text() == "keep me\n"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickled_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    import pickle

    from seqpatch.executor import execute as build_stage
    from seqpatch.stages.programs import ProgramsConfig
    from seqpatch.testing import save_tiny_model

    folder = save_tiny_model("llama", tmp_path / "model", seed=0, tokenizer="wordlevel")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (ran,))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    data = tmp_path / "data"
    build_stage("programs", ProgramsConfig("binding", (1,), 2, 0), data_dir=data)
    line = user_error("build", "benchmark", "--models", f"{folder}:compact", "--data-dir", data)
    assert "a pickle holding more than tensors" in line
    assert not ran.exists()  # torch never ran it


def test_a_cache_that_is_a_file_does_not_stop_a_build(
    a_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store memoizes file hashes in the cache; without a usable cache it hashes again."""
    monkeypatch.setenv("SEQPATCH_CACHE", str(a_file))
    monkeypatch.delenv("SEQPATCH_HASH_MEMO", raising=False)
    args = ["build", "programs", "--seq-lens", "1-2", "--n-per-len", "2", "--data-dir", tmp_path]
    for _ in range(2):  # built, then reused (and read back)
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    assert a_file.read_text() == "keep me\n"


_MISSPELLED_IN_A_FRESH_PROCESS = """
import json, sys
from typer.testing import CliRunner
from seqpatch.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "datasets", "nnsight") if m in sys.modules)
print(json.dumps({"code": result.exit_code, "stderr": result.stderr, "heavy": heavy}))
"""


@pytest.mark.parametrize(
    ("args", "meant"),
    [
        (["build", "benchmark", "--models", "smollm2-135m"], "smollm2-135m-instruct"),
        (["build", "benchmark", "--models=builtin,gemma3-270:code"], "gemma3-270m"),
        (["build", "pairs", "--model", "smollm2-135m", "--seq-len", "3"], "smollm2-135m-instruct"),
        (["build", "pairs", "--model=buitin"], "builtin"),
    ],
)
def test_a_misspelled_model_name_fails_before_any_heavy_import(
    args: list[str], meant: str, tmp_path: Path
) -> None:
    """The name is checked while the command line is read, before the stage's command (whose
    config module imports torch and datasets) is made: a fresh process ends with the one
    did-you-mean line while torch, transformers and datasets were never imported."""
    out = subprocess.run(
        [sys.executable, "-c", _MISSPELLED_IN_A_FRESH_PROCESS, *args, "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 2
    assert f"did you mean {meant!r}?" in error_line(result["stderr"])
    assert result["heavy"] == []
    assert not any(tmp_path.iterdir())  # nothing built, not even the store's folders
