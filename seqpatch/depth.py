"""Chain studies of several models side by side, by relative depth (``scripts/compare_models.py``).

A chain study (``scripts/study_pretrained.py``) is a data folder whose ``study.json`` names the
version each step built (``pairs``, ``patching``, ``tracing``, ``stream-before-last``,
``stream-last``, ``heads``, ``das-pairs``, ``das-patching``, ``das``). ``open_study`` reads one
through ``seqpatch.views.Study``; each function below computes one finding from the stored rows
and returns plain numbers, so the markdown (``seqpatch.depth_markdown``) and its one-liners
print the same values. A step that is not built is reported as not run; a sharded build that has not finished
(``seqpatch.unfinished``) is reported with how many pairs its finished shards hold, and its
numbers are labelled partial — never filled in.

Definitions (the chart and the findings share them):

- **relative depth** of layer ℓ in a model of L layers: ℓ / (L − 1), 0 = entering the first
  layer, 1 = entering the last; L is the number of layers the slice grid patches (the study
  patches every layer);
- **token groups** of a ``--positions slice`` grid, from each pair's own token roles
  (``seqpatch.roles``): ``value`` — the changed statement's value, its last piece (the digit,
  not a space tokenised apart before it: the highest of ``hop0:value``, ``hop0:value+1``…);
  ``hops`` — the tokens of the later statements of the query's slice (``hop1:…``, ``hop2:…``);
  ``question`` — the question's tokens; ``last`` — the last token. A pair's value of a group
  with several tokens is that token's of largest |effect| at the layer, so a value held by
  any one of them shows. The changed statement's other tokens belong to no group;
- **the value's token holds it** up to ``value_until``: the last layer whose mean ``resid_pre``
  effect at ``value`` is ≥ 0.5 (patching that token alone still switches at least half the
  answer);
- **hand-off layer**: the first layer whose mean ``resid_pre`` effect at ``last`` is ≥ 0.5 —
  from there the last token alone carries at least half the change. Layers strictly between
  the two are where the value sits on neither token (``carriers`` says which group holds it);
- means are over pairs (pooled over divergence indices) with the 95% interval of
  ``seqpatch.cells.confidence_interval``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from seqpatch.cells import confidence_interval
from seqpatch.errors import SeqpatchError
from seqpatch.unfinished import (
    Unfinished,
    built_from,
    manifest_of,
    unfinished,
    unfinished_rows,
    unfinished_values,
)
from seqpatch.views import Study

GROUPS = ("value", "hops", "question", "last")
GROUP_TITLES = {
    "value": "changed value's token",
    "hops": "later statements (hops)",
    "question": "question",
    "last": "last token",
}
STEPS = ("patching", "tracing", "stream-before-last", "stream-last", "heads", "das")
STEP_STAGES = {
    "patching": "patching",
    "tracing": "tracing",
    "stream-before-last": "patching",
    "stream-last": "patching",
    "heads": "patching",
    "das": "das",
}
HELD = 0.5  # "carries the value": a mean normalised effect of at least one half
METRIC = "normalised"


class CompareError(SeqpatchError):
    """A folder that is not a chain study, or a study asked for a step it cannot give."""


@dataclass
class StepStatus:
    """How far one step of a study got: ``state`` is ``done``, ``unfinished`` or ``not run``;
    ``pairs`` of ``total`` (tracing: programs; an unfinished DAS: cells) are in its rows
    (``None`` when not known). An unfinished step is its build with the most pairs (DAS: its
    newest); ``unchecked`` of its shards carry no hashes (written before shards recorded them);
    ``newer`` names a newer build of the same step with fewer pairs (e.g. one restarted by
    newer code), ``None`` when there is none."""

    step: str
    state: str
    version: str | None = None
    pairs: int | None = None
    total: int | None = None
    shards: int | None = None
    n_shards: int | None = None
    unchecked: int = 0
    newer: str | None = None

    def words(self) -> str:
        unit = "programs" if self.step == "tracing" else "pairs"
        if self.state == "not run":
            return "not run yet"
        if self.state == "done":
            return f"done, {self.pairs} {unit} (`{self.version}`)" if self.pairs else "done"
        of = f" of {self.total}" if self.total else ""
        if self.step == "das":  # one shard per cell
            return f"**not finished**: {self.pairs}{of} cells (build `{self.version}`)"
        shards = f", {self.shards} of {self.n_shards} shards" if self.n_shards else ""
        notes = []
        if self.unchecked:
            notes.append(f"{self.unchecked} of them written before shards recorded hashes")
        if self.newer:
            notes.append(self.newer)
        more = "; " + "; ".join(notes) if notes else ""
        return f"**not finished**: {self.pairs}{of} {unit} (build `{self.version}`{shards}{more})"


@dataclass
class ModelStudy:
    """One model's chain study: its ``name`` (a label), folder, ``study.json`` record and the
    ``Study`` of its pairs step (``None`` when the pairs are not built)."""

    name: str
    data_dir: Path
    record: dict[str, Any]
    study: Study | None

    @property
    def steps(self) -> dict[str, Any]:
        return self.record.get("steps", {})

    @property
    def n_pairs(self) -> int | None:
        step = self.steps.get("pairs")
        return int(step["pairs"]) if step else None


def open_study(data_dir: str | Path, name: str | None = None) -> ModelStudy:
    """The chain study in ``data_dir`` (its ``study.json``), labelled ``name`` (default: the
    model it names)."""
    data_dir = Path(data_dir)
    path = data_dir / "study.json"
    sides = sorted(data_dir.glob("study-*.json"))
    if sides and not path.exists():  # only steps run beside a main run so far
        path = sides.pop(0)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(
            f"{data_dir} has no study.json; give the data folder of a chain study "
            "(scripts/study_pretrained.py MODEL --data-dir DIR)"
        ) from None
    except (OSError, ValueError) as err:
        raise CompareError(
            f"{path} cannot be read ({err}); is it a chain study's record?"
        ) from None
    record = dict(record, steps=merged_steps(record, sides))
    pairs = record["steps"].get("pairs")
    study = Study(data_dir, pairs=pairs["version"]) if pairs else None
    return ModelStudy(name or str(record.get("model", data_dir.name)), data_dir, record, study)


def merged_steps(record: dict[str, Any], sides: list[Path]) -> dict[str, Any]:
    """The steps of ``record`` (``study.json``) and of the side records ``sides`` (the
    ``study-<name>.json`` files) that
    ``study_pretrained.py --steps … --record <name>`` writes when steps run in a second process.
    A step in several records is the entry of the run that built it: where the versions agree,
    the earliest finished (a later run that reused the version recorded only its lookup time);
    where they differ, the main record's (what the study itself used)."""
    steps = dict(record.get("steps", {}))
    for side in sides:
        try:
            other = json.loads(side.read_text()).get("steps", {})
        except (OSError, ValueError) as err:
            raise CompareError(
                f"{side} cannot be read ({err}); is it a study's side record?"
            ) from None
        for step, entry in other.items():
            mine = steps.get(step)
            if mine is None or (
                mine.get("version") == entry.get("version")
                and entry.get("finished", "") < mine.get("finished", "")
            ):
                steps[step] = entry
    return steps


