"""Stage ``activations``: both programs' site activations for every pair, ready to share.

One row per pair. For each cached site ``s`` the columns ``{s}_a`` and ``{s}_b`` hold the
source's and the target's activations as ``Array3D [layers, positions, d_model]`` in the
configured dtype; ``positions`` is the longest pair's token count and shorter pairs are
zero-padded after ``n_tokens``. Load with ``with_format("torch")`` to get tensors.

The patching stage reads the source activations from here instead of recomputing them. In
float32 that is exact; float16/bfloat16 halve the size for sharing but round the patched
values, so patching from them differs from a recomputed sweep by that rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Array3D, Features, List, Value

from seqpatch.errors import SeqpatchError
from seqpatch.options import csv, layer_list, option
from seqpatch.stages.base import Built, Inputs, ParentSpec, no_artifacts

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from seqpatch.models import ModelHandle
    from seqpatch.store import StageRef

STAGE = "activations"
SCHEMA_VERSION = 1
CACHEABLE_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
DTYPES = ("float32", "float16", "bfloat16")
SHARD_SIZE = 250  # pairs per resumable shard: an interrupt loses seconds, not the stage


class ActivationsStageError(SeqpatchError):
    """Bad activations config (unknown site or dtype)."""


@dataclass(frozen=True)
class ActivationsConfig:
    """Which activations to cache. ``layers`` empty = every layer."""

    sites: tuple[str, ...] = option(
        ("resid_pre",),
        "Comma-separated sites: resid_pre, resid_post, attn_out, mlp_out.",
        parse=csv,
    )
    # float32: exact patching; float16 halves the size for sharing
    dtype: str = option("float32", "float32 (exact), float16 or bfloat16 (half size).")
    layers: tuple[int, ...] = option(
        (),
        "Layers to cache [default: all].",
        parse=layer_list,
        cli_default=None,
        show_default=False,
    )
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.sites:
            raise ActivationsStageError("give at least one site, e.g. --sites resid_pre")
        for site in self.sites:
            if site not in CACHEABLE_SITES:
                raise ActivationsStageError(
                    f"unknown site {site!r}; cacheable sites: {', '.join(CACHEABLE_SITES)}"
                )
        if self.dtype not in DTYPES:
            raise ActivationsStageError(f"unknown dtype {self.dtype!r}; use {', '.join(DTYPES)}")
        if len(set(self.layers)) != len(self.layers):
            raise ActivationsStageError(f"layers lists a layer twice: {list(self.layers)}")
        if self.batch_size < 1:
            raise ActivationsStageError(f"batch_size must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "sites", tuple(dict.fromkeys(self.sites)))


CONFIG = ActivationsConfig
PARENTS = (ParentSpec("pairs"),)
artifacts = no_artifacts


def features(cfg: ActivationsConfig, n_layers: int, n_positions: int, d_model: int) -> Features:
    # Arrow has no bfloat16: it is stored as float32 holding bfloat16-rounded values.
    arrow_dtype = "float32" if cfg.dtype == "bfloat16" else cfg.dtype
    columns: dict[str, Any] = {
        "pair_id": Value("string"),
        "n_tokens": Value("int32"),
        "layers": List(Value("int32")),
        "input_ids_a": List(Value("int32")),
        "input_ids_b": List(Value("int32")),
    }
    for site in cfg.sites:
        for side in ("a", "b"):
            columns[f"{site}_{side}"] = Array3D(
                shape=(n_layers, n_positions, d_model), dtype=arrow_dtype
            )
    return Features(columns)


def _cache(
    batch: dict[str, list],
    cfg: ActivationsConfig,
    handle: ModelHandle,
    layers: list[int],
    width: int,
) -> dict[str, list]:
    import torch

    from seqpatch.interventions import get_activations

    torch_dtype = getattr(torch, cfg.dtype)
    n = len(batch["pair_id"])
    out: dict[str, list] = {
        "pair_id": batch["pair_id"],
        "n_tokens": batch["n_tokens"],
        "layers": [layers] * n,
        "input_ids_a": batch["input_ids_a"],
        "input_ids_b": batch["input_ids_b"],
    }
    grids: dict[str, list[Any]] = {f"{s}_{side}": [None] * n for s in cfg.sites for side in "ab"}
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(batch["n_tokens"]):
        by_length.setdefault(length, []).append(i)
    for length, members in by_length.items():
        for side in "ab":
            ids = torch.tensor([batch[f"input_ids_{side}"][i] for i in members])
            acts = get_activations(handle, ids, list(cfg.sites), layers=layers)
            for site, tensor in acts.items():
                values = tensor.to(torch_dtype)
                if cfg.dtype == "bfloat16":
                    values = values.float()  # rounded to bfloat16, stored as float32
                values = values.cpu().numpy()
                padded = np.zeros((len(members), len(layers), width, handle.d_model), values.dtype)
                padded[:, :, :length] = values
                for j, i in enumerate(members):
                    grids[f"{site}_{side}"][i] = padded[j]
    out.update(grids)
    return out


def model_specs(cfg: ActivationsConfig, parents: Mapping[str, StageRef]) -> tuple[str, ...]:
    """The model that built the pairs is the model whose activations are cached."""
    return (pairs_model_spec(parents["pairs"]),)


def pairs_model_spec(pairs: StageRef) -> str:
    return str(pairs.provenance["config"]["model"])


def prepare(inputs: Inputs, cfg: ActivationsConfig) -> None:
    check_layers(cfg.layers, inputs.model.n_layers, ActivationsStageError)


def check_layers(layers: Sequence[int], n_layers: int, error: type[SeqpatchError]) -> None:
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise error(f"layer {bad[0]} does not exist; the model has layers 0..{n_layers - 1}")


def n_shards(inputs: Inputs, cfg: ActivationsConfig) -> int:
    return max(1, math.ceil(inputs.rows("pairs").num_rows / inputs.shard_size))


def build_shard(inputs: Inputs, cfg: ActivationsConfig, index: int) -> Built:
    """Cache ``cfg.sites`` of both programs of pairs ``[index * shard_size, …)`` of the parent.

    Every shard pads positions to the longest pair of the whole parent, so shards concatenate.
    """
    parent = inputs.rows("pairs")
    handle = inputs.model
    layers = list(cfg.layers) if cfg.layers else list(range(handle.n_layers))
    width = max(parent["n_tokens"])
    start = index * inputs.shard_size
    shard = parent.select(range(start, min(start + inputs.shard_size, parent.num_rows)))
    rows = shard.select_columns(["pair_id", "n_tokens", "input_ids_a", "input_ids_b"]).map(
        _cache,
        batched=True,
        batch_size=cfg.batch_size,
        fn_kwargs={"cfg": cfg, "handle": handle, "layers": layers, "width": width},
        features=features(cfg, len(layers), width, handle.d_model),
        new_fingerprint=inputs.fingerprint(STAGE, index),
        desc="caching activations",
    )
    return Built(rows)
