"""The recipe for a new stage (docs/architecture.md), done: a toy stage registered and built
end to end — through the executor from a notebook, and through a derived ``seqpatch build``
command — reading a stored parent, returning an artifact, reused when built again.

The toy module lives in a temporary folder, not in the package: the test touches only the
registry entries the recipe names (``STAGES`` and ``STAGE_COMMANDS``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seqpatch.executor import execute
from seqpatch.stages import STAGES, StageInfo
from seqpatch.stages.programs import ProgramsConfig
from seqpatch.store import Store

TOY_MODULE = '''
"""Stage ``toy``: each program's answer, times a factor (the recipe's example stage)."""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from seqpatch.options import option
from seqpatch.stages.base import Built, ParentSpec, no_checks, no_models

STAGE = "toy"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ToyConfig:
    factor: int = option(2, "What each answer is multiplied by.", min=1)


CONFIG = ToyConfig
PARENTS = (ParentSpec("programs"),)
model_specs = no_models
prepare = no_checks


def build(inputs, cfg):
    programs = inputs.rows("programs")
    rows = Dataset.from_dict(
        {
            "program_id": programs["program_id"],
            "scaled": [cfg.factor * a for a in programs["answer"]],
        }
    )
    return Built(rows, stats={"n": rows.num_rows})


def artifacts(rows, cfg, inputs):
    return {"total.txt": f"{sum(rows['scaled'])}\\n"}
'''


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Step 1 and 2 of the recipe: the module, and its ``StageInfo`` in the registry."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "toy_stage.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setitem(
        STAGES, "toy", StageInfo("toy", "toy_stage", "answers times a factor", "--factor 2")
    )
    data = tmp_path / "data"
    execute("programs", ProgramsConfig("binding", (2, 3), 4, 0), data_dir=data)
    return data


def test_a_toy_stage_is_built_end_to_end_through_the_executor(toy: Path) -> None:
    from toy_stage import ToyConfig

    programs = Store(toy).resolve("programs")
    ref = execute("toy", ToyConfig(factor=3), data_dir=toy)
    assert ref is not None and not ref.reused
    rows = Store(toy).load("toy", ref.version)
    answers = Store(toy).load("programs")["answer"]
    assert rows["scaled"] == [3 * a for a in answers]
    assert (ref.path / "total.txt").read_text() == f"{3 * sum(answers)}\n"
    assert ref.provenance["parents"][0]["version"] == programs.version
    assert ref.provenance["config"] == {"factor": 3}
    assert ref.provenance["extra"]["n"] == len(answers)
    again = execute("toy", ToyConfig(factor=3), data_dir=toy)
    assert again is not None and again.reused and again.version == ref.version
    other = execute("toy", ToyConfig(factor=4), data_dir=toy)
    assert other is not None and other.version != ref.version


def test_a_toy_stage_gets_its_cli_command_from_its_config(
    toy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 3 of the recipe: one ``StageCommand``; the ``--factor`` option (its help, its
    bound) comes from the config field, with no CLI code for it."""
    from seqpatch.cli import app
    from seqpatch.cli._common import DataDirOpt, report
    from seqpatch.cli._options import param
    from seqpatch.cli._stages import STAGE_COMMANDS, StageCommand

    def run(cfg, runtime, data_dir):  # type: ignore[no-untyped-def]
        report(execute("toy", cfg, data_dir=data_dir, runtime=runtime))

    def config() -> type:
        from toy_stage import ToyConfig

        return ToyConfig

    spec = StageCommand(
        config,
        run,
        "Answers times a factor.",
        "",
        lambda: [param("data_dir", DataDirOpt, None)],
        (),
    )
    monkeypatch.setitem(STAGE_COMMANDS, "toy", spec)
    runner = CliRunner()
    helped = runner.invoke(app, ["build", "toy", "--help"])
    assert helped.exit_code == 0 and "multiplied by" in helped.output
    assert (
        runner.invoke(app, ["build", "toy", "--factor", "0", "--data-dir", str(toy)]).exit_code == 2
    )
    built = runner.invoke(app, ["build", "toy", "--factor", "5", "--data-dir", str(toy)])
    assert built.exit_code == 0, built.output
    (version,) = Store(toy).versions("toy")
    assert version.provenance["config"] == {"factor": 5} and version.version in built.output