# -- how far each step got ---------------------------------------------------------------------


def _step_of(study: Study, build: Unfinished) -> str:
    """Which step of a study an unfinished build is: from its rows, or, before its first
    shard, from its manifest's config."""
    if build.stage != "patching":
        return build.stage
    if build.shards:
        rows = unfinished_rows(study, build)
        sites, span = set(rows["site"]), rows[0]["span"]
    else:
        config = manifest_of(build).get("config")
        config = config if isinstance(config, dict) else {}
        sites, span = set(config.get("sites") or ()), config.get("positions")
    if "head_z" in sites:
        return "heads"
    return {"before-last": "stream-before-last", "last": "stream-last"}.get(span, "patching")


def _builds(ms: ModelStudy, step: str) -> list[Unfinished]:
    """The unfinished builds of ``step``, the one with the most pairs first (then the newest)."""
    if ms.study is None:
        return []
    builds = [b for b in unfinished(ms.study, STEP_STAGES[step]) if _step_of(ms.study, b) == step]
    return sorted(builds, key=lambda b: (b.n_pairs, b.started), reverse=True)


def step_status(ms: ModelStudy, step: str) -> StepStatus:
    """How far ``step`` got (see ``StepStatus``): done when ``study.json`` names a stored
    version; else unfinished when a build of it has started (its build with the most pairs);
    else not run."""
    if step not in STEP_STAGES:
        raise CompareError(f"unknown step {step!r}; a study has {', '.join(STEPS)}")
    record = ms.steps.get(step)
    stage = STEP_STAGES[step]
    if record and ms.study is not None and ms.study.store.find(stage, record["version"]):
        return StepStatus(step, "done", record["version"], record.get("pairs"), record.get("pairs"))
    if ms.study is None:
        return StepStatus(step, "not run")
    if step == "das":
        return _das_status(ms.study, ms.steps)
    builds = _builds(ms, step)
    if not builds:
        return StepStatus(step, "not run")
    build = builds[0]
    newest = max(builds, key=lambda b: b.started)
    newer = None
    if newest is not build:
        of = f" of {newest.n_shards}" if newest.n_shards else ""
        newer = f"a newer build `{newest.version}` has {len(newest.shards)}{of} shards"
    return StepStatus(
        step, "unfinished", build.version, build.n_pairs,
        ms.n_pairs if stage == "patching" else None, len(build.shards), build.n_shards,
        len(build.unchecked), newer,
    )  # fmt: skip


