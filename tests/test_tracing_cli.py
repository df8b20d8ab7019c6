"""`seqpatch build tracing`, `seqpatch plot tracing` and `seqpatch run --tracing` on the organism.

The chart is checked against the stored rows (its cells are the mean indirect effect over the
programs of each divergence index, computed here with numpy), and against where it may be
written: the stage's own chart inside its version, `plot` outside every version.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from seqpatch.cli import app
from seqpatch.store import Store
from tests.cli_output import error_line, snapshot

runner = CliRunner()
TRACE = ["--n-programs", "2", "--n-samples", "2"]


@pytest.fixture(scope="module")
def organism():
    from seqpatch.models import load_model

    return load_model("builtin")


@pytest.fixture
def pairs_dir(tmp_path, organism):
    """A data dir holding a tiny pairs stage of the organism (3 pairs of 3 statements)."""
    from seqpatch.pipeline import build_pairs

    build_pairs("builtin", 3, n_pairs=3, data_dir=tmp_path, progress=False, handle=organism)
    return tmp_path


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def test_build_tracing_writes_the_chart_into_the_version(pairs_dir):
    result = invoke("build", "tracing", *TRACE, "--data-dir", pairs_dir)
    assert result.exit_code == 0, result.output
    store = Store(pairs_dir)
    ref = store.resolve("tracing")
    assert ref.provenance["config"]["n_samples"] == 2
    assert {p["stage"] for p in ref.provenance["parents"]} == {"pairs"}
    png = ref.path / "causal-trace.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (ref.path / "causal-trace.html").stat().st_size > 1000
    assert f"chart: {png}" in result.output
    rows = store.load("tracing", ref.version)
    assert len(rows) == 2 and all(len(s) == 2 for s in rows["seeds"])

    again = invoke("build", "tracing", *TRACE, "--data-dir", pairs_dir)
    assert again.exit_code == 0 and "reused tracing" in again.output


def test_chart_cells_are_the_mean_effect_of_the_stored_rows(pairs_dir, organism):
    from seqpatch.charts import tracing_cells
    from seqpatch.pipeline import build_tracing
    from seqpatch.plots import tracing_summary

    ref = build_tracing(n_programs=3, n_samples=2, data_dir=pairs_dir, progress=False)
    rows = Store(pairs_dir).load("tracing", ref.version).with_format("numpy")
    summary = tracing_summary(rows, "builtin")
    cells = tracing_cells(summary)
    ks = np.asarray(rows["divergence_index"])
    effects = np.asarray(rows["indirect_effect"])  # [programs, kinds, layers, positions]
    for k in sorted(set(ks.tolist())):
        chosen = ks == k
        effect = effects[chosen]
        first = int(np.flatnonzero(chosen)[0])
        n_tokens = int(rows[first]["n_tokens"])
        for kind_i, kind in enumerate(summary["kinds"]):
            drawn = (
                cells.filter((cells["kind"] == kind) & (cells["divergence_index"] == k))
                .sort("layer", "position")["aie"]
                .to_numpy()
                .reshape(organism.n_layers, n_tokens)
            )
            expected = effect[:, kind_i, :, :n_tokens].mean(axis=0)
            np.testing.assert_allclose(drawn, expected, atol=1e-6)
        marked = cells.filter((cells["divergence_index"] == k) & cells["corrupted"])
        assert set(marked["position"].to_list()) == set(rows[first]["corrupted_positions"])
    assert summary["clean_prob"] == pytest.approx(float(np.mean(rows["clean_prob"])))
    assert summary["corrupted_prob"] == pytest.approx(float(np.mean(rows["corrupted_prob"])))


def test_plot_tracing_writes_into_the_charts_dir_not_the_version(pairs_dir):
    from seqpatch.plots import default_charts_dir

    assert invoke("build", "tracing", *TRACE, "--data-dir", pairs_dir).exit_code == 0
    store = Store(pairs_dir)
    ref = store.resolve("tracing")
    before = snapshot(ref.path)
    result = invoke("plot", "tracing", "--data-dir", pairs_dir)
    assert result.exit_code == 0, result.output
    charts = default_charts_dir(ref)
    assert charts.parent == pairs_dir / "charts"
    png = charts / "causal-trace.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"chart: {png}" in result.output
    assert snapshot(ref.path) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--corrupt", "nope"], "unknown corrupt target 'nope'"),
        (["--program", "c"], "program must be 'a' or 'b'"),
        (["--kinds", "resid,heads"], "kinds must be a non-empty subset of resid, mlp, attn"),
        (["--engine", "fast"], "unknown --engine 'fast'; use one of auto, cached, full"),
        (["--n-samples", "0"], "--n-samples"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(pairs_dir, args, message):
    before = snapshot(pairs_dir)
    result = invoke("build", "tracing", *args, "--data-dir", pairs_dir)
    assert result.exit_code == 2, result.output
    assert message in error_line(result.stderr)
    assert snapshot(pairs_dir) == before


def test_run_with_tracing_traces_the_patched_pairs(tmp_path):
    from seqpatch.pipeline import RunConfig, run

    cfg = RunConfig(
        seq_lens="1-4",
        n_per_len=4,
        min_accuracy=0.0,
        min_seq_len=1,
        max_seq_len=3,
        n_pairs=3,
        sites=("resid_pre",),
        tracing=True,
        tracing_programs=2,
    )
    report = run(cfg, tmp_path, echo=lambda _: None, progress=False)
    assert [name for name, _, _ in report.steps][-2:] == ["patching", "tracing"]
    store = Store(tmp_path)
    tracing, patching = store.resolve("tracing"), store.resolve("patching")
    parents = {p["stage"]: p["version"] for p in tracing.provenance["parents"]}
    patched = {p["stage"]: p["version"] for p in patching.provenance["parents"]}
    assert parents == {"pairs": patched["pairs"]}
    assert tracing.provenance["config"]["n_programs"] == 2
    assert tracing.path / "causal-trace.png" in report.charts


def test_run_cli_has_the_tracing_flag():
    result = invoke("run", "--help")
    assert result.exit_code == 0 and "--tracing" in result.output
    assert "--no-tracing" in result.output  # a flag pair
    for command in (("run",), ("build", "activations"), ("build", "das")):
        help_text = invoke(*command, "--help").output
        assert "<bool>" not in help_text, command  # flags render as flags, not as values
    activations = " ".join(invoke("build", "activations", "--help").output.split())
    assert "([layers, positions, d_model] arrays)" in activations


def test_noise_scale_auto_from_the_command_line(pairs_dir):
    """``--noise-scale auto`` calibrates ν (recorded in provenance and rows); a word that is not
    a number or ``auto`` is one line and exit 2, before any work."""
    result = invoke(
        "build", "tracing", "--n-programs", "3", "--n-samples", "2", "--kinds", "resid",
        "--noise-scale", "auto", "--calibration-programs", "3", "--data-dir", pairs_dir,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ref = Store(pairs_dir).resolve("tracing", "latest")
    steps = ref.provenance["extra"]["calibration"]
    assert ref.provenance["config"]["noise_scale"] == "auto" and steps[-1]["chosen"]
    rows = Store(pairs_dir).load("tracing", ref.version)
    assert set(rows["noise_scale"]) == {steps[-1]["noise_scale"]}
    bad = invoke("build", "tracing", "--noise-scale", "loud", "--data-dir", pairs_dir)
    assert bad.exit_code == 2 and "auto" in error_line(bad.output)


def test_chain_pairs_from_the_command_line(tmp_path):
    result = invoke(
        "build", "pairs", "--model", "builtin", "--seq-len", "4", "--n-pairs", "6",
        "--min-depth", "2", "--changed-role", "root", "--data-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = Store(tmp_path).load("pairs", Store(tmp_path).resolve("pairs", "latest").version)
    assert min(rows["chain_depth"]) >= 2
    assert all(r["statement_a"].split("= ")[1].isdigit() for r in rows)  # root: constants
