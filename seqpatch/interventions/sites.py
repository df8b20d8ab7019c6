"""Shared pieces of the interventions: errors, site names, head sites, index resolution, hooks.

Head sites (``HEAD_SITES``) are per-head tensors ``[batch, tokens, heads, d_head]``:

- ``head_z`` — each head's output before the output projection: the input of ``o_proj``
  (``c_proj``, ``dense``) split by head, ``num_attention_heads`` heads. TransformerLens'
  ``hook_z``.
- ``head_q``, ``head_k``, ``head_v`` — the query/key/value projections' outputs split by head,
  *before* rotary embeddings (and before Qwen3's q/k norms), as TransformerLens' ``hook_q``,
  ``hook_k``, ``hook_v`` (its rotated ones are ``hook_rot_q/k``). ``head_q`` has
  ``num_attention_heads`` heads; ``head_k``/``head_v`` have ``num_key_value_heads`` (grouped-query
  attention: a k/v head is shared by several query heads, and is patched as one head).

Where the architecture fuses the projections (GPT-2 ``c_attn`` as ``[q | k | v]``, Phi-3
``qkv_proj`` as ``[q | k | v]`` with fewer k/v heads, GPT-NeoX ``query_key_value`` as per-head
``[q k v]`` triples) the head tensor is a view into the fused output, so reading and patching it
means exactly the same as for separate projections. ``HEAD_LAYOUTS`` says where each lives.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from seqpatch.errors import SeqpatchError
from seqpatch.models.sites import GRID_SITES as GRID_SITES  # the lists come from the site table
from seqpatch.models.sites import HEAD_SITES, SiteHook, site_info
from seqpatch.models.sites import SITE_ORDER as SITE_ORDER
from seqpatch.models.sites import SWEEP_SITES as SWEEP_SITES

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from seqpatch.models import ModelHandle, Site


class InterventionError(SeqpatchError, ValueError):
    """An intervention was asked for something impossible; the message says what to change."""


def check_sites(sites: Iterable[str], allowed: Sequence[str]) -> list[Site]:
    sites = list(sites)
    unknown = [s for s in sites if s not in allowed]
    if unknown or not sites:
        raise InterventionError(
            f"unknown or missing site(s) {unknown or sites!r}; choose from {', '.join(allowed)}"
        )
    return sites  # type: ignore[return-value]


def resolve_indices(indices: Iterable[int] | None, size: int, what: str) -> list[int]:
    """``None`` → ``0..size-1``; negative indices count from the end; out of range raises."""
    if indices is None:
        return list(range(size))
    resolved = []
    for i in indices:
        i = int(i)
        if not -size <= i < size:
            raise InterventionError(f"{what} {i} is out of range for size {size}")
        resolved.append(i % size)
    return resolved


@dataclass(frozen=True)
class HeadLayout:
    """Where one head site lives, relative to a decoder layer.

    ``module`` is read at its input (``kind="input"``) or output. Its last dimension holds
    ``blocks`` blocks of ``heads`` consecutive heads (``[block 0 heads | block 1 heads | …]``),
    or, when ``interleaved``, ``heads`` groups of ``blocks`` consecutive head vectors
    (GPT-NeoX: per head ``[q k v]``); the site is block ``block``. ``heads`` is ``"q"``
    (``num_attention_heads``) or ``"kv"`` (``num_key_value_heads``); ``offset`` counts heads
    before the block (Phi-3: k starts after the q heads).
    """

    module: str
    kind: Literal["input", "output"] = "output"
    heads: Literal["q", "kv"] = "q"
    offset: Literal["", "q", "q+kv"] = ""
    interleaved: int = 0  # >0: heads are groups of this many d_head vectors; block = index


_SEPARATE = {
    "head_q": HeadLayout("{attn}.q_proj"),
    "head_k": HeadLayout("{attn}.k_proj", heads="kv"),
    "head_v": HeadLayout("{attn}.v_proj", heads="kv"),
}
HEAD_LAYOUTS: dict[str, dict[str, HeadLayout]] = {
    **{
        arch: _SEPARATE
        for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    },
    "phi": _SEPARATE,
    "phi3": {
        "head_q": HeadLayout("{attn}.qkv_proj"),
        "head_k": HeadLayout("{attn}.qkv_proj", heads="kv", offset="q"),
        "head_v": HeadLayout("{attn}.qkv_proj", heads="kv", offset="q+kv"),
    },
    "gpt2": {
        "head_q": HeadLayout("{attn}.c_attn"),
        "head_k": HeadLayout("{attn}.c_attn", offset="q"),
        "head_v": HeadLayout("{attn}.c_attn", offset="q+kv"),
    },
    "gpt_neox": {
        name: HeadLayout("{attn}.query_key_value", interleaved=3, offset=off)  # type: ignore[arg-type]
        for name, off in (("head_q", ""), ("head_k", "q"), ("head_v", "q+kv"))
    },
}
"""q/k/v layouts per ``model_type``; ``head_z`` (the ``attn_o_proj`` input) works everywhere."""


def n_kv_heads(handle: ModelHandle) -> int:
    config = handle.hf_model.config.get_text_config()
    return int(getattr(config, "num_key_value_heads", None) or handle.n_heads)


def site_heads(handle: ModelHandle, site: str) -> int | None:
    """How many heads ``site`` splits into (``None`` for sites with one vector per position)."""
    heads = site_info(site).heads
    if heads is None:
        return None
    return n_kv_heads(handle) if heads == "kv" else handle.n_heads


@dataclass(frozen=True, eq=False)
class HeadRef(SiteHook):
    """A head site of one layer: ``get`` views the raw module tensor as ``[..., heads, d_head]``;
    ``hook(fn)`` lets ``fn(site_tensor) -> replacement | None`` rewrite it (other heads, and the
    fused parts of the tensor that are not this site, are left as they were)."""

    site: str
    layer: int
    path: str
    module: torch.nn.Module
    kind: Literal["input", "output"]
    n_heads: int
    d_head: int
    start: int  # first head vector of the site in the last dimension (in units of d_head)
    stride: int  # >1: interleaved groups of ``stride`` vectors, the site's at index ``start``

    def view(self, raw: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            groups = raw.unflatten(-1, (self.n_heads, self.stride * self.d_head))
            return groups[..., self.start * self.d_head : (self.start + 1) * self.d_head]
        block = raw[..., self.start * self.d_head : (self.start + self.n_heads) * self.d_head]
        return block.unflatten(-1, (self.n_heads, self.d_head))

    def get(self, value: Any) -> torch.Tensor:
        return self.view(value[0] if isinstance(value, tuple) else value)

    def put(self, value: Any, site_tensor: torch.Tensor) -> Any:
        raw = value[0] if isinstance(value, tuple) else value
        new = raw.clone()
        self.view(new).copy_(site_tensor)
        return (new, *value[1:]) if isinstance(value, tuple) else new


def head_ref(handle: ModelHandle, site: str, layer: int) -> HeadRef:
    """Where head site ``site`` of ``layer`` lives in this model; ``InterventionError`` if the
    architecture has no known q/k/v layout (``head_z`` works for every supported one)."""
    adapter = handle.adapter
    base = f"{adapter.layers}.{layer}"
    if site == "head_z":
        layout = HeadLayout(f"{adapter.attn_o_proj}", kind="input")
    elif site in HEAD_SITES:
        layouts = HEAD_LAYOUTS.get(adapter.model_type)
        if layouts is None:
            known = ", ".join(sorted(HEAD_LAYOUTS))
            raise InterventionError(
                f"{site} is not supported for {adapter.model_type!r} (its q/k/v projection "
                f"layout is unknown); head_z works for every architecture, head_q/k/v for: {known}"
            )
        layout = layouts[site]
    else:
        raise InterventionError(f"{site!r} is not a head site; head sites: {', '.join(HEAD_SITES)}")
    path = f"{base}.{layout.module.format(attn=adapter.attn)}"
    heads = n_kv_heads(handle) if layout.heads == "kv" else handle.n_heads
    offsets = (
        {"": 0, "q": 1, "q+kv": 2}
        if layout.interleaved
        else {
            "": 0,
            "q": handle.n_heads,
            "q+kv": handle.n_heads + n_kv_heads(handle),
        }
    )
    return HeadRef(
        site,
        layer,
        path,
        handle.submodule(path),
        layout.kind,
        heads,
        handle.d_head,
        offsets[layout.offset],
        layout.interleaved,
    )


def site_ref(handle: ModelHandle, site: str, layer: int) -> Any:
    """``handle.module(site, layer)`` for the model's own sites, ``head_ref`` for head sites."""
    if site in HEAD_SITES:
        return head_ref(handle, site, handle._layer_index(layer))
    return handle.module(site, layer)  # type: ignore[arg-type]


