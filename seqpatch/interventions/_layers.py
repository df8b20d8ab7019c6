"""Run a suffix of a decoder stack directly: layers ``l..L-1`` on positions ``s..T-1``.

This is what lets the sweep engine work at its compute floor. A patch at ``(layer l, position t)``
leaves every layer below ``l`` and every position before ``t`` exactly as in the target's clean
run, so a patched run only has to compute layers ``l..L-1`` for positions ``t..T-1``: it starts
from the clean residual stream entering layer ``l`` and lets those positions attend to the clean
keys and values of positions ``< t`` (a prefix cache), exactly as incremental decoding does.

The decoder layers of ``transformers`` are called one by one with what the model's own forward
would give them — rotary ``position_embeddings``, an explicit additive attention mask (causal,
with the layer's sliding window) and a cache — so the arithmetic inside each layer is the
library's own. Where layers differ by ``config.layer_types`` (Gemma 2/3: sliding-window and
global layers), each layer gets its own type's mask and — where the rotary module is keyed by
layer type (Gemma 3: rope base 10k on local layers, 1M on global ones) — its own type's rotary
embedding, as the model's forward gives them. The cache is a duck-typed stand-in for
``transformers.Cache``: attention modules of the supported architectures only ever call
``cache.update(keys, values, layer_idx)``, which here returns the clean prefix concatenated with
the new keys/values (and, for the clean run, records them).

Supported: the architectures whose ``ArchitectureAdapter`` names a ``rotary`` module (and the
keyword its layers take the cache under), with ``eager`` or ``sdpa`` attention. Anything else
(GPT-2, whose attention keeps its own cache layout; flash attention, whose masks differ) goes
through the sweep's generic path.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

if TYPE_CHECKING:
    from seqpatch.models import ModelHandle


SUPPORTED_ATTENTION = ("eager", "sdpa")
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})  # masks built here
KERNEL = "seqpatch_runner"
"""The attention kernel the runner registers with ``transformers``: the model's own kernel (set
on each attention module under ``_BASE``), with the queries of a module marked ``_LAST_QUERY``
cut to the last."""
_BASE = "_seqpatch_attention_base"
_LAST_QUERY = "_seqpatch_last_query"


def _runner_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Calls the kernel the runner set on ``module``. On the last layer of a ``last_only`` run
    only the last query is computed (``query`` ``[rows, heads, T, d_head]``; its output, the
    same for it as in the full computation, is broadcast over the other positions, which the
    output projection never reads); keys and values stay whole."""
    base = getattr(module, _BASE)
    if getattr(module, _LAST_QUERY, False) and query.shape[-2] > 1:
        positions = query.shape[-2]
        mask = None if attention_mask is None else attention_mask[..., -1:, :]
        out, weights = base(module, query[..., -1:, :], key, value, mask, *args, **kwargs)
        return out.expand(out.shape[0], positions, *out.shape[2:]), weights
    return base(module, query, key, value, attention_mask, *args, **kwargs)


AttentionInterface.register(KERNEL, _runner_attention)


