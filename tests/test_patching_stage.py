"""activations + patching stages: schema, exactness against plain hooks, resume and shards."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from seqpatch import pipeline
from seqpatch.models import load_model
from seqpatch.stages import build_stage, patching
from seqpatch.stages.pairs import PairsConfig
from seqpatch.store import Store
from seqpatch.testing import save_tiny_model
from tests.test_pairs_stage import Oracle

N_PAIRS = 12


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("m") / "llama", tokenizer="wordlevel")
    return load_model(str(folder), prompt_format="compact")


@pytest.fixture
def data_dir(tmp_path, handle):
    oracle = dataclasses.replace(handle, hf_model=Oracle(handle, "binding"))
    cfg = PairsConfig(model="tiny", seq_len=4, n_pairs=N_PAIRS, divergence_indices=(1, 3))
    build_stage(
        "pairs", cfg, data_dir=tmp_path, model=handle.describe(), handle=oracle, progress=False
    )
    return tmp_path


def ld_of(row):
    return row["logits"][..., row["answer_index_a"]] - row["logits"][..., row["answer_index_b"]]


def hooked_logits(handle, src_ids, tgt_ids, site, layer, pos, cand):
    """Independent reference: capture the source's site with one plain hook, patch the target
    with another, read the candidate logits at the last position."""
    layer_module = handle.hf_model.model.layers[layer]
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
    return logits[cand].numpy()


def test_activations_stage_matches_plain_forward(handle, data_dir):
    ref = pipeline.build_activations(("resid_pre", "mlp_out"), data_dir=data_dir, handle=handle)
    rows = Store(data_dir).load("activations", ref.version).with_format("torch")
    assert len(rows) == N_PAIRS
    width = int(max(rows["n_tokens"]))
    assert rows.features["resid_pre_a"].shape == (handle.n_layers, width, handle.d_model)
    row = rows[0]
    with torch.no_grad():
        out = handle.hf_model(input_ids=row["input_ids_a"][None], output_hidden_states=True)
    for layer in range(handle.n_layers):
        assert torch.equal(row["resid_pre_a"][layer], out.hidden_states[layer][0])


def test_patching_equals_plain_hooks_and_metrics(handle, data_dir):
    ref = pipeline.build_patching(
        ("resid_pre", "mlp_out"), activations="none", data_dir=data_dir, handle=handle
    )
    rows = Store(data_dir).load("patching", ref.version)
    assert len(rows) == 2 * N_PAIRS
    assert set(rows["site"]) == {"resid_pre", "mlp_out"}
    pairs_rows = Store(data_dir).load("pairs")
    by_id = {r["pair_id"]: r for r in pairs_rows}
    numpy_rows = rows.with_format("numpy")
    for i in (0, N_PAIRS + 1):
        row = numpy_rows[i]
        pair = by_id[row["pair_id"]]
        for layer in (0, handle.n_layers - 1):
            for pos in (0, int(row["diff_positions"][0]), int(row["n_tokens"]) - 1):
                want = hooked_logits(
                    handle,
                    pair["input_ids_a"],
                    pair["input_ids_b"],
                    row["site"],
                    layer,
                    pos,
                    pair["candidate_ids"],
                )
                np.testing.assert_allclose(row["logits"][layer, pos], want, atol=1e-5)
        # metric grids are views of the stored logits
        a, b = int(row["answer_index_a"]), int(row["answer_index_b"])
        ld = row["logits"][..., a] - row["logits"][..., b]
        np.testing.assert_allclose(row["logit_diff"], ld, atol=1e-5)
        base_a, base_b = row["baseline_logits_a"], row["baseline_logits_b"]
        span = (base_a[a] - base_a[b]) - (base_b[a] - base_b[b])
        np.testing.assert_allclose(
            row["normalised"], (ld - (base_b[a] - base_b[b])) / span, rtol=1e-4, atol=1e-5
        )
    # cells before the first differing token patch identical activations: no effect at all
    for row in numpy_rows:
        first_diff = int(row["diff_positions"][0])
        np.testing.assert_array_equal(row["logit_diff"][:, :first_diff], ld_of(row)[:, :first_diff])
        base_ld = (
            row["baseline_logits_b"][row["answer_index_a"]]
            - row["baseline_logits_b"][row["answer_index_b"]]
        )
        np.testing.assert_allclose(row["logit_diff"][:, :first_diff], base_ld, atol=1e-5)
    heat = np.load(ref.path / patching.HEATMAP_FILE)
    assert heat.shape[:3] == (2, 2, 3)
    assert (ref.path / "heatmap.png").stat().st_size > 1000
    assert (ref.path / "traces.png").stat().st_size > 1000


def test_cached_activations_give_the_same_effects(handle, data_dir):
    pipeline.build_activations(("resid_pre",), data_dir=data_dir, handle=handle)
    cached = pipeline.build_patching(("resid_pre",), data_dir=data_dir, handle=handle, charts=False)
    assert cached.provenance["config"]["activations"] is not None
    fresh = pipeline.build_patching(
        ("resid_pre",), activations="none", data_dir=data_dir, handle=handle, charts=False
    )
    assert fresh.version != cached.version
    store = Store(data_dir)
    x = store.load("patching", cached.version).with_format("numpy")["logits"]
    y = store.load("patching", fresh.version).with_format("numpy")["logits"]
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_interrupted_patching_resumes_without_recomputing(handle, data_dir, monkeypatch):
    calls: list[int] = []
    real = patching.build_shard

    def flaky(index, *args, **kwargs):
        calls.append(index)
        if index == 2 and calls.count(2) == 1:
            raise KeyboardInterrupt
        return real(index, *args, **kwargs)

    monkeypatch.setattr(patching, "build_shard", flaky)
    kw = dict(activations="none", shard_size=4, data_dir=data_dir, handle=handle, charts=False)
    with pytest.raises(KeyboardInterrupt):
        pipeline.build_patching(("resid_pre",), **kw)
    assert not Store(data_dir).versions("patching")  # nothing looks complete
    ref = pipeline.build_patching(("resid_pre",), **kw)
    assert calls == [0, 1, 2, 2]  # shards 0 and 1 were not recomputed
    assert len(Store(data_dir).load("patching", ref.version)) == N_PAIRS


def test_shards_split_across_jobs_then_join(handle, data_dir):
    kw = dict(activations="none", shard_size=4, data_dir=data_dir, handle=handle, charts=False)
    assert pipeline.build_patching(("resid_pre",), shard=(0, 2), **kw) is None
    joined = pipeline.build_patching(("resid_pre",), shard=(1, 2), **kw)
    assert joined is not None
    whole = Store(data_dir).load("patching", joined.version)
    assert whole["pair_id"] == Store(data_dir).load("pairs")["pair_id"]
    assert joined.provenance["extra"]["n_shards"] == 3


def test_patching_continues_from_an_exported_study(handle, data_dir, tmp_path):
    """A collaborator patches from someone's exported pairs + activations without recomputing."""
    from seqpatch.hub import export_stage

    pipeline.build_activations(("resid_pre",), data_dir=data_dir, handle=handle)
    here = pipeline.build_patching(("resid_pre",), data_dir=data_dir, handle=handle, charts=False)
    study = tmp_path / "study"
    export_stage("pairs", study, data_dir=data_dir)
    export_stage("activations", study, data_dir=data_dir)

    elsewhere = tmp_path / "collaborator"
    there = pipeline.build_patching(
        ("resid_pre",), data_dir=elsewhere, handle=handle, charts=False, from_source=str(study)
    )
    assert there.version == here.version  # same pairs, same activations: same stage version
    assert there.provenance["config"]["activations"] == here.provenance["config"]["activations"]
    imported = Store(elsewhere).resolve("activations")
    assert imported.provenance["extra"]["imported_from"]["source"] == str(study)
    x = Store(data_dir).load("patching", here.version).with_format("numpy")["logits"]
    y = Store(elsewhere).load("patching", there.version).with_format("numpy")["logits"]
    np.testing.assert_array_equal(x, y)
