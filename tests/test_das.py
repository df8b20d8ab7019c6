"""DAS: a planted subspace is found, the interchange is exact, and the stage's bases reproduce."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seqpatch.executor import execute
from seqpatch.interventions import das
from seqpatch.models import load_model
from seqpatch.pipeline import build_das
from seqpatch.stages.base import ModelCache
from seqpatch.stages.das import DasConfig, DasStageError, default_ks
from seqpatch.stages.patching import PatchingConfig
from seqpatch.store import Store
from seqpatch.testing import save_tiny_model

# ---------------------------------------------------------------------------------------------
# A planted subspace: a "model" that reads its value along one known direction only


class Planted:
    """``n`` pairs whose activation stores a digit ``v`` along the unit vector ``u`` of ``R^d``
    (``x = (v - 4.5)·scale·u + noise ⟂ u``); the readout decodes ``x·u`` and scores the ten
    digits by closeness. Only the ``u`` component matters, so DAS at ``k = 1`` must find ``u``."""

    def __init__(self, n: int = 400, d: int = 24, scale: float = 1.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
        self.scale = scale
        self.v_src = torch.randint(0, 10, (n,), generator=g)
        self.v_tgt = (self.v_src + torch.randint(1, 10, (n,), generator=g)) % 10  # always differs

        def encode(v: torch.Tensor) -> torch.Tensor:
            noise = 3.0 * torch.randn(n, d, generator=g)  # larger than the value's spread
            noise -= (noise @ self.u)[:, None] * self.u
            return (v.float() - 4.5)[:, None] * scale * self.u + noise

        self.source, self.base = encode(self.v_src), encode(self.v_tgt)

    def logits(self, rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        decoded = value @ self.u / self.scale + 4.5
        return -4.0 * (decoded[:, None] - torch.arange(10.0)) ** 2


def test_planted_direction_is_found_at_k1_and_random_is_not():
    model = Planted()
    rows = torch.randperm(400, generator=torch.Generator().manual_seed(1))
    train, val, test = rows[:240], rows[240:320], rows[320:]
    labels = model.v_src
    shuffled = labels[torch.randperm(400, generator=torch.Generator().manual_seed(2))]
    specs = [das.BasisSpec(1, labels, seed=3), das.BasisSpec(1, shuffled, seed=3)]
    found, control = das.train_bases(
        model, specs, train, val, das.TrainConfig(epochs=30, lr=2e-2, batch_size=32)
    )
    cos = float(found.basis[0] @ model.u)
    assert das.interchange_accuracy(model, found.basis, test, labels) >= 0.95
    assert abs(cos) >= 0.9
    # The full-vector patch carries the value too; random directions and shuffled labels don't.
    assert das.interchange_accuracy(model, das.full_basis(24), test, labels) == 1.0
    random = das.random_basis(24, 1, torch.Generator().manual_seed(4))
    assert abs(float(random[0] @ model.u)) < 0.9
    assert das.interchange_accuracy(model, random, test, labels) < 0.5
    assert das.interchange_accuracy(model, control.basis, test, labels) < 0.5


def test_swap_replaces_exactly_the_span():
    g = torch.Generator().manual_seed(0)
    basis = das.random_basis(10, 3, g)
    assert torch.allclose(basis @ basis.T, torch.eye(3), atol=1e-6)
    base, source = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    out = das.swap(base, source, basis)
    assert torch.allclose(out @ basis.T, source @ basis.T, atol=1e-5)  # inside: the source's
    residual = torch.eye(10) - basis.T @ basis
    assert torch.allclose(out @ residual, base @ residual, atol=1e-5)  # outside: the base's
    assert torch.allclose(das.swap(base, source, das.full_basis(10)), source, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# SiteInterchange against plain hooks written here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("m") / "llama", tokenizer="wordlevel")
    return load_model(str(folder), prompt_format="compact")


def _module(hf_model, site, layer):
    block = hf_model.model.layers[layer]
    return {"attn_out": block.self_attn, "mlp_out": block.mlp}.get(site, block)


def reference_logits(handle, src, tgt, site, layer, pos, basis):
    """Capture the source's and target's site tensors with plain hooks, then run the target with
    ``b + (s - b) Wᵀ W`` written at ``pos``; full next-token logits at the last position."""
    module = _module(handle.hf_model, site, layer)
    grabbed = []

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    def grab_pre(_m, args, kwargs):
        grabbed.append((args[0] if args else kwargs["hidden_states"])[:, pos].clone())

    def grab_post(_m, _args, out):
        grabbed.append(first(out)[:, pos].clone())

    pre = site == "resid_pre"
    with torch.no_grad():
        for ids in (src, tgt):
            h = (
                module.register_forward_pre_hook(grab_pre, with_kwargs=True)
                if pre
                else module.register_forward_hook(grab_post)
            )
            handle.hf_model(input_ids=ids)
            h.remove()
        s, b = grabbed
        value = b + ((s - b) @ basis.T) @ basis

        def put_pre(_m, args, kwargs):
            key = "hidden_states"
            x = (args[0] if args else kwargs[key]).clone()
            x[:, pos] = value
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, key: x})

        def put_post(_m, _args, out):
            x = first(out).clone()
            x[:, pos] = value
            return (x, *out[1:]) if isinstance(out, tuple) else x

        h = (
            module.register_forward_pre_hook(put_pre, with_kwargs=True)
            if pre
            else module.register_forward_hook(put_post)
        )
        logits = handle.hf_model(input_ids=tgt).logits[:, -1]
        h.remove()
    return logits


@pytest.mark.parametrize("method", ["cached", "full"])
@pytest.mark.parametrize(
    ("site", "layer", "pos"),
    [
        ("resid_pre", 1, 3),
        ("resid_post", 0, 5),
        ("attn_out", 1, 0),
        ("mlp_out", 0, 7),
        ("mlp_out", 1, 9),
    ],
)
def test_site_interchange_matches_plain_hooks(tiny, site, layer, pos, method):
    g = torch.Generator().manual_seed(0)
    vocab = tiny.hf_model.config.vocab_size
    src, tgt = (
        torch.randint(4, vocab, (6, 10), generator=g),
        torch.randint(4, vocab, (6, 10), generator=g),
    )
    cand = torch.arange(4, 14)
    model = das.SiteInterchange(tiny, site, layer, pos, src, tgt, cand, method=method)
    basis = das.random_basis(tiny.d_model, 5, g)
    rows = torch.arange(6)
    got = model.logits(rows, das.swap(model.base, model.source, basis))
    want = reference_logits(tiny, src, tgt, site, layer, pos, basis)[:, cand]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # Without the intervention the run is the clean target's.
    clean = tiny.hf_model(input_ids=tgt).logits[:, -1, cand]
    torch.testing.assert_close(model.logits(rows, model.base), clean, atol=2e-5, rtol=1e-5)


def random_interchange(handle, g, n, length, layer, pos):
    """A ``SiteInterchange`` at ``resid_pre`` of ``n`` random token pairs of ``length``."""
    vocab = handle.hf_model.config.vocab_size
    src, tgt = (
        torch.randint(4, vocab, (n, length), generator=g),
        torch.randint(4, vocab, (n, length), generator=g),
    )
    return das.SiteInterchange(handle, "resid_pre", layer, pos, src, tgt, torch.arange(4, 14))


def test_training_leaves_the_model_frozen(tiny):
    g = torch.Generator().manual_seed(0)
    model = random_interchange(tiny, g, 8, 6, layer=0, pos=2)
    before = {n: p.detach().clone() for n, p in tiny.hf_model.named_parameters()}
    labels = torch.randint(0, 10, (8,), generator=g)
    spec = das.BasisSpec(2, labels, seed=0)
    (result,) = das.train_bases(
        model, [spec], torch.arange(6), torch.arange(6, 8), das.TrainConfig(epochs=2)
    )
    assert result.steps == 2 and result.basis.shape == (2, tiny.d_model)
    for name, p in tiny.hf_model.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad, name
        assert torch.equal(p, before[name]), name


def test_config_checks():
    assert default_ks(128) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert default_ks(96) == (1, 2, 4, 8, 16, 32, 64, 96)
    with pytest.raises(DasStageError, match="split"):
        DasConfig(split=(0.5, 0.5, 0.5))
    with pytest.raises(DasStageError, match="metric"):
        DasConfig(metric="nope")


# ---------------------------------------------------------------------------------------------
# The stage on the organism, exported and loaded back


@pytest.fixture(scope="module")
def organism_study(tmp_path_factory):
    from seqpatch.pipeline import pairs_config

    data_dir = tmp_path_factory.mktemp("das")
    store = Store(data_dir)
    models = ModelCache()
    cfg, parents = pairs_config("builtin", seq_len=4, divergence="2", n_pairs=30)
    pairs = execute("pairs", cfg, parents, store=store, models=models, progress=False)
    patching = execute(
        "patching",
        PatchingConfig(sites=("resid_pre",)),
        {"pairs": pairs},
        store=store,
        models=models,
        progress=False,
    )
    das_cfg = DasConfig(top_n=2, ks=(1, 4), epochs=2, allow_small=True)  # 30 pairs: 6 test
    ref = build_das(das_cfg, patching.version, data_dir=data_dir, progress=False)
    return store, models, ref


def test_stage_rows_and_artifacts(organism_study):
    store, models, ref = organism_study
    rows = store.load("das", ref.version)
    handle = models.get("builtin")
    # 2 cells × (k ∈ {1, 4} × {das, shuffled, random} + full)
    assert rows.num_rows == 2 * (2 * 3 + 1)
    assert set(rows["method"]) == {"das", "shuffled", "random", "full"}
    assert rows.features["basis"].shape == (None, handle.d_model)
    for row in rows.with_format("numpy"):
        basis = np.asarray(row["basis"])
        assert basis.shape == (row["k"], handle.d_model)
        np.testing.assert_allclose(basis @ basis.T, np.eye(row["k"]), atol=1e-5)
        assert 0 <= row["iia"] <= 1
    assert sorted(set(rows["rank"])) == [1, 2]
    for name in ("iia.csv", "summary.json", "iia_vs_k.png", "iia_vs_k.html"):
        assert (ref.path / name).stat().st_size > 0
    full = [r for r in rows if r["method"] == "full"]
    assert all(r["k"] == handle.d_model and not r["trained"] for r in full)
    # trained says whether training beat the random start, not merely that it ran
    for r in rows:
        assert r["trained"] == (r["method"] in ("das", "shuffled") and r["best_epoch"] > 0)


def test_das_refuses_a_split_too_small_to_mean_anything(organism_study):
    from seqpatch.stages.das import MIN_TEST_PAIRS, check_split, select_pairs

    store, _, ref = organism_study
    pairs_version = next(p["version"] for p in ref.provenance["parents"] if p["stage"] == "pairs")
    pairs = store.load("pairs", pairs_version)
    study = select_pairs(pairs, DasConfig())
    assert len(study.test) < MIN_TEST_PAIRS
    with pytest.raises(DasStageError, match=r"only \d+ test pairs .* --allow-small") as err:
        check_split(study, DasConfig())
    assert "\n" not in str(err.value) and "n_train" in str(err.value)
    check_split(study, DasConfig(), allow_small=True)  # knowingly small: accepted
    with pytest.raises(DasStageError, match="--allow-small"):
        build_das(
            DasConfig(top_n=1, ks=(1,), epochs=1),
            next(p["version"] for p in ref.provenance["parents"] if p["stage"] == "patching"),
            data_dir=store.data_dir,
            progress=False,
        )


def test_exported_bases_reproduce_stored_iia(organism_study, tmp_path):
    from datasets import Dataset, load_dataset

    from seqpatch.hub import export_stage

    store, models, ref = organism_study
    folder = tmp_path / "export"
    export_stage("das", folder, ref.version, data_dir=store.data_dir)
    loaded = load_dataset(str(folder), "das", split="train").with_format("numpy")
    pairs_version = next(p["version"] for p in ref.provenance["parents"] if p["stage"] == "pairs")
    pairs = Dataset.load_from_disk(str(store.resolve("pairs", pairs_version).path))
    index = {pid: i for i, pid in enumerate(pairs["pair_id"])}
    handle = models.get("builtin")
    checked = 0
    for row in loaded:
        if row["method"] not in ("das", "random") or row["k"] != 4:
            continue
        chosen = pairs.select([index[pid] for pid in row["test_pair_ids"]])
        model = das.SiteInterchange(
            handle,
            row["site"],
            int(row["layer"]),
            int(row["position"]),
            torch.tensor(chosen["input_ids_a"]),
            torch.tensor(chosen["input_ids_b"]),
            torch.tensor(chosen["candidate_ids"]),
        )
        labels = torch.tensor(chosen["answer_index_a"])
        iia = das.interchange_accuracy(
            model, torch.as_tensor(np.asarray(row["basis"])), torch.arange(len(chosen)), labels
        )
        assert math.isclose(iia, float(row["iia"]), abs_tol=1e-6)
        checked += 1
    assert checked == 4


def test_das_cli_refuses_a_small_split_and_names_the_version_it_ranked(organism_study):
    from typer.testing import CliRunner

    from seqpatch.cli import app

    store, _, ref = organism_study
    patching = next(p["version"] for p in ref.provenance["parents"] if p["stage"] == "patching")
    command = ["build", "das", "--top-n", "1", "--ks", "1", "--epochs", "1"]
    command += ["--data-dir", str(store.data_dir)]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 2
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--allow-small" in lines[0] and "test pairs" in lines[0]
    done = CliRunner().invoke(app, [*command, "--allow-small"])
    assert done.exit_code == 0, done.output
    assert f"ranked the cells of patching version {patching}" in done.output


def test_das_refuses_a_patching_parent_it_cannot_rank(tmp_path) -> None:
    """Head grids and attribution estimates have no (site, layer, position) cells to rotate."""
    from seqpatch.stages import das
    from seqpatch.stages.base import Inputs, ModelCache
    from seqpatch.store import StageRef

    def ref(stage: str, config: dict, parents: list) -> StageRef:
        return StageRef(stage, stage[:4], tmp_path, {"config": config, "parents": parents})

    pairs = ref("pairs", {"model": "builtin"}, [])
    for config in (
        {"sites": ["head_z"], "axes": ["layer", "head"], "method": "auto"},
        {"sites": ["resid_pre"], "axes": ["layer", "pos"], "method": "attribution"},
        {"sites": ["head_z"], "axes": ["layer", "pos"], "method": "auto"},
    ):
        patching_ref = ref("patching", config, [{"stage": "pairs", "version": pairs.version}])
        inputs = Inputs({"pairs": pairs, "patching": patching_ref}, ModelCache(), ("builtin",))
        with pytest.raises(DasStageError, match="pass"):
            das.prepare(inputs, DasConfig())


def test_bases_grouped_into_smaller_forwards_train_the_same(tiny):
    """``rows_per_forward`` only bounds memory: one basis per forward and all bases in one
    forward give the same gradients (to float rounding: a batch's rows share matmuls), so the
    same first step, and after training the same scores and kept epochs."""
    g = torch.Generator().manual_seed(1)
    model = random_interchange(tiny, g, 12, 8, layer=1, pos=3)
    labels = torch.randint(0, 10, (12,), generator=g)
    specs = [das.BasisSpec(k, labels, seed=k) for k in (1, 2, 3)]
    train, val = torch.arange(8), torch.arange(8, 12)
    for cfg, atol in (
        (das.TrainConfig(epochs=1, batch_size=8), 1e-5),
        (das.TrainConfig(3, 4), 0.05),
    ):
        one = das.train_bases(model, specs, train, val, cfg, rows_per_forward=1)
        joint = das.train_bases(model, specs, train, val, cfg, rows_per_forward=10**6)
        for a, b in zip(one, joint, strict=True):
            torch.testing.assert_close(a.basis, b.basis, atol=atol, rtol=0)
            assert (a.best_epoch, a.steps, a.val_iia) == (b.best_epoch, b.steps, b.val_iia)
    with pytest.raises(das.InterventionError, match="rows_per_forward"):
        das.train_bases(model, specs, train, val, cfg, rows_per_forward=0)


def test_a_basis_trains_the_same_whatever_the_global_random_state():
    """The orthogonal parametrization completes a basis with the global RNG; DAS seeds that
    completion from the basis's own seed, so training never depends on what ran before."""
    model = Planted(n=60, d=12)
    labels = model.v_src
    spec = das.BasisSpec(2, labels, seed=7)
    cfg = das.TrainConfig(epochs=2, batch_size=8)
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(das.train_bases(model, [spec], torch.arange(40), torch.arange(40, 60), cfg))
    torch.testing.assert_close(runs[0][0].basis, runs[1][0].basis, atol=0, rtol=0)


def test_a_killed_das_run_resumes_at_its_first_unfinished_cell(organism_study, tmp_path):
    """One shard per cell: after one cell's job (``--shard 0/2``, as a run killed during the
    second cell leaves it) the build computes only the other cell, and the rows and statistics
    equal the uninterrupted build's (not summed over shards)."""
    import shutil

    from seqpatch.stages import das as das_stage

    store, models, ref = organism_study
    copy = Store(tmp_path / "copy")
    for stage in ("pairs", "patching"):
        version = next(p["version"] for p in ref.provenance["parents"] if p["stage"] == stage)
        shutil.copytree(store.resolve(stage, version).path, copy.stage_dir(stage) / version)
    parents = {p["stage"]: p["version"] for p in ref.provenance["parents"]}
    cfg = DasConfig(top_n=2, ks=(1, 4), epochs=2, allow_small=True)
    kw = {"store": copy, "models": models, "progress": False}
    assert execute("das", cfg, parents, shard=(0, 2), **kw) is None
    built = []
    real = das_stage.build_shard

    def spy(inputs, cfg, index):
        built.append(index)
        return real(inputs, cfg, index)

    das_stage.build_shard = spy
    try:
        resumed = execute("das", cfg, parents, **kw)
    finally:
        das_stage.build_shard = real
    assert built == [1]
    assert resumed.version == ref.version
    want, got = store.load("das", ref.version), copy.load("das", resumed.version)
    assert want.remove_columns("basis").to_list() == got.remove_columns("basis").to_list()
    np.testing.assert_array_equal(np.asarray(want["basis"][0]), np.asarray(got["basis"][0]))
    for key in ("summary", "n_pairs", "divergence_index", "ks", "dropped"):
        assert resumed.provenance["extra"][key] == ref.provenance["extra"][key], key
    assert ref.provenance["extra"]["n_pairs"] == 30
