"""The study page: one self-contained HTML file per study, read from stored stages only.

``build_report(study)`` writes ``<data_dir>/reports/<pairs version>/index.html`` (or ``out``):
the findings computed from the data, accuracy and the model choice, how the pairs were made,
every patching grid (heatmaps, head grids, whole-stream lines, one pair's traces), the causal
trace, DAS, and the lineage of every version. Everything it shows comes from
``seqpatch.views.Study`` and the chart functions the stages use (``seqpatch.plots``,
``seqpatch.charts``); nothing is recomputed from a model and nothing is written into a stored
version.

The page needs no network: Vega, Vega-Lite and vega-embed are inlined once
(``vl_convert.javascript_bundle``), every chart is an embedded Vega-Lite spec rendered as SVG,
and the data behind the drill-down is one embedded JSON document. **Drill-down**: clicking a
cell of a patching chart shows, beside the charts, the cell's mean, std, n and 95% CI, the
distribution of its values over pairs, and the pairs that drive the mean (both programs, both
answers). Hover tooltips carry mean, std, n and the 95% CI of the mean.
"""

from __future__ import annotations

import html
import json
import math
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from seqpatch.errors import SeqpatchError
from seqpatch.report_assets import SCRIPT, STYLE, TEMPLATE, script_json, vega_bundle

if TYPE_CHECKING:
    from seqpatch.store import StageRef
    from seqpatch.views import Study

REPORTS_DIR = "reports"
PAGE = "index.html"
DEFAULT_METRIC = "normalised"
N_DRIVERS = 8  # pairs listed under a clicked cell


class ReportError(SeqpatchError):
    """A report that cannot be written as asked."""


def default_report_path(study: Study) -> Path:
    """``<data_dir>/reports/<pairs version>/index.html``: beside the stages, never inside a
    stored version."""
    return study.data_dir / REPORTS_DIR / study.pairs_ref.version / PAGE


def build_report(study: Study, out: str | Path | None = None, metric: str = DEFAULT_METRIC) -> Path:
    """Write the study's page (see the module docstring) and return its path.

    ``out`` is a file path (``….html``) or a folder (the page is ``index.html`` in it); it may
    not lie inside a stored version. ``metric`` is the patching metric drawn and drilled into.
    """
    from seqpatch.stages.patching import METRICS

    if metric not in METRICS:
        raise ReportError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    path = _out_path(study, out)
    page = _Page(study, metric)
    content = page.render()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)
    return path


def _out_path(study: Study, out: str | Path | None) -> Path:
    if out is None:
        return default_report_path(study)
    path = Path(out)
    if path.suffix.lower() not in (".html", ".htm"):
        path = path / PAGE
    resolved = path.resolve()
    stages = study.store.data_dir.resolve()
    if stages in resolved.parents:
        inside = resolved.relative_to(stages).parts
        if len(inside) >= 2 and inside[0] in study.store.stages():
            raise ReportError(
                f"{path} lies inside the stored version {inside[0]}/{inside[1]}, which never "
                f"changes; write the report elsewhere (default: {default_report_path(study)})"
            )
    return path


# ---------------------------------------------------------------------------------------------
# The page


