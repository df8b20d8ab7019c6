"""``SiteRef``: where one site of one layer lives in a loaded model.

The sites themselves — names, meanings, where each lives per adapter, widths, head splits and
the floor facts — are the site table (``seqpatch.site_table``, re-exported here). ``SiteRef``
places one row in a model: a module, read at its input or output, and the head split. Every
layer of every supported architecture returns a bare tensor in transformers 5, and every
attention module a tuple whose first element is its output; ``SiteRef`` hides both facts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from seqpatch.site_table import (  # noqa: F401 (the table's names, re-exported)
    CACHEABLE_SITES,
    GRID_SITES,
    HEAD_SITES,
    SITE_ALIASES,
    SITE_ORDER,
    SITE_TABLE,
    SITES,
    SWEEP_SITES,
    Site,
    SiteError,
    SiteInfo,
    site_info,
)


class SiteHook:
    """``hook`` for a site reference: a class with ``module``, ``kind`` (``"input"``: the site
    is the module's first input, positional or keyword; ``"output"``: its output) and
    ``get(raw) -> site tensor`` / ``put(raw, site_tensor) -> raw``."""

    def hook(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Any:
        """Register ``fn(site_tensor) -> replacement | None`` on the module; returns the handle."""
        if self.kind == "output":

            def output_hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
                new = fn(self.get(output))
                return None if new is None else self.put(output, new)

            return self.module.register_forward_hook(output_hook)

        def input_hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                new = fn(self.get(args[0]))
                return None if new is None else ((self.put(args[0], new), *args[1:]), kwargs)
            key = next(iter(kwargs))
            new = fn(self.get(kwargs[key]))
            return None if new is None else (args, {**kwargs, key: self.put(kwargs[key], new)})

        return self.module.register_forward_pre_hook(input_hook, with_kwargs=True)


@dataclass(frozen=True, eq=False)
class SiteRef(SiteHook):
    """Where one site of one layer lives: a module, and whether it is that module's input or output.

    ``get``/``put`` convert between the module's raw input/output and the site tensor (first
    element of a tuple output; ``head_z`` split into ``[..., n_heads, d_head]``); ``hook`` registers
    a plain torch hook that sees, and may replace, the site tensor.
    """

    site: Site
    layer: int
    path: str  # dotted path from the *ForCausalLM root
    module: nn.Module
    kind: Literal["input", "output"]
    n_heads: int | None = None  # set for ``head_z``: the last dim splits into (n_heads, d_head)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.n_heads is None else x.unflatten(-1, (self.n_heads, -1))

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.n_heads is None else x.flatten(-2)

    def get(self, value: Any) -> torch.Tensor:
        """The site tensor from the module's first input (``kind="input"``) or its output."""
        if isinstance(value, tuple):
            value = value[0]
        return self._split(value)

    def put(self, value: Any, site_tensor: torch.Tensor) -> Any:
        """``value`` (first input or output) with the site tensor replaced by ``site_tensor``."""
        new = self._merge(site_tensor)
        return (new, *value[1:]) if isinstance(value, tuple) else new

    def read(self, envoy: Any) -> torch.Tensor:
        """Inside an nnsight trace: the site tensor of ``envoy`` (the envoy of ``self.module``)."""
        return self.get(envoy.input if self.kind == "input" else envoy.output)
