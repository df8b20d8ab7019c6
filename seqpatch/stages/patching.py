"""Stage ``patching``: the effect of patching A into B at every (layer, position), per site.

One row per (pair, site). ``logits[l, t, c]`` are the target's (B's) next-token logits of the
answer candidates (the ten digits, ``candidate_labels``) at its scored position when cell
``(l, t)`` of ``site`` carries the source's (A's) activation — computed by the batched sweep
engine (``seqpatch.interventions.sweep``). ``baseline_logits_a/b`` are the unpatched runs. The
metric grids ``prob_delta``, ``logit_diff`` and ``normalised`` (``[layers, positions]``, see
``seqpatch.metrics``) are stored as views of those logits, so another metric never needs a
rerun. Positions beyond a shorter pair's ``n_tokens`` are NaN.

The stage is built in shards of ``shard_size`` pairs (``Store.build_sharded``): an interrupted
build resumes without recomputing finished shards, and ``--shard i/n`` lets ``n`` jobs share the
shards of one version before ``seqpatch merge`` joins them. Source activations come from an
``activations`` stage when one is given (its version is part of this stage's config), else they
are recomputed in the sweep.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Array2D, Array3D, Features, List, Value

from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    from datasets import Dataset

    from seqpatch.models import ModelHandle

STAGE = "patching"
SCHEMA_VERSION = 1
METRICS = ("normalised", "prob_delta", "logit_diff")
HEATMAP_FILE = "heatmap.npy"
HEATMAP_INDEX_FILE = "heatmap.json"


class PatchingStageError(SeqpatchError):
    """Bad patching config or inputs."""


@dataclass(frozen=True)
class PatchingConfig:
    """Which sweeps to run. ``layers``/``positions`` empty = all of them."""

    sites: tuple[str, ...] = ("resid_pre",)
    layers: tuple[int, ...] = ()
    method: str = "auto"  # the engine picks its compute-floor path where the architecture allows
    shard_size: int = 250  # pairs per resumable shard: a lost shard costs seconds, not minutes
    activations: str | None = None  # version of the activations stage the sources come from

    def __post_init__(self) -> None:
        from seqpatch.interventions import SWEEP_SITES

        if not self.sites:
            raise PatchingStageError("give at least one site, e.g. --sites resid_pre")
        for site in self.sites:
            if site not in SWEEP_SITES:
                raise PatchingStageError(
                    f"unknown site {site!r}; sweepable sites: {', '.join(SWEEP_SITES)}"
                )
        if self.shard_size < 1:
            raise PatchingStageError(f"shard_size must be >= 1, got {self.shard_size}")
        object.__setattr__(self, "sites", tuple(dict.fromkeys(self.sites)))


def features(n_layers: int, n_positions: int, n_candidates: int) -> Features:
    grid = Array2D(shape=(n_layers, n_positions), dtype="float32")
    return Features(
        {
            "pair_id": Value("string"),
            "site": Value("string"),
            "divergence_index": Value("int32"),
            "affects_query": Value("bool"),
            "n_tokens": Value("int32"),
            "tokens": List(Value("string")),
            "tokens_a": List(Value("string")),
            "diff_positions": List(Value("int32")),
            "layers": List(Value("int32")),
            "ground_truth_a": Value("int64"),
            "ground_truth_b": Value("int64"),
            "candidate_labels": List(Value("string")),
            "answer_index_a": Value("int32"),
            "answer_index_b": Value("int32"),
            "baseline_logits_a": List(Value("float32")),
            "baseline_logits_b": List(Value("float32")),
            "logits": Array3D(shape=(n_layers, n_positions, n_candidates), dtype="float32"),
            "prob_delta": grid,
            "logit_diff": grid,
            "normalised": grid,
        }
    )


def _patch(
    batch: dict[str, list],
    cfg: PatchingConfig,
    handle: ModelHandle,
    layers: list[int],
    width: int,
    activations: Dataset | None,
) -> dict[str, list]:
    import torch

    from seqpatch import metrics
    from seqpatch.interventions import candidate_logits, sweep

    src = [torch.tensor(ids) for ids in batch["input_ids_a"]]
    tgt = [torch.tensor(ids) for ids in batch["input_ids_b"]]
    cand = torch.tensor(batch["candidate_ids"])
    base_a = candidate_logits(handle, src, cand).numpy()
    base_b = candidate_logits(handle, tgt, cand).numpy()
    ans_a = np.asarray(batch["answer_index_a"])
    ans_b = np.asarray(batch["answer_index_b"])
    cached = _cached_sources(activations, batch, cfg.sites, layers)
    out: dict[str, list] = {name: [] for name in features(1, 1, 1)}
    for site in cfg.sites:
        logits = sweep(
            handle,
            src,
            tgt,
            site,
            cand,
            layers=layers,
            source_activations=cached.get(site),
            method=cfg.method,
        ).numpy()
        if logits.shape[2] < width:
            pad = np.full((*logits.shape[:2], width - logits.shape[2], logits.shape[3]), np.nan)
            logits = np.concatenate([logits, pad.astype(np.float32)], axis=2)
        grids = {
            "prob_delta": metrics.prob_delta(logits, base_b, ans_b),
            "logit_diff": metrics.logit_diff(logits, ans_a, ans_b),
            "normalised": metrics.normalised(logits, base_b, base_a, ans_a, ans_b),
        }
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
            out["site"].append(site)
            out["layers"].append(layers)
            out["baseline_logits_a"].append(base_a[i])
            out["baseline_logits_b"].append(base_b[i])
            out["logits"].append(logits[i])
            for name, grid in grids.items():
                out[name].append(np.asarray(grid[i], dtype=np.float32))
    return out


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


def shard_count(n_pairs: int, cfg: PatchingConfig) -> int:
    return max(1, math.ceil(n_pairs / cfg.shard_size))


def build_shard(
    index: int,
    parent: Dataset,
    cfg: PatchingConfig,
    handle: ModelHandle,
    activations: Dataset | None = None,
    batch_pairs: int = 250,
) -> Dataset:
    """Rows of shard ``index``: pairs ``[index * shard_size, (index + 1) * shard_size)``."""
    layers = list(cfg.layers) if cfg.layers else list(range(handle.n_layers))
    bad = [layer for layer in layers if not 0 <= layer < handle.n_layers]
    if bad:
        raise PatchingStageError(
            f"layer {bad[0]} does not exist; the model has layers 0..{handle.n_layers - 1}"
        )
    width = max(parent["n_tokens"])
    n_candidates = len(parent[0]["candidate_ids"])
    start = index * cfg.shard_size
    rows = parent.select(range(start, min(start + cfg.shard_size, len(parent))))
    key = json.dumps(
        [STAGE, SCHEMA_VERSION, asdict(cfg), parent._fingerprint, handle.describe(), index],
        sort_keys=True,
        default=str,
    )
    return rows.map(
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
        },
        features=features(len(layers), width, n_candidates),
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        desc=f"patching shard {index}",
    )


# ---------------------------------------------------------------------------------------------
# Views of a stored patching dataset: the aggregate heatmap and the frames charts draw


def aggregate(dataset: Dataset, metric: str = "normalised") -> dict[str, Any]:
    """Mean, std and count over pairs per (site, divergence index, layer, position).

    Returns ``{"sites", "divergence_indices", "layers", "labels", "stats"}`` where ``stats`` is
    ``[sites, divergence_indices, 3 (mean, std, count), layers, positions]`` float64 and
    ``labels[k]`` are the token labels of the first pair diverging at ``k`` (starred where A
    and B differ). NaN cells (beyond a pair's length, or undefined normalisation) are skipped.
    """
    if metric not in METRICS:
        raise PatchingStageError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    cols = dataset.select_columns(["site", "divergence_index", metric]).with_format("numpy")
    sites = list(dict.fromkeys(dataset["site"]))
    ks = sorted(set(dataset["divergence_index"]))
    site_col = np.asarray(dataset["site"])
    k_col = np.asarray(dataset["divergence_index"])
    values = np.asarray(cols[metric], dtype=np.float64)
    _, n_layers, n_pos = values.shape
    stats = np.full((len(sites), len(ks), 3, n_layers, n_pos), np.nan)
    for si, site in enumerate(sites):
        for ki, k in enumerate(ks):
            chunk = values[(site_col == site) & (k_col == k)]
            if len(chunk) == 0:
                continue
            count = np.sum(~np.isnan(chunk), axis=0)
            with np.errstate(invalid="ignore"), _quiet():
                stats[si, ki, 0] = np.nanmean(chunk, axis=0)
                stats[si, ki, 1] = np.nanstd(chunk, axis=0)
            stats[si, ki, 2] = count
    labels = {}
    first = {}
    for i, k in enumerate(dataset["divergence_index"]):
        first.setdefault(k, i)
    for k, i in first.items():
        row = dataset[i]
        diff = set(row["diff_positions"])
        labels[k] = [tok + ("*" if t in diff else "") for t, tok in enumerate(row["tokens"])]
    return {
        "metric": metric,
        "sites": sites,
        "divergence_indices": ks,
        "layers": list(dataset[0]["layers"]),
        "labels": labels,
        "stats": stats,
    }


class _quiet:
    """Silence numpy's all-NaN-slice warnings (those cells stay NaN by design)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def effect_cells(agg: dict[str, Any]) -> Any:
    """The aggregate as a tidy polars frame for ``charts.heatmap_chart``."""
    import polars as pl

    rows = []
    for si, site in enumerate(agg["sites"]):
        for ki, k in enumerate(agg["divergence_indices"]):
            labels = agg["labels"][k]
            for li, layer in enumerate(agg["layers"]):
                for t, label in enumerate(labels):
                    mean, std, count = agg["stats"][si, ki, :, li, t]
                    if count > 0:
                        rows.append(
                            {
                                "site": site,
                                "divergence_index": k,
                                "layer": layer,
                                "position": t,
                                "label": label,
                                "mean": float(mean),
                                "std": float(std),
                                "count": int(count),
                            }
                        )
    return pl.DataFrame(rows)


def example_frame(dataset: Dataset, metric: str, pair_id: str | None = None) -> tuple[Any, dict]:
    """One pair's grid of ``metric`` for every site, tidy (``charts.trace_chart``), and the row."""
    import polars as pl

    ids = dataset["pair_id"]
    target = pair_id if pair_id is not None else ids[0]
    if target not in ids:
        raise PatchingStageError(f"no pair {target!r} in this patching stage")
    rows = []
    first = None
    for i, pid in enumerate(ids):
        if pid != target:
            continue
        row = dataset.with_format("numpy")[i]
        first = first or dataset[i]
        diff = set(first["diff_positions"])
        for li, layer in enumerate(row["layers"]):
            for t in range(int(row["n_tokens"])):
                rows.append(
                    {
                        "site": row["site"],
                        "layer": int(layer),
                        "position": t,
                        "label": first["tokens"][t] + ("*" if t in diff else ""),
                        "value": float(row[metric][li, t]),
                    }
                )
    return pl.DataFrame(rows), first


def write_heatmap(folder: Any, dataset: Dataset, metric: str = "normalised") -> list[Any]:
    """Save the aggregate beside the stage: ``heatmap.npy`` (stats) + ``heatmap.json`` (axes)."""
    from pathlib import Path

    agg = aggregate(dataset, metric)
    folder = Path(folder)
    np.save(folder / HEATMAP_FILE, agg["stats"])
    index = {
        "metric": metric,
        "axes": ["site", "divergence_index", "statistic", "layer", "position"],
        "statistic": ["mean", "std", "count"],
        "sites": agg["sites"],
        "divergence_indices": agg["divergence_indices"],
        "layers": agg["layers"],
        "labels": {str(k): v for k, v in agg["labels"].items()},
    }
    (folder / HEATMAP_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [folder / HEATMAP_FILE, folder / HEATMAP_INDEX_FILE]