class _Page:
    """Collects sections (HTML), charts (Vega-Lite specs) and the drill-down data."""

    def __init__(self, study: Study, metric: str) -> None:
        self.study = study
        self.metric = metric
        self.charts: list[dict[str, Any]] = []
        self.drill: dict[str, Any] = {}
        self.pair_index: dict[str, int] = {}
        self.pair_rows: list[list[Any]] = []

    def render(self) -> str:
        study = self.study
        choice = study.choice()
        sections = [
            self._findings(),
            self._accuracy(choice),
            self._pairs(),
            *self._patching(),
            self._tracing(),
            self._das(),
            self._lineage(),
        ]
        sections = [s for s in sections if s]
        title = (
            f"seqpatch study · {choice.get('model_id') or choice.get('model')} · "
            f"{choice.get('family')} · seq_len {choice.get('seq_len')}"
        )
        data = {
            "charts": self.charts,
            "drill": self.drill,
            "pairs": self.pair_rows,
            "metric": self.metric,
            "n_drivers": N_DRIVERS,
        }
        nav = "".join(
            f'<a href="#{_e(anchor)}">{_e(name)}</a>' for anchor, name in self._nav(sections)
        )
        return TEMPLATE.format(
            title=_e(title),
            subtitle=_e(
                f"pairs {study.pairs_ref.version} in {study.data_dir} · written "
                f"{datetime.now(UTC).isoformat(timespec='seconds')} from stored versions only"
            ),
            nav=nav,
            sections="\n".join(sections),
            style=STYLE,
            vega=vega_bundle(),
            data=script_json(data),
            script=SCRIPT,
        )

    @staticmethod
    def _nav(sections: list[str]) -> list[tuple[str, str]]:
        out = []
        for section in sections:
            start = section.find('id="') + 4
            anchor = section[start : section.find('"', start)]
            heading = section[section.find("<h2>") + 4 : section.find("</h2>")]
            out.append((anchor, html.unescape(heading)))
        return out

    def chart(self, spec: Any, drill: str | None = None, css: str = "chart") -> str:
        """A placeholder for ``spec`` (an altair chart, a Vega-Lite dict, or a function that
        draws one), rendered by the page's script; ``drill`` names the patching version a click
        drills into. A chart that cannot be drawn (``ChartError``: e.g. a metric the grid has
        no values of) becomes a one-line note."""
        from seqpatch.charts import ChartError
        from seqpatch.charts.style import font_family

        if callable(spec):
            try:
                spec = spec()
            except ChartError as err:
                return f'<p class="note">Not drawn: {_e(err)}</p>'
        spec_dict = spec if isinstance(spec, dict) else spec.to_dict()
        spec_dict.setdefault("config", {}).setdefault("font", font_family())
        _add_ci_tooltips(spec_dict)
        chart_id = f"chart-{len(self.charts)}"
        self.charts.append({"id": chart_id, "spec": spec_dict, "drill": drill})
        hint = '<p class="hint">Click a cell to see the pairs behind its mean.</p>' if drill else ""
        return f'{hint}<div class="{css}" id="{chart_id}"></div>'

    # -- sections --------------------------------------------------------------------------

    def _findings(self) -> str:
        study = self.study
        top = study.findings(self.metric)
        if top.is_empty():
            return _section(
                "findings", "Findings", "<p>No patching grid is stored for these pairs yet.</p>"
            )
        parts = [
            "<p>Computed from the stored grids when this page was written (mean "
            f"<code>{_e(self.metric)}</code> over pairs, 95% intervals of the mean).</p>"
        ]
        moves = study.moves(self.metric)
        if not moves.is_empty():
            path = moves.select(
                "site",
                pl.col("divergence_index").alias("k"),
                pl.col("version").alias("patching"),
                pl.col("changed_until").alias("changed token strongest through layer"),
                pl.col("answer_from").alias("answer's position strongest from layer"),
                pl.col("path").alias("strongest cell per layer: token (role) mean"),
            )
            parts.append(
                "<h3>Where the value sits, layer by layer</h3><p>For each layer the cell with "
                "the largest mean: read down the layers, the value moves from the changed token "
                "(role <code>changed</code>, starred) to the token where the answer is read "
                "(<code>last</code>).</p>" + _table(path)
            )
        shown = top.with_columns(
            pl.format(
                "{} [{}, {}]",
                pl.col("mean").round(3),
                pl.col("ci_low").round(3),
                pl.col("ci_high").round(3),
            ).alias("mean [95% CI]")
        ).select(
            "version",
            "method",
            "site",
            pl.col("divergence_index").alias("k"),
            "rank",
            "layer",
            "head",
            "position",
            "label",
            "role",
            "mean [95% CI]",
            "n",
        )
        parts.append(
            "<h3>The strongest cell per grid, site and k</h3>"
            + _table(shown.filter(pl.col("rank") == 1).drop("rank"))
            + f"<details><summary>the {shown['rank'].max()} strongest</summary>"
            + _table(shown)
            + "</details>"
        )
        das = []
        for ref in study.refs("das"):
            for cell in study.das_summary(ref.version):
                smallest = cell.get("smallest_k")
                das.append(
                    f"<li>DAS {_e(ref.version)}: {_e(cell['site'])} L{cell['layer']} position "
                    f"{cell['position']} ('{_e(cell['token'])}'): full-vector IIA "
                    f"{_fmt(cell.get('full_iia'))}; "
                    + (
                        f"a {smallest}-dimensional subspace is within tolerance of it"
                        if smallest is not None
                        else "no subspace tried comes within tolerance of it"
                    )
                    + "</li>"
                )
        if das:
            parts.append("<h3>Distributed alignment search</h3><ul>" + "".join(das) + "</ul>")
        return _section("findings", "Findings", "".join(parts))

    def _accuracy(self, choice: dict[str, Any]) -> str:
        from seqpatch.charts import accuracy_figure

        study = self.study
        if not study.refs("benchmark"):
            return ""
        summary = study.benchmark()
        chosen = choice.get("chosen")
        chart = accuracy_figure(
            summary,
            threshold=chosen["min_accuracy"] if chosen else None,
            chosen=(chosen["model_id"], chosen["seq_len"]) if chosen else None,
            version=study.ref("benchmark").version,
        )
        text = (
            f"<p>Studied: <b>{_e(choice.get('model'))}</b> ({_e(choice.get('model_id'))}) on "
            f"<b>{_e(choice.get('family'))}</b> programs of <b>{choice.get('seq_len')}</b> "
            "statements.</p>"
        )
        if chosen:
            text += (
                f"<p>Choice: {_e(chosen.get('rule'))} → {_e(chosen.get('model_spec'))} at "
                f"seq_len {chosen.get('seq_len')} (accuracy {_fmt(chosen.get('accuracy'))} "
                f"[{_fmt(chosen.get('ci_low'))}, {_fmt(chosen.get('ci_high'))}], "
                f"n = {chosen.get('n')}).</p>"
            )
            if chosen.get("seq_len") != choice.get("seq_len"):
                text += (
                    f"<p class='note'>The pairs use seq_len {choice.get('seq_len')}, not the "
                    f"chosen {chosen.get('seq_len')}: the study capped the length.</p>"
                )
        table = summary.select(
            "model_id", "family", "seq_len", "n", "accuracy", "ci_low", "ci_high"
        ).with_columns(pl.col("accuracy", "ci_low", "ci_high").round(3))
        return _section(
            "accuracy",
            "Accuracy and the choice",
            text
            + self.chart(chart)
            + "<details><summary>table</summary>"
            + _table(table)
            + "</details>",
        )

    def _pairs(self) -> str:
        stats = self.study.pair_stats()
        rejections = pl.DataFrame(
            {
                "reason": list(stats["rejections"]),
                "count": [int(v) for v in stats["rejections"].values()],
            }
        )
        text = (
            f"<p>{stats['accepted']} pairs kept of {stats['candidates']} candidates drawn "
            f"(pairs {self.study.pairs_ref.version}). A pair is kept only when the model answers "
            "both programs correctly.</p>"
        )
        if stats.get("changes_drawn") is not None:
            text += (
                f"<p>{stats['changes_drawn']} changes were drawn in all; redrawn changes count "
                "as <code>token_length</code> and <code>equal_answers</code> rejections.</p>"
            )
        return _section(
            "pairs",
            "Pairs",
            text
            + "<h3>Rejections by reason</h3>"
            + _table(rejections)
            + "<h3>Kept pairs per divergence index k</h3>"
            + _table(stats["by_k"].rename({"divergence_index": "k"})),
        )

    def _patching(self) -> list[str]:
        from seqpatch import plots
        from seqpatch.stages.patching import DEFAULT_AXES, grid_axes

        study = self.study
        sections = []
        pairs_rows = study.rows(study.pairs_ref)
        for ref in study.patching_refs():
            grid = study.grid(ref)
            rows = study.rows(ref)
            axes = grid_axes(rows)
            self.drill[ref.version] = self._drill_data(ref)
            body = f"<p>{_e(_grid_description(grid))}</p>"
            body += self.chart(partial(plots.heatmap_chart, rows, self.metric), drill=ref.version)
            if axes == DEFAULT_AXES:
                body += "<h3>One pair's traces</h3>" + self.chart(
                    partial(_traces, rows, self.metric, pairs_rows)
                )
            elif axes == ("layer", "head", "pos"):
                body += "<h3>The strongest heads by position</h3>" + self.chart(
                    partial(plots.top_heads_chart, rows, self.metric)
                )
            title = f"Patching {ref.version}: {', '.join(grid['sites'])} over " + ",".join(axes)
            if grid["method"] == "attribution":
                title += " (attribution estimate)"
            sections.append(_section(f"patching-{ref.version}", title, body))
        return sections

    def _drill_data(self, ref: StageRef) -> dict[str, Any]:
        """Per ``site|k``: the pairs (indices into the page's pair table) and, per cell
        ``layer|head|position``, each pair's value (null where it has none).

        A ``--positions slice`` grid is drawn by token role (its chart's cells are roles, the
        same role sitting at different positions in pairs of different layouts): its cells are
        keyed ``layer|head|role`` instead, each pair contributing its own token of that role
        (``by_role``), so a click on a role's cell finds the values its mean was taken over."""
        values = self.study.pair_values(ref.version, self.metric)
        groups: dict[str, Any] = {}
        if values.is_empty():
            return groups
        by_role = self.study.grid(ref)["positions"] == "slice"
        if by_role:
            values = values.filter(pl.col("token_role").is_not_null()).with_columns(
                position=pl.col("token_role"), label=pl.col("token_role")
            )
        for (site, k), part in values.group_by(["site", "divergence_index"], maintain_order=True):
            ids = part["pair_id"].unique(maintain_order=True).to_list()
            order = {pid: i for i, pid in enumerate(ids)}
            cells: dict[str, list[float | None]] = {}
            for pid, layer, head, pos, label, value in zip(
                part["pair_id"],
                part["layer"],
                part["head"],
                part["position"],
                part["label"],
                part["value"],
                strict=True,
            ):
                key = f"{layer}|{'' if head is None else head}|{'' if pos is None else pos}"
                if key not in cells:
                    cells[key] = [None] * len(ids)
                    cells[f"{key}#label"] = label
                cells[key][order[pid]] = round(float(value), 4)
            groups[f"{site}|{k}"] = {
                "pairs": [self._pair(pid) for pid in ids],
                "cells": cells,
                "by_role": by_role,
            }
        return groups

    def _pair(self, pair_id: str) -> int:
        if not self.pair_index:
            frame = self.study.pairs()
            for row in frame.iter_rows(named=True):
                self.pair_index[row["pair_id"]] = len(self.pair_rows)
                self.pair_rows.append(
                    [
                        row["pair_id"],
                        row["divergence_index"],
                        row["program_a"],
                        row["program_b"],
                        row["ground_truth_a"],
                        row["ground_truth_b"],
                        row.get("statement_a"),
                        row.get("statement_b"),
                    ]
                )
        return self.pair_index[pair_id]

    def _tracing(self) -> str:
        from seqpatch import plots

        study = self.study
        body = ""
        for ref in study.refs("tracing"):
            cfg = ref.provenance.get("config", {})
            chart = plots.tracing_chart(
                study.rows(ref), study.choice().get("model_id"), cfg.get("noise_scale")
            )
            roles = study.tracing_roles(ref.version)
            strongest = (
                roles.sort("aie", descending=True).group_by("kind", maintain_order=True).first()
            )
            body += f"<h3>Tracing {_e(ref.version)}</h3>" + self.chart(chart)
            body += "<p>Strongest average indirect effect by token role, per kind:</p>" + _table(
                strongest.with_columns(pl.col("aie").round(3))
            )
        return _section("tracing", "Causal tracing (ROME)", body) if body else ""

    def _das(self) -> str:
        study = self.study
        body = ""
        for ref in study.refs("das"):
            frame = study.das(ref.version)
            parents = ", ".join(f"{p['stage']}/{p['version']}" for p in ref.parents)
            body += f"<h3>DAS {_e(ref.version)} (from {_e(parents)})</h3>"
            body += self.chart(_das_chart(study.rows(ref)))
            splits = frame.select("n_train", "n_val", "n_test").unique()
            body += (
                "<p>Pairs per split (train / validation / test): "
                + ", ".join(f"{a} / {b} / {c}" for a, b, c in splits.iter_rows())
                + ".</p>"
            )
            body += (
                "<details><summary>table</summary>"
                + _table(frame.with_columns(pl.col(pl.Float32, pl.Float64).round(3)))
                + "</details>"
            )
        return _section("das", "Distributed alignment search", body) if body else ""

    def _lineage(self) -> str:
        frame = self.study.lineage()
        rows = []
        for row in frame.iter_rows(named=True):
            config = json.dumps(json.loads(row["config"]), indent=1)
            rows.append(
                "<tr>"
                + "".join(
                    f"<td>{_e(row[c])}</td>"
                    for c in ("stage", "version", "parents", "model_id", "revision", "rows")
                )
                + f"<td>{_e(row['created'])}</td>"
                + f"<td><details><summary>config</summary><pre>{_e(config)}</pre></details></td>"
                + "</tr>"
            )
        head = "".join(
            f"<th>{h}</th>"
            for h in ("stage", "version", "parents", "model", "revision", "rows", "created", "")
        )
        return _section(
            "lineage",
            "Lineage",
            f"<p>Every stored version this page reads, in {_e(self.study.data_dir)}.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>",
        )


