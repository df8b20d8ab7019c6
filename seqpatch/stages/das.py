"""Stage ``das``: distributed alignment search at the patching heatmap's strongest cells.

Patching a whole activation shows *where* a value matters; DAS (``seqpatch.interventions.das``)
learns *in how many dimensions* of that activation it lives. For each of the ``top_n`` cells
``(site, layer, position)`` of the parent patching stage, ranked by the mean of ``metric`` over
the pairs studied here, the stage trains an orthonormal basis of each dimension ``k`` in ``ks``
so that swapping the source's (A's) component in that subspace into the target's (B's) run makes
the target answer A's answer, and reports interchange-intervention accuracy (IIA) on held-out
test pairs.

Pairs studied: those whose divergence index is ``divergence_index`` (default: the most common
one) and whose token length is the most common among them, so that a position means the same
token in every pair; pairs with equal answers are dropped (an interchange could not be told from
no effect). They are split by pair (seeded) into train / validation / test. The ranking uses the
patching rows of the same pairs (all splits: the heatmap is the stage's input, as in the issue).

One row per ``(site, layer, position, k, method)``:

- ``das`` — the trained basis (validation IIA picks the epoch);
- ``shuffled`` — the same training with the labels permuted across pairs (train and validation),
  scored against the true labels: how much IIA a basis of that size gets without the variable;
- ``random`` — a random orthonormal basis of the same ``k`` (seeded), untrained;
- ``full`` — the full-vector patch (``k = d_model``, the identity basis), one row per cell.

At ``k = d_model`` every basis spans everything, so ``das``, ``shuffled`` and ``random`` are the
full patch (identity basis, not trained: ``trained`` is false). ``trained`` says whether training
moved a basis at all: true only when some epoch beat the random initialisation on the
validation pairs (``best_epoch > 0``); a basis whose initialisation was never beaten is its
random start, and says so.

A split with fewer than ``MIN_TEST_PAIRS`` test pairs is refused before any training (each IIA
would move in steps of 1/n_test: with one test pair every IIA is 0 or 1), unless the config's
``allow_small`` says the study knowingly accepts it. ``basis`` is the ``[k, d_model]``
float32 basis itself (orthonormal rows), and ``test_pair_ids`` the pairs its ``iia`` was measured
on, so ``load_dataset`` users can reproduce and reuse it (``seqpatch.interventions.das.swap``).

The stage is built one shard per cell (``Store.build_sharded``): a run killed while training
resumes at the first unfinished cell, and the cells' rows and statistics are those of one
uninterrupted build.

Artifacts: ``iia.csv`` (the table without bases), ``summary.json`` (per cell: full-patch IIA, the
smallest ``k`` whose DAS IIA is within ``tolerance`` of it, and the controls at that ``k``) and
``iia_vs_k.html/png`` (IIA against ``k``, one panel per cell, with the controls).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Array2D, Dataset, Features, List, Value

from seqpatch.bounds import check_finite
from seqpatch.errors import SeqpatchError
from seqpatch.options import SEED_HELP, check_seed, int_list, option
from seqpatch.stages.base import Artifact, Built, Inputs, ParentSpec, chart_artifacts

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from seqpatch.store import StageRef

STAGE = "das"
# 2: a basis trains the same in any process (version 1 completed it with the global RNG)
SCHEMA_VERSION = 2
SHARD_SIZE = None  # one shard per cell (``n_shards``)
METHODS = ("das", "shuffled", "random", "full")
RANK_METRICS = ("normalised", "prob_delta", "logit_diff", "prob_delta_candidates")
MIN_TEST_PAIRS = 20  # below this an IIA moves in steps of more than 5 points


class DasStageError(SeqpatchError):
    """Bad DAS config, or parents that cannot be studied together."""


@dataclass(frozen=True)
class DasConfig:
    """Which cells, which subspace sizes, and how each basis is trained."""

    top_n: int = option(3, "Strongest heatmap cells.", min=1)
    # the patching metric the cells are ranked by (mean over pairs)
    metric: str = option("normalised", "Patching metric that ranks the cells.")
    divergence_index: int | None = option(
        None, "Study pairs diverging here [default: the commonest].", show_default=False
    )
    ks: tuple[int, ...] = option(
        (),
        "Subspace dimensions [default: 1,2,4,… and d_model].",
        parse=int_list("--ks", "1,2,4,8"),
        cli_default=None,
        show_default=False,
    )
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train / validation / test, by pair
    epochs: int = option(20, "Training epochs.", min=1)  # 80 Adam steps at 60 train pairs
    lr: float = option(1e-2, "Adam learning rate.")
    # more steps per epoch: k ≤ 8 still improving at 40 steps of 32
    batch_size: int = option(16, "Pairs per step.", min=1)
    seed: int = option(0, SEED_HELP)
    tolerance: float = 0.02  # "within 2 points of the full-vector patch" (summary.json)
    # in the version, so a knowingly small study is told apart from a sound one
    allow_small: bool = option(
        False,
        f"Accept a split with fewer than {MIN_TEST_PAIRS} test pairs (each IIA then moves in "
        f"steps of more than {100 // MIN_TEST_PAIRS} points).",
    )

    def __post_init__(self) -> None:
        check_seed(self.seed)
        if self.top_n < 1:
            raise DasStageError(f"top_n must be >= 1, got {self.top_n}")
        if self.metric not in RANK_METRICS:
            raise DasStageError(
                f"unknown metric {self.metric!r}; rank by one of {', '.join(RANK_METRICS)}"
            )
        if any(k < 1 for k in self.ks):
            raise DasStageError(f"every k must be >= 1, got {list(self.ks)}")
        object.__setattr__(self, "ks", tuple(sorted(set(self.ks))))
        split = tuple(float(x) for x in self.split)
        if len(split) != 3 or any(x <= 0 for x in split) or not math.isclose(sum(split), 1):
            raise DasStageError(
                f"split must be three positive fractions summing to 1, got {list(self.split)}"
            )
        object.__setattr__(self, "split", split)
        if self.epochs < 1 or self.batch_size < 1:
            raise DasStageError("epochs and batch_size must be >= 1")
        check_finite("lr", self.lr, DasStageError, above=0)
        check_finite("tolerance", self.tolerance, DasStageError, at_least=0)


CONFIG = DasConfig
PARENTS = (ParentSpec("pairs"), ParentSpec("patching"))


def default_ks(d_model: int) -> tuple[int, ...]:
    """Powers of two below ``d_model``, then ``d_model`` itself."""
    ks = [1 << i for i in range(d_model.bit_length()) if (1 << i) < d_model]
    return (*ks, d_model)


def features(d_model: int) -> Features:
    return Features(
        {
            "site": Value("string"),
            "layer": Value("int32"),
            "position": Value("int32"),
            "token": Value("string"),
            "rank": Value("int32"),  # 1 = the strongest heatmap cell
            "heatmap_score": Value("float32"),  # mean of the ranking metric over the pairs
            "divergence_index": Value("int32"),
            "n_tokens": Value("int32"),
            "k": Value("int32"),
            "method": Value("string"),
            "trained": Value("bool"),
            "iia": Value("float32"),  # on the test pairs
            "iia_val": Value("float32"),
            "iia_train": Value("float32"),
            "best_epoch": Value("int32"),
            "steps": Value("int32"),
            "n_train": Value("int32"),
            "n_val": Value("int32"),
            "n_test": Value("int32"),
            "basis": Array2D(shape=(None, d_model), dtype="float32"),
            "test_pair_ids": List(Value("string")),
        }
    )


def model_specs(cfg: DasConfig, parents: Mapping[str, StageRef]) -> tuple[str, ...]:
    """The model that built the pairs (and was patched)."""
    return (str(parents["pairs"].provenance["config"]["model"]),)


def prepare(inputs: Inputs, cfg: DasConfig) -> None:
    """The patching stage must be built from these pairs and rankable, the split must hold
    enough test pairs (``check_split``), and every ``k`` must fit the model."""
    pairs_version = inputs.parents["pairs"].version
    patched_from = [
        p.get("version") for p in inputs.parents["patching"].parents if p.get("stage") == "pairs"
    ]
    if patched_from and pairs_version not in patched_from:
        raise DasStageError(
            f"the patching stage was built from pairs {patched_from[0]}, not {pairs_version}; "
            f"pass --pairs {patched_from[0]}"
        )
    patching_cfg = inputs.parents["patching"].provenance["config"]
    if not rankable(patching_cfg):
        raise DasStageError(
            "DAS ranks (site, layer, position) cells of an exact patching stage over whole site "
            f"vectors; this one has sites {','.join(patching_cfg.get('sites', ()))}, axes "
            f"{','.join(patching_cfg.get('axes', ('layer', 'pos')))} and method "
            f"{patching_cfg.get('method', 'auto')}: pass --patching with a version built with "
            "--sites resid_pre,attn_out,mlp_out (axes layer,pos)"
        )
    check_split(select_pairs(inputs.rows("pairs"), cfg), cfg, cfg.allow_small)
    d_model = inputs.model.d_model
    too_big = [k for k in cfg.ks if k > d_model]
    if too_big:
        raise DasStageError(f"k={too_big[0]} exceeds the model's d_model {d_model}")


def rankable(patching_config: Mapping[str, Any]) -> bool:
    """Whether DAS can rank a patching stage's cells: exact (not attribution) patching of whole
    ``d_model``-wide site vectors (no head sites, no ``mlp_post``) over (layer, position)."""
    from seqpatch.site_table import SITE_TABLE

    axes = tuple(patching_config.get("axes", ("layer", "pos")))
    sites = [str(site) for site in patching_config.get("sites", ())]
    wide = all(s in SITE_TABLE and SITE_TABLE[s].width == "d_model" for s in sites)
    return axes == ("layer", "pos") and patching_config.get("method") != "attribution" and wide


@dataclass(frozen=True)
class Study:
    """The pairs studied and their split (indices into ``rows``)."""

    rows: Dataset
    divergence_index: int
    n_tokens: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    dropped: dict[str, int]


def select_pairs(pairs: Dataset, cfg: DasConfig) -> Study:
    """Pairs at one divergence index and one token length, split by pair (seeded)."""
    ks = np.asarray(pairs["divergence_index"])
    differ = np.asarray(pairs["ground_truth_a"]) != np.asarray(pairs["ground_truth_b"])
    if cfg.divergence_index is None:
        counts = Counter(ks[differ].tolist())
        if not counts:
            raise DasStageError("no pair has distinct answers; rebuild pairs without --allow-equal")
        divergence = max(sorted(counts), key=lambda k: counts[k])
    else:
        divergence = cfg.divergence_index
    at_k = differ & (ks == divergence)
    if not at_k.any():
        known = sorted(set(ks.tolist()))
        raise DasStageError(f"no pair diverges at index {divergence}; the pairs diverge at {known}")
    lengths = np.asarray(pairs["n_tokens"])
    n_tokens = Counter(lengths[at_k].tolist()).most_common(1)[0][0]
    keep = np.flatnonzero(at_k & (lengths == n_tokens))
    dropped = {
        "other_divergence_index": int((ks != divergence).sum()),
        "equal_answers": int(((ks == divergence) & ~differ).sum()),
        "other_length": int((at_k & (lengths != n_tokens)).sum()),
    }
    rows = pairs.select(keep.tolist())
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    n_train = round(cfg.split[0] * len(rows))
    n_val = round(cfg.split[1] * len(rows))
    train, val, test = np.split(order, [n_train, n_train + n_val])
    if min(len(train), len(val), len(test)) < 1:
        raise DasStageError(
            f"only {len(rows)} pairs diverge at index {divergence}: too few to split "
            f"{list(cfg.split)}; build more pairs (--n-pairs) or choose --divergence-index"
        )
    return Study(rows, int(divergence), int(n_tokens), train, val, test, dropped)


def check_split(study: Study, cfg: DasConfig, allow_small: bool = False) -> None:
    """Refuse a split whose test set is too small for an IIA to mean anything (one line)."""
    if len(study.test) >= MIN_TEST_PAIRS or allow_small:
        return
    n_pairs = len(study.rows)
    needed = math.ceil(MIN_TEST_PAIRS / cfg.split[2])
    raise DasStageError(
        f"only {len(study.test)} test pairs (n_train {len(study.train)}, n_val "
        f"{len(study.val)}, n_test {len(study.test)} of {n_pairs} pairs at divergence index "
        f"{study.divergence_index}): an IIA needs at least {MIN_TEST_PAIRS} test pairs to mean "
        f"anything; build about {needed} pairs at that index (--n-pairs, --divergence-index) or "
        "pass --allow-small"
    )


@dataclass(frozen=True)
class Cell:
    site: str
    layer: int
    position: int
    score: float
    rank: int


def top_cells(patching: Dataset, pair_ids: Sequence[str], cfg: DasConfig) -> list[Cell]:
    """The ``top_n`` cells by the mean of ``cfg.metric`` over ``pair_ids`` (NaN cells skipped;
    ties in site, layer, position order)."""
    wanted = set(pair_ids)
    ids = patching["pair_id"]
    keep = [i for i, pid in enumerate(ids) if pid in wanted]
    if not keep:
        raise DasStageError("the patching stage has none of the studied pairs")
    chosen = patching.select(keep).select_columns(["site", "layers", cfg.metric])
    sites = np.asarray(chosen["site"])
    values = np.asarray(chosen.with_format("numpy")[cfg.metric], dtype=np.float64)
    layers = list(chosen[0]["layers"])
    cells: list[tuple[float, int, str, int, int]] = []
    for order, site in enumerate(dict.fromkeys(sites.tolist())):
        grid = values[sites == site]
        with np.errstate(invalid="ignore"):
            count = (~np.isnan(grid)).sum(0)
            mean = np.where(count > 0, np.nansum(grid, 0) / np.maximum(count, 1), np.nan)
        for li, layer in enumerate(layers):
            for pos in range(mean.shape[1]):
                if not np.isnan(mean[li, pos]):
                    cells.append((float(mean[li, pos]), order, site, layer, pos))
    cells.sort(key=lambda c: (-c[0], c[1], c[3], c[4]))
    return [
        Cell(site, layer, pos, score, rank)
        for rank, (score, _, site, layer, pos) in enumerate(cells[: cfg.top_n], start=1)
    ]


def n_shards(inputs: Inputs, cfg: DasConfig) -> int:
    """One shard per cell: a run killed while training keeps every finished cell."""
    return max(1, len(_plan(inputs, cfg)[1]))


def build_shard(inputs: Inputs, cfg: DasConfig, index: int) -> Built:
    """The rows of cell ``index`` (rank ``index + 1``): every ``k`` and method."""
    import torch

    handle = inputs.model
    ks = cfg.ks or default_ks(handle.d_model)
    study, cells = _plan(inputs, cfg)
    labels = torch.tensor(study.rows["answer_index_a"], dtype=torch.long)
    split = tuple(
        torch.as_tensor(x, dtype=torch.long) for x in (study.train, study.val, study.test)
    )
    # The shuffled control's labels: true labels permuted across the train and validation pairs.
    shuffled = labels.clone()
    pool = torch.cat(split[:2])
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed + 1))
    shuffled[pool] = labels[pool[perm]]
    out = []
    if index < len(cells):
        out = _study_cell(inputs, cfg, study, cells[index], ks, labels, shuffled, split)
    rows = Dataset.from_list(out, features=features(handle.d_model))
    stats = {
        "patching_version": inputs.parents["patching"].version,  # the heatmap that was ranked
        "divergence_index": study.divergence_index,
        "n_tokens": study.n_tokens,
        "n_pairs": len(study.rows),
        "dropped": study.dropped,
        "ks": list(ks),
    }
    return Built(rows, stats=stats)


def merge_stats(parts: list[dict[str, Any]], rows: Dataset, cfg: DasConfig) -> dict[str, Any]:
    """The study's statistics (equal in every shard, not summed) and the summary of all cells."""
    return {**parts[0], "summary": summary(rows, cfg.tolerance)}


