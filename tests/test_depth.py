"""seqpatch.depth and scripts/compare_models.py: several chain studies side by side.

A tiny chain study of the organism is built with the real pipeline (the steps
``scripts/study_pretrained.py`` runs, on 8 pairs), its ``study.json`` written as that script
writes it; a second folder holds the same pairs with its patching build stopped after one of its
two shards. Every number the chart and the markdown show is recomputed here from the stored
rows with numpy, independently of ``seqpatch.views``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from seqpatch import depth
from seqpatch.charts.depth import depth_figure
from seqpatch.depth_markdown import fragment, model_findings
from seqpatch.executor import execute
from seqpatch.options import RuntimeSettings
from seqpatch.stages.base import ModelCache
from seqpatch.stages.pairs import PairsConfig
from seqpatch.stages.patching import PatchingConfig
from seqpatch.stages.tracing import TracingConfig
from seqpatch.store import Store

N_PAIRS = 8
SITES = ("resid_pre", "attn_out")


def _step(ref, n: int) -> dict:
    return {"stage": ref.stage, "version": ref.version, "seconds": 0.0, "pairs": n}


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """A complete-enough chain study (pairs, slice patching, heads, tracing; no whole stream,
    no DAS) and a copy whose patching stopped after one of two shards."""
    root = tmp_path_factory.mktemp("chains")
    full = root / "full"
    store, models = Store(full), ModelCache()
    quiet = RuntimeSettings(progress=False)
    pairs_cfg = PairsConfig(
        model="builtin", seq_len=4, n_pairs=N_PAIRS, min_depth=2, changed_role="root"
    )
    pairs = execute(
        "pairs", pairs_cfg, {"benchmark": None}, store=store, models=models, runtime=quiet
    )
    parents = {"pairs": pairs, "activations": None}
    slice_cfg = PatchingConfig(sites=SITES, positions="slice")
    patching = execute("patching", slice_cfg, parents, store=store, models=models, runtime=quiet)
    heads_cfg = PatchingConfig(sites=("head_z",), axes=("layer", "head"), layers=(0, 1))
    heads = execute("patching", heads_cfg, parents, store=store, models=models, runtime=quiet)
    trace_cfg = TracingConfig(noise_scale=3.0, n_programs=4, n_samples=2)
    tracing = execute(
        "tracing", trace_cfg, {"pairs": pairs}, store=store, models=models, runtime=quiet
    )
    steps = {
        "pairs": _step(pairs, N_PAIRS),
        "patching": _step(patching, N_PAIRS),
        "heads": _step(heads, N_PAIRS),
        "tracing": _step(tracing, 4),
    }
    (full / "study.json").write_text(json.dumps({"model": "builtin", "steps": steps}))

    partial = root / "partial"
    partial.mkdir()
    shutil.copytree(full / "pairs", partial / "pairs")
    (partial / "study.json").write_text(
        json.dumps({"model": "builtin", "steps": {"pairs": steps["pairs"]}})
    )
    half = RuntimeSettings(progress=False, shard_size=N_PAIRS // 2)
    execute(
        "patching", slice_cfg, {"pairs": pairs.version, "activations": None},
        store=Store(partial), models=models, runtime=half, shard=(0, 2),
    )  # fmt: skip
    return {"full": full, "partial": partial, "refs": steps}


def expected_curves(rows, site: str = "resid_pre") -> dict[tuple[str, int], list[float]]:
    """Per (group, layer), every pair's value: the stored grid at the pair's own tokens of each
    group (the last ``hop0:value*`` token; ``hopN`` N ≥ 1; ``question:*``; ``last``), the token
    of largest |value| where a group has several."""
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows.with_format("numpy"):
        if row["site"] != site:
            continue
        roles = [str(r) for r in row["roles"]]
        grid = np.asarray(row["normalised"], dtype=float)
        value = [t for t, r in enumerate(roles) if r.startswith("hop0:value")]
        groups = {
            "value": value[-1:],
            "hops": [t for t, r in enumerate(roles) if re.match(r"hop[1-9]\d*:", r)],
            "question": [t for t, r in enumerate(roles) if r.startswith("question:")],
            "last": [t for t, r in enumerate(roles) if r == "last"],
        }
        for group, positions in groups.items():
            for layer in range(grid.shape[0]):
                cells = grid[layer, positions]
                cells = cells[~np.isnan(cells)]
                if cells.size:
                    out[(group, layer)].append(float(cells[np.argmax(np.abs(cells))]))
    return out


def expected_handoff(curves: dict[tuple[str, int], list[float]]) -> tuple[int, float]:
    """The first layer whose mean at the last token is ≥ 0.5, and that mean."""
    layers = sorted({layer for _, layer in curves})
    mean = {key: float(np.mean(v)) for key, v in curves.items()}
    at = next(la for la in layers if mean[("last", la)] >= 0.5)
    return at, mean[("last", at)]


def test_depth_curves_are_the_means_of_the_stored_rows_by_group(chain):
    ms = depth.open_study(chain["full"], "organism")
    rows = Store(chain["full"]).load("patching", chain["refs"]["patching"]["version"])
    want = expected_curves(rows)
    curves = depth.depth_curves(ms)
    assert set(curves["group"]) == set(depth.GROUPS)  # chains of depth ≥ 2 have every group
    got = {(g, la): (m, n) for g, la, m, n in curves.select("group", "layer", "mean", "n").rows()}
    assert got.keys() == want.keys()
    for key, values in want.items():
        assert got[key][0] == pytest.approx(np.mean(values), abs=1e-9), key
        assert got[key][1] == len(values)
    n_layers = int(curves["n_layers"][0])
    assert n_layers == 4 and curves["depth"].max() == 1.0 and curves["depth"].min() == 0.0
    assert set(curves["n"]) == {N_PAIRS}  # every pair has a value token, a hop, a last token


def test_the_chart_draws_those_means_on_a_signed_scale_and_names_the_pairs(chain):
    ms = depth.open_study(chain["full"], "organism")
    rows = Store(chain["full"]).load("patching", chain["refs"]["patching"]["version"])
    want = expected_curves(rows)
    curves = depth.depth_curves(ms)
    chart = depth_figure(curves, depth.GROUPS, depth.GROUP_TITLES, ["organism: 8 pairs"])
    spec = chart.to_dict()
    drawn = [r for rows_ in spec["datasets"].values() for r in rows_]
    assert len(drawn) == len(want)
    for r in drawn:
        assert r["mean"] == pytest.approx(np.mean(want[(r["group"], r["layer"])]), abs=1e-9)
        assert r["depth"] == pytest.approx(r["layer"] / 3)
    scale = spec["spec"]["layer"][2]["encoding"]["y"]["scale"]
    low, high = scale["domain"]
    assert low <= min(0.0, min(r["low"] for r in drawn)) and high >= max(r["high"] for r in drawn)
    assert "organism: 8 pairs" in spec["title"]["subtitle"]
    assert set(spec["spec"]["layer"][0]["encoding"]["y"].values()) == {0}  # the zero rule
    panels = {r["panel"] for r in drawn}
    assert panels == {depth.GROUP_TITLES[g] for g in depth.GROUPS}  # words, not role codes


def test_missing_steps_are_reported_as_not_run(chain):
    ms = depth.open_study(chain["full"], "organism")
    status = depth.statuses(ms)
    assert {s: st.state for s, st in status.items()} == {
        "patching": "done",
        "tracing": "done",
        "stream-before-last": "not run",
        "stream-last": "not run",
        "heads": "done",
        "das": "not run",
    }
    assert depth.stream_crossing(ms) is None and depth.das_facts(ms) is None
    text = "\n".join(model_findings(ms))
    assert "- **DAS**: not run yet." in text
    assert "- **Whole stream**: before-last not run yet, last not run yet." in text


def test_an_unfinished_patching_build_is_read_from_its_finished_shards_and_said_partial(chain):
    ms = depth.open_study(chain["partial"], "half")
    status = depth.step_status(ms, "patching")
    assert (status.state, status.pairs, status.total, status.shards, status.n_shards) == (
        "unfinished", N_PAIRS // 2, N_PAIRS, 1, 2,
    )  # fmt: skip
    shard = next((chain["partial"] / "patching").glob("*.partial")) / "shard-00000"
    from datasets import Dataset

    want = expected_curves(Dataset.load_from_disk(str(shard)))
    curves = depth.depth_curves(ms)
    assert curves["partial"].all()
    for g, la, m in curves.select("group", "layer", "mean").rows():
        assert m == pytest.approx(np.mean(want[(g, la)]), abs=1e-9)
    text = fragment([ms], "cmd")
    assert f"**not finished**: {N_PAIRS // 2} of {N_PAIRS} pairs" in text
    assert f"**partial: {N_PAIRS // 2} of {N_PAIRS} pairs**" in text
    assert "- **Tracing**: not run yet." in text and "- **Heads**: not run yet." in text


def test_the_markdown_numbers_are_the_datas(chain):
    ms = depth.open_study(chain["full"], "organism")
    store = Store(chain["full"])
    rows = store.load("patching", chain["refs"]["patching"]["version"])
    at, last = expected_handoff(expected_curves(rows))
    text = fragment([ms], "python scripts/compare_models.py --study organism=DIR")
    assert f"the last token carries ≥ 0.5 from layer {at} ({at / 3:.2f} of depth, {last:.2f})" in (
        text
    )
    assert (
        f"| hand-off: last token ≥ 0.5 from (relative depth) | layer {at} of 4 ({at / 3:.2f}) |"
        in (text)
    )
    heads = store.load("patching", chain["refs"]["heads"]["version"]).with_format("numpy")
    grid = np.nanmean(np.stack([np.asarray(g, float) for g in heads["normalised"]]), axis=0)
    layer, head = np.unravel_index(np.nanargmax(grid), grid.shape)
    assert f"L{layer}.H{head} {grid[layer, head]:.2f}" in text
    trace = store.load("tracing", chain["refs"]["tracing"]["version"])
    assert f"P(answer) clean {np.mean(trace['clean_prob']):.3f}" in text
    assert f"corrupted {np.mean(trace['corrupted_prob']):.3f}" in text
    liner = re.search(r"`python -c \"(.*?handoff.*?)\"`", text).group(1)
    assert str(chain["full"]) in liner  # the one-liner names the study it reads


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "compare_models.py"
    spec = importlib.util.spec_from_file_location("compare_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_writes_chart_spec_and_fragment_into_the_marked_section(
    chain, tmp_path, monkeypatch
):
    doc = tmp_path / "doc.md"
    doc.write_text("# Doc\n<!-- compare-models:start -->\nold\n<!-- compare-models:end -->\nend\n")
    argv = [
        "compare_models.py",
        f"--study=organism={chain['full']}",
        f"--study=half={chain['partial']}",
        f"--out={tmp_path / 'out'}",
        f"--into={doc}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    _script().main()
    out = tmp_path / "out"
    assert (out / "compare-models.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spec = json.loads((out / "compare-models.vl.json").read_text())
    subtitle = " ".join(spec["title"]["subtitle"])
    assert f"organism: {N_PAIRS} pairs, 4 layers" in subtitle
    assert f"half: PARTIAL, {N_PAIRS // 2} of {N_PAIRS} pairs" in subtitle
    assert "Dashed line: partial" in subtitle
    line = spec["spec"]["layer"][2]["encoding"]["strokeDash"]
    assert line["field"] == "patching"
    drawn = [r for rows_ in spec["datasets"].values() for r in rows_]
    assert {r["model"]: r["patching"].split(":")[0] for r in drawn} == {
        "organism": "finished",
        "half": "partial",
    }
    text = doc.read_text()
    assert "old" not in text and text.endswith("<!-- compare-models:end -->\nend\n")
    assert (out / "compare-models.md").read_text() in text
    assert "](out/compare-models.png)" in text  # the chart, relative to the document


@pytest.mark.parametrize(
    ("arg", "words"),
    [("organism", "must be NAME=DIR"), ("x=/nonexistent", "has no study.json")],
)
def test_the_script_refuses_a_bad_study_with_exit_2(arg, words, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["compare_models.py", f"--study={arg}"])
    with pytest.raises(SystemExit) as stop:
        _script().main()
    assert stop.value.code == 2 and words in capsys.readouterr().err


def test_shards_written_before_they_recorded_hashes_count_as_unchecked(chain, tmp_path):
    """A shard without ``files.json`` (older code) that loads is read and said unchecked; a
    shard whose bytes no longer match its recorded hashes is left out."""
    copy = tmp_path / "partial"
    shutil.copytree(chain["partial"], copy)
    work = next((copy / "patching").glob("*.partial"))
    (work / "shard-00000" / "files.json").unlink()
    status = depth.step_status(depth.open_study(copy), "patching")
    assert (status.state, status.pairs, status.unchecked) == ("unfinished", N_PAIRS // 2, 1)
    assert "1 of them written before shards recorded hashes" in status.words()

    damaged = tmp_path / "damaged"
    shutil.copytree(chain["partial"], damaged)
    work = next((damaged / "patching").glob("*.partial"))
    arrow = next((work / "shard-00000").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-20] ^= 0xFF
    arrow.write_bytes(bytes(data))
    status = depth.step_status(depth.open_study(damaged), "patching")
    assert (status.state, status.pairs, status.shards) == ("unfinished", 0, 0)
    assert depth.depth_curves(depth.open_study(damaged)).is_empty()


def test_a_study_with_no_pairs_yet_reports_every_step_not_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "study.json").write_text(json.dumps({"model": "m", "steps": {}}))
    ms = depth.open_study(tmp_path)
    assert ms.name == "m" and ms.study is None
    assert {st.state for st in depth.statuses(ms).values()} == {"not run"}
    assert depth.depth_curves(ms).is_empty() and depth.handoff(ms) is None
    text = fragment([ms], "cmd")
    assert "| pairs | not built yet |" in text and "not measured (patching not run yet)" in text
    monkeypatch.setattr(sys, "argv", ["compare_models.py", f"--study=m={tmp_path}"])
    with pytest.raises(SystemExit) as stop:
        _script().main()
    assert stop.value.code == 2 and "no study has a patching grid" in capsys.readouterr().err


def test_steps_run_in_a_second_process_are_read_from_its_side_record(chain, tmp_path):
    """``study_pretrained.py --steps heads --record side`` writes ``study-side.json``: the
    study reads its steps as its own; where both records name one version, the run that built
    it (finished first) is the entry; where they name different versions, the main record's."""
    folder = tmp_path / "study"
    shutil.copytree(chain["full"], folder)
    steps = chain["refs"]
    main = {k: dict(v, finished="2026-12-06T06:00:00Z") for k, v in steps.items() if k != "heads"}
    main["tracing"]["seconds"] = 0.1  # reused: it was built by the side process
    (folder / "study.json").write_text(json.dumps({"model": "builtin", "steps": main}))
    side = {
        "pairs": dict(steps["pairs"], seconds=0.0, finished="2026-12-06T06:10:00Z"),
        "heads": dict(steps["heads"], seconds=12.0, finished="2026-12-06T05:00:00Z"),
        "tracing": dict(steps["tracing"], seconds=30.0, finished="2026-12-06T05:30:00Z"),
        "patching": dict(steps["patching"], version="0" * 12, finished="2026-12-06T04:00:00Z"),
    }
    (folder / "study-side.json").write_text(json.dumps({"model": "builtin", "steps": side}))
    ms = depth.open_study(folder)
    assert ms.steps["heads"]["seconds"] == 12.0
    assert ms.steps["tracing"]["seconds"] == 30.0
    assert ms.steps["patching"]["version"] == steps["patching"]["version"]
    assert depth.step_status(ms, "heads").state == "done"
    (folder / "study.json").unlink()  # only the side process has recorded steps so far
    assert depth.step_status(depth.open_study(folder), "heads").state == "done"
    (folder / "study-side.json").write_text("{not json")
    with pytest.raises(depth.CompareError, match=r"study-side\.json cannot be read"):
        depth.open_study(folder)