@contextmanager
def hooked(handle: ModelHandle, hooks: dict[tuple[Site, int], Callable]) -> Iterator[None]:
    """Plain torch hooks on site modules for the duration of the block (removed even on error).

    Keys are ``(site, layer)`` of any site, head sites included (``site_ref``)."""
    handles = [site_ref(handle, site, layer).hook(fn) for (site, layer), fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_sites(
    handle: ModelHandle, input_ids: torch.Tensor, sites: Iterable[Site], layers: Iterable[int]
) -> tuple[dict[tuple[Site, int], torch.Tensor], torch.Tensor]:
    """One plain forward of unpadded ``input_ids`` ``[B, T]``; site tensors by (site, layer) and
    the next-token logits at the last position ``[B, vocab]``."""
    captured: dict[tuple[Site, int], torch.Tensor] = {}

    def keep(key: tuple[Site, int]) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            captured[key] = x.detach()

        return fn

    keys = [(site, layer) for site in sites for layer in layers]
    with torch.no_grad(), hooked(handle, {key: keep(key) for key in keys}):
        logits = handle.hf_model(input_ids=input_ids, logits_to_keep=1).logits[:, -1]
    return captured, logits


def as_id_rows(ids: Any, what: str) -> list[torch.Tensor]:
    """Token ids as a list of 1-D long tensors: from ``[n, T]`` or a sequence of rows."""
    if isinstance(ids, torch.Tensor):
        if ids.ndim != 2:
            raise InterventionError(
                f"{what} must be [n_pairs, tokens], got shape {list(ids.shape)}"
            )
        return list(ids.long())
    rows = [torch.as_tensor(row, dtype=torch.long) for row in ids]
    if any(row.ndim != 1 or row.numel() == 0 for row in rows):
        raise InterventionError(f"{what} must be non-empty 1-D rows of token ids (no padding)")
    return rows


def as_pair_rows(src_ids: Any, tgt_ids: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Source and target rows (``as_id_rows``) that pair up: as many of each, and each pair's
    two rows of equal length, since a patched cell needs the same position in both."""
    src_rows, tgt_rows = as_id_rows(src_ids, "src_ids"), as_id_rows(tgt_ids, "tgt_ids")
    if len(src_rows) != len(tgt_rows):
        raise InterventionError(f"{len(src_rows)} source rows but {len(tgt_rows)} target rows")
    for i, (s, t) in enumerate(zip(src_rows, tgt_rows, strict=True)):
        if s.shape != t.shape:
            raise InterventionError(
                f"pair {i}: source has {s.numel()} tokens and target {t.numel()}; a patched cell "
                "needs the same position in both, so pairs must have equal token lengths"
            )
    return src_rows, tgt_rows