def build(inputs: Inputs, cfg: DasConfig) -> Built:
    """Every cell in one go (the executor builds the shards; this is for direct calls)."""
    from datasets import concatenate_datasets

    shards = [build_shard(inputs, cfg, i) for i in range(n_shards(inputs, cfg))]
    rows = concatenate_datasets([shard.rows for shard in shards])
    return Built(rows, stats=merge_stats([dict(s.stats) for s in shards], rows, cfg))


def _plan(inputs: Inputs, cfg: DasConfig) -> tuple[Study, list[Cell]]:
    """The studied pairs and the ranked cells (the same in every shard)."""
    study = select_pairs(inputs.rows("pairs"), cfg)
    return study, top_cells(inputs.rows("patching"), study.rows["pair_id"], cfg)


def _study_cell(
    inputs: Inputs,
    cfg: DasConfig,
    study: Study,
    cell: Cell,
    ks: Sequence[int],
    labels: Any,
    shuffled: Any,
    split: tuple[Any, ...],
) -> list[dict[str, Any]]:
    """The rows of one cell: DAS and shuffled-label bases trained together, random bases, and
    the full-vector patch."""
    import torch

    from seqpatch.interventions import das

    handle = inputs.model
    d_model = handle.d_model
    train, val, test = split
    model = das.SiteInterchange(
        handle,
        cell.site,  # type: ignore[arg-type]
        cell.layer,
        cell.position,
        torch.tensor(study.rows["input_ids_a"], dtype=torch.long),
        torch.tensor(study.rows["input_ids_b"], dtype=torch.long),
        torch.tensor(study.rows["candidate_ids"], dtype=torch.long),
    )
    trained_ks = [k for k in ks if k < d_model]
    specs = [das.BasisSpec(k, labels, _seed(cfg.seed, cell, k, 0)) for k in trained_ks]
    specs += [das.BasisSpec(k, shuffled, _seed(cfg.seed, cell, k, 1)) for k in trained_ks]
    train_cfg = das.TrainConfig(cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed)
    results = das.train_bases(model, specs, train, val, train_cfg)
    trained = {
        (spec.k, "das" if spec.labels is labels else "shuffled"): result
        for spec, result in zip(specs, results, strict=True)
    }
    common = {
        "site": cell.site,
        "layer": cell.layer,
        "position": cell.position,
        "token": study.rows[0]["tokens"][cell.position],
        "rank": cell.rank,
        "heatmap_score": cell.score,
        "divergence_index": study.divergence_index,
        "n_tokens": study.n_tokens,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "test_pair_ids": [study.rows["pair_id"][i] for i in study.test.tolist()],
    }
    out = []
    for k in [*ks, None]:
        if k is None:  # one full-vector row per cell
            bases = {"full": (das.full_basis(d_model), None)}
        elif k == d_model:  # every basis of d_model directions is the full patch
            bases = {m: (das.full_basis(d_model), None) for m in ("das", "shuffled", "random")}
        else:
            generator = torch.Generator().manual_seed(_seed(cfg.seed, cell, k, 2))
            bases = {
                "das": (trained[(k, "das")].basis, trained[(k, "das")]),
                "shuffled": (trained[(k, "shuffled")].basis, trained[(k, "shuffled")]),
                "random": (das.random_basis(d_model, k, generator), None),
            }
        for method, (basis, result) in bases.items():
            out.append(
                {
                    **common,
                    "k": d_model if k is None else k,
                    "method": method,
                    "trained": result is not None and result.best_epoch > 0,
                    "iia": das.interchange_accuracy(model, basis, test, labels),
                    "iia_val": das.interchange_accuracy(model, basis, val, labels),
                    "iia_train": das.interchange_accuracy(model, basis, train, labels),
                    "best_epoch": result.best_epoch if result else 0,
                    "steps": result.steps if result else 0,
                    "basis": basis.numpy().astype(np.float32),
                }
            )
    return out


