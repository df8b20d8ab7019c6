"""Stage ``patching``: the effect of patching A into B at every cell of a grid, per site.

The grid's named axes are the config's ``axes`` (``PatchingConfig``), recorded in every row's
``axes`` column, and every grid column is an array over them:

- ``layer,pos`` (default) — one (layer, position) per cell, ``[layers, positions]``;
- ``layer,head`` — one head of a head site (``head_z``, ``head_q/k/v``) at every position at
  once, ``[layers, heads]`` (the row's ``heads`` lists them: k/v sites have the model's k/v
  heads, NaN beyond them when a query-head site shares the stage);
- ``layer,head,pos`` — one head at one position, ``[layers, heads, positions]``;
- ``layer`` — whole-stream patching: every position of the config's ``positions`` set at once
  (``all``; ``from-divergence``: from the pair's first differing token on; ``before-last``: from
  the divergence up to, not including, the last token; ``last``: the last token alone; the
  row's ``span``), ``[layers]``. ``all`` switches B to A at every layer by construction;
  ``before-last`` against ``last`` shows at which layer the value has left the other positions
  for the token where the answer is read.

One row per (pair, site). ``logits[..., c]`` are the target's (B's) next-token logits of the
answer candidates (the ten digits, ``candidate_labels``) at its scored position when a cell of
``site`` carries the source's (A's) activation — computed by the batched patching engine
(``seqpatch.interventions.sweep.patch_grid``). ``lse[...]`` is the log-sum-exp of that run's
logits over the model's *whole vocabulary* (its log-normaliser, float32, from the same forward),
so ``logits - lse`` are full-vocabulary log-probabilities. ``baseline_logits_a/b`` and
``baseline_lse_a/b`` are the unpatched runs. The metric grids (over the axes, see
``seqpatch.metrics``) are stored as views of those numbers, so another metric never needs a
rerun:

- ``prob_delta`` — the roadmap's Δ = P(B's answer | patched) − P(B's answer | B), exactly,
  probabilities over the whole vocabulary;
- ``prob_delta_candidates`` — the same with a softmax over the candidates only (schema 1's
  ``prob_delta``);
- ``logit_diff`` and ``normalised``.

Positions beyond a shorter pair's ``n_tokens`` are NaN.

Heatmap artifacts (``heatmap_artifacts``): one array per metric, named by it —
``heatmap_<metric>.npy``, ``[sites, divergence indices, (mean, std, count), *grid axes]``
float64 over pairs (``layer, position`` by default) — plus the roadmap's ``heatmap.npy``: the
mean Δ = P(B's answer | patched) − P(B's answer | B) over pairs, ``[sites, divergence indices,
*grid axes]`` (attribution stores no probabilities: its ``heatmap.npy`` is the mean normalised
estimate). ``heatmap.json`` names the axes, the sites, divergence indices, layers, heads and
token labels they share, maps each metric to its file and says what ``heatmap.npy`` holds.

The stage is built in shards of ``shard_size`` pairs (``Store.build_sharded``): an interrupted
build resumes without recomputing finished shards, and ``--shard i/n`` lets ``n`` jobs share the
shards of one version before ``seqpatch merge`` joins them. Source activations come from an
``activations`` stage when one is given (its version is part of this stage's config), else they
are recomputed in the sweep.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Array2D, Array3D, Array4D, Features, List, Value

from seqpatch.charts.grid_data import (  # the views charts draw, re-exported for callers
    AXIS_NAMES,
    DEFAULT_AXES,
    aggregate,
    grid_axes,
)
from seqpatch.charts.grid_data import effect_cells as effect_cells
from seqpatch.charts.grid_data import example_frame as example_frame
from seqpatch.errors import SeqpatchError
from seqpatch.metrics import METRIC_INFO, METRICS
from seqpatch.options import ENGINES, csv, layer_list, option
from seqpatch.roles import STATEMENT_SEPARATORS as STATEMENT_SEPARATORS
from seqpatch.roles import chosen_positions
from seqpatch.roles import selected_positions as selected_positions
from seqpatch.site_table import HEAD_SITES, SWEEP_SITES
from seqpatch.stages.base import Artifact, Built, Inputs, ParentSpec
from seqpatch.store import StageRef

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from datasets import Dataset

    from seqpatch.models import ModelHandle

STAGE = "patching"
SCHEMA_VERSION = 5  # 2: full-vocabulary lse; 3: `method`; 4: named axes; 5: token roles
STAGE_AXES = (("layer", "pos"), ("layer", "head"), ("layer", "head", "pos"), ("layer",))
POSITION_SETS = ("all", "from-divergence", "before-last", "last")
# Position selections of a grid with a pos axis: "all" (every position; those before a pair's
# divergence are skipped by the engine as provable no-ops) or, per pair, its changed tokens, the
# last token of every line from the divergence on and the final token (``selected_positions``);
# or "slice": every token of the changed statement and of the later statements of the query's
# slice, the question's tokens and the last token (``seqpatch.roles.slice_positions``).
POS_SELECTIONS = ("all", "changed+ends+last", "slice")
# Exact patching of every cell (its engine path is RuntimeSettings.engine) or attribution.
METHODS = ("exact", "attribution")
SHARD_SIZE = 250  # pairs per resumable shard: a lost shard costs seconds, not minutes
HEATMAP_INDEX_FILE = "heatmap.json"
HEATMAP_FILE = "heatmap_normalised.npy"  # the default metric's array, as heatmap_file() names it
ROADMAP_HEATMAP_FILE = "heatmap.npy"  # the roadmap's deliverable: mean Δ over pairs, per site


class PatchingStageError(SeqpatchError):
    """Bad patching config or inputs."""


@dataclass(frozen=True)
class PatchingConfig:
    """Which sweeps to run. ``layers`` empty = all of them.

    ``axes`` name the grid (``STAGE_AXES``); ``positions`` is the position set a grid without a
    ``pos`` axis patches at once (``POSITION_SETS``).
    """

    sites: tuple[str, ...] = option(
        ("resid_pre",),
        f"Comma-separated sites: {', '.join(SWEEP_SITES)}, or the attention heads "
        f"{', '.join(HEAD_SITES)} (with --axes layer,head).",
        parse=csv,
    )
    layers: tuple[int, ...] = option(
        (),
        "Layers to sweep [default: all].",
        parse=layer_list,
        cli_default=None,
        show_default=False,
    )
    # exact patching of every cell, or first-order estimates (seqpatch.interventions.attribution);
    # how exact cells are computed is an execution setting (RuntimeSettings.engine)
    method: str = option(
        "exact",
        "exact (patch every cell) or attribution (first-order estimates of the logit "
        "difference from one backward pass). The exact engine path is --engine.",
    )
    axes: tuple[str, ...] = option(
        DEFAULT_AXES,
        "The grid: layer,pos; layer,head or layer,head,pos (head sites head_z, head_q, head_k, "
        "head_v); layer (whole-stream: all --positions at once).",
        parse=csv,
    )
    # grids without a pos axis: the set patched at once (POSITION_SETS); with one: the cells
    # (POS_SELECTIONS; "changed+ends+last" leaves the other cells NaN)
    positions: str = option(
        "all",
        "Without a pos axis, the positions patched at once: all, from-divergence, before-last "
        "(from the divergence up to the last token) or last. With a pos axis, the cells: all, or "
        "changed+ends+last (per pair: the changed tokens, the last token of every line from "
        "there on and the final token; other cells NaN).",
    )

    def __post_init__(self) -> None:
        from seqpatch.interventions import GRID_SITES
        from seqpatch.interventions.sweep import check_axes

        if not self.sites:
            raise PatchingStageError("give at least one site, e.g. --sites resid_pre")
        for site in self.sites:
            if site not in GRID_SITES:
                raise PatchingStageError(
                    f"unknown site {site!r}; sweepable sites: {', '.join(GRID_SITES)}"
                )
        axes = tuple(self.axes)
        if axes not in STAGE_AXES:
            choices = " | ".join(",".join(a) for a in STAGE_AXES)
            raise PatchingStageError(f"unknown axes {','.join(axes)!r}; use one of {choices}")
        for site in self.sites:
            check_axes(axes, site)
        if self.positions not in (*POSITION_SETS, *POS_SELECTIONS):
            choices = ", ".join(dict.fromkeys((*POSITION_SETS, *POS_SELECTIONS)))
            raise PatchingStageError(f"unknown positions {self.positions!r}; use one of {choices}")
        if "pos" in axes and self.positions not in POS_SELECTIONS:
            raise PatchingStageError(
                f"with a pos axis --positions selects the cells: {' or '.join(POS_SELECTIONS)}; "
                f"{self.positions!r} is a set patched at once: use --axes layer or layer,head"
            )
        if "pos" not in axes and self.positions in POS_SELECTIONS[1:]:
            raise PatchingStageError(
                f"--positions {self.positions} selects cells of a pos axis; use --axes layer,pos"
            )
        object.__setattr__(self, "axes", axes)
        if self.method == "attribution" and self.positions not in ("all", "from-divergence"):
            raise PatchingStageError(
                "attribution estimates position sets from the divergence on (all or "
                f"from-divergence), not {self.positions!r}; use the exact method for it"
            )
        if self.method not in METHODS:
            engine = " (the engine path is --engine)" if self.method in ENGINES else ""
            raise PatchingStageError(
                f"unknown method {self.method!r}; use one of {', '.join(METHODS)}{engine}"
            )
        if len(set(self.layers)) != len(self.layers):
            raise PatchingStageError(f"layers lists a layer twice: {list(self.layers)}")
        object.__setattr__(self, "sites", tuple(dict.fromkeys(self.sites)))


CONFIG = PatchingConfig
PARENTS = (ParentSpec("pairs"), ParentSpec("activations", optional=True))


def features(*shape: int) -> Features:
    """The rows' schema for grids of ``shape[:-1]`` (the axes' sizes) and ``shape[-1]``
    candidates: ``features(layers, positions, candidates)`` is the default ``layer,pos`` grid."""
    *sizes, n_candidates = shape
    grid = _array(tuple(sizes))
    return Features(
        {
            "pair_id": Value("string"),
            "site": Value("string"),
            "method": Value("string"),
            "divergence_index": Value("int32"),
            "affects_query": Value("bool"),
            "n_tokens": Value("int32"),
            "tokens": List(Value("string")),
            "tokens_a": List(Value("string")),
            "roles": List(Value("string")),
            "diff_positions": List(Value("int32")),
            "layers": List(Value("int32")),
            "axes": List(Value("string")),
            "heads": List(Value("int32")),
            "span": Value("string"),
            "ground_truth_a": Value("int64"),
            "ground_truth_b": Value("int64"),
            "candidate_labels": List(Value("string")),
            "answer_index_a": Value("int32"),
            "answer_index_b": Value("int32"),
            "baseline_logits_a": List(Value("float32")),
            "baseline_logits_b": List(Value("float32")),
            "baseline_lse_a": Value("float32"),
            "baseline_lse_b": Value("float32"),
            "logits": _array((*sizes, n_candidates)),
            "lse": grid,
            "prob_delta": grid,
            "logit_diff": grid,
            "normalised": grid,
            "prob_delta_candidates": grid,
        }
    )


def _array(shape: tuple[int, ...]) -> Any:
    """A float32 array feature of ``shape`` (1-D: a fixed-length list)."""
    if len(shape) == 1:
        return List(Value("float32"), length=shape[0])
    kinds = {2: Array2D, 3: Array3D, 4: Array4D}
    return kinds[len(shape)](shape=shape, dtype="float32")


def grid_shape(cfg: PatchingConfig, handle: ModelHandle, n_layers: int, width: int) -> list[int]:
    """The stored grid's shape: the size of each axis (heads: the most any site has)."""
    from seqpatch.interventions.sites import site_heads

    sizes = {
        "layer": n_layers,
        "head": max(site_heads(handle, site) or 0 for site in cfg.sites),
        "pos": width,
    }
    return [sizes[axis] for axis in cfg.axes]


