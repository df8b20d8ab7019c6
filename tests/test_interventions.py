"""The nnsight building blocks equal plain torch hooks: get_activations and patch_and_run."""

import pytest
import torch

from seqpatch.interventions import (
    InterventionError,
    candidate_logits,
    first_token_ids,
    get_activations,
    patch_and_run,
    sweep,
)
from seqpatch.models import SITES, load_model
from seqpatch.testing import save_tiny_model

ARCHS = ["llama", "gpt2", "gpt_neox"]
# Different token lengths, so the batch is left padded.
PROMPTS = ["x = 0\nx += 3\nx -= 2\n#x:", "x = 0\nx -= 4\n#x:", "x = 0\n#x:"]
SRC, TGT = "x = 0\nx += 3\nx -= 2", "x = 0\nx -= 4\nx += 1"  # equal token length


@pytest.fixture(scope="module")
def handles(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    return {arch: load_model(str(save_tiny_model(arch, root / arch))) for arch in ARCHS}


def hooked_activations(handle, text):
    """Every site of every layer of one unpadded prompt, read by plain torch hooks."""
    values, hooks = {}, []
    for layer in range(handle.n_layers):
        for site in SITES:
            ref = handle.module(site, layer)

            def keep_in(_m, args, key=(site, layer)):
                values[key] = args[0][0].clone()

            def keep_out(_m, _args, out, key=(site, layer)):
                values[key] = (out[0] if isinstance(out, tuple) else out)[0].clone()

            if ref.kind == "input":
                hooks.append(ref.module.register_forward_pre_hook(keep_in))
            else:
                hooks.append(ref.module.register_forward_hook(keep_out))
    ids = handle.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        handle.hf_model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return values, ids.shape[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_get_activations_equals_hooks_in_a_left_padded_batch(handles, arch):
    handle = handles[arch]
    acts = get_activations(handle, PROMPTS, SITES)
    for row, text in enumerate(PROMPTS):
        want, length = hooked_activations(handle, text)
        for site in SITES:
            got = acts[site][row]
            assert got.shape[:2] == (handle.n_layers, acts[site].shape[2])
            assert got[:, length:].isnan().all()
            for layer in range(handle.n_layers):
                expected = want[(site, layer)]
                if site == "head_z":
                    expected = expected.unflatten(-1, (handle.n_heads, -1))
                assert (got[layer, :length] - expected).abs().max() <= 1e-5, (site, layer)


def test_get_activations_selects_layers_and_unpadded_positions(handles):
    handle = handles["llama"]
    acts = get_activations(handle, PROMPTS, ["resid_post", "resid_pre"], [0, -1], [1, 0])
    assert set(acts) == {"resid_post", "resid_pre"}
    assert acts["resid_pre"].shape == (3, 2, 2, handle.d_model)
    for row, text in enumerate(PROMPTS):
        want, length = hooked_activations(handle, text)
        for li, layer in enumerate([1, 0]):
            for pi, pos in enumerate([0, length - 1]):
                got = acts["resid_post"][row, li, pi]
                assert (got - want[("resid_post", layer)][pos]).abs().max() <= 1e-5
    single = get_activations(handle, PROMPTS[0], "mlp_out")["mlp_out"]
    _, length = hooked_activations(handle, PROMPTS[0])
    assert single.shape == (handle.n_layers, length, handle.d_model)
    assert not single.isnan().any()


def test_get_activations_takes_slices_as_the_original_experiments_wrote_them(handles):
    """``positions=slice(0, 5)`` (and ranges, and negative slices) read each prompt's own
    unpadded positions, the same values a list of indices and plain hooks give."""
    handle = handles["llama"]
    lengths = [hooked_activations(handle, text)[1] for text in PROMPTS]
    seed_style = get_activations(handle, PROMPTS, "resid_pre", positions=slice(0, 5))["resid_pre"]
    assert seed_style.shape == (3, handle.n_layers, 5, handle.d_model)
    assert min(lengths) < 10 < max(lengths)  # the shortest prompt is cut short by slice(0, 10)
    first = get_activations(handle, PROMPTS, "resid_pre", positions=slice(0, 10))["resid_pre"]
    as_list = get_activations(handle, PROMPTS, "resid_pre", positions=list(range(10)))
    as_range = get_activations(handle, PROMPTS, "resid_pre", positions=range(10))
    assert torch.equal(seed_style, first[:, :, :5])
    for other in (as_list["resid_pre"], as_range["resid_pre"]):
        assert torch.equal(first.isnan(), other.isnan())
        assert torch.equal(first.nan_to_num(), other.nan_to_num())
    last = get_activations(handle, PROMPTS, "resid_post", positions=slice(-3, None))["resid_post"]
    assert last.shape == (3, handle.n_layers, 3, handle.d_model)
    for row, (text, length) in enumerate(zip(PROMPTS, lengths, strict=True)):
        want, _ = hooked_activations(handle, text)
        for layer in range(handle.n_layers):
            got_first = first[row, layer, : min(length, 10)]
            assert (got_first - want[("resid_pre", layer)][:10]).abs().max() <= 1e-5
            assert (last[row, layer] - want[("resid_post", layer)][-3:]).abs().max() <= 1e-5
        assert first[row, :, length:].isnan().all()
    with pytest.raises(InterventionError, match="for one position write"):
        get_activations(handle, PROMPTS, "resid_pre", positions=3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "resid_post"])
def test_patch_and_run_equals_a_hook_patch(handles, arch, site):
    handle = handles[arch]
    src_ids = handle.tokenizer(SRC, return_tensors="pt")["input_ids"]
    tgt_ids = handle.tokenizer(TGT, return_tensors="pt")["input_ids"]
    cand_ids = first_token_ids(handle, range(10), TGT)
    source_acts, _ = hooked_activations(handle, SRC)
    layer, pos = 0, 6  # a later layer at pos < T-1 could only reach the logits via resid_pre
    ref = handle.module(site, layer)
    donor = source_acts[(site, layer)][pos]

    def write_in(_m, args):
        x = args[0].clone()
        x[:, pos] = donor
        return (x, *args[1:])

    def write_out(_m, _args, out):
        x = (out[0] if isinstance(out, tuple) else out).clone()
        x[:, pos] = donor
        return (x, *out[1:]) if isinstance(out, tuple) else x

    hook = (
        ref.module.register_forward_pre_hook(write_in)
        if ref.kind == "input"
        else ref.module.register_forward_hook(write_out)
    )
    with torch.no_grad():
        patched = handle.hf_model(input_ids=tgt_ids).logits[0, -1]
    hook.remove()
    with torch.no_grad():
        clean = handle.hf_model(input_ids=tgt_ids).logits[0, -1]
        source = handle.hf_model(input_ids=src_ids).logits[0, -1]

    result = patch_and_run(handle, SRC, TGT, layer, pos, site=site, answers=(3, 7))
    assert (result.patched_logits - patched[cand_ids]).abs().max() <= 1e-5
    assert (result.baseline_logits - clean[cand_ids]).abs().max() <= 1e-5
    assert (result.source_logits - source[cand_ids]).abs().max() <= 1e-5
    want_delta = patched.softmax(-1)[cand_ids[7]] - clean.softmax(-1)[cand_ids[7]]
    assert result.delta == pytest.approx(float(want_delta), abs=1e-6)
    assert float(result) == result.delta  # Δ as a number, as the original experiments read it
    assert abs(result.delta) > 0  # the patch changed something, so the test can fail
    # The engine agrees with the building block on the same cell.
    grid = sweep(handle, src_ids, tgt_ids, site, cand_ids, layers=[layer], positions=[pos])
    assert (grid.logits[0, 0, 0] - result.patched_logits).abs().max() <= 1e-5
    baseline = candidate_logits(handle, tgt_ids, cand_ids)
    assert (baseline.logits[0] - result.baseline_logits).abs().max() <= 1e-5
    assert grid.lse[0, 0, 0] == pytest.approx(float(patched.logsumexp(-1)), abs=1e-5)
    assert baseline.lse[0] == pytest.approx(float(clean.logsumexp(-1)), abs=1e-5)


def test_patch_and_run_defaults_to_the_clean_runs_top_candidates(handles):
    handle = handles["llama"]
    result = patch_and_run(handle, SRC, TGT, 0, -1)
    assert result.token_idx == handle.tokenizer(TGT, return_tensors="pt")["input_ids"].shape[1] - 1
    assert result.answer_tgt == int(result.baseline_logits.argmax())
    assert result.answer_src == int(result.source_logits.argmax())
    assert result.candidates == tuple(range(10))


def test_patch_and_run_takes_the_original_experiments_act_key(handles):
    handle = handles["gpt2"]
    by_site = patch_and_run(handle, SRC, TGT, 0, 6, site="mlp_out", answers=(3, 7))
    by_key = patch_and_run(handle, SRC, TGT, 0, 6, act_key="mlp_out", answers=(3, 7))
    default = patch_and_run(handle, SRC, TGT, 0, 6, answers=(3, 7))
    assert by_key.site == "mlp_out" and default.site == "resid_pre"
    assert torch.equal(by_key.patched_logits, by_site.patched_logits)
    assert not torch.equal(by_key.patched_logits, default.patched_logits)
    assert float(by_key) == by_site.delta != 0
    with pytest.raises(InterventionError, match="act_key is another name for site"):
        patch_and_run(handle, SRC, TGT, 0, 6, site="attn_out", act_key="mlp_out")
    with pytest.raises(InterventionError, match="site"):
        patch_and_run(handle, SRC, TGT, 0, 6, act_key="resid")


def test_patch_and_run_refuses_what_it_cannot_do(handles):
    handle = handles["llama"]
    with pytest.raises(InterventionError, match="equal lengths"):
        patch_and_run(handle, SRC, "x = 0", 0, 0)
    with pytest.raises(InterventionError, match="site"):
        patch_and_run(handle, SRC, TGT, 0, 0, site="embed")
    with pytest.raises(InterventionError, match="token_idx 99"):
        patch_and_run(handle, SRC, TGT, 0, 99)
    with pytest.raises(InterventionError, match="among the candidates"):
        patch_and_run(handle, SRC, TGT, 0, 0, answers=(3, 12))
