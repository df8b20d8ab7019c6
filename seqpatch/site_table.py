"""The site table: every site seqpatch reads or patches, as one row each.

Torch-free on purpose (charts, cards and the CLI read it without loading a model). The rows are
placed in a model by ``seqpatch.models.sites`` (``SiteRef``) and the adapters' module paths; the
engine's floor rules read ``local`` and ``after_attention``.

``SITE_TABLE`` is the one list of sites. Each row says where the site lives per adapter (a
module relative to the decoder layer, read at its input or output), its width and head split,
two facts the engine's floor rules rely on, and how it is shown:

- ``local`` — patched at position ``t`` of layer ``l``, it changes layer ``l``'s output at ``t``
  alone (it sits after the layer's keys and values are computed, or is the output itself). So a
  patch of the last layer at a position before the last cannot reach the logits, and a patch at
  one position reruns its layer on that position only.
- ``after_attention`` — read after the layer's attention has mixed positions: a restart patched
  there reuses the layer's attention output instead of recomputing it (``interventions.restart``).

Every other list (the sweepable, cacheable and head sites; CLI help; chart titles; cards) is
derived from it: adding a site is one row here, its module in each adapter, and tests.
``resid_pre`` is read as the *input* of the layer, never as the embedding module's output, so it
is exactly what the layer receives (Gemma's ``sqrt(d_model)`` scale, GPT-2's position
embeddings included); hence ``resid_post[l] == resid_pre[l + 1]`` exactly. ``head_z`` is
``[..., n_heads, d_head]`` with ``d_head`` from the config (``n_heads * d_head`` may differ from
``d_model``, as in Gemma and Qwen3). ``head`` is accepted as another name for ``head_z`` (the
name ``get_activations`` used first); ``SITE_ALIASES`` is the one place that says so.

Caveats, per architecture: GPT-NeoX (``use_parallel_residual``) and Phi run attention and MLP in
parallel from the same input; Gemma 2/3 apply a norm to ``attn_out`` and ``mlp_out`` before they
join the residual and Gemma 2 soft-caps its logits (``ModelHandle.logits_from_resid`` does both
ends). ``mlp_post`` is the input of the MLP's output projection: ``act(gate) * up`` for gated
MLPs (Llama, Gemma, Qwen, Phi-3), ``act(fc_in)`` otherwise (GPT-2, GPT-NeoX, Phi) —
TransformerLens' ``hook_post``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from seqpatch.errors import SeqpatchError


class SiteError(SeqpatchError, ValueError):
    """An unknown site name or a layer index out of range."""


Site = Literal["resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_post", "head_z"]


@dataclass(frozen=True)
class SiteInfo:
    """One row of the site table (see the module docstring).

    ``module`` is an adapter field naming the module relative to the decoder layer (``""``: the
    layer itself; ``None``: the architecture's q/k/v layout, ``interventions.sites.HEAD_LAYOUTS``);
    ``width`` is ``d_model``, ``d_mlp`` or ``d_head`` (then ``heads`` is ``q`` or ``kv``);
    ``order`` is the site's place in one layer's execution (nnsight reads in that order).
    """

    name: str
    title: tuple[str, str]  # display name in two short lines (charts join them)
    meaning: str
    module: str | None
    kind: Literal["input", "output"]
    width: Literal["d_model", "d_mlp", "d_head"] = "d_model"
    heads: Literal["q", "kv"] | None = None
    local: bool = False
    after_attention: bool = False
    order: int = 0

    @property
    def per_head(self) -> bool:
        return self.heads is not None


SITE_TABLE: dict[str, SiteInfo] = {
    info.name: info
    for info in (
        SiteInfo(
            "resid_pre",
            ("residual stream", "(layer input)"),
            "hidden state entering decoder layer l (the embeddings for l = 0)",
            "",
            "input",
            order=0,
        ),
        SiteInfo(
            "resid_post",
            ("residual stream", "(layer output)"),
            "hidden state leaving decoder layer l (= resid_pre of layer l + 1)",
            "",
            "output",
            local=True,
            order=8,
        ),
        SiteInfo(
            "attn_out",
            ("attention", "output"),
            "the attention module's output, before it joins the residual stream",
            "attn",
            "output",
            local=True,
            after_attention=True,
            order=5,
        ),
        SiteInfo(
            "mlp_out",
            ("MLP", "output"),
            "the MLP module's output, before it joins the residual stream",
            "mlp",
            "output",
            local=True,
            after_attention=True,
            order=7,
        ),
        SiteInfo(
            "mlp_post",
            ("MLP neurons", "(after activation)"),
            "the MLP's hidden activation after its nonlinearity, d_mlp wide (hook_post)",
            "mlp_down",
            "input",
            "d_mlp",
            local=True,
            after_attention=True,
            order=6,
        ),
        SiteInfo(
            "head_z",
            ("attention heads", "(o_proj input)"),
            "each head's attention output before the output projection (hook_z)",
            "attn_o_proj",
            "input",
            "d_head",
            "q",
            local=True,
            after_attention=True,
            order=4,
        ),
        SiteInfo(
            "head_q",
            ("attention heads", "(queries, pre-RoPE)"),
            "query projection per head, before rotary embeddings (TransformerLens hook_q)",
            None,
            "output",
            "d_head",
            "q",
            local=True,
            order=1,
        ),
        SiteInfo(
            "head_k",
            ("attention heads", "(keys, pre-RoPE)"),
            "key projection per key/value head, before rotary embeddings (hook_k)",
            None,
            "output",
            "d_head",
            "kv",
            order=2,
        ),
        SiteInfo(
            "head_v",
            ("attention heads", "(values)"),
            "value projection per key/value head (hook_v)",
            None,
            "output",
            "d_head",
            "kv",
            order=3,
        ),
    )
}
SITE_ALIASES: dict[str, str] = {"head": "head_z"}
"""Other names accepted for a site: ``head`` is ``head_z`` (``get_activations``' first name)."""

SITES: tuple[Site, ...] = tuple(n for n, i in SITE_TABLE.items() if i.module is not None)  # type: ignore[assignment]
"""Sites every adapter places by a module path (``handle.module``)."""
SITE_ORDER: tuple[str, ...] = tuple(sorted(SITE_TABLE, key=lambda n: SITE_TABLE[n].order))
"""Execution order inside one decoder layer (nnsight must read modules in this order)."""
HEAD_SITES: tuple[str, ...] = tuple(n for n, i in SITE_TABLE.items() if i.per_head)
SWEEP_SITES: tuple[Site, ...] = tuple(n for n in SITES if n not in HEAD_SITES)  # type: ignore[assignment]
"""Sites with one vector per position, patched by (layer, position) with any grid."""
GRID_SITES: tuple[str, ...] = (*SWEEP_SITES, *HEAD_SITES)
CACHEABLE_SITES: tuple[str, ...] = SWEEP_SITES
"""Sites the ``activations`` stage stores (``[layers, positions, width]``)."""


def site_info(site: str) -> SiteInfo:
    """The table row of ``site`` (aliases resolved); ``SiteError`` lists the known sites."""
    name = SITE_ALIASES.get(site, site)
    if name not in SITE_TABLE:
        raise SiteError(f"unknown site {site!r}; sites are {', '.join(SITE_TABLE)}")
    return SITE_TABLE[name]