def _das_status(study: Study, steps: dict[str, Any]) -> StepStatus:
    """DAS is built from its own pairs (the ``das-pairs`` step), one shard per cell: how many
    cells its newest unfinished build has."""
    pairs = (steps.get("das-pairs") or {}).get("version")
    builds = built_from(study.store, "das", pairs) if pairs else []
    if not builds:
        return StepStatus("das", "not run")
    build = builds[-1]
    return StepStatus(
        "das", "unfinished", build.version, len(build.shards), build.n_shards,
        unchecked=len(build.unchecked),
    )  # fmt: skip


def statuses(ms: ModelStudy) -> dict[str, StepStatus]:
    return {step: step_status(ms, step) for step in STEPS}


# -- the slice grid by token group and relative depth -------------------------------------------


def slice_values(ms: ModelStudy) -> tuple[pl.DataFrame, StepStatus]:
    """Every pair's normalised effect on the ``patching`` step's slice grid (its finished shards
    when it has not finished; empty when not run), with the step's status."""
    status = step_status(ms, "patching")
    if status.state == "not run" or ms.study is None:
        return pl.DataFrame(), status
    if status.state == "done":
        return ms.study.pair_values(status.version, METRIC), status
    build = next(b for b in _builds(ms, "patching") if b.version == status.version)
    return unfinished_values(ms.study, build, METRIC), status


def group_of_roles() -> pl.Expr:
    """The token group (``GROUPS``) of each row of a pair-values frame, from ``token_role``;
    null for tokens in no group. Needs the column ``value_piece`` (``group_values``)."""
    role = pl.col("token_role")
    return (
        pl.when(pl.col("value_piece").is_not_null() & (pl.col("value_piece") == pl.col("last_piece")))
        .then(pl.lit("value"))
        .when(role.str.contains(r"^hop[1-9][0-9]*:"))
        .then(pl.lit("hops"))
        .when(role.str.starts_with("question:"))
        .then(pl.lit("question"))
        .when(role == "last")
        .then(pl.lit("last"))
        .otherwise(pl.lit(None, pl.String))
    )  # fmt: skip


