"""The README's examples are real: its Python block and its shell commands run as written.

Every `seqpatch` command in the README's ```bash blocks is either run here, in README order,
against one fresh data dir (sizes shrunk by ``SHRINK`` so the whole walk takes about a minute;
every option is exercised as written) or listed in ``NOT_RUN`` with the reason and the test
that covers it instead. A command added to the README fails this test until it is classified.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seqpatch.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

NOT_RUN = {
    "seqpatch run": "minutes: tests/test_run.py runs the main job with small settings",
    "seqpatch run --tracing": "minutes: tests/test_tracing_cli.py runs run with tracing",
    "seqpatch build benchmark --models builtin,./my-model:compact --programs 3f2a "
    "--batch-size 32": "needs a model folder of the reader's; tests/test_benchmark.py",
    "seqpatch build benchmark --models builtin,Qwen/Qwen2.5-0.5B --batch-size 64": "a Hub model "
    "(network)",
    "seqpatch organism train --out ./my-organism --seed 0": "20 minutes; tests/test_organism.py",
    "seqpatch build benchmark --models builtin,./my-organism:compact": "needs the trained "
    "organism above",
    "seqpatch push pairs --repo-id you/variable-tracking": "the Hub (network); "
    "tests/test_hub.py pushes to a fake Hub",
    "seqpatch build activations --sites resid_pre,attn_out,mlp_out --executor ray "
    "--ray-address auto": "a Ray cluster; tests/test_ray.py",
    "seqpatch build patching --sites resid_pre,attn_out,mlp_out --shard-size 32 --executor ray "
    "--ray-address auto": "a Ray cluster; tests/test_ray.py",
    "seqpatch build tracing --n-programs 0 --shard-size 4 --executor ray --ray-address auto": (
        "a Ray cluster; tests/test_ray.py"
    ),
    "seqpatch build patching --sites resid_pre --executor ray": "starts Ray (slow); "
    "tests/test_ray.py runs it with --shard-size 2",
    "seqpatch build benchmark --models meta-llama/Llama-3.1-8B --remote": "NDIF (network); "
    "tests/test_cli_remote.py",
    "seqpatch build activations --sites resid_pre --remote": "NDIF (network); "
    "tests/test_cli_remote.py",
    "seqpatch models install smollm2-135m-instruct": "downloads and converts 94 MB; "
    "tests/test_pretrained.py installs it in a session fixture",
    "seqpatch models install smollm2-135m-instruct && seqpatch models install gemma3-270m": "the "
    "pretrained benchmark loop's installs (Gemma-3: 253 MB, minutes to convert)",
    "seqpatch build programs --family $fam --seq-lens 1-10 --n-per-len 100 --seed 0 "
    "--data-dir study-$fam": "the pretrained benchmark loop: about 30 minutes on one core "
    "(docs/pretrained.md); its commands are the ones run above with other options",
    "seqpatch build benchmark --models builtin,smollm2-135m-instruct,gemma3-270m "
    "--data-dir study-$fam": "the pretrained benchmark loop (see above)",
    "seqpatch choose --min-accuracy 0.8 --min-seq-len 6 --data-dir study-$fam": "the "
    "pretrained benchmark loop (see above)",
    "seqpatch plot accuracy --data-dir study-$fam": "the pretrained benchmark loop (see above)",
}
SHRINK = {
    "--n-per-len 50": "--n-per-len 8",
    "--n-pairs 2000": "--n-pairs 12",
    "--n-pairs 500": "--n-pairs 12",
    "--n-programs 100": "--n-programs 2",
    "seqpatch build das": "seqpatch build das --ks 1,4 --epochs 2 --top-n 1 --allow-small",
    "you/variable-tracking": "./study",  # the exported folder has the Hub repo's layout
}


def readme_commands() -> list[str]:
    """Every `seqpatch …` command of the README's bash blocks, comments and env prefixes cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)
            if line.startswith("seqpatch "):
                commands.append(" ".join(line.split()))
    return commands


def shrunk(command: str) -> str:
    for long, short in SHRINK.items():
        command = command.replace(long, short)
    return command


def test_every_readme_command_is_run_or_explained() -> None:
    commands = readme_commands()
    assert len(commands) > 20
    unknown = [c for c in NOT_RUN if c not in commands]
    assert not unknown, f"NOT_RUN lists commands the README no longer has: {unknown}"


def test_readme_commands_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEQPATCH_DATA", str(tmp_path / "data"))
    runner = CliRunner()
    ran = []
    for command in readme_commands():
        if command in NOT_RUN:
            continue
        args = shlex.split(shrunk(command))[1:]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"`{command}` failed:\n{result.output}"
        ran.append(command)
    assert len(ran) >= 20
    assert (tmp_path / "study" / "README.md").is_file()  # `seqpatch export` wrote the study


def test_readme_python_block_runs() -> None:
    section = README.split("## In Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert tuple(namespace["acts"]["resid_pre"].shape) == (4, 5, 128)
    delta = float(namespace["result"])
    assert -1.0 <= delta <= 1.0 and namespace["a"].answer != namespace["b"].answer