def eager_of(module: torch.nn.Module) -> Callable | None:
    """The eager attention function of the modeling file that defines ``module``'s class (each
    architecture's own: Gemma 2's caps its logits, for one), ``None`` where it has none."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def model_eager(module: torch.nn.Module) -> Callable:
    """``eager_of``, required."""
    eager = eager_of(module)
    if eager is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its module")
    return eager


def supports_layer_runner(handle: ModelHandle) -> bool:
    """Whether ``LayerRunner`` reproduces this model's forward (architecture and attention kernel).

    Layer types other than full and sliding-window attention (chunked, linear attention…) need
    masks or caches the runner does not build, so such models take the generic path, as do
    attention classes whose modeling file has no ``eager_attention_forward`` (``KERNEL`` calls
    it on a CPU).
    """
    config = handle.hf_model.config
    layer_types = getattr(config, "layer_types", None) or ()
    if handle.adapter.rotary is None:
        return False
    attn = handle.layer(0).get_submodule(handle.adapter.attn)
    return (
        not handle.remote
        and eager_of(attn) is not None
        and getattr(config, "_attn_implementation", None) in SUPPORTED_ATTENTION
        and not getattr(config, "use_bidirectional_attention", False)
        and set(layer_types) <= SUPPORTED_LAYER_TYPES
    )


class PrefixCache:
    """Stand-in for ``transformers.Cache`` holding clean keys/values of the positions before ``s``.

    ``prefix[j]`` is ``(keys, values)`` of layer ``j``, each ``[rows, kv_heads, s, d_head]`` (or
    ``None`` when ``s == 0``). With ``record=True`` the keys/values computed in the run are kept
    in ``recorded`` (the clean run uses this to build every later prefix).
    """

    def __init__(
        self,
        prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        record: bool = False,
    ) -> None:
        self.prefix = prefix or {}
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if record else None

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *_: Any,
        **__: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recorded is not None:
            self.recorded[layer_idx] = (key_states, value_states)
        if layer_idx not in self.prefix:
            return key_states, value_states
        keys, values = self.prefix[layer_idx]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


class LayerRunner:
    """Calls the decoder layers of one model on a slice of positions, with a clean prefix cache."""

    def __init__(self, handle: ModelHandle) -> None:
        if not supports_layer_runner(handle):
            raise ValueError(
                f"the direct layer runner does not support {handle.adapter.model_type!r} with "
                f"{getattr(handle.hf_model.config, '_attn_implementation', None)!r} attention"
            )
        self.handle = handle
        self.cache_kwarg = handle.adapter.cache_kwarg
        self.layers = [handle.layer(i) for i in range(handle.n_layers)]
        self.rotary = handle.submodule(handle.adapter.rotary)  # type: ignore[arg-type]
        config = handle.hf_model.config
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        self.windows: list[int | None] = [
            (window if (layer_types is None or layer_types[i] == "sliding_attention") else None)
            for i in range(handle.n_layers)
        ]
        if getattr(config, "use_sliding_window", True) is False:
            self.windows = [None] * handle.n_layers
        # A rotary module keyed by layer type (it lists them) takes the type on each call.
        typed_rotary = isinstance(getattr(self.rotary, "layer_types", None), (list, tuple))
        self.rope_keys: list[str | None] = [
            layer_types[i] if typed_rotary and layer_types else None for i in range(handle.n_layers)
        ]
        self._masks: dict[tuple[int, int, int | None], torch.Tensor] = {}
        self.attns = [layer.get_submodule(handle.adapter.attn) for layer in self.layers]
        self.configs = list({id(a.config): a.config for a in self.attns}.values())
        cpu = handle.device.type == "cpu"
        self._in_kernel = False
        eager = cpu or config._attn_implementation == "eager"
        self.bases = [
            model_eager(a) if eager else ALL_ATTENTION_FUNCTIONS[config._attn_implementation]
            for a in self.attns
        ]

    def mask(self, start: int, length: int, window: int | None) -> torch.Tensor:
        """Additive mask ``[1, 1, length - start, length]``: queries ``start..``, keys ``0..``."""
        key = (start, length, window)
        if key not in self._masks:
            q = torch.arange(start, length, device=self.handle.device)[:, None]
            k = torch.arange(length, device=self.handle.device)[None, :]
            allowed = k <= q
            if window is not None:
                allowed &= k > q - window
            blocked = torch.finfo(self.handle.dtype).min
            self._masks[key] = torch.where(allowed, 0.0, blocked).to(self.handle.dtype)[None, None]
        return self._masks[key]

    def run(
        self,
        hidden: torch.Tensor,
        start_layer: int,
        start_pos: int,
        cache: PrefixCache,
        last_only: bool = False,
        stop_layer: int | None = None,
        joins: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Layers ``start_layer..L-1`` (or ``..stop_layer-1``) on ``hidden`` =
        ``[rows, T - start_pos, d]``; returns the output.

        ``joins[j]`` are more rows (same positions) that enter at layer ``j``: appended to the
        batch before layer ``j`` runs, so the output has every joined row, in join order; the
        prefix cache of each layer must hold the rows present there, in that order.

        ``cache.prefix`` must hold the clean keys/values of positions ``< start_pos`` for every
        layer run. Hooks registered on the layers' modules fire as in a normal forward.

        ``last_only``: only the last position of the output is wanted, so the last layer's
        attention output projection and MLP run on that position alone (their outputs broadcast
        back into the residual sum; every other position of the result is then meaningless).
        The last layer's keys and values still come from every position, as they must; its
        attention is computed for the last query only (``_runner_attention``). Hooks on the
        trimmed modules see the one-position tensor.
        """
        stop = len(self.layers) if stop_layer is None else stop_layer
        if last_only and start_layer < stop == len(self.layers) and hidden.shape[1] > 1:
            last = len(self.layers) - 1
            adapter = self.handle.adapter
            trims = [
                self.handle.submodule(f"{adapter.layers}.{last}.{path}").register_forward_pre_hook(
                    _last_position_only
                )
                for path in (adapter.attn_o_proj, adapter.mlp)
            ]
            setattr(self.attns[last], _LAST_QUERY, True)
            try:
                return self.run(hidden, start_layer, start_pos, cache, joins=joins)
            finally:
                delattr(self.attns[last], _LAST_QUERY)
                for trim in trims:
                    trim.remove()
        with self.kernel():
            return self._run(hidden, start_layer, start_pos, cache, stop, joins)

    @contextlib.contextmanager
    def kernel(self) -> Iterator[None]:
        """Run every attention through ``KERNEL`` over ``self.bases``: on a CPU the model's
        ``eager`` (the library's own matmul-softmax-matmul), which computes the same attention
        as ``sdpa`` and is faster for the short query blocks of restarts (8% less time for the
        organism's real-pair ``resid_pre`` grid, the same for SmolLM2's: the A/B in
        docs/benchmarks.md); elsewhere the model's own kernel."""
        if self._in_kernel:  # a run inside a run (a hook restarting): already set
            yield
            return
        configs = self.configs
        before = [c._attn_implementation for c in configs]
        self._in_kernel = True
        for config in configs:
            config._attn_implementation = KERNEL
        for attn, base in zip(self.attns, self.bases, strict=True):
            setattr(attn, _BASE, base)
        try:
            yield
        finally:
            self._in_kernel = False
            for attn in self.attns:
                delattr(attn, _BASE)
            for config, impl in zip(configs, before, strict=True):
                config._attn_implementation = impl

    def _run(
        self,
        hidden: torch.Tensor,
        start_layer: int,
        start_pos: int,
        cache: PrefixCache,
        stop: int,
        joins: dict[int, torch.Tensor] | None,
    ) -> torch.Tensor:
        length = start_pos + hidden.shape[1]
        position_ids = torch.arange(start_pos, length, device=hidden.device)[None]
        position_embeddings = {
            key: self.rotary(hidden, position_ids, *([key] if key else []))
            for key in set(self.rope_keys[start_layer:stop])
        }
        for index in range(start_layer, stop):
            if joins and index in joins:
                hidden = torch.cat([hidden, joins[index]])
            hidden = self.layers[index](
                hidden,
                attention_mask=self.mask(start_pos, length, self.windows[index]),
                position_ids=position_ids,
                position_embeddings=position_embeddings[self.rope_keys[index]],
                use_cache=True,
                **{self.cache_kwarg: cache},
            )
        return hidden


def _last_position_only(_module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0][:, -1:], *args[1:])
