"""The sweep engine equals a patch made by plain torch hooks, cell by cell, on many architectures.

The reference below is written independently of the engine: it runs one source and one patched
target per cell with ``register_forward_hook`` / ``register_forward_pre_hook`` on the modules the
handle names for each site.
"""

import pytest
import torch

from seqpatch.interventions import (
    SWEEP_SITES,
    InterventionError,
    PatchSpec,
    SweepStats,
    candidate_logits,
    get_activations,
    patch_grid,
    sweep,
)
from seqpatch.interventions._grid import _Resolved
from seqpatch.metrics import prob_delta, prob_delta_candidates
from seqpatch.models import load_model
from seqpatch.testing import TINY_ARCHITECTURES, save_tiny_model, tiny_config
from tests.token_pairs import random_pairs

CACHED_ARCHS = [a for a in TINY_ARCHITECTURES if a != "gpt2"]
CANDIDATES = list(range(20, 30))
TOL = 1e-5


@pytest.fixture(scope="module")
def handles(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return {
        arch: load_model(str(save_tiny_model(arch, root / arch))) for arch in TINY_ARCHITECTURES
    }


def _site_tensor(value):
    return value[0] if isinstance(value, tuple) else value


def reference_patch(handle, src, tgt, site, layer, pos):
    """Next-token logits ``[B, vocab]`` of targets ``[B, T]`` with (site, layer, pos) taken from
    the sources, by plain hooks (one cell, a batch of pairs)."""
    ref = handle.module(site, layer)
    module, is_input = ref.module, ref.kind == "input"
    donated = {}

    def read_pre(_m, args):
        donated["x"] = args[0][:, pos].clone()

    def read_out(_m, _args, out):
        donated["x"] = _site_tensor(out)[:, pos].clone()

    def write_pre(_m, args):
        x = args[0].clone()
        x[:, pos] = donated["x"]
        return (x, *args[1:])

    def write_out(_m, _args, out):
        x = _site_tensor(out).clone()
        x[:, pos] = donated["x"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    for reader, writer in [(read_pre, write_pre)] if is_input else [(read_out, write_out)]:
        register = module.register_forward_pre_hook if is_input else module.register_forward_hook
        hook = register(reader)
        with torch.no_grad():
            handle.hf_model(input_ids=src)
        hook.remove()
        hook = register(writer)
        with torch.no_grad():
            logits = handle.hf_model(input_ids=tgt).logits[:, -1]
        hook.remove()
    return logits.float()


def assert_matches_reference(handle, src, tgt, site, result, cells, layers=None, positions=None):
    """Candidate logits and the full-vocabulary log-normaliser of each cell equal the hooks'."""
    layers = list(range(handle.n_layers)) if layers is None else layers
    positions = list(range(tgt.shape[1])) if positions is None else positions
    for layer, pos in cells:
        want = reference_patch(handle, src, tgt, site, layer, pos)
        at = (slice(None), layers.index(layer), positions.index(pos))
        assert (result.logits[at] - want[:, CANDIDATES]).abs().max().item() <= TOL, (site, layer)
        assert (result.lse[at] - want.logsumexp(-1)).abs().max().item() <= TOL, (site, layer, pos)


@pytest.mark.parametrize(
    ("arch", "method"),
    [(a, "full") for a in TINY_ARCHITECTURES] + [(a, "cached") for a in CACHED_ARCHS],
)
def test_sweep_equals_hook_patches(handles, arch, method):
    handle = handles[arch]
    length = 20  # longer than the sliding windows of gemma2 (16) and gemma3_text (4)
    src, tgt = random_pairs(seed=1, n=3, length=length, diverge=6)
    last = handle.n_layers - 1
    cells = [(0, 0), (0, length - 1), (last, 0), (last, length - 1), (last, 11)]
    for site in SWEEP_SITES:
        stats = []
        result = sweep(handle, src, tgt, site, CANDIDATES, method=method, min_rows=4, stats=stats)
        assert result.logits.shape == (3, handle.n_layers, length, len(CANDIDATES))
        assert result.lse.shape == (3, handle.n_layers, length)
        for part in result:
            assert part.dtype == torch.float32 and not part.isnan().any()
        assert stats[0].method == method
        assert_matches_reference(handle, src, tgt, site, result, cells)


@pytest.mark.parametrize(("arch", "method"), [("llama", "cached"), ("gpt2", "full")])
def test_full_vocabulary_delta_equals_a_hook_patch(handles, arch, method):
    """The roadmap's Δ from the readout equals a softmax over the whole vocabulary of a hook
    patch, on the compute-floor path (Llama) and on the generic path (GPT-2)."""
    handle = handles[arch]
    length, k = 10, 4
    src, tgt = random_pairs(seed=8, n=3, length=length, diverge=k)
    last = handle.n_layers - 1
    base = candidate_logits(handle, tgt, CANDIDATES)
    answer = base.logits.argmax(-1)  # per pair: the target's preferred candidate
    token = torch.tensor(CANDIDATES)[answer]
    with torch.no_grad():
        clean_p = handle.hf_model(input_ids=tgt).logits[:, -1].float().softmax(-1)
    for site in ("resid_pre", "mlp_out"):
        stats = []
        readout = sweep(handle, src, tgt, site, CANDIDATES, stats=stats)
        assert stats[0].method == method
        delta = prob_delta(
            readout.logits, base.logits, answer, patched_lse=readout.lse, baseline_lse=base.lse
        )
        by_candidates = prob_delta_candidates(readout.logits, base.logits, answer)
        for layer, pos in [(0, k), (last, k), (0, length - 1), (last, length - 1)]:
            patched_p = reference_patch(handle, src, tgt, site, layer, pos).softmax(-1)
            rows = torch.arange(3)
            want = patched_p[rows, token] - clean_p[rows, token]
            assert (delta[:, layer, pos] - want).abs().max() <= 1e-6, (site, layer, pos)
            if pos == length - 1 or layer == 0:
                assert want.abs().max() > 1e-5  # the patch changed the answer's probability
                # ... and the candidate-only softmax is not the roadmap's Δ
                assert (by_candidates[:, layer, pos] - want).abs().max() > 1e-5


def test_sliding_window_attention_is_exact(tmp_path):
    from transformers import AutoModelForCausalLM

    from seqpatch.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer("bpe")
    config = tiny_config("mistral", vocab_size=len(tok))
    config.sliding_window = 5
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    handle = load_model(str(tmp_path))
    src, tgt = random_pairs(seed=2, n=2, length=14, diverge=3)
    result = sweep(handle, src, tgt, "resid_pre", CANDIDATES, method="cached", min_rows=1)
    assert_matches_reference(handle, src, tgt, "resid_pre", result, [(0, 3), (1, 4), (0, 9)])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patching_the_only_differing_token_reproduces_the_source(handles, arch):
    handle = handles[arch]
    length, k = 12, 5
    src, tgt = random_pairs(seed=3, n=4, length=length, diverge=k)
    tgt[:, k + 1 :] = src[:, k + 1 :]  # the pair differs at token k only
    source = candidate_logits(handle, src, CANDIDATES)
    target = candidate_logits(handle, tgt, CANDIDATES)
    pre = sweep(handle, src, tgt, "resid_pre", CANDIDATES, layers=[0])
    post = sweep(handle, src, tgt, "resid_post", CANDIDATES, layers=[-1], positions=[-1])
    for part in range(2):  # logits [n, L', P', C], then lse [n, L', P']
        assert (pre[part][:, 0, k] - source[part]).abs().max() <= TOL
        assert (pre[part][:, 0, :k] - target[part][:, None]).abs().max() <= TOL
        assert (post[part][:, 0, 0] - source[part]).abs().max() <= TOL
    assert (source.lse - target.lse).abs().max() > 1e-3  # the comparisons above can fail


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_grids_agree_across_methods_and_with_hooks(handles, seed):
    """Random lengths per pair, random layer/position subsets (negative positions too)."""
    g = torch.Generator().manual_seed(seed)
    handle = handles["qwen2"]
    lengths = torch.randint(4, 15, (5,), generator=g).tolist()
    pairs = [
        random_pairs(seed * 10 + i, 1, n, int(torch.randint(0, n, (1,), generator=g)))
        for i, n in enumerate(lengths)
    ]
    src = [s[0] for s, _ in pairs]
    tgt = [t[0] for _, t in pairs]
    site = SWEEP_SITES[seed % len(SWEEP_SITES)]
    layers = [1, 0] if seed % 2 else [-1]
    positions = [0, -1, 2, 9]
    kwargs = {"layers": layers, "positions": positions}
    cached = sweep(handle, src, tgt, site, CANDIDATES, method="cached", min_rows=3, **kwargs)
    full = sweep(handle, src, tgt, site, CANDIDATES, method="full", max_rows=7, **kwargs)
    assert cached.logits.shape == (5, len(layers), len(positions), len(CANDIDATES))
    for got, other in zip(cached, full, strict=True):
        assert torch.equal(got.isnan(), other.isnan())
        assert (got - other).nan_to_num().abs().max() <= TOL
    assert torch.equal(cached.lse.isnan(), cached.logits.isnan().all(-1))
    for p, length in enumerate(lengths):
        assert cached.logits[p, :, 3].isnan().all() == (length <= 9)
        for li, layer in enumerate(layers):
            want = reference_patch(handle, src[p][None], tgt[p][None], site, layer % 2, -1)[0]
            assert (cached.logits[p, li, 1] - want[CANDIDATES]).abs().max() <= TOL
            assert (cached.lse[p, li, 1] - want.logsumexp(-1)).abs() <= TOL


def test_cached_source_activations_give_the_same_grid(handles):
    handle = handles["llama"]
    src, tgt = random_pairs(seed=4, n=3, length=9, diverge=2)
    layers, positions = [1, 0], [8, 2, 5]
    acts = get_activations(handle, src, "mlp_out", positions=positions, layers=layers)["mlp_out"]
    assert acts.shape == (3, 2, 3, handle.d_model)
    given = sweep(handle, src, tgt, "mlp_out", CANDIDATES, layers, positions, acts)
    computed = sweep(handle, src, tgt, "mlp_out", CANDIDATES, layers, positions)
    for got, want in zip(given, computed, strict=True):
        assert (got - want).abs().max() <= TOL
    half = sweep(handle, src, tgt, "mlp_out", CANDIDATES, layers, positions, acts.half())
    diff = (half.logits - computed.logits).abs().max()
    assert 0 < diff < 1e-2  # float16 sources are used, after a cast
    with pytest.raises(InterventionError, match="swept grid"):
        sweep(handle, src, tgt, "mlp_out", CANDIDATES, [0], positions, acts)


def test_cached_method_does_about_a_quarter_of_the_naive_work(handles):
    handle = handles["llama"]
    src, tgt = random_pairs(seed=5, n=8, length=16, diverge=0)
    stats: list[SweepStats] = []
    sweep(handle, src, tgt, "resid_pre", CANDIDATES, method="cached", min_rows=1, stats=stats)
    sweep(handle, src, tgt, "resid_pre", CANDIDATES, method="full", stats=stats)
    cached, full = stats
    assert cached.cells == full.cells == 8 * 2 * 16
    assert cached.skipped_cells == 0
    # Exact floor: sum over l<L, t<T of (L - l)(T - t) / (L² T²) = (L+1)(T+1) / (4 L T)
    assert cached.work_ratio == pytest.approx(3 * 17 / (4 * 2 * 16), rel=0.01)
    assert full.work_ratio == pytest.approx(1.0)


@pytest.mark.parametrize("site", ["attn_out", "mlp_out"])
def test_a_site_local_to_its_position_reruns_its_layer_on_that_position_only(
    handles, monkeypatch, site
):
    """attn_out / mlp_out at (l, t) change layer l's output at t alone: one token-layer at l,
    then layers l+1.. on positions t.. (none on the last layer before the last position: such
    a patch cannot reach the logits) — and the values stay those of plain hooks."""
    handle = handles["llama"]
    src, tgt = random_pairs(seed=5, n=8, length=16, diverge=0)
    stats: list[SweepStats] = []
    result = sweep(handle, src, tgt, site, CANDIDATES, skip_noops=False, min_rows=1, stats=stats)
    length, layers = 16, handle.n_layers
    per_pair = sum(
        int(layer < layers - 1 or t == length - 1) + (layers - layer - 1) * (length - t)
        for layer in range(layers)
        for t in range(length)
    )
    assert stats[0].token_layers == 8 * per_pair
    assert_matches_reference(handle, src, tgt, site, result, [(0, 0), (0, 9), (1, 15), (1, 3)])
    # rows resolved one at a time: windows holding only last-layer cells before the last
    # position resolve to nothing, and those cells read the clean logits
    monkeypatch.setattr(_Resolved, "WINDOW_BYTES", handle.d_model * 4)
    alone = sweep(handle, src, tgt, site, CANDIDATES, skip_noops=False, min_rows=1)
    torch.testing.assert_close(alone.logits, result.logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("axes", [("layer", "pos"), ("layer", "head", "pos")])
def test_cells_resolved_a_few_rows_at_a_time_give_the_same_grid(handles, monkeypatch, axes):
    """A site read after attention has its patched layer computed ahead for a window of rows at
    a time (``_grid._Resolved``); windows of one row give the grid of one large window."""
    handle = handles["llama"]
    src, tgt = random_pairs(seed=12, n=3, length=10, diverge=3)
    spec = PatchSpec("head_z" if "head" in axes else "attn_out", axes)
    whole = patch_grid(handle, src, tgt, spec, CANDIDATES, min_rows=2)
    monkeypatch.setattr(_Resolved, "WINDOW_BYTES", handle.d_model * 4)  # one row
    computed, window = [], _Resolved._window
    monkeypatch.setattr(
        _Resolved,
        "_window",
        lambda self, lo, hi: (computed.append(hi - lo), window(self, lo, hi))[1],
    )
    windows = patch_grid(handle, src, tgt, spec, CANDIDATES, min_rows=2)
    assert len(computed) > 3 and min(computed) >= 1
    torch.testing.assert_close(windows.logits, whole.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(windows.lse, whole.lse, atol=TOL, rtol=0)
    assert windows.stats.token_layers == whole.stats.token_layers


def test_identical_prefix_cells_are_skipped_and_still_exact(handles):
    handle = handles["llama"]
    src, tgt = random_pairs(seed=6, n=4, length=10, diverge=4)
    stats: list[SweepStats] = []
    fast = sweep(handle, src, tgt, "attn_out", CANDIDATES, stats=stats)
    slow = sweep(handle, src, tgt, "attn_out", CANDIDATES, skip_noops=False, stats=stats)
    identical = 4 * 4  # layer 0, positions before the divergence, 4 pairs
    unreachable = 4 * 9  # layer 1 (the last), positions before the last: attn_out can't reach
    assert stats[0].skipped_cells == identical + unreachable
    assert stats[1].skipped_cells == 0
    for got, want in zip(fast, slow, strict=True):
        assert (got - want).abs().max() <= TOL


def test_bad_requests_say_what_to_change(handles):
    handle = handles["gpt2"]
    src, tgt = random_pairs(seed=7, n=2, length=6, diverge=1)
    with pytest.raises(InterventionError, match="site"):
        sweep(handle, src, tgt, "head", CANDIDATES)
    with pytest.raises(InterventionError, match="method='full'"):
        sweep(handle, src, tgt, "resid_pre", CANDIDATES, method="cached")
    with pytest.raises(InterventionError, match="equal token lengths"):
        sweep(handle, [src[0]], [tgt[0, :5]], "resid_pre", CANDIDATES)
    with pytest.raises(InterventionError, match="layer 5"):
        sweep(handle, src, tgt, "resid_pre", CANDIDATES, layers=[5])
    with pytest.raises(InterventionError, match="candidate_ids"):
        sweep(handle, src, tgt, "resid_pre", [10**6])
