"""The restartable run and the new site ``mlp_post``, against independent computations.

- ``mlp_post`` is recomputed by hand from the MLP's input with each architecture's own
  projections and activation (the reference never reads the module the site table names);
- a patch of ``mlp_post`` equals a plain hook on the input of the MLP's output projection,
  named here per architecture;
- the floor paths of ``RestartableRun`` (the patched layer's attention reused, one position per
  row, the last layer on the last position) equal the unoptimised restart (``floor=False``) and
  the generic path of full forwards with plain hooks, for arbitrary written values.
"""

from dataclasses import replace

import pytest
import torch

from seqpatch.interventions import PatchSpec, get_activations, patch_grid
from seqpatch.interventions.restart import RestartableRun, Write
from seqpatch.interventions.sites import InterventionError, site_heads
from seqpatch.models import load_model
from seqpatch.models.sites import SITE_TABLE
from seqpatch.testing import TINY_ARCHITECTURES, save_tiny_model
from tests.token_pairs import random_pairs

CANDIDATES = list(range(20, 30))
TOL = 1e-5
FLOOR_ARCHS = ("llama", "qwen2", "gemma2", "gemma3_text", "gpt_neox", "phi")


@pytest.fixture(scope="module")
def handles(tmp_path_factory):
    root = tmp_path_factory.mktemp("restart")
    return {
        arch: load_model(str(save_tiny_model(arch, root / arch))) for arch in TINY_ARCHITECTURES
    }


def mlp_parts(handle, arch, layer):
    """(mlp module, its output projection, hidden(x)): the MLP's hidden activation computed by
    hand from its input, the way each architecture's MLP code does."""
    m = handle.hf_model
    if arch == "gpt2":
        mlp = m.transformer.h[layer].mlp
        return mlp, mlp.c_proj, lambda x: mlp.act(mlp.c_fc(x))
    if arch == "gpt_neox":
        mlp = m.gpt_neox.layers[layer].mlp
        return mlp, mlp.dense_4h_to_h, lambda x: mlp.act(mlp.dense_h_to_4h(x))
    mlp = m.model.layers[layer].mlp
    if arch == "phi":
        return mlp, mlp.fc2, lambda x: mlp.activation_fn(mlp.fc1(x))
    if arch == "phi3":

        def fused(x):
            gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
            return up * mlp.activation_fn(gate)

        return mlp, mlp.down_proj, fused
    return mlp, mlp.down_proj, lambda x: mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_mlp_post_is_the_mlp_hidden_activation_after_its_nonlinearity(handles, arch):
    handle = handles[arch]
    ids = random_pairs(seed=3, n=2, length=9, diverge=2)[0]
    got = get_activations(handle, ids, "mlp_post")["mlp_post"]  # [B, L, T, d_mlp]
    for layer in range(handle.n_layers):
        mlp, down, hidden = mlp_parts(handle, arch, layer)
        seen: dict[str, torch.Tensor] = {}
        hook = mlp.register_forward_pre_hook(lambda _m, args, seen=seen: seen.update(x=args[0]))
        with torch.no_grad():
            handle.hf_model(input_ids=ids)
            want = hidden(seen["x"])
        hook.remove()
        assert want.shape[-1] == down.weight.shape[-1 if arch != "gpt2" else 0] != handle.d_model
        assert (got[:, layer] - want).abs().max() <= TOL


def hook_patch(handle, arch, layer, pos, src, tgt):
    """Next-token logits of ``tgt`` with ``mlp_post`` at (layer, pos) taken from ``src``, by a
    plain pre-hook on the MLP's output projection."""
    _, down, _ = mlp_parts(handle, arch, layer)
    donated = {}

    def read(_m, args):
        donated["x"] = args[0][:, pos].clone()

    def write(_m, args):
        x = args[0].clone()
        x[:, pos] = donated["x"]
        return (x, *args[1:])

    with torch.no_grad():
        hook = down.register_forward_pre_hook(read)
        handle.hf_model(input_ids=src)
        hook.remove()
        hook = down.register_forward_pre_hook(write)
        logits = handle.hf_model(input_ids=tgt).logits[:, -1].float()
        hook.remove()
    return logits


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_mlp_post_patches_equal_a_plain_hook(handles, arch):
    handle = handles[arch]
    length = 12
    src, tgt = random_pairs(seed=4, n=2, length=length, diverge=3)
    result = patch_grid(handle, src, tgt, PatchSpec("mlp_post"), CANDIDATES, min_rows=2)
    last = handle.n_layers - 1
    for layer, pos in [(0, 3), (0, length - 1), (last, 5), (last, length - 1)]:
        want = hook_patch(handle, arch, layer, pos, src, tgt)
        got = result.logits[:, layer, pos]
        assert (got - want[:, CANDIDATES]).abs().max() <= TOL, (layer, pos)
        assert (result.lse[:, layer, pos] - want.logsumexp(-1)).abs().max() <= TOL