def _seed(seed: int, cell: Cell, k: int, salt: int) -> int:
    """A seed per (cell, k, purpose), stable across runs and processes."""
    import hashlib

    key = f"{seed}/{cell.site}/{cell.layer}/{cell.position}/{k}/{salt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def table(rows: Dataset) -> Any:
    """The IIA table (every column but the basis and the test pair ids) as a polars frame."""
    return rows.remove_columns(["basis", "test_pair_ids"]).to_polars()


def summary(rows: Dataset, tolerance: float = 0.02) -> list[dict[str, Any]]:
    """Per cell: full-patch IIA, the smallest k whose DAS IIA is within ``tolerance`` of it
    (``None`` if none), and the DAS and control IIAs at that k."""
    frame = table(rows)
    out = []
    for (site, layer, position), group in frame.group_by(
        ["site", "layer", "position"], maintain_order=True
    ):
        full = float(group.filter(group["method"] == "full")["iia"][0])
        iia = {
            (m, int(k)): float(v)
            for m, k, v in zip(group["method"], group["k"], group["iia"], strict=True)
        }
        ks = sorted({k for m, k in iia if m == "das"})
        smallest = next((k for k in ks if iia[("das", k)] >= full - tolerance - 1e-9), None)
        entry: dict[str, Any] = {
            "site": site,
            "layer": int(layer),
            "position": int(position),
            "token": group["token"][0],
            "rank": int(group["rank"][0]),
            "full_iia": full,
            "smallest_k": smallest,
        }
        if smallest is not None:
            for method in ("das", "shuffled", "random"):
                entry[f"{method}_iia"] = iia[(method, smallest)]
        entry["k1"] = {m: iia.get((m, ks[0])) for m in ("das", "shuffled", "random")} if ks else {}
        out.append(entry)
    return out


def artifacts(rows: Dataset, cfg: DasConfig, inputs: Inputs) -> dict[str, Artifact]:
    """``iia.csv``, ``summary.json`` and the IIA-vs-k chart."""
    import io

    from seqpatch.charts.das import iia_figure, iia_name

    buffer = io.BytesIO()
    table(rows).write_csv(buffer)
    return {
        "iia.csv": buffer.getvalue(),
        "summary.json": json.dumps(summary(rows, cfg.tolerance), indent=2) + "\n",
        **chart_artifacts(iia_figure(table(rows)), iia_name()),
    }