def group_values(values: pl.DataFrame) -> pl.DataFrame:
    """Per pair, site and layer, the value of each token group (see the module docstring):
    ``site, divergence_index, pair_id, layer, group, value, token_role``."""
    if values.is_empty():
        return pl.DataFrame(
            schema={
                "site": pl.String,
                "divergence_index": pl.Int64,
                "pair_id": pl.String,
                "layer": pl.Int64,
                "group": pl.String,
                "value": pl.Float64,
                "token_role": pl.String,
            }
        )
    role = pl.col("token_role")
    piece = (
        pl.when(role.str.starts_with("hop0:value"))
        .then(role.str.extract(r"\+(\d+)$").cast(pl.Int64).fill_null(0))
        .otherwise(pl.lit(None, pl.Int64))
    )
    keys = ["site", "divergence_index", "pair_id", "layer", "group"]
    return (
        values.filter(role.is_not_null())
        .with_columns(value_piece=piece)
        .with_columns(last_piece=pl.col("value_piece").max().over("pair_id"))
        .with_columns(group=group_of_roles())
        .filter(pl.col("group").is_not_null())
        .sort([*keys, pl.col("value").abs()], descending=[False] * len(keys) + [True])
        .group_by(keys, maintain_order=True)
        .first()
        .select(*keys, "value", "token_role")
    )


def summarise_groups(grouped: pl.DataFrame) -> pl.DataFrame:
    """Mean, std, ``n`` and 95% interval over pairs per ``site, group, layer``."""
    out = (
        grouped.group_by(["site", "group", "layer"])
        .agg(
            pl.col("value").mean().alias("mean"),
            pl.col("value").std(ddof=0).alias("std"),
            pl.len().alias("n"),
        )
        .sort(["site", "group", "layer"])
    )
    low, high = confidence_interval(out["mean"], out["std"], out["n"])
    return out.with_columns(ci_low=pl.Series(low), ci_high=pl.Series(high)).with_columns(
        pl.col("ci_low").fill_nan(None), pl.col("ci_high").fill_nan(None)
    )


def depth_curves(ms: ModelStudy, site: str | None = "resid_pre") -> pl.DataFrame:
    """The chart's rows for one model: ``model, site, group, layer, n_layers, depth, mean, std,
    n, ci_low, ci_high, partial`` (``partial``: from an unfinished build's finished shards);
    ``site`` ``None``: every site. Empty when the patching step has not run."""
    values, status = slice_values(ms)
    if values.is_empty():
        return pl.DataFrame()
    if site is not None:
        values = values.filter(pl.col("site") == site)
    n_layers = int(values["layer"].max()) + 1
    return summarise_groups(group_values(values)).with_columns(
        model=pl.lit(ms.name),
        n_layers=pl.lit(n_layers),
        depth=pl.col("layer") / max(n_layers - 1, 1),
        partial=pl.lit(status.state != "done"),
    )


def _at(curves: pl.DataFrame, group: str) -> dict[int, float]:
    rows = curves.filter(pl.col("group") == group)
    return dict(zip(rows["layer"].to_list(), rows["mean"].to_list(), strict=True))


def handoff(ms: ModelStudy) -> dict[str, Any] | None:
    """Where the value sits (``resid_pre``, see the module docstring): ``value_until`` (the last
    layer whose mean at the value's token is ≥ 0.5) and ``handoff`` (the first layer whose mean
    at the last token is ≥ 0.5), each with its relative depth (``*_depth``) and mean
    (``*_mean``); ``between``: the layers strictly between them; ``partial``: from an unfinished
    build's shards. ``None`` when not patched."""
    curves = depth_curves(ms)
    if curves.is_empty():
        return None
    n_layers = int(curves["n_layers"][0])
    value, last = _at(curves, "value"), _at(curves, "last")
    held = [la for la in sorted(value) if value[la] >= HELD]
    late = [la for la in sorted(last) if last[la] >= HELD]
    out: dict[str, Any] = {
        "n_layers": n_layers,
        "pairs": int(curves["n"].max()),
        "partial": bool(curves["partial"].any()),
    }
    for key, found, means in (
        ("value_until", held[-1] if held else None, value),
        ("handoff", late[0] if late else None, last),
    ):
        out[key] = found
        out[f"{key}_depth"] = None if found is None else round(found / max(n_layers - 1, 1), 3)
        out[f"{key}_mean"] = None if found is None else means[found]
    low = -1 if out["value_until"] is None else out["value_until"]
    high = n_layers if out["handoff"] is None else out["handoff"]
    out["between"] = list(range(low + 1, high))
    return out


