"""The CLI: ``seqpatch build programs``, ``seqpatch list``, help texts and user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from seqpatch.cli import app
from seqpatch.store import Store, load_stage

runner = CliRunner()
SMALL = ["--family", "binding", "--seq-lens", "1-3,6", "--n-per-len", "4", "--seed", "7"]


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def test_build_programs_then_reuse(tmp_path: Path) -> None:
    first = invoke("build", "programs", *SMALL, "--data-dir", tmp_path)
    assert first.exit_code == 0, first.output
    ref = Store(tmp_path).resolve("programs")
    assert first.stdout.strip() == f"built programs version {ref.version} (16 rows): {ref.path}"
    rows = load_stage("programs", tmp_path)
    assert rows.num_rows == 16 and sorted(set(rows["seq_len"])) == [1, 2, 3, 6]
    assert set(rows["seed"]) == {7} and set(rows["family"]) == {"binding"}

    second = invoke("build", "programs", *SMALL, "--data-dir", tmp_path)
    assert second.exit_code == 0, second.output
    assert second.stdout.strip() == f"reused programs version {ref.version} (16 rows): {ref.path}"
    assert len(Store(tmp_path).versions("programs")) == 1


def test_data_dir_from_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SEQPATCH_DATA", str(tmp_path / "env"))
    result = invoke("build", "programs", "--seq-lens", "2", "--n-per-len", "1")
    assert result.exit_code == 0, result.output
    assert load_stage("programs", tmp_path / "env").num_rows == 1


def test_list_shows_versions_rows_and_config(tmp_path: Path) -> None:
    empty = invoke("list", "--data-dir", tmp_path)
    assert empty.exit_code == 0
    assert "no stages stored" in empty.stderr
    invoke("build", "programs", *SMALL, "--data-dir", tmp_path)
    invoke("build", "programs", "--seq-lens", "2", "--n-per-len", "3", "--data-dir", tmp_path)
    listed = invoke("list", "--data-dir", tmp_path)
    assert listed.exit_code == 0, listed.output
    for ref in Store(tmp_path).refs():
        assert ref.version in listed.stdout
    assert "family=binding" in listed.stdout and "family=arithmetic" in listed.stdout
    assert " 16 " in listed.stdout and " 3 " in listed.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--family", "nope"], "unknown family 'nope'; known families: arithmetic, binding"),
        (["--seq-lens", "0-3"], "includes 0; every length must be >= 1"),
        (["--seq-lens", "1-x"], "cannot read seq-lens '1-x'"),
        (["--seq-lens", "5-2"], "range '5-2' is empty"),
        (["--seq-lens", ""], "cannot read seq-lens ''"),
        (["--n-per-len", "0"], "n_per_len must be an integer >= 1, got 0"),
        (["--seed", "-1"], "seed must be an integer"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    data_dir = tmp_path / "data"
    result = invoke("build", "programs", *args, "--data-dir", data_dir)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not data_dir.exists()


def test_unwritable_data_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = invoke("build", "programs", "--n-per-len", "1", "--data-dir", blocker / "data")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "cannot write to data dir" in result.stderr and "--data-dir" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_other_errors_keep_their_traceback(tmp_path: Path, monkeypatch) -> None:
    """Only user errors are shortened; a bug must stay visible."""

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    monkeypatch.setattr("seqpatch.executor.execute", broken)
    result = invoke("build", "programs", "--data-dir", tmp_path)
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


def _is_group(command: object) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def _commands(group: object, prefix: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """Every (path, command) below ``group``, sub-groups included (commands made on first use,
    like the derived ``build`` commands, too)."""
    ctx = typer.Context(group)  # type: ignore[arg-type]
    for name in group.list_commands(ctx):  # type: ignore[attr-defined]
        command = group.get_command(ctx, name)  # type: ignore[attr-defined]
        path = (*prefix, name)
        yield path, command
        if _is_group(command):
            yield from _commands(command, path)


def test_every_command_has_help_with_examples() -> None:
    root = typer.main.get_command(app)
    assert _is_group(root)
    commands = list(_commands(root))
    assert {("build", "programs"), ("list",), ("build",), ("organism",), ("plot",)} <= {
        path for path, _ in commands
    }
    for path, command in commands:
        result = invoke(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        if not _is_group(command):
            assert "Examples" in result.stdout, path
            assert f"seqpatch {' '.join(path)}" in result.stdout, path


def test_help_is_fast_and_imports_no_heavy_library() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from seqpatch.cli import app;"
        "r = CliRunner().invoke(app, ['build', 'programs', '--help']); assert r.exit_code == 0;"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'nnsight') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