# ---------------------------------------------------------------------------------------------
# Helpers


def _grid_description(grid: dict[str, Any]) -> str:
    axes = ",".join(grid["axes"])
    what = {
        "layer,pos": "one (layer, token) cell at a time",
        "layer,head": "one head at every position at once",
        "layer,head,pos": "one head at one token",
        "layer": f"every position of the set '{grid['positions']}' at once, per layer",
    }.get(axes, axes)
    method = (
        "Attribution patching: first-order estimates of the effect, not exact patching."
        if grid["method"] == "attribution"
        else "Exact activation patching of A's activation into B's run."
    )
    selection = (
        f" Cells: {grid['positions']}."
        if "pos" in grid["axes"] and grid["positions"] != "all"
        else ""
    )
    return f"{method} Sites {', '.join(grid['sites'])}; each cell patches {what}.{selection}"


def _traces(rows: Any, metric: str, pairs: Any) -> Any:
    """One pair's traces (the first pair's, as the patching stage draws them)."""
    from seqpatch import plots

    return plots.traces_chart(rows, metric, pairs=pairs)[0]


def _das_chart(rows: Any) -> Any:
    """The DAS stage's own IIA-vs-k chart, drawn from its table."""
    from seqpatch.charts import iia_figure
    from seqpatch.stages.das import table

    return iia_figure(table(rows))


def _add_ci_tooltips(spec: Any) -> None:
    """Give every data row with ``mean, std, count`` a ``ci95`` text (the 95% interval of the
    mean, ``seqpatch.views.confidence_interval``) and every tooltip that shows ``std`` a line
    for it, in place."""
    from seqpatch.views import confidence_interval

    def rows(values: Any) -> None:
        for row in values if isinstance(values, list) else []:
            if isinstance(row, dict) and {"mean", "std", "count"} <= row.keys():
                if row["mean"] is None or row["std"] is None:
                    row["ci95"] = ""
                    continue
                low, high = confidence_interval(row["mean"], row["std"], row["count"])
                row["ci95"] = (
                    f"[{float(low):.3f}, {float(high):.3f}]" if math.isfinite(low) else "n < 2"
                )

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasets" and isinstance(value, dict):
                    for data in value.values():
                        rows(data)
                elif key == "values":
                    rows(value)
                elif key == "tooltip" and isinstance(value, list):
                    fields = {t.get("field") for t in value if isinstance(t, dict)}
                    if "std" in fields and "ci95" not in fields:
                        value.append({"field": "ci95", "type": "nominal", "title": "95% CI"})
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(spec)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{float(value):.3f}"


def _table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in frame.iter_rows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'
