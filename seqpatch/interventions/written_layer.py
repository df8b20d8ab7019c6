"""The written layer, computed without restarting the rows above it: rules 2 and 3 of
``seqpatch.interventions.restart`` (whose docstring states the compute floor).

A restart that writes at layer ``l`` runs layer ``l`` itself only where it must: written after
the layer's attention (``attn_out``, ``head_z``, ``mlp_post``, ``mlp_out``), the layer reuses
the base run's attention output (``patched_layer``, rule 2); written at one position before it
(``head_q``), it runs on that position alone (``local_layer``, rule 3). ``resolve`` applies
rule 2 to many rows ahead of their restarts, turning their writes into the ``resid_pre`` writes
of the layer above that they amount to.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from seqpatch.interventions._layers import PrefixCache
from seqpatch.interventions.sites import InterventionError, hooked
from seqpatch.interventions.writes import Frame, Write, rows_of, rows_where, write_hooks
from seqpatch.models.sites import site_info

if TYPE_CHECKING:
    from seqpatch.interventions.restart import RestartableRun


@contextlib.contextmanager
def attention_from(attn: torch.nn.Module, supply: Callable[[], torch.Tensor]) -> Iterator[None]:
    """The attention module returns ``(supply(), None)`` instead of computing (its hooks still
    fire): every supported decoder layer unpacks its attention as ``output, weights``. A
    ``forward`` the instance already had (nnsight wraps modules that way) is put back after."""
    before = attn.__dict__.get("forward")
    attn.forward = lambda *_args, **_kwargs: (supply(), None)  # type: ignore[method-assign]
    try:
        yield
    finally:
        if before is None:
            del attn.forward
        else:
            attn.forward = before  # type: ignore[method-assign]


def resolve(
    run: RestartableRun, rows: torch.Tensor, writes: Sequence[Write], max_entries: int = 2048
) -> list[Write]:
    """``writes`` on base rows ``rows`` as the writes they amount to, the written layer
    computed now: each write of a site read after its layer's attention (rule 2) becomes a
    ``resid_pre`` write of the next layer — that layer's output at the written (row,
    position) entries, the only places it changes. Other writes come back unchanged.

    Why: with its attention output taken from the base run, the written layer is a function
    of each written entry alone, so it can be computed for many rows in one call (at most
    ``max_entries`` entries each) instead of once per restart and entry layer. A sweep
    resolves its cells ahead of packing them into restarts: the same arithmetic in a few
    calls instead of one per restart (15% of the organism's ``attn_out`` grid was that
    overhead). On the last layer only last-position entries are kept (rule 4); a write there
    becomes a ``resid_pre`` write of layer ``L``, read straight into the logits.

    Needs a full base run (no ``upto``) with the floor and ``floor_layers`` (``floor_z`` for
    ``head_z``) covering the written layers; otherwise nothing is resolved.
    """
    writes = list(writes)
    if run.method != "cached" or not run.floor or run.upto is not None:
        return writes
    keep, by_layer = [], defaultdict(list)
    for w in writes:
        resolvable = (
            site_info(w.site).after_attention
            and w.layer in run.attn
            and (w.site != "head_z" or w.layer in run.z)
        )
        (by_layer[w.layer] if resolvable else keep).append(w)
    last = run.handle.n_layers - 1
    for layer, group in sorted(by_layer.items()):
        if layer == last:
            group = [p for w in group if (p := rows_where(w, w.pos == run.length - 1))]
            if not group:
                continue
        # one entry per written (row, position); the writes renumbered onto the entries
        key = torch.cat([w.rows * run.length + w.pos for w in group])
        entries, inverse = torch.unique(key, return_inverse=True)
        entry_rows, entry_pos = entries // run.length, entries % run.length
        pieces = inverse.split([len(w.rows) for w in group])
        renumbered = [replace(w, rows=r) for w, r in zip(group, pieces, strict=True)]
        parts = []
        for lo in range(0, len(entries), max_entries):
            hi = min(lo + max_entries, len(entries))
            part = [s for w in renumbered if (s := w.select(lo, hi)) is not None]
            run.counters.forwards += 1
            out = patched_layer(run, rows[entry_rows[lo:hi]], layer, part, 0, entry_pos[lo:hi])
            parts.append(out[:, 0])
        keep.append(Write("resid_pre", layer + 1, entry_rows, entry_pos, torch.cat(parts)))
    return keep


def patched_layer(
    run: RestartableRun,
    rows: torch.Tensor,
    layer: int,
    writes: list[Write],
    start_pos: int,
    gather: torch.Tensor | None,
) -> torch.Tensor:
    """Rules 2–4: layer ``layer`` with its attention output supplied from the base run, on
    each row's written position (``gather``: output ``[rows, 1, d]``) or on positions
    ``start_pos..`` (``[rows, T - start_pos, d]``)."""
    handle = run.handle
    if gather is not None:
        frame = Frame(run.length - 1, 1, gather)
        hidden = run.resid[layer][rows, gather][:, None]
        attn_out = run.attn[layer][rows, gather][:, None]
        z = run.z[layer][rows, gather][:, None] if layer in run.z else None
    else:
        frame = Frame(start_pos, run.length - start_pos)
        hidden = run.resid[layer][rows, start_pos:]
        attn_out = run.attn[layer][rows, start_pos:]
        z = run.z[layer][rows, start_pos:] if layer in run.z else None
    head_z = any(w.site == "head_z" for w in writes)
    if head_z and z is None:
        raise InterventionError("head_z restarts need the base run's o_proj input (floor_z)")
    o_proj = run.o_proj(layer)
    attn = handle.submodule(f"{handle.adapter.layers}.{layer}.{handle.adapter.attn}")
    supply = (lambda: o_proj(z)) if head_z else (lambda: attn_out)
    with attention_from(attn, supply), hooked(handle, write_hooks(writes, frame)):
        out = run.runner.run(hidden, layer, frame.start, PrefixCache(), stop_layer=layer + 1)
    run.counters.token_layers += out.shape[0] * out.shape[1]
    return out


def local_layer(
    run: RestartableRun,
    rows: torch.Tensor,
    layer: int,
    writes: list[Write],
    start_pos: int,
    gather: Any,
) -> torch.Tensor:
    """Rule 3 for a site read before attention (``head_q``): layer ``layer`` on each row's
    written position, attending to the base run's keys/values before it (rows grouped by
    position); returns the layer's output merged into the base run's from ``start_pos``."""
    merged = run.resid[layer + 1][rows, start_pos:].clone()
    for pos in sorted(set(gather.tolist())):
        sel = (gather == pos).nonzero().squeeze(-1)
        index = torch.full((len(rows),), -1, dtype=torch.long, device=rows.device)
        index[sel] = torch.arange(len(sel), device=rows.device)
        part = [p for w in writes if (p := rows_of(w, index)) is not None]
        frame = Frame(pos, 1)
        prefix = run.prefix(rows[sel], pos, [layer])
        hidden = run.resid[layer][rows[sel], pos : pos + 1]
        with hooked(run.handle, write_hooks(part, frame)):
            out = run.runner.run(hidden, layer, pos, prefix, stop_layer=layer + 1)
        merged[sel, pos - start_pos] = out[:, 0]
        run.counters.forwards += 1
        run.counters.token_layers += len(sel)
    return merged