def random_writes(handle, site, rows, length, gen, *, single, layer):
    """Arbitrary values written at random positions of ``rows`` restarted rows: one position
    per row (``single``) or a set of positions per row."""
    heads = site_heads(handle, site)
    shape = (handle.site_width(site),) if heads is None else (heads, handle.site_width(site))
    at, pos = [], []
    for r in range(rows):
        chosen = [int(torch.randint(1, length, (1,), generator=gen))]
        if not single:
            chosen = sorted(set(chosen + torch.randint(1, length, (3,), generator=gen).tolist()))
        at += [r] * len(chosen)
        pos += chosen
    value = torch.randn(len(at), *shape, generator=gen)
    head_t = None
    if heads is not None:
        head_t = torch.randint(0, heads, (len(at),), generator=gen)
        value = value[:, 0]
    return Write(site, layer, torch.tensor(at), torch.tensor(pos), value, head_t)


FLOOR_SITES = ("attn_out", "mlp_out", "mlp_post", "head_z", "head_q", "resid_pre")


@pytest.mark.parametrize("arch", FLOOR_ARCHS)
def test_floor_restarts_equal_the_unoptimised_restart_and_plain_hooks(handles, arch):
    """Every floor rule (attention reused, one position per row, last layer on the last
    position) against ``floor=False`` (bit-close) and full forwards with plain hooks."""
    handle = handles[arch]
    length = 18  # longer than gemma3_text's sliding window (4)
    ids = random_pairs(seed=8, n=3, length=length, diverge=0)[0]
    gen = torch.Generator().manual_seed(0)
    runs = {
        name: RestartableRun(
            handle,
            ids,
            method="full" if name == "full" else "cached",
            floor=name != "plain",
            floor_layers=range(handle.n_layers),
            floor_z=True,
        )
        for name in ("floor", "plain", "full")
    }
    rows = torch.tensor([0, 2, 1, 2, 0])
    for site in FLOOR_SITES:
        for layer in range(handle.n_layers):
            for single in (True, False):
                write = random_writes(
                    handle, site, len(rows), length, gen, single=single, layer=layer
                )
                got = {name: run.restart(rows, [write]) for name, run in runs.items()}
                resolved = runs["floor"].resolve(rows, [write])
                got["resolved"] = runs["floor"].restart(rows, resolved)
                key = (site, layer, single)
                torch.testing.assert_close(
                    got["resolved"], got["plain"], atol=TOL, rtol=0, msg=str(key)
                )
                torch.testing.assert_close(
                    got["floor"], got["plain"], atol=TOL, rtol=0, msg=str(key)
                )
                torch.testing.assert_close(
                    got["floor"], got["full"], atol=TOL, rtol=0, msg=str(key)
                )


