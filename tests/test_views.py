"""seqpatch.views: a study's labelled results equal what the stages stored."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from seqpatch.store import DamagedVersionError, StageNotFoundError, Store
from seqpatch.views import Study, confidence_interval, display_token


def _layer_pos(study: Study):
    return next(r for r in study.patching_refs() if study.grid(r)["axes"] == ("layer", "pos"))


def test_a_study_holds_every_stage_built_from_its_pairs(organism_study):
    study = Study(organism_study)
    counts = {stage: len(study.refs(stage)) for stage in Study.STAGES}
    assert counts == {
        "programs": 1,
        "benchmark": 1,
        "pairs": 1,
        "activations": 1,
        "patching": 3,
        "tracing": 1,
        "das": 1,
    }
    lineage = study.lineage()
    assert lineage["stage"].to_list().count("patching") == 3
    pairs_row = lineage.filter(pl.col("stage") == "pairs").row(0, named=True)
    assert pairs_row["parents"] == f"benchmark/{study.refs('benchmark')[0].version}"
    assert pairs_row["model_id"] == "seqpatch/organism"
    assert json.loads(pairs_row["config"])["n_pairs"] == 24
    choice = study.choice()
    assert choice["chosen"]["model_spec"] == "builtin" and choice["seq_len"] == 4
    with pytest.raises(StageNotFoundError):
        Study(organism_study, pairs="ffffffffffff")


def test_patching_cells_equal_the_stored_heatmap_arrays(organism_study):
    study = Study(organism_study)
    for ref in study.patching_refs():
        index = json.loads((ref.path / "heatmap.json").read_text())
        stored = np.load(ref.path / index["metrics"]["normalised"]["file"])
        cells = study.patching(ref.version, ("normalised",))
        axes = study.grid(ref)["axes"]
        for row in cells.iter_rows(named=True):
            si = index["sites"].index(row["site"])
            ki = index["divergence_indices"].index(row["divergence_index"])
            grid = [index["layers"].index(row["layer"])]
            if "head" in axes:
                grid.append(index["heads"].index(row["head"]))
            if "pos" in axes:
                grid.append(row["position"])
            mean, std, count = stored[(si, ki, slice(None), *grid)]
            assert row["n"] == count
            assert row["mean"] == pytest.approx(mean, abs=1e-6)
            assert row["std"] == pytest.approx(std, abs=1e-6)
        assert len(cells) == int(np.sum(stored[:, :, 2] > 0))  # every covered cell, no other


def test_pair_values_are_the_stored_rows_and_the_ci_is_the_sample_interval(organism_study):
    study = Study(organism_study)
    ref = _layer_pos(study)
    rows = Store(organism_study).load_ref(ref).with_format("numpy")
    values = study.pair_values(ref.version, "prob_delta", site="attn_out", divergence_index=2)
    assert set(values["site"]) == {"attn_out"} and set(values["divergence_index"]) == {2}
    for row in values.sample(20, seed=0).iter_rows(named=True):
        i = next(
            j
            for j in range(len(rows))
            if rows[j]["pair_id"] == row["pair_id"] and rows[j]["site"] == "attn_out"
        )
        layer = list(rows[i]["layers"]).index(row["layer"])
        assert row["value"] == pytest.approx(float(rows[i]["prob_delta"][layer, row["position"]]))
    cell = values.filter(pl.col("layer") == 1, pl.col("position") == values["position"].max())
    summary = study.patching(ref.version, ("prob_delta",)).filter(
        pl.col("site") == "attn_out",
        pl.col("divergence_index") == 2,
        pl.col("layer") == 1,
        pl.col("position") == values["position"].max(),
    )
    x = cell["value"].to_numpy()
    half = 1.959963984540054 * x.std(ddof=1) / np.sqrt(len(x))
    assert summary["ci_low"][0] == pytest.approx(x.mean() - half)
    assert summary["ci_high"][0] == pytest.approx(x.mean() + half)
    assert summary["role"][0] == "last"


def test_labels_are_decoded_and_roles_name_the_changed_and_last_tokens(organism_study):
    assert display_token("Ġhelpful") == "·helpful"
    assert display_token("Ċ") == "↵" and display_token("a\nb c") == "a↵b·c"
    assert display_token("") == "∅"
    study = Study(organism_study)
    cells = study.patching(_layer_pos(study).version, ("normalised",))
    changed = cells.filter(pl.col("role") == "changed")
    assert len(changed) and changed["label"].str.ends_with("*").all()
    assert set(cells.filter(pl.col("role") == "last")["label"]) == {":"}
    assert np.isnan(confidence_interval(0.5, 0.1, 1)[0])  # one pair: no interval


def test_findings_are_the_strongest_cells_and_the_value_moves_to_the_answer(organism_study):
    study = Study(organism_study)
    version = _layer_pos(study).version
    cells = study.patching(version, ("normalised",))
    top = study.findings().filter(pl.col("version") == version, pl.col("rank") == 1)
    for row in top.iter_rows(named=True):
        group = cells.filter(
            pl.col("site") == row["site"], pl.col("divergence_index") == row["divergence_index"]
        )
        assert row["mean"] == pytest.approx(group["mean"].max())
    moves = study.moves().filter(pl.col("site") == "resid_pre")
    assert len(moves) == 3
    for row in moves.iter_rows(named=True):
        # layer 0's residual stream is the embedding: only the changed token carries A's value
        assert row["changed_until"] is not None and row["changed_until"] >= 0
        assert row["answer_from"] is not None and row["answer_from"] > row["changed_until"]
        assert "(changed)" in row["path"] and row["path"].rstrip().split(" (")[-1].startswith(
            "last"
        )


def test_tracing_and_das_frames(organism_study):
    study = Study(organism_study)
    trace = study.tracing()
    assert set(trace["kind"]) == {"resid", "mlp", "attn"}
    assert trace["label"].str.ends_with("*").any()  # the corrupted tokens are marked
    assert set(study.tracing_roles()["role"]) >= {"last"}
    das = study.das()
    assert "basis" not in das.columns and set(das["method"]) >= {"das", "random", "full"}
    assert study.das_summary()[0]["site"] == das["site"][0]


def test_an_artifact_that_changed_on_disk_is_refused(organism_study, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(organism_study, copy)
    study = Study(copy)
    path = study.ref("das").path / "summary.json"
    text = path.read_text()
    path.write_text(text.replace('"site"', '"sitf"', 1))  # same size: only the hash can tell
    with pytest.raises(DamagedVersionError, match="recorded hash"):
        study.das_summary()


def test_the_readme_example_reads_a_study(organism_study):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Reading a study", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(
        compile(code.replace('"seqpatch-data"', repr(str(organism_study))), "README", "exec"),
        namespace,
    )
    assert set(namespace["cells"]["metric"]) == {"normalised"}
    assert set(namespace["per_pair"]["site"]) == {"resid_pre"}


def test_pairs_of_different_lengths_are_aligned_at_their_last_token_as_the_stage_aligns_them(
    organism_study, tmp_path
):
    """A stored grid where half of one k's pairs are a token shorter (as BPE tokenizers make
    them): the API's means are the stage's own ``aggregate`` (end-aligned) and the labels and
    roles are the longest pair's."""
    from seqpatch.stages import patching
    from seqpatch.stages.base import Built

    copy = tmp_path / "study"
    shutil.copytree(organism_study, copy)
    store = Store(copy)
    study = Study(copy)
    source = study.rows(_layer_pos(study))
    records = source.to_list()
    for row in records[::2]:  # every other pair: its first token dropped, one token shorter
        row["n_tokens"] -= 1
        row["tokens"] = row["tokens"][1:]
        row["diff_positions"] = [t - 1 for t in row["diff_positions"]]
        for name in ("normalised", "prob_delta", "logit_diff", "prob_delta_candidates", "lse"):
            grid = np.asarray(row[name], dtype=np.float32)
            shifted = np.concatenate([grid[:, 1:], np.full_like(grid[:, :1], np.nan)], axis=1)
            row[name] = shifted.tolist()
    rows = source.from_list(records, features=source.features)
    ref = store.get_or_build(
        "patching",
        patching.SCHEMA_VERSION,
        patching.PatchingConfig(sites=("resid_pre", "attn_out"), layers=(0, 1, 2, 3)),
        lambda: Built(rows),
        parents=[study.pairs_ref],
    )
    agg = patching.aggregate(rows, "normalised")
    assert agg["aligned_to_end"]  # the case under test
    cells = Study(copy).patching(ref.version, ("normalised",))
    for row in cells.iter_rows(named=True):
        si = agg["sites"].index(row["site"])
        ki = agg["divergence_indices"].index(row["divergence_index"])
        li = agg["layers"].index(row["layer"])
        mean, _, count = agg["stats"][si, ki, :, li, row["position"]]
        assert (row["mean"], row["n"]) == (pytest.approx(mean, abs=1e-6), count)
        expected = agg["labels"][row["divergence_index"]][row["position"]]
        assert row["label"] == display_token(expected.rstrip("*")) + "*" * expected.endswith("*")
    last = cells.filter(pl.col("role") == "last")
    assert set(last["label"]) == {":"} and (last["n"] == 8).all()  # every pair's last token