def _patch(
    batch: dict[str, list],
    cfg: PatchingConfig,
    handle: ModelHandle,
    layers: list[int],
    width: int,
    activations: Dataset | None,
    engine: str = "auto",
) -> dict[str, list]:
    import torch

    from seqpatch import metrics
    from seqpatch.interventions import PatchSpec, candidate_logits, patch_grid
    from seqpatch.interventions.attribution import attribution_sweep
    from seqpatch.interventions.sites import site_heads

    src = [torch.tensor(ids) for ids in batch["input_ids_a"]]
    tgt = [torch.tensor(ids) for ids in batch["input_ids_b"]]
    cand = torch.tensor(batch["candidate_ids"])
    base_a, base_lse_a = (x.numpy() for x in candidate_logits(handle, src, cand))
    base_b, base_lse_b = (x.numpy() for x in candidate_logits(handle, tgt, cand))
    ans_a = np.asarray(batch["answer_index_a"])
    ans_b = np.asarray(batch["answer_index_b"])
    cached = _cached_sources(activations, batch, cfg.sites, layers) if _cacheable(cfg) else {}
    shape = grid_shape(cfg, handle, len(layers), width)
    out: dict[str, list] = {name: [] for name in features(1, 1, 1)}
    for site in cfg.sites:
        if cfg.method == "attribution":  # first-order estimates, one backward per batch
            # every axes grid; a position set is summed whole ("from-divergence" = "all":
            # positions before the divergence contribute exactly 0 to a first-order estimate)
            readout = attribution_sweep(
                handle,
                src,
                tgt,
                site,
                cand,
                ans_a,
                ans_b,
                layers=layers,
                axes=cfg.axes,
                method=engine,
            )
        elif "pos" in cfg.axes and cfg.positions != "all":
            chosen = [
                chosen_positions(cfg.positions, batch, i, handle.tokenizer) for i in range(len(src))
            ]
            readout = _selected_grid(
                handle, src, tgt, site, cand, layers, cached.get(site), engine, chosen
            )
        else:
            spec = PatchSpec(site, cfg.axes, layers=layers, spans=(cfg.positions,))
            readout = patch_grid(
                handle, src, tgt, spec, cand, source_activations=cached.get(site), method=engine
            ).readout
        logits, lse = (_pad(x.numpy(), shape) for x in readout)
        heads = list(range(site_heads(handle, site) or 0)) if "head" in cfg.axes else []
        grids = {
            "lse": lse,
            "prob_delta": metrics.prob_delta(
                logits, base_b, ans_b, patched_lse=lse, baseline_lse=base_lse_b
            ),
            "logit_diff": metrics.logit_diff(logits, ans_a, ans_b),
            "normalised": metrics.normalised(logits, base_b, base_a, ans_a, ans_b),
            "prob_delta_candidates": metrics.prob_delta_candidates(logits, base_b, ans_b),
        }
        if cfg.method == "attribution":  # only LD is estimated: no probabilities (NaN lse)
            grids["prob_delta_candidates"] = np.full_like(lse, np.nan)
        for i in range(len(src)):
            for name in (
                "pair_id",
                "divergence_index",
                "affects_query",
                "n_tokens",
                "tokens",
                "tokens_a",
                "diff_positions",
                "ground_truth_a",
                "ground_truth_b",
                "candidate_labels",
                "answer_index_a",
                "answer_index_b",
            ):
                out[name].append(batch[name][i])
            out["roles"].append(batch["roles"][i] if "roles" in batch else [])
            out["site"].append(site)
            out["method"].append("attribution" if cfg.method == "attribution" else "exact")
            out["layers"].append(layers)
            out["axes"].append(list(cfg.axes))
            out["heads"].append(heads)
            out["span"].append(
                "" if cfg.positions == "all" and "pos" in cfg.axes else cfg.positions
            )
            out["baseline_logits_a"].append(base_a[i])
            out["baseline_logits_b"].append(base_b[i])
            out["baseline_lse_a"].append(float(base_lse_a[i]))
            out["baseline_lse_b"].append(float(base_lse_b[i]))
            out["logits"].append(logits[i])
            for name, grid in grids.items():
                out[name].append(np.asarray(grid[i], dtype=np.float32))
    return out


