"""The executor: one place chains stages; parents stay untouched; lineage is complete."""

from __future__ import annotations

import ast
import hashlib
import shutil
from pathlib import Path

import pytest

from seqpatch import pipeline
from seqpatch.choose import choose
from seqpatch.executor import execute
from seqpatch.stages import STAGES, get_stage
from seqpatch.stages.base import ModelCache
from seqpatch.stages.benchmark import BenchmarkConfig
from seqpatch.stages.programs import ProgramsConfig
from seqpatch.store import Store

ROOT = Path(__file__).resolve().parents[1]


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones too) with the SHA-256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """programs → benchmark → choose → pairs → activations → patching on the organism, small."""
    data_dir = tmp_path_factory.mktemp("study")
    models = ModelCache()
    programs = pipeline.build_programs(ProgramsConfig("binding", (2, 3), 10), data_dir=data_dir)
    bench = pipeline.build_benchmark(
        BenchmarkConfig(("builtin",)), programs=programs.version, data_dir=data_dir, models=models
    )
    choose(0.5, 2, bench.version, data_dir)
    pairs = pipeline.build_pairs("chosen", None, "0,1", 8, data_dir=data_dir, models=models)
    before = folder_digest(pairs.path)
    acts = pipeline.build_activations(
        ("resid_pre",), pairs=pairs.version, data_dir=data_dir, models=models
    )
    patch = pipeline.build_patching(
        ("resid_pre",), pairs=pairs.version, data_dir=data_dir, models=models
    )
    return {
        "data_dir": data_dir,
        "models": models,
        "refs": {"programs": programs, "benchmark": bench, "pairs": pairs},
        "acts": acts,
        "patch": patch,
        "pairs_before": before,
    }


def test_child_builds_leave_the_parent_folder_byte_identical(study: dict) -> None:
    assert folder_digest(study["refs"]["pairs"].path) == study["pairs_before"]
    assert sorted(p.name for p in study["refs"]["pairs"].path.iterdir()) == [
        "data-00000-of-00001.arrow",
        "dataset_info.json",
        "seqpatch.json",
        "state.json",
    ]


def test_provenance_lists_every_parent(study: dict) -> None:
    refs = study["refs"]
    pairs_parents = refs["pairs"].provenance["parents"]
    assert [(p["stage"], p["version"]) for p in pairs_parents] == [
        ("benchmark", refs["benchmark"].version)
    ]
    assert [(p["stage"], p["version"]) for p in study["patch"].provenance["parents"]] == [
        ("pairs", refs["pairs"].version),
        ("activations", study["acts"].version),
    ]


def test_pairs_from_chosen_study_the_chosen_family_and_length(study: dict) -> None:
    import json

    chosen = json.loads((study["data_dir"] / "chosen_model.json").read_text())
    config = study["refs"]["pairs"].provenance["config"]
    assert (config["model"], config["family"], config["seq_len"]) == (
        chosen["model_spec"],
        chosen["family"],
        chosen["seq_len"],
    )


def test_artifacts_are_part_of_the_committed_version(study: dict) -> None:
    patch = study["patch"]
    files = patch.provenance["files"]
    for name in ("heatmap_prob_delta.npy", "heatmap.json", "heatmap-normalised.png"):
        assert name in files, name
        assert (patch.path / name).stat().st_size == files[name]["size"]
    bench = study["refs"]["benchmark"]
    assert "results_summary.csv" in bench.provenance["files"]
    assert not any(name.startswith("accuracy") for name in bench.provenance["files"])


def test_a_stored_stage_is_reused_without_loading_any_model(study: dict, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("a reused stage must not load a model")

    monkeypatch.setattr("seqpatch.models.load_model", no_loading)
    monkeypatch.setattr(ModelCache, "get", no_loading)
    again = pipeline.build_patching(
        ("resid_pre",), pairs=study["refs"]["pairs"].version, data_dir=study["data_dir"]
    )
    assert again.reused and again.version == study["patch"].version


def test_rebuilding_a_deleted_child_recomputes_it(study: dict, monkeypatch) -> None:
    from seqpatch.stages import activations

    calls = []
    real = activations._cache

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "_cache", counting)
    acts = study["acts"]
    rows_before = Store(study["data_dir"]).load("activations", acts.version)["resid_pre_a"]
    shutil.rmtree(acts.path)
    rebuilt = pipeline.build_activations(
        ("resid_pre",),
        pairs=study["refs"]["pairs"].version,
        data_dir=study["data_dir"],
        models=study["models"],
    )
    assert not rebuilt.reused and rebuilt.version == acts.version
    assert calls, "the rows were taken from a stale cache instead of being recomputed"
    assert Store(study["data_dir"]).load("activations", acts.version)["resid_pre_a"] == rows_before


def test_an_unknown_parent_is_refused(tmp_path: Path) -> None:
    from seqpatch.errors import SeqpatchError

    with pytest.raises(SeqpatchError, match="has no parent 'pairs'"):
        execute(
            "programs", ProgramsConfig("binding", (1,), 2), {"pairs": "latest"}, data_dir=tmp_path
        )


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_registered_stage_follows_the_contract(stage: str) -> None:
    module = get_stage(stage)
    assert stage == module.STAGE
    assert isinstance(module.SCHEMA_VERSION, int)
    assert hasattr(module, "CONFIG") and hasattr(module, "PARENTS")
    assert hasattr(module, "build") or hasattr(module, "build_shard")
    assert all(spec.stage in STAGES for spec in module.PARENTS)
    assert (ROOT / "datasets_cards" / f"{stage}.md").is_file()


