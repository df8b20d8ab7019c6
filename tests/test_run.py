"""`seqpatch run`, the main job, end to end on the shipped organism (small settings)."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from seqpatch.cli import app
from seqpatch.pipeline import RunConfig, run
from seqpatch.store import Store


def test_run_builds_every_stage_and_the_charts(tmp_path):
    cfg = RunConfig(
        seq_lens="1-8", n_per_len=8, min_accuracy=0.0, n_pairs=12, sites=("resid_pre", "mlp_out")
    )
    report = run(cfg, tmp_path, echo=lambda _: None)
    assert [name for name, _, _ in report.steps] == [
        "programs",
        "benchmark",
        "choose",
        "pairs",
        "activations",
        "patching",
    ]
    store = Store(tmp_path)
    patching = store.resolve("patching")
    assert patching.provenance["row_count"] == 2 * 12
    assert patching.provenance["config"]["activations"] == store.resolve("activations").version
    chosen = json.loads((tmp_path / "chosen_model.json").read_text())
    assert chosen["model_spec"] == "builtin"
    pairs = store.load("pairs")
    assert set(pairs["seq_len"]) == {min(chosen["seq_len"], cfg.max_seq_len)}
    stats = np.load(patching.path / "heatmap.npy")
    assert stats.shape[0] == 2 and np.nanmax(stats[:, :, 2]) <= 12
    for name in ("heatmap.png", "heatmap.html", "traces.png", "traces.html"):
        assert (patching.path / name).stat().st_size > 1000
    assert {p.name for p in report.charts} >= {"heatmap.png", "accuracy.png", "results_summary.csv"}

    again = run(cfg, tmp_path, echo=lambda _: None)  # everything is reused
    assert all(what.startswith(("reused", "chose")) for _, what, _ in again.steps)


def test_run_cli_reports_a_bad_option_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["run", "--sites", "nowhere", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown site 'nowhere'" in result.output
    assert not any(tmp_path.iterdir())  # nothing was built before the check