def carriers(ms: ModelStudy, site: str = "resid_pre") -> list[dict[str, Any]] | None:
    """Which token group carries the value at each depth: the group of largest mean at each
    layer of ``site``, as stretches of layers ``{first, last, group, low, high}`` (the smallest
    and largest of those means); ``None`` when not patched."""
    curves = depth_curves(ms, site)
    if curves.is_empty():
        return None
    best = (
        curves.sort("mean", descending=True, nulls_last=True)
        .group_by("layer", maintain_order=True)
        .first()
        .sort("layer")
    )
    out: list[dict[str, Any]] = []
    for layer, group, mean in best.select("layer", "group", "mean").iter_rows():
        if out and out[-1]["group"] == group and out[-1]["last"] == layer - 1:
            out[-1].update(
                last=layer, low=min(out[-1]["low"], mean), high=max(out[-1]["high"], mean)
            )
        else:
            out.append({"first": layer, "last": layer, "group": group, "low": mean, "high": mean})
    return [{**s, "low": round(s["low"], 3), "high": round(s["high"], 3)} for s in out]  # fmt: skip


def strongest_write(ms: ModelStudy, site: str) -> dict[str, Any] | None:
    """The ``site`` cell (layer, token role) of largest mean over pairs on the slice grid (e.g.
    ``attn_out``: which attention layer writes the value onto which token; ``partial``: from an
    unfinished build); ``None`` when not patched or the grid has no such site."""
    values, status = slice_values(ms)
    if values.is_empty():
        return None
    cells = (
        values.filter(pl.col("site") == site, pl.col("token_role").is_not_null())
        .group_by(["layer", "token_role"])
        .agg(pl.col("value").mean().alias("mean"), pl.len().alias("n"))
        .sort(["mean", "layer", "token_role"], descending=[True, False, False])
    )
    if cells.is_empty():
        return None
    top = cells.row(0, named=True)
    n_layers = int(values["layer"].max()) + 1
    return {
        "site": site,
        "layer": top["layer"],
        "depth": round(top["layer"] / max(n_layers - 1, 1), 3),
        "role": top["token_role"],
        "mean": round(top["mean"], 3),
        "pairs": top["n"],
        "partial": status.state != "done",
    }


def stream_crossing(ms: ModelStudy) -> dict[str, Any] | None:
    """Whole-stream patching: the first layer where the last token alone carries more than
    every position before it (``stream-last`` mean > ``stream-before-last`` mean), with both
    means there; ``None`` unless both steps are done."""
    states = [step_status(ms, f"stream-{span}") for span in ("before-last", "last")]
    if ms.study is None or any(s.state != "done" for s in states):
        return None
    means = []
    for status in states:
        values = ms.study.pair_values(status.version, METRIC)
        means.append(dict(values.group_by("layer").agg(pl.col("value").mean()).iter_rows()))
    before, last = means
    n_layers = max(before) + 1
    cross = [la for la in sorted(last) if last[la] > before.get(la, np.inf)]
    at = cross[0] if cross else None
    return {
        "layer": at,
        "depth": None if at is None else round(at / max(n_layers - 1, 1), 3),
        "before_last": None if at is None else round(before[at], 3),
        "last": None if at is None else round(last[at], 3),
        "pairs": states[0].pairs,
    }


