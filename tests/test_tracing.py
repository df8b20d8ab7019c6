"""Causal tracing (ROME): σ, seeded noise, the restored grid against plain hooks, and the stage."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from seqpatch.interventions.tracing import (
    KINDS,
    Corruption,
    default_window,
    embedding_std,
    noise_seeds,
    restore_probs,
    sample_noise,
    trace,
    window_layers,
)
from seqpatch.models import load_model
from seqpatch.programs import get_family
from seqpatch.stages import tracing as stage

TOL = 1e-5


@pytest.fixture(scope="module")
def organism():
    return load_model("builtin")


@pytest.fixture(scope="module")
def program(organism):
    """A 4-statement organism program, its ids, target (answer token) and chain positions."""
    from seqpatch.organism import organism_family

    fam = organism_family()
    prog = fam.sample(4, random.Random(3))
    prompt = organism.prompt_format.prompt(prog)
    ids = organism.prompt_ids(prog)
    target = organism.answer_token_ids([prog.answer], prompt=prompt)[0][0]
    statements = stage.statement_positions(organism, prog, prompt)
    chain = sorted(t for i in prog.dependencies() for t in statements[i])
    return prog, prompt, ids, target, chain


def corruption(handle, positions, n=3, seed=0):
    return Corruption(tuple(positions), tuple(noise_seeds(seed, "p", n)), 3 * embedding_std(handle))


def reference(handle, ids, target, positions, noise, states):
    """Independent implementation with plain hooks: noise added to the embedding output of every
    row, then each (kind, layer, position) in ``states`` set to its clean value."""
    model = handle.hf_model
    layers = model.model.layers
    clean: dict = {}
    removers = []

    def pre(layer):
        def fn(_m, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            clean[("resid", layer)] = hidden[0].clone()

        return fn

    def post(kind, layer):
        def fn(_m, _args, out):
            clean[(kind, layer)] = (out[0] if isinstance(out, tuple) else out)[0].clone()

        return fn

    for i, layer in enumerate(layers):
        removers.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        removers.append(layer.mlp.register_forward_hook(post("mlp", i)))
        removers.append(layer.self_attn.register_forward_hook(post("attn", i)))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for r in removers:
        r.remove()
    removers = []
    pos = torch.tensor(positions)

    def add_noise(_m, _args, out):
        out = out.clone()
        out[:, pos] += noise
        return out

    removers.append(model.model.embed_tokens.register_forward_hook(add_noise))
    for kind, layer, t in states:
        value = clean[(kind, layer)][t]
        if kind == "resid":

            def set_pre(_m, args, kwargs, t=t, value=value):
                if args:
                    hidden = args[0].clone()
                    hidden[:, t] = value
                    return (hidden, *args[1:]), kwargs
                hidden = kwargs["hidden_states"].clone()
                hidden[:, t] = value
                return args, {**kwargs, "hidden_states": hidden}

            removers.append(layers[layer].register_forward_pre_hook(set_pre, with_kwargs=True))
        else:

            def set_out(_m, _args, out, t=t, value=value):
                tensor = (out[0] if isinstance(out, tuple) else out).clone()
                tensor[:, t] = value
                return (tensor, *out[1:]) if isinstance(out, tuple) else tensor

            module = layers[layer].mlp if kind == "mlp" else layers[layer].self_attn
            removers.append(module.register_forward_hook(set_out))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids] * noise.shape[0])).logits[:, -1]
    finally:
        for r in removers:
            r.remove()
    return torch.softmax(logits.double(), -1)[:, target].numpy()


# ---------------------------------------------------------------------------------------------
# σ, noise and windows


def test_sigma_is_nu_times_std_over_every_embedding_entry(organism):
    weight = organism.hf_model.model.embed_tokens.weight.detach().numpy().astype(np.float64)
    assert embedding_std(organism) == pytest.approx(np.std(weight, ddof=1), rel=1e-9)
    assert embedding_std(organism, [5, 5, 7]) == pytest.approx(
        np.std(weight[[5, 5, 7]], ddof=1), rel=1e-9
    )
    cfg = stage.TracingConfig(noise_scale=2.5)
    assert stage.sigma_for(organism, cfg, []) == pytest.approx(2.5 * np.std(weight, ddof=1))


def test_noise_is_reproducible_from_the_stored_seed(organism, program):
    _, _, ids, target, chain = program
    corr = corruption(organism, chain, n=3)
    assert noise_seeds(0, "p", 3) == list(corr.seeds)
    assert len(set(corr.seeds)) == 3 and noise_seeds(1, "p", 3) != list(corr.seeds)
    generator = torch.Generator().manual_seed(corr.seeds[1])
    eps = torch.randn((len(chain), organism.d_model), generator=generator)
    assert torch.equal(corr.noise(organism.d_model)[1], corr.sigma * eps)
    assert torch.equal(sample_noise(corr.seeds[1], len(chain), organism.d_model), eps)
    # the corrupted run is a function of the seeds alone
    noise = torch.stack(
        [
            corr.sigma
            * torch.randn(
                (len(chain), organism.d_model), generator=torch.Generator().manual_seed(s)
            )
            for s in corr.seeds
        ]
    )
    expected = reference(organism, ids, target, chain, noise, [])
    result = trace(organism, ids, target, corr, kinds=("resid",), layers=[0])
    np.testing.assert_allclose(result.corrupted_probs, expected, atol=TOL)
    again = trace(organism, ids, target, corr, kinds=("resid",), layers=[0])
    np.testing.assert_array_equal(again.corrupted_probs, result.corrupted_probs)


def test_window_rule_scales_romes_ten_of_forty_eight():
    assert default_window(48) == 10 and default_window(4) == 1 and default_window(30) == 6
    assert list(window_layers(20, 10, 48)) == list(range(15, 25))
    assert list(window_layers(2, 10, 48)) == list(range(0, 7))
    assert list(window_layers(2, 1, 4)) == [2]
    assert list(window_layers(3, 3, 4)) == [2, 3]


# ---------------------------------------------------------------------------------------------
# Restorations


def test_restoring_nothing_gives_corrupted_and_everything_gives_clean(organism, program):
    _, _, ids, target, chain = program
    corr = corruption(organism, chain)
    result = trace(organism, ids, target, corr, kinds=("resid",))
    nothing = restore_probs(organism, ids, target, corr, [])
    np.testing.assert_allclose(nothing, result.corrupted_probs, atol=TOL)
    clean = restore_probs(organism, ids, target, None)[0]
    assert result.clean_prob == pytest.approx(clean, abs=TOL)
    assert abs(result.corrupted_prob - clean) > 1e-3  # the chain's noise matters
    every = [("resid_pre", layer, t) for layer in range(organism.n_layers) for t in range(len(ids))]
    np.testing.assert_allclose(restore_probs(organism, ids, target, corr, every), clean, atol=TOL)
    for layer in range(organism.n_layers):  # every position of one layer is the whole stream
        states = [("resid_pre", layer, t) for t in range(len(ids))]
        np.testing.assert_allclose(
            restore_probs(organism, ids, target, corr, states), clean, atol=TOL
        )
    # one corrupted token: restoring its embedding (resid row 0) restores everything
    single = corruption(organism, chain[-1:])
    one = trace(organism, ids, target, single, kinds=("resid",), layers=[0])
    assert one.restored[0, 0, chain[-1]] == pytest.approx(one.clean_prob, abs=TOL)
    untouched = [t for t in range(len(ids)) if t != chain[-1]]
    np.testing.assert_allclose(
        one.restored[0, 0, untouched], np.broadcast_to(one.corrupted_probs, (len(untouched), 3))
    )


@pytest.mark.parametrize("method", ["cached", "full"])
def test_single_restorations_match_plain_hooks(organism, program, method):
    _, _, ids, target, chain = program
    corr = corruption(organism, chain)
    window = 3  # exercises multi-layer windows and the truncation at both ends
    result = trace(organism, ids, target, corr, window=window, method=method)
    noise = corr.noise(organism.d_model)
    last = len(ids) - 1
    n_layers = organism.n_layers
    cells = [
        ("resid", 0, chain[0]),
        ("resid", 2, chain[-1]),
        ("resid", 3, last),
        ("resid", 1, chain[-1] + 1),
        ("mlp", 0, chain[0]),
        ("mlp", 3, last),
        ("mlp", 2, chain[-1]),
        ("attn", 1, last),
        ("attn", 3, chain[-1] + 2),
        ("attn", 0, 0),
    ]
    for kind, layer, t in cells:
        if kind == "resid":
            states = [(kind, layer, t)]
        else:
            states = [(kind, j, t) for j in window_layers(layer, window, n_layers)]
        expected = reference(organism, ids, target, chain, noise, states)
        got = result.restored[KINDS.index(kind), layer, t]
        np.testing.assert_allclose(got, expected, atol=TOL, err_msg=f"{kind} {layer} {t}")
    assert np.abs(result.indirect_effect).max() > 1e-3


def test_cached_and_full_agree_on_the_whole_grid(organism, program):
    _, _, ids, target, chain = program
    corr = corruption(organism, chain, n=2)
    stats: list = []
    cached = trace(organism, ids, target, corr, method="cached", stats=stats)
    full = trace(organism, ids, target, corr, method="full", skip_noops=False, stats=stats)
    np.testing.assert_allclose(cached.restored, full.restored, atol=TOL)
    assert stats[0].token_layers < 0.5 * stats[1].token_layers
    assert stats[0].skipped_rows > 0 and stats[1].skipped_rows < stats[0].skipped_rows


def test_full_method_runs_architectures_without_the_layer_runner(tmp_path):
    from seqpatch.testing import save_tiny_model

    handle = load_model(str(save_tiny_model("gpt2", tmp_path / "gpt2")), prompt_format="compact")
    ids = list(range(3, 15))
    corr = corruption(handle, [2, 3])
    result = trace(handle, ids, 7, corr, kinds=("resid", "mlp"), layers=[1])
    for k, (site, t) in enumerate([("resid_pre", 3), ("mlp_out", 11)]):
        ref = restore_probs(handle, ids, 7, corr, [(site, 1, t)])
        np.testing.assert_allclose(result.restored[k, 0, t], ref, atol=TOL)
    assert abs(result.corrupted_prob - result.clean_prob) > 0


@pytest.mark.parametrize("method", ["cached", "full"])
def test_tracing_is_exact_on_sliding_window_and_global_layers(tmp_path, method):
    """Gemma 3: layer 0 attends over a 4-token window with rope base 10k, layer 1 globally with
    base 1M; the layer runner must give each layer its own mask and rotary embedding."""
    from seqpatch.testing import save_tiny_model

    folder = save_tiny_model("gemma3_text", tmp_path / "gemma3")
    handle = load_model(str(folder), prompt_format="compact")
    ids = list(range(3, 17))  # 14 tokens, far beyond the window
    noised = [2, 3]
    corr = corruption(handle, noised)
    window = 1
    stats: list = []
    result = trace(handle, ids, 7, corr, window=window, method=method, stats=stats)
    assert stats[0].method == method
    noise = corr.noise(handle.d_model)
    last = len(ids) - 1
    cells = [("resid", 1, 3), ("resid", 1, 9), ("resid", 0, 2), ("mlp", 0, 3)]
    cells += [("mlp", 1, last), ("attn", 1, last), ("attn", 0, 6), ("resid", 1, last)]
    for kind, layer, t in cells:
        if kind == "resid":
            states = [(kind, layer, t)]
        else:
            states = [(kind, j, t) for j in window_layers(layer, window, handle.n_layers)]
        expected = reference(handle, ids, 7, noised, noise, states)
        got = result.restored[KINDS.index(kind), layer, t]
        np.testing.assert_allclose(got, expected, atol=TOL, err_msg=f"{kind} {layer} {t}")
    assert np.abs(result.indirect_effect).max() > 1e-4


# ---------------------------------------------------------------------------------------------
# The stage's pieces


def test_config_states_romes_defaults_and_validates():
    cfg = stage.TracingConfig()
    assert (cfg.noise_scale, cfg.n_samples, cfg.window, cfg.corrupt) == (3.0, 10, None, "changed")
    for bad in ({"corrupt": "nope"}, {"n_samples": 0}, {"kinds": ("resid", "x")}, {"program": "c"}):
        with pytest.raises(stage.TracingStageError):
            stage.TracingConfig(**bad)


def test_statement_positions_and_corrupt_targets(organism, program):
    prog, prompt, ids, _, chain = program
    statements = stage.statement_positions(organism, prog, prompt)
    tokens = organism.tokenizer.convert_ids_to_tokens(ids)
    for stmt, positions in zip(prog.statements, statements, strict=True):
        assert "".join(tokens[t] for t in positions) == stmt.render("compact")
    row = {
        "pair_id": "x",
        "divergence_index": 1,
        "diff_positions": [statements[1][-1]],
        "dependencies_b": prog.dependencies(),
    }
    assert stage.corrupted_positions("changed", row, prog, statements, "b") == statements[1]
    assert stage.corrupted_positions("diff", row, prog, statements, "b") == [statements[1][-1]]
    assert stage.corrupted_positions("chain", row, prog, statements, "b") == chain
    assert stage.corrupted_positions("3", row, prog, statements, "b") == statements[3]
    with pytest.raises(stage.TracingStageError):
        stage.corrupted_positions("9", row, prog, statements, "b")


def test_roles_follow_romes_token_groups():
    assert stage.roles(9, [2, 3, 5]) == [
        "before",
        "before",
        "first_corrupted",
        "middle_corrupted",
        "between",
        "last_corrupted",
        "first_after",
        "further_after",
        "last",
    ]


# ---------------------------------------------------------------------------------------------
# End to end through the executor


def test_stage_builds_through_the_executor(tmp_path, organism, monkeypatch):
    from seqpatch.executor import execute
    from seqpatch.options import RuntimeSettings
    from seqpatch.pipeline import default_family
    from seqpatch.stages import STAGES, StageInfo
    from seqpatch.stages.base import ModelCache
    from seqpatch.stages.pairs import PairsConfig
    from seqpatch.store import Store

    if "tracing" not in STAGES:  # until the registry lists the stage
        info = StageInfo("tracing", "seqpatch.stages.tracing", "ROME causal trace per program")
        monkeypatch.setitem(STAGES, "tracing", info)
    store = Store(tmp_path)
    models = ModelCache()
    models.put("builtin", organism)
    family, params = default_family("builtin")
    pairs_cfg = PairsConfig(
        model="builtin", seq_len=3, n_pairs=3, family=family, family_params=params
    )
    pairs = execute("pairs", pairs_cfg, store=store, models=models, progress=False)
    cfg = stage.TracingConfig(n_programs=2, n_samples=2, corrupt="chain")
    ref = execute(
        "tracing",
        cfg,
        {"pairs": pairs},
        store=store,
        models=models,
        runtime=RuntimeSettings(shard_size=1, progress=False),
    )
    rows = store.load("tracing", ref.version)
    assert len(rows) == 2
    n_width = max(rows["n_tokens"])
    assert rows.features == stage.features(3, organism.n_layers, n_width)
    row = rows.with_format("numpy")[0]
    assert row["restored"].shape == (3, organism.n_layers, n_width)
    np.testing.assert_allclose(
        row["indirect_effect"], row["restored"] - row["corrupted_prob"], atol=1e-6
    )
    # the stored seeds and σ reproduce the stored corrupted probabilities
    corr = Corruption(
        tuple(int(t) for t in row["corrupted_positions"]),
        tuple(int(s) for s in row["seeds"]),
        float(row["sigma"]),
    )
    ids = [int(i) for i in row["input_ids"]]
    again = restore_probs(organism, ids, int(row["target_id"]), corr, [])
    np.testing.assert_allclose(again, row["corrupted_probs"], atol=TOL)
    assert row["clean_prob"] == pytest.approx(
        restore_probs(organism, ids, int(row["target_id"]), None)[0], abs=TOL
    )
    assert int(row["window"]) == 1 and row["sigma"] == pytest.approx(3 * embedding_std(organism))
    folder = ref.path
    aie = np.load(folder / stage.AIE_FILE)
    index = json.loads((folder / stage.AIE_INDEX_FILE).read_text())
    assert aie.shape == (len(index["divergence_indices"]), 3, organism.n_layers, n_width)
    roles = np.load(folder / stage.AIE_ROLES_FILE)
    assert roles.shape == (3, organism.n_layers, len(stage.ROLES))
    assert index["kinds"] == list(KINDS) and index["n_programs"] == 2


def test_sigma_counts_the_embedding_modules_own_scale(tmp_path):
    from seqpatch.testing import save_tiny_model

    handle = load_model(str(save_tiny_model("gemma", tmp_path / "gemma")), prompt_format="compact")
    module = handle.hf_model.model.embed_tokens
    weight = module.weight.detach().double().numpy()
    expected = np.std(weight, ddof=1) * float(module.embed_scale)
    assert float(module.embed_scale) > 1
    assert embedding_std(handle) == pytest.approx(expected, rel=1e-9)


def test_auto_noise_is_the_smallest_rung_that_halves_the_answer(tmp_path, organism, monkeypatch):
    """``noise_scale="auto"``: the chosen ν is the first rung of the ladder whose corrupted
    P(answer), recomputed here with the tracing engine's own ``restore_probs``, is at most half
    the clean one on the calibration programs (the rung before it is not); the rows, provenance
    and chart carry it."""
    from seqpatch.executor import execute
    from seqpatch.options import RuntimeSettings
    from seqpatch.pipeline import default_family
    from seqpatch.stages import STAGES, StageInfo
    from seqpatch.stages.base import ModelCache
    from seqpatch.stages.pairs import PairsConfig
    from seqpatch.store import Store

    if "tracing" not in STAGES:
        info = StageInfo("tracing", "seqpatch.stages.tracing", "ROME causal trace per program")
        monkeypatch.setitem(STAGES, "tracing", info)
    ladder = (1e-3, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    monkeypatch.setattr(stage, "NOISE_LADDER", ladder)
    monkeypatch.setattr(stage.calibrate_noise, "__defaults__", (ladder,))
    store, models = Store(tmp_path), ModelCache()
    models.put("builtin", organism)
    family, params = default_family("builtin")
    pairs_cfg = PairsConfig(
        model="builtin", seq_len=3, n_pairs=4, family=family, family_params=params
    )
    pairs = execute("pairs", pairs_cfg, store=store, models=models, progress=False)
    cfg = stage.TracingConfig(
        n_programs=4, n_samples=3, kinds=("resid",), noise_scale="auto", calibration_programs=3,
    )  # fmt: skip
    runtime = RuntimeSettings(shard_size=2, progress=False)
    ref = execute("tracing", cfg, {"pairs": pairs}, store=store, models=models, runtime=runtime)
    rows = store.load("tracing", ref.version)
    steps = ref.provenance["extra"]["calibration"]
    nu = steps[-1]["noise_scale"]
    assert [s["noise_scale"] for s in steps] == list(ladder[: len(steps)])
    assert [s["chosen"] for s in steps] == [False] * (len(steps) - 1) + [True]
    assert len(steps) >= 2  # the tiny first rung never corrupts enough
    assert set(rows["noise_scale"]) == {nu}
    std = embedding_std(organism)
    assert rows[0]["sigma"] == pytest.approx(nu * std)

    def mean_probs(scale):
        clean, noisy = [], []
        for row in rows.select(range(3)):
            ids, target = [int(i) for i in row["input_ids"]], int(row["target_id"])
            corr = Corruption(tuple(row["corrupted_positions"]), tuple(row["seeds"]), scale * std)
            clean.append(restore_probs(organism, ids, target, None)[0])
            noisy.append(np.mean(restore_probs(organism, ids, target, corr, [])))
        return float(np.mean(clean)), float(np.mean(noisy))

    clean, noisy = mean_probs(nu)
    assert noisy <= 0.5 * clean
    assert (clean, noisy) == pytest.approx((steps[-1]["clean_prob"], steps[-1]["corrupted_prob"]))
    before_clean, before_noisy = mean_probs(steps[-2]["noise_scale"])
    assert before_noisy > 0.5 * before_clean
    index = json.loads((ref.path / stage.AIE_INDEX_FILE).read_text())
    assert index["noise_scale"] == nu
    assert list(ref.path.glob("causal-trace.png"))


def test_bad_noise_settings_are_refused_before_work():
    with pytest.raises(stage.TracingStageError, match="noise_scale must be"):
        stage.TracingConfig(noise_scale="loud")
    with pytest.raises(stage.TracingStageError, match="calibration_programs"):
        stage.TracingConfig(noise_scale="auto", calibration_programs=0)


@pytest.mark.parametrize("shared_prefix", [1, 0])
def test_the_target_is_the_token_that_carries_the_value(shared_prefix):
    """SmolLM2 reads `` 6`` as ``Ġ`` then ``6``: the trace appends the whitespace token (whether
    or not the pair shares it as an answer prefix) and targets ``6``, not ``Ġ`` — the space is
    the same for every value, so P(``Ġ``) cannot show a corruption of the value (schema 1)."""
    from seqpatch.models import pretrained as pt
    from seqpatch.programs import Program

    pt.install("smollm2-135m-instruct", progress=False)
    handle = load_model("smollm2-135m-instruct", prompt_format="code")
    program = Program.parse("a = 6\nb = a\n#b:", "binding", "code")
    prompt = handle.prompt_format.prompt(program)
    space, six = handle.answer_token_ids([6], prompt=prompt)[0]
    ids = handle.prompt_ids(program)
    row = {
        "pair_id": "p", "program_b": program.render("code"), "prompt_b": prompt,
        "input_ids_b": ids + [space] * shared_prefix, "n_tokens": len(ids) + shared_prefix,
        "answer_prefix_len": shared_prefix, "ground_truth_b": 6, "divergence_index": 0,
        "dependencies_b": [0, 1], "diff_positions": [],
    }  # fmt: skip
    prog = stage.prepare_program(handle, stage.TracingConfig(), row, get_family("binding"))
    assert handle.tokenizer.decode([space]).strip() == ""
    assert prog.target == six and prog.ids == [*ids, space]
    assert [prog.tokens[t] for t in prog.positions][-1] == "6"  # the changed statement's value