def test_an_unfinished_das_build_is_said_with_its_finished_cells(chain, tmp_path):
    """DAS runs on its own pairs, one shard per cell: a study whose DAS stopped after one of two
    cells says so (it said "not run" before DAS was sharded)."""
    from seqpatch.stages.das import DasConfig

    folder = tmp_path / "das"
    shutil.copytree(chain["full"], folder)
    record = json.loads((folder / "study.json").read_text())
    refs = record["steps"]
    record["steps"]["das-pairs"] = refs["pairs"]  # the study's own pairs stand in for DAS's
    (folder / "study.json").write_text(json.dumps(record))
    cfg = DasConfig(top_n=2, ks=(1,), epochs=1, allow_small=True, split=(0.34, 0.33, 0.33))
    parents = {"pairs": refs["pairs"]["version"], "patching": refs["patching"]["version"]}
    store = Store(folder)
    assert depth.step_status(depth.open_study(folder), "das").state == "not run"
    execute("das", cfg, parents, store=store, models=ModelCache(), progress=False, shard=(0, 2))
    status = depth.step_status(depth.open_study(folder), "das")
    assert (status.state, status.pairs, status.total) == ("unfinished", 1, 2)
    assert status.words() == f"**not finished**: 1 of 2 cells (build `{status.version}`)"
    assert "- **DAS**: **not finished**: 1 of 2 cells" in "\n".join(
        model_findings(depth.open_study(folder))
    )