@pytest.mark.parametrize("arch", ("llama", "gemma2", "gpt_neox"))
def test_resolved_writes_are_the_written_layer_computed_ahead(handles, arch):
    """``resolve`` turns after-attention writes into ``resid_pre`` writes of the next layer:
    one entry per written (row, position) however many writes share it (two heads of one
    position), last-layer entries only at the last position, the same values in chunks of any
    size; restarted, they equal the unoptimised restart of the original writes."""
    handle = handles[arch]
    length, last = 12, handle.n_layers - 1
    ids = random_pairs(seed=13, n=3, length=length, diverge=0)[0]
    floor = RestartableRun(handle, ids, floor_layers=range(handle.n_layers), floor_z=True)
    plain = RestartableRun(handle, ids, floor=False)
    gen = torch.Generator().manual_seed(5)
    rows = torch.tensor([2, 0, 1, 2])
    heads = handle.n_heads
    z = torch.randn(6, handle.d_head, generator=gen)
    writes = [  # row 0 position 5 written at two heads by two writes; row 3 at two positions
        Write("head_z", 0, torch.tensor([0, 1, 3]), torch.tensor([5, 7, 2]), z[:3],
              torch.tensor([0, 1, heads - 1])),
        Write("head_z", 0, torch.tensor([0, 3]), torch.tensor([5, 9]), z[3:5],
              torch.tensor([1, 0])),
        Write("mlp_out", last, torch.tensor([1, 2, 2]), torch.tensor([4, length - 1, 3]),
              torch.randn(3, handle.d_model, generator=gen)),
    ]  # fmt: skip
    resolved = floor.resolve(rows, writes)
    assert [(w.site, w.layer) for w in resolved] == [("resid_pre", 1), ("resid_pre", last + 1)]
    first, final = resolved
    assert sorted(zip(first.rows.tolist(), first.pos.tolist(), strict=True)) == [
        (0, 5), (1, 7), (3, 2), (3, 9)
    ]  # fmt: skip
    assert list(zip(final.rows.tolist(), final.pos.tolist(), strict=True)) == [(2, length - 1)]
    chunked = floor.resolve(rows, writes, max_entries=1)
    for a, b in zip(resolved, chunked, strict=True):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.pos, b.pos)
        torch.testing.assert_close(a.value, b.value, atol=TOL, rtol=0)
    want = plain.restart(rows, writes)
    torch.testing.assert_close(floor.restart(rows, resolved), want, atol=TOL, rtol=0)
    torch.testing.assert_close(floor.restart(rows, writes), want, atol=TOL, rtol=0)
    other = [Write("resid_pre", 1, torch.tensor([0]), torch.tensor([3]), z[:1].repeat(1, heads))]
    assert floor.resolve(rows, other) == other  # nothing to resolve: unchanged
    assert plain.resolve(rows, writes) == writes  # no floor: unchanged


def _on_rows(write, rows):
    """``write`` (on rows 0..k-1) moved to batch rows ``rows``."""
    return Write(write.site, write.layer, rows[write.rows], write.pos, write.value, write.heads)


@pytest.mark.parametrize("arch", FLOOR_ARCHS)
def test_rows_entering_at_different_layers_share_one_forward_exactly(handles, arch):
    """One restart whose rows begin at different layers (each joins the forward at its own
    layer), with different sites, a row written at two layers, a resid_post write and a row
    without any write, equals each row restarted alone and full forwards with plain hooks;
    its work is each row's own, counted from the layer it begins with."""
    handle = handles[arch]
    length, last = 14, handle.n_layers - 1
    ids = random_pairs(seed=11, n=3, length=length, diverge=0)[0]
    gen = torch.Generator().manual_seed(3)
    floor = RestartableRun(handle, ids, floor_layers=range(handle.n_layers), floor_z=True)
    full = RestartableRun(handle, ids, method="full")
    plan = [  # (site, layer, single position) per written row; the last row has no write
        ("resid_pre", last, True),
        ("attn_out", 0, True),
        ("head_z", 1 % handle.n_layers, False),
        ("mlp_out", last, True),
        ("resid_pre", 0, False),
        ("resid_post", 0, True),
    ]
    writes = [
        _on_rows(
            random_writes(handle, site, 1, length, gen, single=one, layer=layer), torch.tensor([i])
        )
        for i, (site, layer, one) in enumerate(plan)
    ]
    writes.append(  # row 1 is written again, above its entry layer
        _on_rows(
            random_writes(handle, "mlp_out", 1, length, gen, single=True, layer=last),
            torch.tensor([1]),
        )
    )
    rows = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    start = min(int(w.pos.min()) for w in writes)
    alone = []
    for i in range(len(rows)):
        own = [replace(w, rows=torch.zeros_like(w.rows)) for w in writes if int(w.rows[0]) == i]
        alone.append(floor.restart(rows[i : i + 1], own, start)[0])
    alone = torch.stack(alone)
    before = floor.counters.token_layers
    together = floor.restart(rows, writes, start)
    torch.testing.assert_close(together, alone, atol=TOL, rtol=0)
    torch.testing.assert_close(together, full.restart(rows, writes, start), atol=TOL, rtol=0)
    torch.testing.assert_close(together[-1], floor.logits[2], atol=0, rtol=0)
    assert floor.counters.token_layers - before < len(rows) * handle.n_layers * (length - start)