def top_heads(ms: ModelStudy, n: int = 3) -> dict[str, Any] | None:
    """The ``n`` heads (``head_z``) of largest mean over pairs of the ``heads`` step, with the
    position set they were patched at; ``None`` unless the step is done."""
    from seqpatch.charts.style import span_title

    status = step_status(ms, "heads")
    if status.state != "done" or ms.study is None:
        return None
    ref = ms.study.ref("patching", status.version)
    values = ms.study.pair_values(status.version, METRIC)
    cells = (
        values.group_by(["layer", "head"])
        .agg(pl.col("value").mean().alias("mean"), pl.len().alias("n"))
        .sort(["mean", "layer", "head"], descending=[True, False, False])
    )
    return {
        "positions": span_title(Study.grid(ref)["positions"]),
        "layers": sorted(set(values["layer"].to_list())),
        "top": [
            {"layer": la, "head": h, "mean": m, "pairs": k}
            for la, h, m, k in cells.head(n).iter_rows()
        ],
        "next": round(cells["mean"][n], 3) if cells.height > n else None,
    }


def tracing_facts(ms: ModelStudy) -> dict[str, Any] | None:
    """Causal tracing: programs, mean clean and corrupted P(answer), the noise scale, and the
    (kind, layer, role) of the largest average indirect effect; ``None`` unless done."""
    status = step_status(ms, "tracing")
    if status.state != "done" or ms.study is None:
        return None
    ref = ms.study.ref("tracing", status.version)
    rows = ms.study.rows(ref)
    by_role = ms.study.tracing_roles(status.version)
    peak = by_role.sort(["aie", "layer"], descending=[True, False]).row(0, named=True)
    n_layers = len(set(by_role["layer"].to_list()))
    return {
        "programs": len(rows),
        "clean": float(np.mean(rows["clean_prob"])),
        "corrupted": float(np.mean(rows["corrupted_prob"])),
        "noise_scale": float(rows[0]["noise_scale"]),
        "peak": {
            "kind": peak["kind"],
            "layer": peak["layer"],
            "depth": round(peak["layer"] / max(n_layers - 1, 1), 3),
            "role": peak["role"],
            "aie": round(peak["aie"], 3),
        },
    }


def das_facts(ms: ModelStudy) -> list[dict[str, Any]] | None:
    """DAS at its top cells (the ``das`` step's ``summary.json``, read through ``Study`` on the
    ``das-pairs`` version): per cell the full patch's IIA, the smallest ``k`` within tolerance
    (``smallest_k``) and DAS's IIA there, or, where no ``k`` gets within tolerance
    (``smallest_k`` ``None``), DAS's best IIA and its ``k`` (the smallest of ties); then the
    shuffled and random controls at that ``k``. ``None`` unless done."""
    from seqpatch.charts.tokens import display_token

    das, pairs = ms.steps.get("das"), ms.steps.get("das-pairs")
    if not das or not pairs:
        return None
    study = Study(ms.data_dir, pairs=pairs["version"])
    if not study.store.find("das", das["version"]):
        return None
    table = study.das(das["version"])
    facts = []
    for cell in study.das_summary(das["version"]):
        at = table.filter(
            (pl.col("site") == cell["site"])
            & (pl.col("layer") == cell["layer"])
            & (pl.col("position") == cell["position"])
        )
        k = cell["smallest_k"]
        if k is None:
            trained = at.filter(pl.col("method") == "das").sort(
                ["iia", "k"], descending=[True, False]
            )
            k = int(trained["k"][0])
        iia = {m: float(v) for m, v in at.filter(pl.col("k") == k).select("method", "iia").rows()}
        facts.append(
            {
                "site": cell["site"],
                "layer": cell["layer"],
                "position": cell["position"],
                "full_iia": cell["full_iia"],
                "smallest_k": cell["smallest_k"],
                "k": k,
                "das_iia": iia["das"],
                "token": display_token(str(cell.get("token", ""))),
                "shuffled_iia": iia.get("shuffled"),
                "random_iia": iia.get("random"),
            }
        )
    return facts