OS_WRITES = {"replace", "rename", "renames", "remove", "unlink", "rmdir", "removedirs", "mkdir"}
OS_WRITES |= {"makedirs", "symlink", "link", "truncate", "write", "open", "chmod", "utime"}
WRITE_PREFIXES = ("write", "save", "to_csv", "to_parquet", "to_json", "to_sql", "to_file")
PATH_WRITES = {"mkdir", "touch", "unlink", "rmdir", "rmtree", "tofile", "savez", "dump"}


def _is_buffer(node: ast.AST) -> bool:
    """``io.BytesIO()`` or ``io.StringIO()``: a file in memory, which a stage may write."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("BytesIO", "StringIO")
    )


def _open_mode(node: ast.Call) -> str:
    at = 0 if isinstance(node.func, ast.Attribute) else 1  # path.open(mode) or open(path, mode)
    mode = node.args[at] if len(node.args) > at else None
    mode = next((k.value for k in node.keywords if k.arg == "mode"), mode)
    return mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else "r"


def write_calls(source: str) -> list[str]:
    """The calls in ``source`` that write, move or delete files (writes into an in-memory
    buffer excepted): the guard's definition of "a stage writes files"."""
    tree = ast.parse(source)
    buffers = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and _is_buffer(node.value)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = (
            func.value.id
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            else ""
        )
        first = node.args[0] if node.args else None
        if owner in buffers or (isinstance(first, ast.Name) and first.id in buffers):
            continue
        if name == "save" and not node.args and not node.keywords:
            continue  # nnsight's `proxy.save()` keeps a traced value; a file save needs a path
        if (
            owner == "shutil"
            or (owner == "os" and name in OS_WRITES)
            or name.startswith(WRITE_PREFIXES)
            or name in PATH_WRITES
            or (name == "open" and set(_open_mode(node)) & set("wax+"))
        ):
            found.append(f"{owner + '.' if owner else ''}{name} (line {node.lineno})")
    return found


@pytest.mark.parametrize(
    "code",
    [
        "path.write_bytes(b'')",
        "Path(p).write_text('x')",
        "open(p, 'w')",
        "open(p, mode='ab')",
        "path.open('x')",
        "chart.save(p)",
        "frame.to_csv(p)",
        "frame.write_csv(p)",
        "frame.to_parquet(p)",
        "np.save(p, a)",
        "torch.save(t, p)",
        "rows.save_to_disk(p)",
        "shutil.copy(a, b)",
        "shutil.rmtree(p)",
        "os.replace(a, b)",
        "os.rename(a, b)",
        "os.remove(p)",
        "path.unlink()",
        "path.mkdir()",
        "json.dump(x, handle)",
    ],
)
def test_the_write_guard_catches_every_kind_of_write(code: str) -> None:
    assert write_calls(code), code


def test_the_write_guard_allows_reads_and_memory_buffers() -> None:
    code = "buffer = io.BytesIO()\nnp.save(buffer, a)\nopen(p)\nopen(p, 'rb')\ns.replace('a', 'b')"
    code += "\nout = tracer.result.save()"
    assert write_calls(code) == []


def test_stage_modules_hold_no_wiring() -> None:
    """Stage modules neither resolve parents, nor load models, nor write files: the executor
    and the store do. (The one chaining place is ``seqpatch.executor``.) A stage hands files to
    the store as artifacts (bytes, text, or a function the store calls with a path inside its
    staging folder); ``base.chart_artifacts`` is such a function and the one exception."""
    forbidden = {"Store", "load_model", "execute", "resolve", "build_stage"}
    for path in sorted((ROOT / "seqpatch" / "stages").glob("*.py")):
        source = path.read_text()
        if path.name != "base.py":
            assert write_calls(source) == [], f"{path.name} writes files"
        if path.name in ("__init__.py", "base.py"):
            continue
        tree = ast.parse(source)
        called = {
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
        }
        assert not called & forbidden, f"{path.name} calls {sorted(called & forbidden)}"


def test_thread_count_changes_no_stored_result(tmp_path: Path, monkeypatch) -> None:
    import numpy as np
    import torch

    from seqpatch.threads import THREADS_ENV

    built = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            monkeypatch.setenv(THREADS_ENV, str(threads))
            data_dir = tmp_path / str(threads)
            models = ModelCache()
            pairs = pipeline.build_pairs(
                "builtin", 4, "1,3", 6, data_dir=data_dir, models=models, progress=False
            )
            ref = pipeline.build_patching(
                ("resid_pre",), pairs=pairs.version, data_dir=data_dir, models=models
            )
            assert ref.provenance["runtime"]["torch_threads"] == threads
            built[threads] = (ref.version, Store(data_dir).load("patching", ref.version))
    finally:
        torch.set_num_threads(before)
    assert built[1][0] == built[2][0]  # the version does not depend on the thread count
    one, two = (np.asarray(built[t][1]["logits"], dtype=np.float64) for t in (1, 2))
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-5)


def test_thread_choice_follows_model_size_and_the_override(monkeypatch) -> None:
    from seqpatch.errors import SeqpatchError
    from seqpatch.threads import SINGLE_THREAD_BELOW, THREADS_ENV, choose_threads

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert choose_threads(670_592) == 1  # the organism: one thread, whatever the machine
    assert choose_threads(SINGLE_THREAD_BELOW) == 4  # large: half the cores
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert choose_threads(135_000_000) == 1  # a 2-core laptop keeps a core for the others
    monkeypatch.setenv(THREADS_ENV, "3")
    assert choose_threads(670_592) == 3
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(SeqpatchError, match=THREADS_ENV):
        choose_threads(1)