def test_the_floor_reuses_attention_and_trims_the_last_layer(handles):
    """The work the floor does, counted: a single-position write after attention is one
    token-layer at its layer; on the last layer only the last position is computed."""
    handle = handles["llama"]
    length, last = 10, handle.n_layers - 1
    ids = random_pairs(seed=9, n=2, length=length, diverge=0)[0]
    run = RestartableRun(handle, ids, floor_layers=[0, last], floor_z=True)
    rows = torch.tensor([0, 1])
    value = torch.randn(2, handle.n_heads, handle.d_head)
    every = torch.arange(length).repeat(2)
    write = Write(
        "head_z",
        last,
        torch.tensor([0, 1]).repeat_interleave(length),
        every,
        value.repeat_interleave(length, 0)[:, 0],
        torch.zeros(2 * length, dtype=torch.long),
    )
    attn = handle.hf_model.model.layers[last].self_attn
    wrapped = attn.__dict__.get("forward")  # nnsight's wrapper, when it has one
    before = run.counters.token_layers
    patched = run.restart(rows, [write])
    assert attn.__dict__.get("forward") is wrapped  # the module is left as it was
    assert run.counters.token_layers - before == 2  # the last layer, last position, per row
    only_last = Write(
        "head_z",
        last,
        torch.tensor([0, 1]),
        torch.tensor([length - 1] * 2),
        value[:, 0],
        torch.zeros(2, dtype=torch.long),
    )
    assert torch.equal(patched, run.restart(rows, [only_last]))


@pytest.mark.parametrize("arch", ("llama", "gemma2", "gemma3_text"))
def test_the_last_layer_attends_from_the_last_query_only(handles, arch):
    """Rule 4 inside attention: the last layer's kernel gets the last query alone (keys and
    values of every restarted position), the layers below every restarted query; the logits
    equal the unoptimised restart's (``floor=False``)."""
    handle = handles[arch]
    length, start = 12, 5
    ids = random_pairs(seed=4, n=2, length=length, diverge=0)[0]
    run = RestartableRun(handle, ids)
    plain = RestartableRun(handle, ids, floor=False)
    seen: list[tuple[int, int, int]] = []
    for i, base in enumerate(list(run.runner.bases)):

        def spy(module, query, key, *args, i=i, base=base, **kwargs):
            seen.append((i, query.shape[-2], key.shape[-2]))
            return base(module, query, key, *args, **kwargs)

        run.runner.bases[i] = spy
    value = torch.randn(2, handle.d_model, generator=torch.Generator().manual_seed(1))
    write = Write("resid_pre", 0, torch.tensor([0, 1]), torch.tensor([start, start]), value)
    rows = torch.tensor([1, 0])
    got = run.restart(rows, [write])
    last = handle.n_layers - 1
    assert seen == [(i, 1 if i == last else length - start, length) for i in range(last + 1)]
    torch.testing.assert_close(got, plain.restart(rows, [write]), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", (*FLOOR_ARCHS, "gpt2"))
def test_a_base_run_up_to_a_layer_restarts_like_the_full_base_run(handles, arch):
    """A base run stopped before layer ``upto`` restarts like the full base run: writes of every
    floor site at each layer from ``upto`` on (and ``resid_post`` just below it, which enters
    at ``upto``), two layers written at once, rows restarted twice and a row without a write all
    equal the full run's restart (which uses the floor rules and its stored logits); a capture
    below ``upto`` is the full run's. It has no logits, restarts nowhere below ``upto`` nor
    after position 0, and captures nothing at or above ``upto``: each says so."""
    handle = handles[arch]
    length, n_layers = 12, handle.n_layers
    ids = random_pairs(seed=12, n=3, length=length, diverge=0)[0]
    gen = torch.Generator().manual_seed(5)
    keys = [("mlp_out", layer) for layer in range(n_layers)]
    full = RestartableRun(handle, ids, floor_layers=range(n_layers), floor_z=True, capture=keys)
    rows = torch.tensor([0, 2, 1, 2])  # random_writes writes rows 0..2: the last has none
    for upto in range(n_layers + 1):
        part = RestartableRun(handle, ids, upto=upto, capture=keys[:upto])
        for key in keys[:upto]:
            torch.testing.assert_close(part.acts[key], full.acts[key], atol=TOL, rtol=0)
        with pytest.raises(InterventionError, match="no logits"):
            _ = part.logits
        plan = [(site, layer) for layer in range(upto, n_layers) for site in FLOOR_SITES]
        plan += [("resid_post", upto - 1)] if upto else []
        for site, layer in plan:
            writes = [random_writes(handle, site, 3, length, gen, single=False, layer=layer)]
            if layer < n_layers - 1:
                last = random_writes(handle, "mlp_out", 3, length, gen, single=True, layer=layer)
                writes.append(replace(last, layer=n_layers - 1))
            got, want = part.restart(rows, writes), full.restart(rows, writes)
            torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=str((upto, site, layer)))
        torch.testing.assert_close(part.restart(rows, []), full.logits[rows], atol=TOL, rtol=0)
        if upto:
            below = random_writes(handle, "resid_pre", 3, length, gen, single=True, layer=upto - 1)
            with pytest.raises(InterventionError, match=f"upto <= {upto - 1}"):
                part.restart(rows, [below])
        with pytest.raises(InterventionError, match="leave start_pos unset"):
            part.restart(rows, [], start_pos=2)
    with pytest.raises(InterventionError, match="cannot capture layers \\[1\\]"):
        RestartableRun(handle, ids, upto=1, capture=keys[:2])
    with pytest.raises(InterventionError, match="upto must be in"):
        RestartableRun(handle, ids, upto=n_layers + 1)


