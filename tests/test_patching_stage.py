"""activations + patching stages: schema, exactness against plain hooks, resume and shards."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch

from seqpatch import pipeline
from seqpatch.executor import execute
from seqpatch.interventions._layers import supports_layer_runner
from seqpatch.models import load_model
from seqpatch.programs import Program
from seqpatch.stages import patching
from seqpatch.stages.base import ModelCache
from seqpatch.stages.pairs import PairsConfig
from seqpatch.store import Store
from seqpatch.testing import save_tiny_model
from tests.test_pairs_stage import Oracle

N_PAIRS = 12


def tiny_handle(root, arch):
    folder = save_tiny_model(arch, root / arch, tokenizer="wordlevel")
    return load_model(str(folder), prompt_format="compact")


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    return tiny_handle(tmp_path_factory.mktemp("m"), "llama")


def model_cache(handle):
    """The pairs below are built for the model spec ``tiny``: every later stage loads that."""
    models = ModelCache()
    models.put("tiny", handle)
    return models


@pytest.fixture
def models(handle):
    return model_cache(handle)


def build_pairs(handle, data_dir):
    oracle = dataclasses.replace(handle, hf_model=Oracle(handle, "binding"))
    cfg = PairsConfig(model="tiny", seq_len=4, n_pairs=N_PAIRS, divergence_indices=(1, 3))
    execute("pairs", cfg, store=Store(data_dir), models=model_cache(oracle), progress=False)
    return data_dir


@pytest.fixture
def data_dir(tmp_path, handle):
    return build_pairs(handle, tmp_path / "data")


def ld_of(row):
    return row["logits"][..., row["answer_index_a"]] - row["logits"][..., row["answer_index_b"]]


# Each architecture's decoder layers, found here without the handle's adapter.
DECODER_LAYERS = {"llama": lambda m: m.model.layers, "gpt2": lambda m: m.transformer.h}


def hooked_logits(handle, src_ids, tgt_ids, site, layer, pos, arch="llama"):
    """Independent reference: capture the source's site with one plain hook, patch the target
    with another, read the full next-token logits ``[vocab]`` at the last position."""
    layer_module = DECODER_LAYERS[arch](handle.hf_model)[layer]
    captured = {}
    if site == "resid_pre":

        def grab(_m, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured["x"] = hidden[0, pos].clone()

        def put(_m, args, kwargs):
            if args:
                hidden = args[0].clone()
                hidden[0, pos] = captured["x"]
                return (hidden, *args[1:]), kwargs
            hidden = kwargs["hidden_states"].clone()
            hidden[0, pos] = captured["x"]
            return args, {**kwargs, "hidden_states": hidden}

        register = lambda fn: layer_module.register_forward_pre_hook(fn, with_kwargs=True)  # noqa: E731
    else:
        module = layer_module.mlp

        def grab(_m, _args, out):
            captured["x"] = out[0, pos].clone()

        def put(_m, _args, out):
            out = out.clone()
            out[0, pos] = captured["x"]
            return out

        register = module.register_forward_hook
    with torch.no_grad():
        h = register(grab)
        handle.hf_model(input_ids=torch.tensor([src_ids]))
        h.remove()
        h = register(put)
        logits = handle.hf_model(input_ids=torch.tensor([tgt_ids])).logits[0, -1]
        h.remove()
    return logits.float()


def clean_logits(handle, ids):
    with torch.no_grad():
        return handle.hf_model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_activations_stage_matches_plain_forward(handle, data_dir, models):
    ref = pipeline.build_activations(("resid_pre", "mlp_out"), data_dir=data_dir, models=models)
    rows = Store(data_dir).load("activations", ref.version).with_format("torch")
    assert len(rows) == N_PAIRS
    width = int(max(rows["n_tokens"]))
    assert rows.features["resid_pre_a"].shape == (handle.n_layers, width, handle.d_model)
    row = rows[0]
    with torch.no_grad():
        out = handle.hf_model(input_ids=row["input_ids_a"][None], output_hidden_states=True)
    for layer in range(handle.n_layers):
        assert torch.equal(row["resid_pre_a"][layer], out.hidden_states[layer][0])


def test_patching_equals_plain_hooks_and_metrics(handle, data_dir, models):
    ref = pipeline.build_patching(
        ("resid_pre", "mlp_out"), activations="none", data_dir=data_dir, models=models
    )
    assert ref.provenance["schema_version"] == patching.SCHEMA_VERSION == 5
    rows = Store(data_dir).load("patching", ref.version)
    assert len(rows) == 2 * N_PAIRS
    assert set(rows["site"]) == {"resid_pre", "mlp_out"}
    width = max(rows["n_tokens"])
    assert rows.features["lse"].shape == (handle.n_layers, width)
    pairs_rows = Store(data_dir).load("pairs")
    by_id = {r["pair_id"]: r for r in pairs_rows}
    numpy_rows = rows.with_format("numpy")
    for i in (0, N_PAIRS + 1):
        row = numpy_rows[i]
        pair = by_id[row["pair_id"]]
        for layer in (0, handle.n_layers - 1):
            for pos in (0, int(row["diff_positions"][0]), int(row["n_tokens"]) - 1):
                want = hooked_logits(
                    handle, pair["input_ids_a"], pair["input_ids_b"], row["site"], layer, pos
                )
                np.testing.assert_allclose(
                    row["logits"][layer, pos], want[pair["candidate_ids"]], atol=1e-5
                )
                assert abs(row["lse"][layer, pos] - float(want.logsumexp(-1))) <= 1e-5
        # metric grids are views of the stored logits
        a, b = int(row["answer_index_a"]), int(row["answer_index_b"])
        ld = row["logits"][..., a] - row["logits"][..., b]
        np.testing.assert_allclose(row["logit_diff"], ld, atol=1e-5)
        base_a, base_b = row["baseline_logits_a"], row["baseline_logits_b"]
        span = (base_a[a] - base_a[b]) - (base_b[a] - base_b[b])
        np.testing.assert_allclose(
            row["normalised"], (ld - (base_b[a] - base_b[b])) / span, rtol=1e-4, atol=1e-5
        )
        for name, ids in (("baseline_lse_a", "input_ids_a"), ("baseline_lse_b", "input_ids_b")):
            want_lse = float(clean_logits(handle, pair[ids]).logsumexp(-1))
            assert abs(float(row[name]) - want_lse) <= 1e-5
    # cells before the first differing token patch identical activations: no effect at all
    for row in numpy_rows:
        first_diff = int(row["diff_positions"][0])
        np.testing.assert_array_equal(row["logit_diff"][:, :first_diff], ld_of(row)[:, :first_diff])
        base_ld = (
            row["baseline_logits_b"][row["answer_index_a"]]
            - row["baseline_logits_b"][row["answer_index_b"]]
        )
        np.testing.assert_allclose(row["logit_diff"][:, :first_diff], base_ld, atol=1e-5)
        np.testing.assert_allclose(row["prob_delta"][:, :first_diff], 0.0, atol=1e-6)
    for chart in ("heatmap", "traces"):  # the stage's own charts, named by their metric
        pngs = list(ref.path.glob(f"{chart}*normalised*.png"))
        assert pngs and all(png.stat().st_size > 1000 for png in pngs), chart


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stored_prob_delta_is_the_full_vocabulary_delta(arch, tmp_path, handle):
    """The stored Δ per cell equals P(B's answer) from a full-vocabulary softmax of a plain-hook
    patch minus that of the clean B run, to 1e-6: on Llama (the compute-floor path) and GPT-2
    (the generic path of full forwards)."""
    model = handle if arch == "llama" else tiny_handle(tmp_path, arch)
    assert supports_layer_runner(model) == (arch == "llama")
    data_dir = build_pairs(model, tmp_path / "data")
    ref = pipeline.build_patching(
        ("resid_pre", "mlp_out"), activations="none", data_dir=data_dir, models=model_cache(model)
    )
    rows = Store(data_dir).load("patching", ref.version).with_format("numpy")
    by_id = {r["pair_id"]: r for r in Store(data_dir).load("pairs")}
    last = model.n_layers - 1
    differs_from_candidates = 0
    for i in (0, N_PAIRS - 1, N_PAIRS, 2 * N_PAIRS - 1):  # both sites, both divergence indices
        row = rows[i]
        pair = by_id[row["pair_id"]]
        answer = pair["candidate_ids"][int(row["answer_index_b"])]
        p_clean = clean_logits(model, pair["input_ids_b"]).softmax(-1)[answer]
        diverged, end = int(row["diff_positions"][0]), int(row["n_tokens"]) - 1
        for layer, pos in [(0, diverged), (last, diverged), (0, end), (last, end)]:
            patched = hooked_logits(
                model, pair["input_ids_a"], pair["input_ids_b"], row["site"], layer, pos, arch
            )
            want = float(patched.softmax(-1)[answer] - p_clean)
            assert abs(row["prob_delta"][layer, pos] - want) <= 1e-6, (row["site"], layer, pos)
            candidates_only = row["prob_delta_candidates"][layer, pos]
            differs_from_candidates += abs(candidates_only - want) > 1e-4
    assert differs_from_candidates  # the candidate softmax is not the roadmap's Δ here


def test_heatmap_arrays_are_named_by_their_metric(handle, data_dir, models):
    ref = pipeline.build_patching(
        ("resid_pre", "mlp_out"), activations="none", data_dir=data_dir, models=models
    )
    rows = Store(data_dir).load("patching", ref.version)
    files = patching.heatmap_artifacts(rows)
    index = json.loads(files[patching.HEATMAP_INDEX_FILE])
    assert set(index["metrics"]) == set(patching.METRICS)
    assert index["axes"] == ["site", "divergence_index", "statistic", "layer", "position"]
    assert index["sites"] == ["resid_pre", "mlp_out"] and index["divergence_indices"] == [1, 3]
    for metric in patching.METRICS:
        name = index["metrics"][metric]["file"]
        assert name == f"heatmap_{metric}.npy" and index["metrics"][metric]["meaning"]
        stats = np.load(io.BytesIO(files[name]))
        assert stats.shape == (2, 2, 3, handle.n_layers, max(rows["n_tokens"]))
        np.testing.assert_array_equal(stats, patching.aggregate(rows, metric)["stats"])
        # the mean of one cell, by hand: site resid_pre, k = 1, layer 0, the last position
        values = [
            r[metric][0][-1]
            for r in rows
            if r["site"] == "resid_pre" and r["divergence_index"] == 1
        ]
        np.testing.assert_allclose(stats[0, 0, 0, 0, -1], np.nanmean(values), rtol=1e-6)
    # the roadmap's heatmap.npy: the mean Δ over pairs per site, documented in heatmap.json
    delta = np.load(io.BytesIO(files["heatmap.npy"]))
    assert delta.shape == (2, 2, handle.n_layers, max(rows["n_tokens"]))
    values = [
        r["prob_delta"][0][-1]
        for r in rows
        if r["site"] == "mlp_out" and r["divergence_index"] == 3
    ]
    np.testing.assert_allclose(delta[1, 1, 0, -1], np.nanmean(values), rtol=1e-6)
    assert index["heatmap.npy"]["metric"] == "prob_delta"
    assert index["heatmap.npy"]["axes"] == ["site", "divergence_index", "layer", "position"]
    written = {p.name for p in ref.path.iterdir()}
    assert {patching.HEATMAP_FILE, patching.HEATMAP_INDEX_FILE, "heatmap.npy"} <= written

    # seqpatch plot heatmap --k --sites draws part of the study, and names what exists otherwise
    from typer.testing import CliRunner

    from seqpatch.cli import app

    out = data_dir.parent / "figures"
    plot = ["plot", "heatmap", "--data-dir", str(data_dir), "--out", str(out)]
    done = CliRunner().invoke(app, [*plot, "--k", "3", "--sites", "mlp_out"])
    assert done.exit_code == 0, done.output
    assert {p.name for p in out.iterdir()} == {
        "heatmap-normalised-k3-mlp_out.html",
        "heatmap-normalised-k3-mlp_out.png",
    }
    wrong = CliRunner().invoke(app, [*plot, "--k", "7"])
    assert wrong.exit_code == 2
    assert "no divergence index 7 in this patching stage; it has 1, 3" in wrong.output


def test_cached_activations_give_the_same_effects(data_dir, models):
    pipeline.build_activations(("resid_pre",), data_dir=data_dir, models=models)
    cached = pipeline.build_patching(("resid_pre",), data_dir=data_dir, models=models)
    assert "activations" in {p["stage"] for p in cached.parents}
    fresh = pipeline.build_patching(
        ("resid_pre",), activations="none", data_dir=data_dir, models=models
    )
    assert "activations" not in {p["stage"] for p in fresh.parents}
    assert fresh.version != cached.version
    store = Store(data_dir)
    for column in ("logits", "lse", "prob_delta"):
        x = store.load("patching", cached.version).with_format("numpy")[column]
        y = store.load("patching", fresh.version).with_format("numpy")[column]
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_interrupted_patching_resumes_without_recomputing(data_dir, models, monkeypatch):
    calls: list[int] = []
    real = patching.build_shard

    def flaky(inputs, cfg, index, *args, **kwargs):
        calls.append(index)
        if index == 2 and calls.count(2) == 1:
            raise KeyboardInterrupt
        return real(inputs, cfg, index, *args, **kwargs)

    monkeypatch.setattr(patching, "build_shard", flaky)
    kw = dict(activations="none", shard_size=4, data_dir=data_dir, models=models)
    with pytest.raises(KeyboardInterrupt):
        pipeline.build_patching(("resid_pre",), **kw)
    assert not Store(data_dir).versions("patching")  # nothing looks complete
    ref = pipeline.build_patching(("resid_pre",), **kw)
    assert calls == [0, 1, 2, 2]  # shards 0 and 1 were not recomputed
    assert len(Store(data_dir).load("patching", ref.version)) == N_PAIRS


def test_shards_split_across_jobs_then_join(data_dir, models):
    kw = dict(activations="none", shard_size=4, data_dir=data_dir, models=models)
    assert pipeline.build_patching(("resid_pre",), shard=(0, 2), **kw) is None
    assert pipeline.build_patching(("resid_pre",), shard=(1, 2), **kw) is None  # jobs never join
    assert not Store(data_dir).versions("patching")
    joined = pipeline.build_patching(("resid_pre",), **kw)  # what `seqpatch merge` calls
    whole = Store(data_dir).load("patching", joined.version)
    assert whole["pair_id"] == Store(data_dir).load("pairs")["pair_id"]
    assert joined.provenance["extra"]["n_shards"] == 3


def test_patching_continues_from_an_exported_study(data_dir, models, tmp_path):
    """A collaborator patches from someone's exported pairs + activations without recomputing."""
    from seqpatch.hub import export_stage

    pipeline.build_activations(("resid_pre",), data_dir=data_dir, models=models)
    here = pipeline.build_patching(("resid_pre",), data_dir=data_dir, models=models)
    study = tmp_path / "study"
    export_stage("pairs", study, data_dir=data_dir)
    export_stage("activations", study, data_dir=data_dir)

    elsewhere = tmp_path / "collaborator"
    there = pipeline.build_patching(
        ("resid_pre",), data_dir=elsewhere, models=models, from_source=str(study)
    )
    assert there.version == here.version  # same pairs, same activations: same stage version
    parents = lambda ref: {p["stage"]: p["version"] for p in ref.parents}  # noqa: E731
    assert parents(there) == parents(here) and "activations" in parents(here)
    imported = Store(elsewhere).resolve("activations")
    assert imported.provenance["extra"]["imported_from"]["source"] == str(study)
    x = Store(data_dir).load("patching", here.version).with_format("numpy")["logits"]
    y = Store(elsewhere).load("patching", there.version).with_format("numpy")["logits"]
    np.testing.assert_array_equal(x, y)


def head_hooked_logits(handle, src_ids, tgt_ids, layer, head, positions):
    """Independent reference for head_z (Llama): o_proj's input split by head, one head of the
    source written at ``positions`` of the target."""
    o_proj = handle.hf_model.model.layers[layer].self_attn.o_proj
    d_head = handle.hf_model.config.head_dim
    captured = {}

    def grab(_m, args):
        captured["x"] = args[0].clone()

    def put(_m, args):
        x = args[0].clone()
        cols = slice(head * d_head, (head + 1) * d_head)
        for pos in positions:
            x[0, pos, cols] = captured["x"][0, pos, cols]
        return (x,)

    with torch.no_grad():
        h = o_proj.register_forward_pre_hook(grab)
        handle.hf_model(input_ids=torch.tensor([src_ids]))
        h.remove()
        h = o_proj.register_forward_pre_hook(put)
        logits = handle.hf_model(input_ids=torch.tensor([tgt_ids])).logits[0, -1]
        h.remove()
    return logits.float()


@pytest.mark.parametrize("axes", [("layer", "head"), ("layer", "head", "pos")])
def test_head_grids_are_stored_over_their_axes(handle, data_dir, models, axes):
    ref = pipeline.build_patching(
        ("head_z", "head_k"), axes=axes, data_dir=data_dir, models=models, activations="auto"
    )
    rows = Store(data_dir).load("patching", ref.version)
    n_heads, n_kv = handle.n_heads, handle.hf_model.config.num_key_value_heads
    assert n_kv < n_heads  # grouped-query attention: fewer k/v heads than query heads
    width = max(rows["n_tokens"])
    grid = (handle.n_layers, n_heads) + ((width,) if "pos" in axes else ())
    assert rows.features["normalised"].shape == grid
    assert rows.features["logits"].shape == (*grid, 10)
    assert rows[0]["axes"] == list(axes) and rows[0]["span"] == ("" if "pos" in axes else "all")
    by_id = {r["pair_id"]: r for r in Store(data_dir).load("pairs")}
    numpy_rows = rows.with_format("numpy")
    for i in (0, N_PAIRS + 1):
        row = numpy_rows[i]
        site = row["site"]
        heads = n_heads if site == "head_z" else n_kv
        assert list(row["heads"]) == list(range(heads))
        assert np.isnan(row["lse"][:, heads:]).all() and not np.isnan(row["lse"][:, :heads]).any()
        if site != "head_z":
            continue
        pair = by_id[row["pair_id"]]
        n = int(row["n_tokens"])
        for layer, head, pos in [(0, 0, n - 1), (handle.n_layers - 1, heads - 1, n - 1)]:
            positions = [pos] if "pos" in axes else range(n)
            want = hooked = head_hooked_logits(
                handle, pair["input_ids_a"], pair["input_ids_b"], layer, head, positions
            )
            at = (layer, head, pos) if "pos" in axes else (layer, head)
            np.testing.assert_allclose(row["logits"][at], want[pair["candidate_ids"]], atol=1e-5)
            assert abs(row["lse"][at] - float(hooked.logsumexp(-1))) <= 1e-5
    files = patching.heatmap_artifacts(rows)
    index = json.loads(files[patching.HEATMAP_INDEX_FILE])
    named = ["layer", "head", "position"][: len(axes)]
    assert index["axes"] == ["site", "divergence_index", "statistic", *named]
    assert index["heads"] == list(range(n_heads))
    stats = np.load(io.BytesIO(files[patching.HEATMAP_FILE]))
    assert stats.shape == (2, 2, 3, *grid)
    assert (stats[1, :, 2, :, n_kv:] == 0).all()  # head_k has no heads beyond its k/v heads
    pngs = list(ref.path.glob("heatmap-normalised.png"))
    assert pngs and pngs[0].stat().st_size > 1000


def test_whole_stream_patching_is_a_layer_grid(handle, data_dir, models):
    everywhere = pipeline.build_patching(
        ("resid_pre",), axes=("layer",), data_dir=data_dir, models=models, activations="none"
    )
    rows = Store(data_dir).load("patching", everywhere.version)
    assert rows.features["lse"].length == handle.n_layers
    assert rows.features["logits"].shape == (handle.n_layers, 10)
    col = lambda name: np.asarray(rows.with_format("numpy")[name])  # noqa: E731
    # all positions of layer 0's input patched: B's run is A's run
    np.testing.assert_allclose(col("logits")[:, 0], col("baseline_logits_a"), atol=1e-5)
    np.testing.assert_allclose(col("lse")[:, 0], col("baseline_lse_a"), atol=1e-5)
    np.testing.assert_allclose(col("normalised")[:, 0], 1.0, atol=1e-3)
    later = pipeline.build_patching(
        ("resid_pre",),
        axes=("layer",),
        positions="from-divergence",
        data_dir=data_dir,
        models=models,
        activations="none",
    )
    assert later.version != everywhere.version
    rows = Store(data_dir).load("patching", later.version)
    assert set(rows["span"]) == {"from-divergence"}
    by_id = {r["pair_id"]: r for r in Store(data_dir).load("pairs")}
    row = rows.with_format("numpy")[3]
    pair = by_id[row["pair_id"]]
    first, n = int(row["diff_positions"][0]), int(row["n_tokens"])
    layer_module = handle.hf_model.model.layers[1]
    captured = {}

    def grab(_m, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def put(_m, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x[0, first:n] = captured["x"][0, first:n]
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    with torch.no_grad():
        h = layer_module.register_forward_pre_hook(grab, with_kwargs=True)
        handle.hf_model(input_ids=torch.tensor([pair["input_ids_a"]]))
        h.remove()
        h = layer_module.register_forward_pre_hook(put, with_kwargs=True)
        want = handle.hf_model(input_ids=torch.tensor([pair["input_ids_b"]])).logits[0, -1]
        h.remove()
    np.testing.assert_allclose(row["logits"][1], want[pair["candidate_ids"]], atol=1e-5)
    index = json.loads(patching.heatmap_artifacts(rows)[patching.HEATMAP_INDEX_FILE])
    assert index["axes"] == ["site", "divergence_index", "statistic", "layer"]
    assert index["positions"] == "from-divergence"
    assert list(later.path.glob("layers-normalised.png"))


def test_bad_axes_are_refused_before_building():
    with pytest.raises(patching.PatchingStageError, match="axes"):
        patching.PatchingConfig(axes=("pos", "layer"))
    with pytest.raises(Exception, match="head site"):
        patching.PatchingConfig(sites=("resid_pre",), axes=("layer", "head"))
    with pytest.raises(patching.PatchingStageError, match="positions"):
        patching.PatchingConfig(positions="from-divergence")


def test_changed_ends_last_is_the_full_grid_at_its_cells(handle, data_dir, models):
    """The ``changed+ends+last`` selection computes exactly the full grid's cells it keeps
    (and an independent plain-hook patch), NaN elsewhere."""
    sites = ("resid_pre", "mlp_out")
    full = pipeline.build_patching(sites, data_dir=data_dir, models=models, activations="none")
    chosen = pipeline.build_patching(
        sites,
        positions="changed+ends+last",
        data_dir=data_dir,
        models=models,
        activations="none",
    )
    assert chosen.version != full.version
    store = Store(data_dir)
    full_rows = store.load("patching", full.version).with_format("numpy")
    rows = store.load("patching", chosen.version).with_format("numpy")
    pairs = {r["pair_id"]: r for r in store.load("pairs")}
    assert set(rows["span"]) == {"changed+ends+last"}
    n_kept = with_ends = 0
    for row, ref in zip(rows, full_rows, strict=True):
        assert (row["pair_id"], row["site"]) == (ref["pair_id"], ref["site"])
        pair = pairs[row["pair_id"]]
        keep = patching.selected_positions(
            pair["input_ids_a"], pair["input_ids_b"], handle.tokenizer
        )
        n = int(row["n_tokens"])
        first = int(row["diff_positions"][0])
        assert set(row["diff_positions"].tolist()) | {n - 1} <= set(keep)
        assert len(keep) < n - first  # a true subset of the from-divergence cells
        with_ends += len(keep) > len(row["diff_positions"]) + 1  # line ends after the change
        np.testing.assert_allclose(row["logits"][:, keep], ref["logits"][:, keep], atol=1e-5)
        np.testing.assert_allclose(row["lse"][:, keep], ref["lse"][:, keep], atol=1e-5)
        others = [t for t in range(row["lse"].shape[1]) if t not in keep]
        assert np.isnan(row["lse"][:, others]).all()
        n_kept += len(keep)
    assert n_kept > 0 and with_ends > 0
    row = rows[0]
    pair = pairs[row["pair_id"]]
    pos = int(row["diff_positions"][0])
    want = hooked_logits(handle, pair["input_ids_a"], pair["input_ids_b"], row["site"], 1, pos)
    np.testing.assert_allclose(row["logits"][1, pos], want[pair["candidate_ids"]], atol=1e-5)
    heat = patching.aggregate(store.load("patching", chosen.version))
    counts = heat["stats"][:, :, 2]
    assert (counts == 0).any() and (counts > 0).any()


def test_position_selection_needs_a_pos_axis():
    with pytest.raises(patching.PatchingStageError, match="layer,pos"):
        patching.PatchingConfig(axes=("layer",), positions="changed+ends+last")
    assert patching.PatchingConfig(positions="changed+ends+last").positions == "changed+ends+last"


def test_heatmap_aligns_pairs_of_different_lengths_at_their_ends(handle, data_dir, models):
    """BPE pairs of one divergence index differ in length: the aggregate averages them token by
    token from the end (the query and the answer's position), not from the start."""
    ref = pipeline.build_patching(("resid_pre",), data_dir=data_dir, models=models)
    rows = Store(data_dir).load("patching", ref.version)
    k = rows[0]["divergence_index"]
    keep = [i for i, row in enumerate(rows) if row["divergence_index"] == k][:2]
    two = rows.select(keep)
    first, second = two.with_format("numpy")["normalised"]
    n = int(two[1]["n_tokens"])
    shortened = np.full_like(second, np.nan)
    shortened[:, : n - 1] = second[:, 1:n]  # the second pair, one token shorter (its first dropped)
    grids = [first, shortened]
    edited = two.remove_columns("normalised").add_column("normalised", [g.tolist() for g in grids])
    edited = edited.remove_columns("n_tokens").add_column("n_tokens", [n, n - 1])
    agg = patching.aggregate(edited)
    assert agg["aligned_to_end"] == [k]
    mean = agg["stats"][0, 0, 0]
    np.testing.assert_allclose(mean[:, n - 1], (first[:, n - 1] + second[:, n - 1]) / 2, atol=1e-6)
    np.testing.assert_allclose(mean[:, 0], first[:, 0], atol=1e-6)  # only the longer pair there
    assert agg["labels"][k] == [
        tok + ("*" if t in set(two[0]["diff_positions"]) else "")
        for t, tok in enumerate(two[0]["tokens"])
    ]
    same = patching.aggregate(two)
    assert same["aligned_to_end"] == []


def test_mlp_post_is_cached_and_patched_end_to_end(handle, data_dir, models):
    """The new site through both stages: stored d_mlp wide (equal to the MLP's hidden
    activation computed by hand), patched from the cache and recomputed alike, and a cell equal
    to a plain pre-hook on ``down_proj``."""
    acts = pipeline.build_activations(("mlp_post",), data_dir=data_dir, models=models)
    stored = Store(data_dir).load("activations", acts.version).with_format("torch")
    d_mlp = handle.hf_model.config.intermediate_size
    assert stored.features["mlp_post_a"].shape[-1] == d_mlp != handle.d_model
    row = stored[0]
    mlp = handle.hf_model.model.layers[0].mlp
    seen = {}
    hook = mlp.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    with torch.no_grad():
        handle.hf_model(input_ids=row["input_ids_a"][None])
        want = mlp.act_fn(mlp.gate_proj(seen["x"])) * mlp.up_proj(seen["x"])
    hook.remove()
    n = int(row["n_tokens"])
    torch.testing.assert_close(row["mlp_post_a"][0, :n], want[0], atol=1e-6, rtol=0)
    cached = pipeline.build_patching(("mlp_post",), data_dir=data_dir, models=models)
    assert "activations" in {p["stage"] for p in cached.parents}
    fresh = pipeline.build_patching(
        ("mlp_post",), activations="none", data_dir=data_dir, models=models
    )
    store = Store(data_dir)
    x = store.load("patching", cached.version).with_format("numpy")
    y = store.load("patching", fresh.version).with_format("numpy")
    np.testing.assert_allclose(x["logits"], y["logits"], atol=1e-5)
    pair = {r["pair_id"]: r for r in store.load("pairs")}[y[0]["pair_id"]]
    layer, pos = 0, int(y[0]["diff_positions"][0])
    down = handle.hf_model.model.layers[layer].mlp.down_proj
    src, tgt = (torch.tensor([pair[k]]) for k in ("input_ids_a", "input_ids_b"))
    with torch.no_grad():
        h = down.register_forward_pre_hook(lambda _m, args: seen.update(d=args[0][0, pos].clone()))
        handle.hf_model(input_ids=src)
        h.remove()

        def put(_m, args):
            x = args[0].clone()
            x[0, pos] = seen["d"]
            return (x,)

        h = down.register_forward_pre_hook(put)
        logits = handle.hf_model(input_ids=tgt).logits[0, -1].float()
        h.remove()
    np.testing.assert_allclose(y[0]["logits"][layer, pos], logits[pair["candidate_ids"]], atol=1e-5)


def test_slice_positions_are_the_full_grid_at_the_chain_cells(handle, tmp_path, models):
    """``--positions slice`` on chain pairs patches the changed statement, the later hops, the
    question and the last token — each labelled by its role — and every computed cell equals the
    full grid's cell (an independent plain-hook patch checks one of them); the rest is NaN."""
    data_dir = tmp_path / "chain"
    oracle = dataclasses.replace(handle, hf_model=Oracle(handle, "binding"))
    cfg = PairsConfig(model="tiny", seq_len=4, n_pairs=8, min_depth=2)
    execute("pairs", cfg, store=Store(data_dir), models=model_cache(oracle), progress=False)
    sites = ("resid_pre", "attn_out")
    full = pipeline.build_patching(sites, data_dir=data_dir, models=models, activations="none")
    chain = pipeline.build_patching(
        sites, positions="slice", data_dir=data_dir, models=models, activations="none"
    )
    store = Store(data_dir)
    full_rows = store.load("patching", full.version).with_format("numpy")
    rows = store.load("patching", chain.version)
    pairs = {r["pair_id"]: r for r in store.load("pairs")}
    assert set(rows["span"]) == {"slice"}
    for row, ref in zip(rows.with_format("numpy"), full_rows, strict=True):
        pair = pairs[row["pair_id"]]
        roles = list(row["roles"])
        assert roles == pair["roles"]
        program = Program.parse(pair["program_b"], "binding")
        k, n = int(row["divergence_index"]), int(row["n_tokens"])
        hops = [i for i in program.dependencies() if i >= k]
        # compact word-level tokens: statement i is tokens bos + 4i .. bos + 4i + 3 (`a = 5 ;`),
        # then `#`, the variable and `:`
        bos = n - 4 * program.seq_len - 3
        expected = [bos + 4 * i + j for i in hops for j in range(4)]
        expected += list(range(bos + 4 * program.seq_len, n))
        keep = [t for t, role in enumerate(roles) if role != "stmt" and role != "context"]
        assert keep == expected and roles[-1] == "last" and roles[-3] == "question:0"
        assert [roles[t] for t in expected[:4]] == ["hop0:var", "hop0:=", "hop0:value", "hop0:end"]
        assert len(hops) == pair["chain_depth"] >= 2
        np.testing.assert_allclose(row["logits"][:, keep], ref["logits"][:, keep], atol=1e-5)
        np.testing.assert_allclose(row["lse"][:, keep], ref["lse"][:, keep], atol=1e-5)
        others = [t for t in range(row["lse"].shape[1]) if t not in keep]
        assert np.isnan(row["lse"][:, others]).all()
    row = rows[0]
    pair = pairs[row["pair_id"]]
    program = Program.parse(pair["program_b"], "binding")
    hop = next(i for i in program.dependencies() if i > int(row["divergence_index"]))
    pos = int(row["n_tokens"]) - 4 * program.seq_len - 3 + 4 * hop + 2  # the hop's copied variable
    want = hooked_logits(handle, pair["input_ids_a"], pair["input_ids_b"], row["site"], 1, pos)
    got = np.asarray(row["logits"])[1, pos]
    np.testing.assert_allclose(got, want[pair["candidate_ids"]], atol=1e-5)

    # the heatmap averages by role: each role's cell is the mean over pairs of that role's token
    agg = patching.aggregate(rows)
    assert agg["position_axis"] == "role"
    frame = rows.with_format("numpy")
    for ki, k in enumerate(agg["divergence_indices"]):
        labels = agg["labels"][k]
        assert labels[-1] == "last" and labels[0] == "hop0:var"
        assert not any(r in ("stmt", "context") for r in labels)  # only patched rows
        for c, role in enumerate(labels):
            picked = [
                frame[i]["normalised"][:, list(frame[i]["roles"]).index(role)]
                for i in range(len(rows))
                if rows[i]["site"] == "resid_pre"
                and rows[i]["divergence_index"] == k
                and role in rows[i]["roles"]
            ]
            with np.errstate(invalid="ignore"):
                want = np.nanmean(np.stack(picked), axis=0)
            np.testing.assert_allclose(agg["stats"][0, ki, 0, :, c], want, atol=1e-6)
    index = json.loads(patching.heatmap_artifacts(rows)[patching.HEATMAP_INDEX_FILE])
    assert index["axes"][-1] == "role"
    assert list(chain.path.glob("heatmap-normalised.png"))
