"""Head sites, head axes and whole-stream patching equal patches made by plain hooks.

The references below are written independently of the engine and of ``HeadRef``: each reads the
architecture's own modules (``q_proj`` or the fused ``c_attn`` / ``query_key_value``, and the
input of ``o_proj``) and splits heads the way that architecture's attention code does.
"""

import pytest
import torch

from seqpatch.interventions import (
    HEAD_SITES,
    InterventionError,
    PatchSpec,
    candidate_logits,
    patch_grid,
    sweep,
)
from seqpatch.models import load_model
from seqpatch.testing import save_tiny_model
from tests.token_pairs import random_pairs

ARCHS = ("llama", "qwen2", "gemma2", "gemma3_text", "gpt2", "gpt_neox")
CANDIDATES = list(range(20, 30))
TOL = 1e-5


@pytest.fixture(scope="module")
def handles(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {arch: load_model(str(save_tiny_model(arch, root / arch))) for arch in ARCHS}


def methods(arch):
    return ["full"] if arch == "gpt2" else ["full", "cached"]


def head_module(handle, arch, site, layer):
    """(module, is_input, to_heads): to_heads views the raw tensor as [B, T, heads, d_head] the
    way the architecture's attention does."""
    config = handle.hf_model.config
    m = handle.hf_model
    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    dh = handle.d_head
    if arch == "gpt2":
        attn = m.transformer.h[layer].attn
        if site == "head_z":
            return attn.c_proj, True, lambda x: x.view(*x.shape[:2], n_q, dh)
        part = {"head_q": 0, "head_k": 1, "head_v": 2}[site]
        d = config.n_embd
        return (
            attn.c_attn,
            False,
            lambda x: x[..., part * d : (part + 1) * d].view(*x.shape[:2], n_q, dh),
        )
    if arch == "gpt_neox":
        attn = m.gpt_neox.layers[layer].attention
        if site == "head_z":
            return attn.dense, True, lambda x: x.view(*x.shape[:2], n_q, dh)
        part = {"head_q": 0, "head_k": 1, "head_v": 2}[site]
        return (
            attn.query_key_value,
            False,
            lambda x: x.view(*x.shape[:2], n_q, 3 * dh)[..., part * dh : (part + 1) * dh],
        )
    attn = m.model.layers[layer].self_attn
    if site == "head_z":
        return attn.o_proj, True, lambda x: x.view(*x.shape[:2], n_q, dh)
    module = {"head_q": attn.q_proj, "head_k": attn.k_proj, "head_v": attn.v_proj}[site]
    heads = n_q if site == "head_q" else n_kv
    return module, False, lambda x: x.view(*x.shape[:2], heads, dh)


def reference(handle, arch, src, tgt, site, layer, positions, head):
    """Full next-token logits [B, vocab] of targets with ``site`` of ``layer`` at ``positions``
    (a list) and ``head`` (None = all heads) taken from the sources."""
    module, is_input, to_heads = head_module(handle, arch, site, layer)
    grabbed = {}

    def read(x):
        grabbed["x"] = to_heads(x).clone()

    def write(x):
        x = x.clone()
        view = to_heads(x)
        donor = grabbed["x"]
        for pos in positions:
            if head is None:
                view[:, pos] = donor[:, pos]
            else:
                view[:, pos, head] = donor[:, pos, head]
        return x

    def run(fn, ids):
        if is_input:

            def pre(_m, args):
                new = fn(args[0])
                return None if new is None else (new, *args[1:])

            hook = module.register_forward_pre_hook(pre)
        else:
            hook = module.register_forward_hook(lambda _m, _a, out: fn(out))
        try:
            with torch.no_grad():
                return handle.hf_model(input_ids=ids).logits[:, -1].float()
        finally:
            hook.remove()

    run(read, src)
    return run(write, tgt)


def check(result_logits, result_lse, want):
    assert (result_logits - want[:, CANDIDATES]).abs().max().item() <= TOL
    assert (result_lse - want.logsumexp(-1)).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_head_grid_all_positions_equals_hook_patches(handles, arch):
    handle = handles[arch]
    length = 18  # longer than the sliding windows of gemma2 (16) and gemma3_text (4)
    src, tgt = random_pairs(seed=1, n=3, length=length, diverge=5)
    n_kv = getattr(handle.hf_model.config, "num_key_value_heads", None) or handle.n_heads
    for method in methods(arch):
        for site in HEAD_SITES:
            result = patch_grid(
                handle, src, tgt, PatchSpec(site, ("layer", "head")), CANDIDATES, method=method
            )
            heads = n_kv if site in ("head_k", "head_v") else handle.n_heads
            assert result.axes == ("layer", "head")
            assert result.logits.shape == (3, handle.n_layers, heads, len(CANDIDATES))
            assert result.index["head"] == list(range(heads))
            assert not result.logits.isnan().any()
            for layer, head in [(0, 0), (handle.n_layers - 1, heads - 1), (0, heads - 1)]:
                want = reference(handle, arch, src, tgt, site, layer, range(length), head)
                check(result.logits[:, layer, head], result.lse[:, layer, head], want)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_head_pos_grid_equals_hook_patches(handles, arch):
    handle = handles[arch]
    length, k = 14, 4
    src, tgt = random_pairs(seed=2, n=3, length=length, diverge=k)
    last = handle.n_layers - 1
    for method in methods(arch):
        for site in HEAD_SITES:
            spec = PatchSpec(site, ("layer", "head", "pos"), heads=[-1, 0])
            result = patch_grid(handle, src, tgt, spec, CANDIDATES, method=method, min_rows=4)
            assert result.logits.shape == (3, handle.n_layers, 2, length, len(CANDIDATES))
            assert not result.lse.isnan().any()
            heads = result.index["head"]
            for layer, hi, pos in [(0, 0, k), (last, 1, length - 1), (last, 0, k + 2), (0, 1, 0)]:
                want = reference(handle, arch, src, tgt, site, layer, [pos], heads[hi])
                check(result.logits[:, layer, hi, pos], result.lse[:, layer, hi, pos], want)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_head_z_at_a_cell_equals_attn_out_there(handles, arch):
    """o_proj is linear: patching all heads' z at (layer, pos) gives the source's o_proj output
    there, which is attn_out (its bias, when it has one, is the same in both runs)."""
    handle = handles[arch]
    src, tgt = random_pairs(seed=3, n=2, length=10, diverge=3)
    z = patch_grid(handle, src, tgt, PatchSpec("head_z"), CANDIDATES, skip_noops=False)
    attn = sweep(handle, src, tgt, "attn_out", CANDIDATES, skip_noops=False)
    assert z.logits.shape == attn.logits.shape
    assert (z.logits - attn.logits).abs().max() <= TOL
    assert (z.lse - attn.lse).abs().max() <= TOL
    assert (z.logits[:, :, -1] - z.clean.logits[:, None]).abs().max() > 1e-3  # it did patch


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_stream_at_layer_zero_gives_the_source(handles, arch):
    handle = handles[arch]
    src, tgt = random_pairs(seed=4, n=3, length=12, diverge=2)
    source = candidate_logits(handle, src, CANDIDATES)
    target = candidate_logits(handle, tgt, CANDIDATES)
    for method in methods(arch):
        result = patch_grid(
            handle, src, tgt, PatchSpec("resid_pre", ("layer",)), CANDIDATES, method=method
        )
        assert result.axes == ("layer",) and result.lse.shape == (3, handle.n_layers)
        assert (result.logits[:, 0] - source.logits).abs().max() <= TOL
        assert (result.lse[:, 0] - source.lse).abs().max() <= TOL
        assert (source.logits - target.logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gemma3_text"])
def test_whole_stream_from_divergence_and_span_axis(handles, arch):
    handle = handles[arch]
    length = 12
    src, tgt = random_pairs(seed=5, n=3, length=length, diverge=4)
    tgt[1, 4:7] = src[1, 4:7]  # pair 1 diverges later, at 7
    layer_module = handle.hf_model.transformer.h if arch == "gpt2" else handle.hf_model.model.layers
    spans = ("all", "from-divergence", [0, -1], "before-last", "last")
    spec = PatchSpec("resid_pre", ("layer", "span"), spans=spans)
    for method in methods(arch):
        result = patch_grid(handle, src, tgt, spec, CANDIDATES, method=method)
        assert result.logits.shape == (3, handle.n_layers, len(spans), len(CANDIDATES))
        for layer in range(handle.n_layers):
            for p, start in ((0, 4), (1, 7), (2, 4)):
                for si, positions in (
                    (0, range(length)),
                    (1, range(start, length)),
                    (2, [0, length - 1]),
                    (3, range(start, length - 1)),
                    (4, [length - 1]),
                ):
                    want = _resid_reference(
                        handle, layer_module[layer], src[p : p + 1], tgt[p : p + 1], positions
                    )
                    check(result.logits[p, layer, si], result.lse[p, layer, si], want)


def _resid_reference(handle, layer_module, src, tgt, positions):
    grabbed = {}

    def read(_m, args, kwargs):
        grabbed["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def write(_m, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        for pos in positions:
            x[:, pos] = grabbed["x"][:, pos]
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    with torch.no_grad():
        hook = layer_module.register_forward_pre_hook(read, with_kwargs=True)
        handle.hf_model(input_ids=src)
        hook.remove()
        hook = layer_module.register_forward_pre_hook(write, with_kwargs=True)
        logits = handle.hf_model(input_ids=tgt).logits[:, -1].float()
        hook.remove()
    return logits


def test_skipped_head_cells_are_exact(handles):
    """No-op skipping (identical prefix, unreachable last-layer cells) changes no value."""
    handle = handles["llama"]
    src, tgt = random_pairs(seed=6, n=3, length=10, diverge=4)
    for site in HEAD_SITES:
        spec = PatchSpec(site, ("layer", "head", "pos"))
        fast = patch_grid(handle, src, tgt, spec, CANDIDATES)
        slow = patch_grid(handle, src, tgt, spec, CANDIDATES, skip_noops=False)
        assert fast.stats.skipped_cells > 0 and slow.stats.skipped_cells == 0
        assert (fast.logits - slow.logits).abs().max() <= TOL
        assert (fast.lse - slow.lse).abs().max() <= TOL


@pytest.mark.parametrize("site", HEAD_SITES)
def test_all_positions_patch_starts_at_the_first_changed_position(handles, site):
    """A head patched at every position runs from the first position its donor changes: the
    work of the from-divergence patch, the values of the untrimmed run and of plain hooks."""
    handle = handles["llama"]
    src, tgt = random_pairs(seed=8, n=3, length=10, diverge=4)
    tgt[1, 4:6] = src[1, 4:6]  # pair 1 diverges later, at 6
    every = patch_grid(handle, src, tgt, PatchSpec(site, ("layer", "head")), CANDIDATES)
    untrimmed = patch_grid(
        handle, src, tgt, PatchSpec(site, ("layer", "head")), CANDIDATES, skip_noops=False
    )
    spec = PatchSpec(site, ("layer", "head"), spans=("from-divergence",))
    from_divergence = patch_grid(handle, src, tgt, spec, CANDIDATES, skip_noops=False)
    assert every.stats.token_layers == from_divergence.stats.token_layers
    assert every.stats.token_layers < untrimmed.stats.token_layers
    assert (every.logits - untrimmed.logits).abs().max() <= TOL
    assert (every.lse - untrimmed.lse).abs().max() <= TOL
    for layer in (0, handle.n_layers - 1):
        for head in (0, 1):
            want = reference(handle, "llama", src, tgt, site, layer, list(range(10)), head)
            check(every.logits[:, layer, head], every.lse[:, layer, head], want)


def test_bad_axes_say_what_to_change(handles):
    handle = handles["llama"]
    src, tgt = random_pairs(seed=7, n=2, length=6, diverge=1)
    with pytest.raises(InterventionError, match="head site"):
        PatchSpec("resid_pre", ("layer", "head"))
    with pytest.raises(InterventionError, match="choose one of"):
        PatchSpec("head_z", ("head", "layer"))
    with pytest.raises(InterventionError, match="head 4"):
        patch_grid(handle, src, tgt, PatchSpec("head_k", ("layer", "head"), heads=[4]), [20])
    with pytest.raises(InterventionError, match="span"):
        PatchSpec("resid_pre", ("layer",), spans=("everything",))