def test_every_site_in_the_table_names_a_module_on_every_adapter(handles):
    for arch, handle in handles.items():
        for name, info in SITE_TABLE.items():
            if info.module is not None:
                ref = handle.module(name, 0)
                assert ref.module is handle.hf_model.get_submodule(ref.path), (arch, name)


def test_site_lists_are_derived_from_the_table():
    """A new row reaches every list: sweepable, cacheable, chart titles and the CLI's help."""
    from typer.testing import CliRunner

    from seqpatch import charts
    from seqpatch.cli import app
    from seqpatch.interventions import SWEEP_SITES
    from seqpatch.stages.activations import CACHEABLE_SITES

    assert "mlp_post" in SWEEP_SITES and "mlp_post" in CACHEABLE_SITES
    assert charts.SITE_TITLES["mlp_post"] == SITE_TABLE["mlp_post"].title
    help_text = CliRunner().invoke(app, ["build", "patching", "--help"], terminal_width=200).output
    assert "mlp_post" in help_text


@pytest.mark.parametrize("arch", ("llama", "gemma2", "gpt2"))
def test_logits_of_chosen_columns_equal_the_full_logits_gathered(handles, arch):
    """``restart(columns=...)`` computes only the chosen logits (DAS reads ten candidates): on
    the floor path, the generic path, an ``upto`` run, a chunked restart and a restart without
    writes it equals the full vocabulary's logits gathered (Gemma 2 soft-caps them)."""
    handle = handles[arch]
    length = 10
    ids = random_pairs(seed=3, n=3, length=length, diverge=0)[0]
    gen = torch.Generator().manual_seed(2)
    rows = torch.tensor([0, 2, 1, 2])
    vocab = handle.hf_model.config.vocab_size
    columns = torch.randint(0, vocab, (len(rows), 5), generator=gen)
    runs = [
        RestartableRun(handle, ids, method=method, floor_layers=range(handle.n_layers))
        for method in ("auto", "full")
    ]
    runs.append(RestartableRun(handle, ids, upto=1))
    for run in runs:
        for writes in (
            [],
            [random_writes(handle, "attn_out", 3, length, gen, single=True, layer=1)],
        ):
            for max_rows in (None, 1):
                full = run.restart(rows, writes, max_rows=max_rows)
                chosen = run.restart(rows, writes, max_rows=max_rows, columns=columns)
                assert chosen.shape == columns.shape
                torch.testing.assert_close(chosen, full.gather(-1, columns), atol=TOL, rtol=0)