def _selected_grid(
    handle: ModelHandle,
    src: list[Any],
    tgt: list[Any],
    site: str,
    cand: Any,
    layers: list[int],
    cached: list[np.ndarray] | None,
    engine: str,
    chosen_positions: list[list[int]],
) -> tuple[Any, Any]:
    """A ``layer,pos`` grid computed at each pair's ``chosen_positions`` only, NaN elsewhere.

    Pairs whose selections sit at the same offsets from their ends share one engine call
    (negative ``PatchSpec.positions``, so pairs of different lengths batch together), and every
    computed cell is the cell the full grid computes (same engine, same restart)."""
    import torch

    from seqpatch.interventions import PatchSpec, patch_grid

    width = max(len(t) for t in tgt)
    logits = torch.full((len(tgt), len(layers), width, cand.shape[-1]), float("nan"))
    lse = torch.full((len(tgt), len(layers), width), float("nan"))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (b, chosen) in enumerate(zip(tgt, chosen_positions, strict=True)):
        groups.setdefault(tuple(t - len(b) for t in chosen), []).append(i)
    for offsets, members in groups.items():
        spec = PatchSpec(site, ("layer", "pos"), layers=layers, positions=list(offsets))
        sources = None if cached is None else [cached[i][:, list(offsets)] for i in members]
        result = patch_grid(
            handle,
            [src[i] for i in members],
            [tgt[i] for i in members],
            spec,
            cand[members] if cand.dim() == 2 else cand,
            source_activations=sources,
            method=engine,
        )
        for row, i in enumerate(members):
            at = [len(tgt[i]) + offset for offset in offsets]
            logits[i][:, at] = result.logits[row]
            lse[i][:, at] = result.lse[row]
    return logits, lse