def test_token_roles_label_positions_and_a_slice_grid_is_summarised_by_role(
    organism_study, tmp_path
):
    """Rows that store each token's role (``seqpatch.roles``) expose it per pair, and a
    ``slice`` grid's cells are roles: each role's mean is the mean over the pairs' tokens that
    have it, wherever they sit."""
    from seqpatch.stages import patching
    from seqpatch.stages.base import Built

    copy = tmp_path / "study"
    shutil.copytree(organism_study, copy)
    study = Study(copy)
    source = study.rows(_layer_pos(study))
    records = source.to_list()
    for row in records:  # made-up roles: by parity of the position, the last token "last"
        n = row["n_tokens"]
        row["roles"] = [("even" if t % 2 == 0 else "odd") for t in range(n - 1)] + ["last"]
    rows = source.from_list(records)
    config = {**dataclasses.asdict(patching.PatchingConfig(sites=("resid_pre", "attn_out")))}
    config["positions"] = "slice"
    ref = Store(copy).get_or_build(
        "patching", patching.SCHEMA_VERSION, config, lambda: Built(rows), [study.pairs_ref]
    )
    study = Study(copy)
    values = study.pair_values(ref.version, site="resid_pre", divergence_index=1)
    assert set(values.filter(pl.col("position") % 2 == 1)["token_role"]) <= {"odd", "last"}
    cells = study.patching(ref.version, ("normalised",)).filter(
        pl.col("site") == "resid_pre", pl.col("divergence_index") == 1, pl.col("layer") == 0
    )
    assert cells["position"].is_null().all() and set(cells["role"]) == {"even", "odd", "last"}
    even = values.filter(pl.col("layer") == 0, pl.col("token_role") == "even")["value"]
    row = cells.filter(pl.col("role") == "even").row(0, named=True)
    assert row["mean"] == pytest.approx(even.mean()) and row["n"] == len(even)
