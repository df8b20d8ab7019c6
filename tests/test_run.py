"""`seqpatch run`, the main job, end to end on the shipped organism (small settings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from seqpatch.cli import app
from seqpatch.pipeline import RunConfig, run
from seqpatch.store import Store

SMALL = ["--n-pairs", "12", "--sites", "resid_pre,mlp_out", "--min-accuracy", "0"]


def small_config() -> RunConfig:
    return RunConfig(
        seq_lens="1-8", n_per_len=8, min_accuracy=0.0, n_pairs=12, sites=("resid_pre", "mlp_out")
    )


def test_run_builds_every_stage_and_the_charts(tmp_path):
    cfg = small_config()
    lines: list[str] = []
    report = run(cfg, tmp_path, echo=lines.append)
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
    parents = {p["stage"]: p["version"] for p in patching.provenance["parents"]}
    assert parents == {
        "pairs": store.resolve("pairs").version,
        "activations": store.resolve("activations").version,
    }
    chosen = json.loads((tmp_path / "chosen_model.json").read_text())
    assert chosen["model_spec"] == "builtin"
    pairs = store.load("pairs")
    studied = min(chosen["seq_len"], cfg.max_seq_len)
    assert set(pairs["seq_len"]) == {studied}
    assert any(f"seq_len {studied}" in line for line in lines)  # the terminal says what it studies
    index = json.loads((patching.path / "heatmap.json").read_text())
    stats = np.load(patching.path / index["metrics"]["normalised"]["file"])
    assert stats.shape[0] == 2 and np.nanmax(stats[:, :, 2]) <= 12
    first_pair = store.load("pairs")[0]["pair_id"]
    for name in ("heatmap-normalised", f"traces-{first_pair}-normalised"):
        for suffix in (".png", ".html"):
            assert (patching.path / f"{name}{suffix}").stat().st_size > 1000
    assert {p.name for p in report.charts} >= {"heatmap-normalised.png", "accuracy.png"}
    accuracy = next(p for p in report.charts if p.name == "accuracy.png")
    assert store.resolve("benchmark").path not in accuracy.parents  # never inside a version

    again = run(cfg, tmp_path, echo=lambda _: None)  # everything is reused
    assert all(what.startswith(("reused", "chose")) for _, what, _ in again.steps)


def test_run_says_when_it_caps_the_chosen_length(tmp_path, monkeypatch):
    from seqpatch.stages import benchmark

    drawn: list[dict] = []
    draw = benchmark.accuracy_chart_artifacts

    def spy(*args, **kwargs):
        drawn.append(kwargs)
        return draw(*args, **kwargs)

    monkeypatch.setattr(benchmark, "accuracy_chart_artifacts", spy)
    lines: list[str] = []
    cfg = RunConfig(
        seq_lens="2-4",
        n_per_len=6,
        min_accuracy=0.0,
        min_seq_len=2,
        max_seq_len=3,
        n_pairs=4,
        sites=("resid_pre",),
    )
    run(cfg, tmp_path, echo=lines.append)
    chosen = json.loads((tmp_path / "chosen_model.json").read_text())
    assert chosen["seq_len"] == 4
    assert any("capped by --max-seq-len 3" in line for line in lines)
    assert set(Store(tmp_path).load("pairs")["seq_len"]) == {3}
    # the study's one accuracy chart shows the length studied and why it is not the chosen one
    assert drawn and drawn[0]["studied"] == 3 and "--max-seq-len 3" in drawn[0]["cap_reason"]


def test_run_output_fits_one_screen_and_ends_with_the_charts_and_the_report(tmp_path):
    result = CliRunner().invoke(app, ["run", *SMALL, "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) <= 40, result.output
    done = next(i for i, line in enumerate(lines) if line.startswith("done in"))
    charts = lines[done + 1 : -1]
    assert charts and all(line.strip().endswith((".png", ".html")) for line in charts)
    page = Path(lines[-1].split(": ", 1)[1])  # the last line is the study page
    pairs = Store(tmp_path).resolve("pairs").version
    assert page == tmp_path / "reports" / pairs / "index.html" and page.stat().st_size > 100_000
    for noise in ("Map", "Saving the dataset", "Loading weights", "Casting"):
        assert noise not in result.output
    quiet = CliRunner().invoke(app, ["run", *SMALL, "--quiet", "--data-dir", str(tmp_path)])
    assert quiet.exit_code == 0 and "▶" not in quiet.output and "━" not in quiet.output


def test_run_cli_reports_a_bad_option_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["run", "--sites", "nowhere", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown site 'nowhere'" in result.output
    assert not any(tmp_path.iterdir())  # nothing was built before the check
