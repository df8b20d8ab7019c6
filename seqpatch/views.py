"""Labelled results of one study, read from stored versions only (notebooks, the report page).

A **study** is one stored ``pairs`` version with everything around it: the ``benchmark`` and
``programs`` it came from, the model choice, and every ``activations``, ``patching``,
``tracing`` and ``das`` version built from those pairs. ``Study(data_dir)`` takes the newest
pairs version; ``Study(data_dir, pairs="1279")`` another one. Nothing is recomputed from a
model: rows come through ``Store.load_ref`` (sizes and row counts checked) and artifacts
(DAS's ``summary.json``) through ``read_artifact`` (their recorded SHA-256 checked).

Results are **polars long frames**, one row per labelled value (``study.patching().filter(...)``):

- ``patching()`` — per (patching version, site, ``k`` = divergence index, layer, head, position,
  metric): ``mean, std, n`` over pairs and the 95% confidence interval of the mean
  (``ci_low, ci_high``: mean ± 1.96 · sample std / √n), with the position's token ``label`` (from
  the example pair, decoded for display: ``·`` a space, ``↵`` a newline, ``*`` where A and B
  differ) and its ``role`` in the program (``changed``, ``after``, ``last``, …);
- ``pair_values()`` — the same cells per pair (the drill-down behind a mean);
- ``tracing()`` / ``tracing_roles()`` — ROME's average indirect effect by position and by role;
- ``das()`` / ``das_summary()`` — interchange accuracy per cell, k and method;
- ``benchmark()`` and ``choice()`` — accuracy with Wilson intervals and the chosen model;
- ``pairs()`` and ``pair_stats()`` — the programs, answers and why candidates were rejected;
- ``lineage()`` — every version with its parents, model and config;
- ``findings()``, ``flow()``, ``moves()`` — the strongest cells, the strongest cell of each
  layer, and where the value moves from its token to the answer.

Token roles stored with the rows (``roles``) appear per pair as ``token_role``.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from seqpatch.cells import (
    ANSWER_ROLE,
    CHANGED_ROLE,
    confidence_interval,
    display_token,
    position_roles,
    summarise_values,
    values_of_rows,
)
from seqpatch.errors import SeqpatchError

__all__ = [
    "Study",
    "StudyError",
    "confidence_interval",
    "display_token",
    "position_roles",
    "read_artifact",
]

if TYPE_CHECKING:
    import os

    from datasets import Dataset

    from seqpatch.store import StageRef


class StudyError(SeqpatchError):
    """A study that cannot be read as asked (no such stage or version in it)."""


class Study:
    """The stored results around one pairs version of ``data_dir`` (see the module docstring)."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, pairs: str = "latest"):
        from seqpatch.store import Store

        self.store = Store(data_dir)
        self.data_dir = self.store.data_dir
        self.pairs_ref = self.store.resolve("pairs", pairs)
        self._rows: dict[tuple[str, str], Dataset] = {}
        self._values: dict[tuple[str, str], pl.DataFrame] = {}  # (version, metric): pair values
        self._summaries: dict[tuple[str, str], Any] = {}

    def __repr__(self) -> str:
        counts = ", ".join(f"{stage} {len(self.refs(stage))}" for stage in self.STAGES)
        return f"Study({str(self.data_dir)!r}, pairs={self.pairs_ref.version!r}: {counts})"

    STAGES = ("programs", "benchmark", "pairs", "activations", "patching", "tracing", "das")

    # -- which versions belong to the study --------------------------------------------------

    def refs(self, stage: str) -> list[StageRef]:
        """The study's stored versions of ``stage``, oldest first: the pairs' ancestors
        (``benchmark``, ``programs``), the pairs version, or the versions built from it."""
        if stage not in self.STAGES:
            raise StudyError(f"unknown stage {stage!r}; a study has {', '.join(self.STAGES)}")
        if stage == "pairs":
            return [self.pairs_ref]
        if stage in ("benchmark", "programs"):
            return [ref for ref in self._ancestors if ref.stage == stage]
        return [
            ref
            for ref in self.store.versions(stage)
            if self._parent_version(ref, "pairs") == self.pairs_ref.version
        ]

    def ref(self, stage: str, version: str | None = None) -> StageRef:
        """One version of ``stage`` in the study: ``version`` (or a unique prefix), else the
        newest."""
        refs = self.refs(stage)
        if not refs:
            raise StudyError(
                f"the study of pairs {self.pairs_ref.version} in {self.data_dir} has no {stage} "
                f"stage; build it from those pairs (`seqpatch build {stage} --pairs "
                f"{self.pairs_ref.version}`)"
            )
        if version is None:
            return refs[-1]
        found = [ref for ref in refs if ref.version.startswith(version)]
        if len(found) != 1:
            known = ", ".join(ref.version for ref in refs)
            raise StudyError(f"{stage} version {version!r} is not one of this study's: {known}")
        return found[0]

    def rows(self, ref: StageRef) -> Dataset:
        """The rows of a stored version (loaded once per study)."""
        key = (ref.stage, ref.version)
        if key not in self._rows:
            self._rows[key] = self.store.load_ref(ref)
        return self._rows[key]

    @cached_property
    def _ancestors(self) -> list[StageRef]:
        out = []
        queue = list(self.pairs_ref.parents)
        while queue:
            parent = queue.pop(0)
            ref = self.store.find(parent.get("stage", ""), parent.get("version") or "")
            if ref is not None and ref not in out:
                out.append(ref)
                queue.extend(ref.parents)
        return out

    @staticmethod
    def _parent_version(ref: StageRef, stage: str) -> str | None:
        return next((p.get("version") for p in ref.parents if p.get("stage") == stage), None)

    # -- lineage, benchmark, choice, pairs ----------------------------------------------------

    def lineage(self) -> pl.DataFrame:
        """Every version of the study: ``stage, version, parents, model_id, revision,
        schema_version, rows, created, config`` (JSON), ``path``."""
        records = []
        for stage in self.STAGES:
            for ref in self.refs(stage):
                prov = ref.provenance
                model = prov.get("model") or {}
                records.append(
                    {
                        "stage": stage,
                        "version": ref.version,
                        "parents": ", ".join(f"{p['stage']}/{p['version']}" for p in ref.parents),
                        "model_id": model.get("id") if isinstance(model, dict) else None,
                        "revision": model.get("revision") if isinstance(model, dict) else None,
                        "schema_version": prov.get("schema_version"),
                        "rows": prov.get("row_count"),
                        "created": prov.get("created"),
                        "config": json.dumps(prov.get("config", {}), sort_keys=True),
                        "path": str(ref.path),
                    }
                )
        return pl.DataFrame(records)

    def benchmark(self) -> pl.DataFrame:
        """Accuracy per (model, family, length) of the study's benchmark, with Wilson 95%
        intervals (``seqpatch.stages.benchmark.summarize`` of its rows)."""
        from seqpatch.stages.benchmark import summarize

        return summarize(self.rows(self.ref("benchmark")))

    def choice(self) -> dict[str, Any]:
        """The model and length studied: the pairs' config (``model``, ``family``, ``seq_len``),
        and the rule and accuracy of ``seqpatch choose`` when ``chosen_model.json`` was chosen
        from this study's benchmark (``chosen``; ``None`` otherwise)."""
        cfg = self.pairs_ref.provenance.get("config", {})
        out: dict[str, Any] = {
            "model": cfg.get("model"),
            "model_id": (self.pairs_ref.provenance.get("model") or {}).get("id"),
            "family": cfg.get("family"),
            "seq_len": cfg.get("seq_len"),
            "chosen": None,
        }
        path = self.data_dir / "chosen_model.json"
        bench = self.refs("benchmark")
        if path.is_file() and bench:
            try:
                chosen = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                chosen = None
            if isinstance(chosen, dict) and chosen.get("benchmark_version") == bench[-1].version:
                out["chosen"] = chosen
        return out

    def pairs(self) -> pl.DataFrame:
        """The study's pairs: ids, ``divergence_index``, both programs, the changed statements,
        both answers, whether the change can reach the query, token count."""
        columns = [
            "pair_id",
            "divergence_index",
            "seq_len",
            "program_a",
            "program_b",
            "statement_a",
            "statement_b",
            "ground_truth_a",
            "ground_truth_b",
            "affects_query",
            "n_tokens",
        ]
        rows = self.rows(self.pairs_ref)
        return pl.DataFrame({c: rows[c] for c in columns if c in rows.column_names})

    def pair_stats(self) -> dict[str, Any]:
        """How the pairs were made: ``candidates`` drawn, ``accepted``, ``rejections`` by reason
        (whole candidates and redrawn changes; ``changes_drawn``, a count of draws rather than
        a reason, is reported apart as ``changes_drawn``), and the accepted pairs per ``k``,
        with answers that differ and changes that can reach the query."""
        extra = dict(self.pairs_ref.provenance.get("extra") or {})
        rejections = dict(extra.get("rejections") or {})
        drawn = rejections.pop("changes_drawn", None)
        frame = self.pairs()
        by_k = (
            frame.group_by("divergence_index")
            .agg(
                pl.len().alias("pairs"),
                pl.col("affects_query").sum().alias("affects_query"),
                (pl.col("ground_truth_a") != pl.col("ground_truth_b"))
                .sum()
                .alias("answers_differ"),
            )
            .sort("divergence_index")
        )
        return {
            "candidates": extra.get("candidates"),
            "accepted": extra.get("accepted", frame.height),
            "rejections": rejections,
            "changes_drawn": drawn,
            "by_k": by_k,
        }

    # -- patching ------------------------------------------------------------------------------

    def patching_refs(self) -> list[StageRef]:
        return self.refs("patching")

    @staticmethod
    def grid(ref: StageRef) -> dict[str, Any]:
        """What a patching version's grid is: ``axes``, ``method``, ``positions``, ``sites``."""
        from seqpatch.stages.patching import DEFAULT_AXES

        cfg = ref.provenance.get("config", {})
        method = cfg.get("method", "auto")
        return {
            "version": ref.version,
            "axes": tuple(cfg.get("axes") or DEFAULT_AXES),
            "method": "attribution" if method == "attribution" else "exact",
            "positions": cfg.get("positions", "all"),
            "sites": tuple(cfg.get("sites", ())),
        }

    def patching(
        self, version: str | None = None, metrics: tuple[str, ...] | None = None
    ) -> pl.DataFrame:
        """Mean, std, ``n`` and 95% CI over pairs per cell, long: ``version, method, axes, span,
        site, divergence_index, layer, head, position, label, role, metric, mean, std, n,
        ci_low, ci_high`` (``head``/``position`` null on grids without that axis). ``version``
        ``None`` stacks every patching version of the study; ``metrics`` ``None``: all four.
        A ``--positions slice`` grid (pairs of different layouts) is summarised by token role:
        ``position`` null, ``label`` and ``role`` the role (``hop1:value``, ``last``…)."""
        from seqpatch.stages.patching import METRICS

        refs = self.patching_refs() if version is None else [self.ref("patching", version)]
        frames = []
        for ref in refs:
            by_role = self.grid(ref)["positions"] == "slice"
            for metric in metrics or METRICS:
                values = self.pair_values(ref.version, metric)
                if not values.is_empty():
                    frames.append(summarise_values(values, by_role))
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames, how="diagonal_relaxed")

    def pair_values(
        self,
        version: str | None = None,
        metric: str = "normalised",
        site: str | None = None,
        divergence_index: int | None = None,
    ) -> pl.DataFrame:
        """Every pair's value of ``metric`` at every cell: ``version, method, axes, span,
        site, divergence_index, pair_id, layer, head, position, label, role, metric, value,
        token_role`` (NaN cells — beyond a pair's length, not selected, undefined — left out;
        ``token_role``: that pair's own token's role in its program's data flow when the rows
        store ``roles``, else null). Where pairs
        of one ``k`` differ in token length their positions are aligned at the last token, as
        the stored heatmap aligns them (``label``/``role`` are then the longest pair's)."""
        from seqpatch.stages.patching import METRICS

        if metric not in METRICS:
            raise StudyError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        ref = self.ref("patching", version)
        key = (ref.version, metric)
        if site is None and divergence_index is None and key in self._values:
            return self._values[key]
        rows = self.rows(ref)
        if site is not None or divergence_index is not None:
            keep = np.ones(len(rows), dtype=bool)
            if site is not None:
                keep &= np.asarray(rows["site"]) == site
            if divergence_index is not None:
                keep &= np.asarray(rows["divergence_index"]) == divergence_index
            rows = rows.select(np.flatnonzero(keep))
        frame = values_of_rows(rows, ref.version, self.grid(ref), metric)
        if site is None and divergence_index is None:
            self._values[key] = frame
        return frame

    # -- tracing and DAS -------------------------------------------------------------------------

    def tracing(self, version: str | None = None) -> pl.DataFrame:
        """ROME's average indirect effect by position: ``version, divergence_index, kind,
        layer, position, label, aie, n_programs`` (the AIE over the programs of that ``k``;
        labels from its first program, ``*`` on the corrupted tokens)."""
        ref = self.ref("tracing", version)
        rows = self.rows(ref)
        summary = self._aie(ref)
        meta = rows.select_columns(["divergence_index", "tokens", "corrupted_positions"])
        k_col = np.asarray(meta["divergence_index"])
        records = []
        for ki, k in enumerate(summary["divergence_indices"]):
            first = meta[int(np.flatnonzero(k_col == k)[0])]
            marked = set(first["corrupted_positions"])
            labels = [
                display_token(tok) + ("*" if t in marked else "")
                for t, tok in enumerate(first["tokens"])
            ]
            block = summary["by_position"][ki]  # [kinds, layers, positions]
            for kind_i, kind in enumerate(summary["kinds"]):
                for li, layer in enumerate(summary["layers"]):
                    for t, label in enumerate(labels):
                        value = block[kind_i, li, t]
                        if not np.isnan(value):
                            records.append(
                                {
                                    "version": ref.version,
                                    "divergence_index": int(k),
                                    "kind": kind,
                                    "layer": int(layer),
                                    "position": t,
                                    "label": label,
                                    "aie": float(value),
                                    "n_programs": int((k_col == k).sum()),
                                }
                            )
        return pl.DataFrame(records)

    def tracing_roles(self, version: str | None = None) -> pl.DataFrame:
        """The AIE by token role (ROME's Figure 2 rows): ``kind, layer, role, aie``."""
        summary = self._aie(self.ref("tracing", version))
        return pl.DataFrame(
            [
                {"kind": kind, "layer": int(layer), "role": role, "aie": float(v)}
                for kind_i, kind in enumerate(summary["kinds"])
                for li, layer in enumerate(summary["layers"])
                for ri, role in enumerate(summary["roles"])
                if not np.isnan(v := summary["by_role"][kind_i, li, ri])
            ]
        )

    def _aie(self, ref: StageRef) -> dict[str, Any]:
        from seqpatch.stages.tracing import aie

        key = ("aie", ref.version)
        if key not in self._summaries:
            self._summaries[key] = aie(self.rows(ref))
        return self._summaries[key]

    def das(self, version: str | None = None) -> pl.DataFrame:
        """Interchange accuracy per ``(site, layer, position, k, method)`` of a DAS version
        (every stored column but the learned basis and the test pair ids)."""
        rows = self.rows(self.ref("das", version))
        keep = [c for c in rows.column_names if c not in ("basis", "test_pair_ids")]
        return pl.DataFrame(rows.select_columns(keep).to_dict())

    def das_summary(self, version: str | None = None) -> list[dict[str, Any]]:
        """The DAS version's ``summary.json`` (per cell: full-patch IIA, the smallest ``k``
        within tolerance of it, the controls at k = 1), checked against its recorded hash."""
        return json.loads(read_artifact(self.ref("das", version), "summary.json"))

    # -- findings --------------------------------------------------------------------------------

    def findings(self, metric: str = "normalised", n_top: int = 3) -> pl.DataFrame:
        """The ``n_top`` strongest cells (largest mean) per patching version, site and ``k`` of
        the study's ``layer,pos`` and ``layer,head`` grids, with their 95% intervals:
        ``version, method, site, divergence_index, rank, layer, head, position, label, role,
        mean, ci_low, ci_high, n``."""
        cells = self.patching(metrics=(metric,))
        if cells.is_empty():
            return cells
        keys = ["version", "site", "divergence_index"]
        return (
            cells.filter(pl.col("axes") != "layer", pl.col("n") > 0)
            .sort([*keys, "mean"], descending=[False, False, False, True], nulls_last=True)
            .with_columns(rank=pl.col("mean").cum_count().over(keys))
            .filter(pl.col("rank") <= n_top)
            .select(
                [
                    *keys[:1],
                    "method",
                    *keys[1:],
                    "rank",
                    "layer",
                    "head",
                    "position",
                    "label",
                    "role",
                    "mean",
                    "ci_low",
                    "ci_high",
                    "n",
                ]
            )
        )

    def flow(self, metric: str = "normalised") -> pl.DataFrame:
        """Where the value sits at each layer, per exact ``layer,pos`` version, site and ``k``:
        the strongest cell of that layer (largest mean) with its ``position, label, role, mean,
        ci_low, ci_high, n``. Read down the layers, it is the path of the value from the changed
        token (role ``changed``) to the token where the answer is read (role ``last``)."""
        cells = self.patching(metrics=(metric,))
        if cells.is_empty():
            return cells
        keys = ["version", "site", "divergence_index", "layer"]
        return (
            cells.filter(pl.col("axes") == "layer,position", pl.col("method") == "exact")
            .sort("mean", descending=True, nulls_last=True)
            .group_by(keys, maintain_order=True)
            .first()
            .select(*keys, "position", "label", "role", "mean", "ci_low", "ci_high", "n")
            .sort(keys)
        )

    def moves(self, metric: str = "normalised") -> pl.DataFrame:
        """One row per exact ``layer,pos`` version, site and ``k`` summarising ``flow``: the
        last layer whose strongest cell is a changed token (``changed_until``), the first layer
        whose strongest cell is the answer's position (``answer_from``; null if none), and the
        ``path`` — each stretch of layers with its strongest token and role."""
        flow = self.flow(metric)
        if flow.is_empty():
            return flow
        records = []
        for (version, site, k), group in flow.group_by(
            ["version", "site", "divergence_index"], maintain_order=True
        ):
            group = group.sort("layer")
            layers = group["layer"].to_list()
            roles = group["role"].to_list()
            changed = [
                layer for layer, role in zip(layers, roles, strict=True) if role == CHANGED_ROLE
            ]
            answer = [
                layer for layer, role in zip(layers, roles, strict=True) if role == ANSWER_ROLE
            ]
            steps: list[str] = []
            previous = None
            for row in group.iter_rows(named=True):
                here = (row["position"], row["role"])
                if here != previous:
                    steps.append(
                        f"L{row['layer']} {row['label']} ({row['role']}) {row['mean']:.2f}"
                    )
                previous = here
            records.append(
                {
                    "version": version,
                    "site": site,
                    "divergence_index": k,
                    "changed_until": max(changed) if changed else None,
                    "answer_from": min(answer) if answer else None,
                    "path": " → ".join(steps),
                }
            )
        schema = {"changed_until": pl.Int64, "answer_from": pl.Int64}
        return pl.DataFrame(records, schema_overrides=schema).sort(
            ["version", "site", "divergence_index"]
        )


def read_artifact(ref: StageRef, name: str) -> bytes:
    """The bytes of an artifact of a stored version, checked against the SHA-256 its provenance
    records (``DamagedVersionError`` if they differ or the file is not recorded)."""
    from seqpatch.store import DamagedVersionError

    record = (ref.provenance.get("files") or {}).get(name)
    path = ref.path / name
    if not isinstance(record, dict) or not path.is_file():
        raise DamagedVersionError(
            f"{ref.stage}/{ref.version} has no recorded {name}; rebuild it or run "
            f"`seqpatch verify {ref.stage}`"
        )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise DamagedVersionError(
            f"{ref.stage}/{ref.version}/{name} does not match its recorded hash; "
            f"`seqpatch verify {ref.stage} --clean` removes the damaged version, then rebuild it"
        )
    return data