def test_das_facts_give_the_best_k_where_none_reaches_the_full_patch(chain, tmp_path):
    """A cell whose DAS never gets within tolerance of the full patch (k = 1 only, one epoch)
    has no ``smallest_k`` in ``summary.json``; its facts are DAS's best IIA, read from the rows,
    and the controls at that k (the markdown said nothing before: it raised KeyError)."""
    import polars as pl

    from seqpatch.stages.das import DasConfig

    folder = tmp_path / "das-best"
    shutil.copytree(chain["full"], folder)
    record = json.loads((folder / "study.json").read_text())
    refs = record["steps"]
    cfg = DasConfig(top_n=2, ks=(1,), epochs=1, allow_small=True, split=(0.34, 0.33, 0.33))
    parents = {"pairs": refs["pairs"]["version"], "patching": refs["patching"]["version"]}
    ref = execute("das", cfg, parents, store=Store(folder), models=ModelCache(), progress=False)
    record["steps"]["das-pairs"] = refs["pairs"]
    record["steps"]["das"] = _step(ref, N_PAIRS)
    (folder / "study.json").write_text(json.dumps(record))
    ms = depth.open_study(folder)
    table = pl.read_csv(ref.path / "iia.csv")
    facts = depth.das_facts(ms)
    assert any(f["smallest_k"] is None for f in facts)
    for f in facts:
        at = table.filter((pl.col("layer") == f["layer"]) & (pl.col("position") == f["position"]))
        at = at.filter(pl.col("site") == f["site"])
        das = at.filter(pl.col("method") == "das")
        assert f["k"] == (1 if f["smallest_k"] is None else f["smallest_k"])
        assert f["das_iia"] == pytest.approx(das.filter(pl.col("k") == f["k"])["iia"][0])
    text = "\n".join(model_findings(ms))
    assert "(its best; no k within tolerance)" in text
