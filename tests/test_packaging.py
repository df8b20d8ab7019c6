"""The package as users install it: a wheel (not editable) carries the card templates.

``test_installed_wheel_exports_every_stage`` builds a fresh venv, installs seqpatch from a copy of
the source tree with ``pip install --no-deps`` (dependencies come from the test's own venv
through a ``.pth`` line, so nothing is downloaded), and exports every stage from a folder outside
the checkout. It takes ~20-40 s.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from datasets import load_dataset

from seqpatch.stages.base import Built
from seqpatch.store import Store
from tests.test_hub import (
    activations_snapshot,
    benchmark_snapshot,
    pairs_snapshot,
    patching_snapshot,
    programs_snapshot,
)

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "seqpatch", "datasets_cards")


def test_pyproject_lists_every_package() -> None:
    """``packages`` is an explicit list (``find`` cannot add ``seqpatch._cards``): a new
    subpackage must be added there or the wheel lacks it."""
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = set(find_packages(str(ROOT), include=["seqpatch", "seqpatch.*"]))
    listed = set(config["packages"])
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == {"seqpatch._cards"}
    assert config["package-dir"]["seqpatch._cards"] == "datasets_cards"


def _store(tmp_path: Path) -> Path:
    """A store holding every stage (programs from the real stage, the rest synthetic rows)."""
    data = tmp_path / "data"
    store = Store(data)
    parent = None
    for snapshot in (
        programs_snapshot(),
        benchmark_snapshot(),
        pairs_snapshot(),
        activations_snapshot(),
        patching_snapshot(tmp_path),
    ):
        files = {p.name: p.read_bytes() for p in snapshot.artifacts}
        parent = store.get_or_build(
            snapshot.stage,
            1,
            {"seed": 0},
            lambda s=snapshot, f=files: Built(s.dataset, dict(s.provenance["extra"]), f),
            parents=[parent] if parent else [],
        )
    return data


def test_installed_wheel_exports_every_stage(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # dependencies (and pip, setuptools) from this test's venv; a plain path line, so the
    # editable seqpatch installed there (a .pth finder) is not picked up
    Path(purelib, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(source)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    shutil.rmtree(source)  # the installed copy must not depend on the source tree

    data = _store(tmp_path)
    out = tmp_path / "exports"
    script = (
        "import sys, seqpatch\n"
        "from seqpatch.hub import export_stage\n"
        "print(seqpatch.__file__)\n"
        "for stage in sys.argv[3:]:\n"
        "    export_stage(stage, sys.argv[2] + '/' + stage, data_dir=sys.argv[1], lineage=False)\n"
    )
    stages = ["programs", "benchmark", "pairs", "activations", "patching"]
    run = subprocess.run(
        [python, "-c", script, str(data), str(out), *stages],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # outside the checkout
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert Path(run.stdout.splitlines()[0]).is_relative_to(venv)  # the installed copy ran
    for stage in stages:
        loaded = load_dataset(str(out / stage), stage, split="train", cache_dir=str(tmp_path / "c"))
        assert loaded.num_rows == Store(data).resolve(stage).provenance["row_count"]
        assert f"## `{stage}`" in (out / stage / "README.md").read_text()
