"""``--executor ray``: a stage built by Ray actors is the local build, shard for shard.

One local Ray instance (2 CPUs) serves the module: starting Ray costs seconds, so the tests are
few. The organism's pairs (8 pairs, shards of 2) are built once; every test copies them into its
own data dir. Rows are compared column by column: exactly, except float columns, which may
differ in the last bit between processes (seen once in ~10 runs, in the ``lse``/``prob_delta``
grids; torch's CPU kernels do not promise bitwise equality across processes), so they are
compared to 1e-6.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import ray
from typer.testing import CliRunner

from seqpatch import pipeline, plots
from seqpatch.cli import app
from seqpatch.stages import patching
from seqpatch.store import Store

SITES = ("resid_pre",)
SHARD_SIZE = 2
N_PAIRS = 8
N_SHARDS = N_PAIRS // SHARD_SIZE


@pytest.fixture(scope="module", autouse=True)
def no_charts():
    """The driver renders no charts at commit (seconds each; not what these tests check)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "patching_chart_artifacts", lambda rows, pairs=None: {})
        mp.setattr(plots, "tracing_chart_artifacts", lambda rows, model=None, noise_scale=None: {})
        yield


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pairs_store(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("pairs")
    pipeline.build_pairs("builtin", seq_len=4, n_pairs=N_PAIRS, data_dir=data_dir, progress=False)
    return data_dir


def fresh_store(pairs_store: Path, tmp_path: Path, name: str) -> Path:
    data_dir = tmp_path / name
    shutil.copytree(pairs_store / "pairs", data_dir / "pairs")
    return data_dir


def build(data_dir: Path, **kwargs):
    return pipeline.build_patching(
        SITES,
        activations="none",
        shard_size=SHARD_SIZE,
        data_dir=data_dir,
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def local(pairs_store, tmp_path_factory):
    """The local executor's build: its version and its rows' bytes."""
    data_dir = fresh_store(pairs_store, tmp_path_factory.mktemp("local"), "store")
    ref = build(data_dir)
    return ref.version, Store(data_dir).load_ref(ref)


@pytest.fixture
def shard_executors(monkeypatch) -> list:
    """Every shard executor ``execute`` makes (``None`` for in-process shards), so a test can
    tell which shards Ray actors computed."""
    from seqpatch import executor as executor_module

    made = []
    real = executor_module._shard_executor

    def spy(executor, ray_address):
        made.append(real(executor, ray_address))
        return made[-1]

    monkeypatch.setattr(executor_module, "_shard_executor", spy)
    return made


def assert_same_rows(rows, expected) -> None:
    """Same features and row order; values equal (float columns to 1e-6, NaN = NaN)."""
    assert rows.features == expected.features
    assert rows.num_rows == expected.num_rows
    for name in expected.column_names:
        want = np.asarray(expected.with_format("numpy")[name])
        if want.dtype.kind != "f":
            got = rows.data.table.column(name).combine_chunks()
            assert got.equals(expected.data.table.column(name).combine_chunks()), name
            continue
        got = np.asarray(rows.with_format("numpy")[name])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)


def test_cli_ray_build_is_the_local_build(
    ray_instance, pairs_store, tmp_path, local, shard_executors
):
    data_dir = fresh_store(pairs_store, tmp_path, "store")
    result = CliRunner().invoke(
        app,
        [
            "build",
            "patching",
            "--sites",
            ",".join(SITES),
            "--shard-size",
            str(SHARD_SIZE),
            "--activations",
            "none",
            "--executor",
            "ray",
            "--data-dir",
            str(data_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    version, expected = local
    assert f"built patching version {version}" in result.output
    ref = Store(data_dir).resolve("patching", version)
    assert ref.provenance["extra"]["n_shards"] == N_SHARDS
    assert_same_rows(Store(data_dir).load_ref(ref), expected)
    assert not (data_dir / "patching" / f"{version}.partial").exists()
    assert shard_executors[-1].computed == list(range(N_SHARDS))


def test_worker_killed_mid_shard_is_retried(ray_instance, pairs_store, tmp_path, local):
    """Shard 1's first attempt computes its rows, then its worker process is SIGKILLed before
    anything is written; Ray restarts the actor and the shard is built again."""
    from seqpatch.ray_executor import RayExecutor

    marks = tmp_path / "marks"
    marks.mkdir()

    def dies_once(inputs, cfg, index):
        built = patching.build_shard(inputs, cfg, index)
        killed = marks / f"killed-{index}"
        if index == 1 and not killed.exists():
            killed.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        (marks / f"built-{index}").write_text(str(os.getpid()))
        return built

    executor = RayExecutor(build_shard=dies_once, max_retries=2)
    data_dir = fresh_store(pairs_store, tmp_path, "store")
    ref = build(data_dir, executor=executor)
    version, expected = local
    assert ref.version == version
    assert_same_rows(Store(data_dir).load_ref(ref), expected)
    killed_pid = (marks / "killed-1").read_text()
    assert (marks / "built-1").read_text() != killed_pid  # rebuilt by the restarted actor
    assert executor.computed == list(range(N_SHARDS))


def test_interrupted_driver_resumes_from_finished_shards(
    ray_instance, pairs_store, tmp_path, local
):
    """Shards 0 and 2 were finished before the driver stopped (here: built locally as one of two
    jobs); the Ray run computes only shards 1 and 3, and the commit is the local build."""
    from seqpatch.ray_executor import RayExecutor

    data_dir = fresh_store(pairs_store, tmp_path, "store")
    assert build(data_dir, shard=(0, 2)) is None
    marks = tmp_path / "marks"
    marks.mkdir()

    def counted(inputs, cfg, index):
        (marks / f"built-{index}").touch()
        return patching.build_shard(inputs, cfg, index)

    executor = RayExecutor(build_shard=counted)
    ref = build(data_dir, executor=executor)
    version, expected = local
    assert sorted(p.name for p in marks.iterdir()) == ["built-1", "built-3"]
    assert executor.computed == [1, 3]
    assert ref.version == version
    assert_same_rows(Store(data_dir).load_ref(ref), expected)


TRACING = ["--n-programs", "4", "--n-samples", "1", "--kinds", "resid", "--shard-size", "2"]


def test_cli_ray_tracing_is_the_local_tracing(ray_instance, pairs_store, tmp_path, shard_executors):
    """``seqpatch build tracing --executor ray``: the local build's version and rows."""
    built = {}
    for executor in ("local", "ray"):
        data_dir = fresh_store(pairs_store, tmp_path, executor)
        result = CliRunner().invoke(
            app,
            ["build", "tracing", *TRACING, "--executor", executor, "--data-dir", str(data_dir)],
        )
        assert result.exit_code == 0, result.output
        ref = Store(data_dir).resolve("tracing")
        built[executor] = ref, Store(data_dir).load_ref(ref)
    (local_ref, local_rows), (ray_ref, ray_rows) = built["local"], built["ray"]
    assert ray_ref.version == local_ref.version
    assert ray_ref.provenance["extra"]["n_shards"] == 2
    assert_same_rows(ray_rows, local_rows)
    assert shard_executors[0] is None and shard_executors[1].computed == [0, 1]


def test_ray_benchmark_is_the_local_benchmark(ray_instance, tmp_path, shard_executors):
    """The benchmark on Ray actors (one shard per model): the local build's version and rows."""
    from seqpatch.stages.benchmark import BenchmarkConfig, parse_models
    from seqpatch.stages.programs import ProgramsConfig

    cfg = BenchmarkConfig(parse_models("builtin"), batch_size=8, max_new_tokens=4)
    built = {}
    for executor in ("local", "ray"):
        data_dir = tmp_path / executor
        pipeline.build_programs(ProgramsConfig("binding", (2, 3), 4), data_dir=data_dir)
        ref = pipeline.build_benchmark(cfg, data_dir=data_dir, progress=False, executor=executor)
        built[executor] = ref, Store(data_dir).load_ref(ref)
    (local_ref, local_rows), (ray_ref, ray_rows) = built["local"], built["ray"]
    assert ray_ref.version == local_ref.version
    assert_same_rows(ray_rows, local_rows)
    assert shard_executors[0] is None and shard_executors[1].computed == [0]


def test_remote_and_ray_are_exclusive():
    for command in (["build", "benchmark"], ["build", "activations"]):
        result = CliRunner().invoke(app, [*command, "--remote", "--executor", "ray"])
        assert result.exit_code == 2
        assert "choose one" in result.output