def _pad(values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``values`` ``[n, *grid, (C)]`` NaN-padded to the stored grid ``shape`` (positions beyond a
    shorter batch, heads beyond a site with fewer)."""
    grid = values.shape[1 : 1 + len(shape)]
    if tuple(grid) == tuple(shape):
        return values
    padded = np.full((values.shape[0], *shape, *values.shape[1 + len(shape) :]), np.nan)
    padded[(slice(None), *(slice(0, g) for g in grid))] = values
    return padded.astype(np.float32)


def _cacheable(cfg: PatchingConfig) -> bool:
    """Whether cached source activations can feed the sweep (residual sites, layer × pos)."""
    from seqpatch.interventions import SWEEP_SITES

    return cfg.axes == DEFAULT_AXES and all(site in SWEEP_SITES for site in cfg.sites)


def _cached_sources(
    activations: Dataset | None, batch: dict[str, list], sites: tuple[str, ...], layers: list[int]
) -> dict[str, list[np.ndarray]]:
    """Source grids from the activations stage for this batch's pairs (by ``pair_id``)."""
    if activations is None:
        return {}
    index = {pid: i for i, pid in enumerate(activations["pair_id"])}
    missing = [pid for pid in batch["pair_id"] if pid not in index]
    if missing:
        raise PatchingStageError(
            f"pair {missing[0]} has no cached activations; rebuild the activations stage "
            "from the same pairs version"
        )
    stored_layers = activations[0]["layers"]
    rows = activations.select([index[pid] for pid in batch["pair_id"]]).with_format("numpy")
    out: dict[str, list[np.ndarray]] = {}
    for site in sites:
        if f"{site}_a" not in activations.column_names:
            raise PatchingStageError(
                f"the activations stage has no {site!r}; cache it with "
                f"`seqpatch build activations --sites {site}` or drop --activations"
            )
        layer_rows = [stored_layers.index(layer) for layer in layers]
        grids = rows[f"{site}_a"]
        out[site] = [
            np.asarray(grid)[layer_rows, :length].astype(np.float32)
            for grid, length in zip(grids, batch["n_tokens"], strict=True)
        ]
    return out


def model_specs(cfg: PatchingConfig, parents: Mapping[str, StageRef]) -> tuple[str, ...]:
    """The model that built the pairs is the model that is patched."""
    return (str(parents["pairs"].provenance["config"]["model"]),)


def prepare(inputs: Inputs, cfg: PatchingConfig) -> None:
    """Reject layers the model lacks and sites the activations parent lacks, before any shard."""
    from seqpatch.stages.activations import check_layers

    check_layers(cfg.layers, inputs.model.n_layers, PatchingStageError)
    if inputs.has("activations") and _cacheable(cfg):
        cached = inputs.parents["activations"].provenance["config"]
        missing = [site for site in cfg.sites if site not in cached["sites"]]
        if missing:
            raise PatchingStageError(
                f"the activations stage has no {missing[0]!r}; cache it with "
                f"`seqpatch build activations --sites {missing[0]}` or pass --activations none"
            )
        if cached.get("layers"):
            raise PatchingStageError(
                "the activations stage caches only some layers; patch from one with every layer "
                "or pass --activations none"
            )


def n_shards(inputs: Inputs, cfg: PatchingConfig) -> int:
    return max(1, math.ceil(inputs.rows("pairs").num_rows / inputs.shard_size))


def build_shard(inputs: Inputs, cfg: PatchingConfig, index: int, batch_pairs: int = 250) -> Built:
    """Rows of shard ``index``: pairs ``[index * shard_size, (index + 1) * shard_size)``."""
    parent = inputs.rows("pairs")
    handle = inputs.model
    activations = inputs.rows("activations") if inputs.has("activations") else None
    layers = list(cfg.layers) if cfg.layers else list(range(handle.n_layers))
    width = max(parent["n_tokens"])
    n_candidates = len(parent[0]["candidate_ids"])
    start = index * inputs.shard_size
    rows = parent.select(range(start, min(start + inputs.shard_size, len(parent))))
    patched = rows.map(
        _patch,
        batched=True,
        batch_size=batch_pairs,
        remove_columns=rows.column_names,
        fn_kwargs={
            "cfg": cfg,
            "handle": handle,
            "layers": layers,
            "width": width,
            "activations": activations,
            "engine": inputs.runtime.engine,
        },
        features=features(*grid_shape(cfg, handle, len(layers), width), n_candidates),
        new_fingerprint=inputs.fingerprint(STAGE, index),
        desc=f"patching shard {index}",
    )
    return Built(patched)


def artifacts(rows: Dataset, cfg: PatchingConfig, inputs: Inputs) -> dict[str, Artifact]:
    """The heatmap array with its axis file, and the heatmap and trace charts (a
    ``layer,head,pos`` grid adds the top heads' per-position panels)."""
    from seqpatch import plots

    if grid_axes(rows) != DEFAULT_AXES:
        return {
            **heatmap_artifacts(rows),
            **plots.grid_chart_artifacts(rows),
            **plots.head_positions_chart_artifacts(rows),
        }
    return {
        **heatmap_artifacts(rows),
        **plots.patching_chart_artifacts(rows, inputs.rows("pairs")),
    }


def heatmap_file(metric: str) -> str:
    """The file holding ``metric``'s aggregate: ``heatmap_<metric>.npy``."""
    return f"heatmap_{metric}.npy"


def heatmap_artifacts(dataset: Dataset, metrics: Sequence[str] = METRICS) -> dict[str, bytes | str]:
    """The aggregate of each metric as ``heatmap_<metric>.npy``, the roadmap's ``heatmap.npy``
    and their index ``heatmap.json``.

    Each metric's array is ``aggregate(dataset, metric)["stats"]``; ``heatmap.npy`` is the mean
    (statistic 0) of ``prob_delta``'s (of ``normalised``'s for attribution rows, which store no
    probabilities). The index names the axes and their values (shared by every array), maps each
    metric to its file and says what it measures.
    """
    import io

    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()

    files: dict[str, bytes | str] = {}
    index: dict[str, Any] = {}
    aggs = {}
    for metric in metrics:
        agg = aggs[metric] = aggregate(dataset, metric)
        files[heatmap_file(metric)] = npy(agg["stats"])
        index = index or {
            "axes": [
                "site",
                "divergence_index",
                "statistic",
                *(
                    agg.get("position_axis", AXIS_NAMES[axis])
                    if axis == "pos"
                    else AXIS_NAMES[axis]
                    for axis in agg["axes"]
                ),
            ],
            "statistic": ["mean", "std", "count"],
            "sites": agg["sites"],
            "divergence_indices": agg["divergence_indices"],
            "layers": agg["layers"],
            **({"heads": agg["heads"]} if "head" in agg["axes"] else {}),
            **({"positions": agg["span"]} if "pos" not in agg["axes"] else {}),
            "labels": {str(k): v for k, v in agg["labels"].items()},
            **({"aligned_to_end": agg["aligned_to_end"]} if agg["aligned_to_end"] else {}),
        }
    index["metrics"] = {
        metric: {"file": heatmap_file(metric), "meaning": METRIC_INFO[metric].formula}
        for metric in metrics
    }
    delta = "normalised" if aggs[metrics[0]]["method"] == "attribution" else "prob_delta"
    agg = aggs.get(delta) or aggregate(dataset, delta)
    files[ROADMAP_HEATMAP_FILE] = npy(agg["stats"][:, :, 0])
    index[ROADMAP_HEATMAP_FILE] = {
        "metric": delta,
        "statistic": "mean",
        "axes": [a for a in index["axes"] if a != "statistic"],
        "meaning": f"mean over pairs of {delta}: {METRIC_INFO[delta].formula}",
    }
    files[HEATMAP_INDEX_FILE] = json.dumps(index, indent=2, ensure_ascii=False) + "\n"
    return files
