"""Altair charts that a reader understands without the README.

Charts never compute results: ``seqpatch.stages.patching`` (``aggregate``, ``example_frame``)
and ``seqpatch.stages.benchmark`` (``summarize``) turn stored datasets into the frames and arrays
drawn here. Every chart says on its face what it shows:

- **heatmap** (``heatmap_figure``): one group of panels per divergence index ``k`` (across),
  one panel per site inside a group (across, in the order given), layers on x, the tokens of
  one example pair on y (ROME's causal-trace layout), colour = mean effect over pairs. Every
  group's title carries its pair count; a caption under the chart says what the labels, ``*``
  and the colours mean. Sequential metrics (``normalised``) use a white-to-blue scale with
  0 = white; signed ones (``prob_delta``, ``logit_diff``) a diverging scale with 0 = white and
  blue = towards A's answer.
- **traces** (``traces_figure``): one pair, one line per patched token, labelled by its role
  (changed token, strongest other token, last token), sites in the heatmap's order and names.
- **accuracy** (``accuracy_figure``): accuracy by length per model (colour, shape and dash),
  Wilson 95% intervals, the choice threshold and the chosen (model, length) marked.

Everything is saved as a self-contained HTML page (no CDN) and as PNG through vl-convert
(``save_chart``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from seqpatch.errors import SeqpatchError

METRIC_TITLES = {
    "normalised": "normalised effect (0 = none, 1 = switched to A)",
    "prob_delta": "Δ P(B's answer)",
    "logit_diff": "logit(A's answer) − logit(B's answer)",
    "prob_delta_candidates": "Δ P(B's answer), softmax over the candidates",
}
LEGEND_TITLES = {
    "normalised": ["normalised", "effect"],
    "prob_delta": ["Δ P(B's", "answer)"],
    "logit_diff": ["logit(A) −", "logit(B)"],
    "prob_delta_candidates": ["Δ P(B's answer)", "(candidates)"],
}
# What the colours mean, one sentence per metric (the heatmap's caption, the traces' y axis).
METRIC_MEANINGS = {
    "normalised": (
        "Colour: mean normalised effect over pairs of patching A's activation into B at that "
        "(layer, token): 0 (white) = B's answer unchanged, 1 (dark blue) = B now prefers A's "
        "answer as much as A does."
    ),
    "prob_delta": (
        "Colour: mean change in the probability of B's answer when A's activation is patched "
        "into B at that (layer, token): 0 (white) = no change, −1 (blue) = B's answer lost, "
        "+1 (red) = B's answer strengthened."
    ),
    "logit_diff": (
        "Colour: mean logit(A's answer) − logit(B's answer) after patching A's activation into "
        "B at that (layer, token): 0 (white) = both answers equally likely, blue = prefers A's, "
        "red = prefers B's (as unpatched B does)."
    ),
    "prob_delta_candidates": (
        "Colour: mean change in the probability of B's answer among the answer candidates "
        "(softmax over the candidates only) when A's activation is patched into B at that "
        "(layer, token): 0 (white) = no change, −1 (blue) = B's answer lost, +1 (red) = "
        "strengthened."
    ),
}
SEQUENTIAL_METRICS = ("normalised",)
SIGNED_METRICS = ("prob_delta", "logit_diff", "prob_delta_candidates")
# Display names: two short lines so narrow panels keep them whole; joined with a space elsewhere.
SITE_TITLES: dict[str, tuple[str, str]] = {
    "resid_pre": ("residual stream", "(layer input)"),
    "resid_post": ("residual stream", "(layer output)"),
    "attn_out": ("attention", "output"),
    "mlp_out": ("MLP", "output"),
    "head_z": ("attention heads", "(o_proj input)"),
}
WHITE = "#ffffff"
TOWARDS_A = "#2166ac"  # blue: the patch moved B towards A's answer
TOWARDS_B = "#b2182b"  # red: B's answer held or strengthened
NO_DATA = "#d9d9d9"
ChartFormat = str


class ChartError(SeqpatchError):
    """A chart was asked for data it cannot draw (unknown metric, empty frame)."""


def site_title(site: str, sep: str = " ") -> str:
    """The display name of ``site`` (``resid_pre`` → ``residual stream (layer input)``)."""
    return sep.join(SITE_TITLES.get(site, (site,)))


def _check_metric(metric: str) -> None:
    if metric not in METRIC_MEANINGS:
        raise ChartError(f"unknown metric {metric!r}; use one of {', '.join(METRIC_MEANINGS)}")


def ordinal(n: int) -> str:
    """``1`` → ``1st``, ``2`` → ``2nd``, ``11`` → ``11th``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# ---------------------------------------------------------------------------------------------
# Colour scales


def color_scale(metric: str, values: Iterable[float] = ()) -> alt.Scale:
    """The colour scale of ``metric``; 0 is pure white on every scale.

    ``normalised``: sequential on ``[0, 1]`` (white → blue, clamped; the middle stop keeps
    effects of 0.1–0.2 visible). ``prob_delta``: diverging on ``[-1, 1]``, negative (B's answer
    lost) blue. ``logit_diff``: diverging, symmetric around 0 at the largest ``|value|``,
    positive (prefers A's answer) blue.
    """
    _check_metric(metric)
    if metric in SEQUENTIAL_METRICS:
        return alt.Scale(
            domain=[0, 0.5, 1], range=[WHITE, "#4292c6", "#08306b"], clamp=True, interpolate="lab"
        )
    if metric in ("prob_delta", "prob_delta_candidates"):
        return alt.Scale(
            domain=[-1, 0, 1], range=[TOWARDS_A, WHITE, TOWARDS_B], clamp=True, interpolate="lab"
        )
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    bound = _nice_ceiling(max(finite, default=1.0))
    return alt.Scale(
        domain=[-bound, 0, bound], range=[TOWARDS_B, WHITE, TOWARDS_A], interpolate="lab"
    )


def _nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^n that is ≥ ``x`` (a legend-friendly bound)."""
    if x <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(x))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= x - 1e-12)


# ---------------------------------------------------------------------------------------------
# Heatmap


def heatmap_caption(metric: str, missing: bool = False) -> list[str]:
    """The lines under the heatmap: what the token labels, ``*`` and the colours mean."""
    _check_metric(metric)
    lines = [
        "Rows: the tokens of one example pair per divergence index (B's prompt, numbered by "
        "position); * marks the tokens where A and B differ.",
        METRIC_MEANINGS[metric],
        "k = the statement that differs between A and B (counted from 0); each group of panels "
        "averages over the pairs that diverge there.",
    ]
    if metric == "normalised":
        lines.append("Values below 0 are drawn white and above 1 dark blue (clamped).")
    if missing:
        lines.append("Grey = no pair has a defined value at that cell.")
    return lines


def pairs_per_k(agg: Mapping[str, Any]) -> dict[int, int]:
    """Pairs per divergence index, read from an aggregate's counts (``patching.aggregate``).

    The largest cell count of each ``k`` (any site): a pair contributes to every cell it covers,
    except where its normalisation is undefined. Pass the exact counts to ``heatmap_figure``
    when you have them.
    """
    counts = np.asarray(agg["stats"])[:, :, 2]
    return {
        int(k): int(np.nan_to_num(counts[:, ki]).max())
        for ki, k in enumerate(agg["divergence_indices"])
    }


def count_pairs(rows: Any) -> dict[int, int]:
    """Distinct pairs per divergence index of patching rows (a ``Dataset`` or a frame with
    ``pair_id`` and ``divergence_index``): the counts ``heatmap_figure`` puts in its titles."""
    seen: dict[int, set[str]] = {}
    for pid, k in zip(rows["pair_id"], rows["divergence_index"], strict=True):
        seen.setdefault(int(k), set()).add(pid)
    return {k: len(ids) for k, ids in sorted(seen.items())}


def _panel_cells(
    panel: tuple[str, str], k: int, layers: Sequence[int], labels: list[str], **values: Any
) -> pl.DataFrame:
    """One panel of one divergence index as tidy cells, layer-major: the ``panel`` column (name,
    value), ``divergence_index, layer, position, label``, then ``values`` (each flattened from
    ``[layers, positions]``)."""
    n_pos = len(labels)
    return pl.DataFrame(
        {
            panel[0]: [panel[1]] * (len(layers) * n_pos),
            "divergence_index": [int(k)] * (len(layers) * n_pos),
            "layer": np.repeat(np.asarray(layers, dtype=np.int64), n_pos),
            "position": np.tile(np.arange(n_pos, dtype=np.int64), len(layers)),
            "label": labels * len(layers),
            **values,
        }
    )


def heatmap_cells(agg: Mapping[str, Any]) -> pl.DataFrame:
    """The aggregate as tidy cells: ``site, divergence_index, layer, position, label, mean, std,
    count`` (``count`` 0 and ``mean`` null where no pair has a value)."""
    stats = np.asarray(agg["stats"], dtype=np.float64)
    frames = []
    for si, site in enumerate(agg["sites"]):
        for ki, k in enumerate(agg["divergence_indices"]):
            labels = list(agg["labels"][k])
            n_pos = len(labels)
            layers = list(agg["layers"])
            block = stats[si, ki, :, :, :n_pos]  # (3, layers, positions)
            mean, std, count = (block[i].reshape(-1) for i in range(3))
            frames.append(
                _panel_cells(
                    ("site", site),
                    k,
                    layers,
                    labels,
                    mean=mean,
                    std=std,
                    count=np.nan_to_num(count).astype(np.int64),
                )
            )
    if not frames:
        raise ChartError("the aggregate has no cells to draw")
    cells = pl.concat(frames)
    return cells.with_columns(
        pl.when(pl.col("count") > 0).then(pl.col("mean")).otherwise(None).alias("mean"),
        pl.when(pl.col("count") > 0).then(pl.col("std")).otherwise(None).alias("std"),
    ).with_columns(pl.col("mean").fill_nan(None), pl.col("std").fill_nan(None))


def heatmap_figure(
    agg: Mapping[str, Any],
    metric: str | None = None,
    n_pairs_by_k: Mapping[int, int] | None = None,
    *,
    title: str | None = None,
    max_height: int = 900,
) -> alt.VConcatChart:
    """Layer × token heatmaps of an aggregate (``seqpatch.stages.patching.aggregate``).

    Layout: one group per divergence index (across), titled with its pair count
    (``n_pairs_by_k``, else ``pairs_per_k(agg)``); inside it one panel per site (across, in
    ``agg["sites"]`` order) sharing the token axis; layer labels horizontal. Row height shrinks
    with the number of tokens so the chart stays under ``max_height`` CSS pixels (PNGs are
    saved at 2×). A caption under the chart explains labels, ``*`` and colours.
    """
    metric = metric or agg.get("metric", "normalised")
    _check_metric(metric)
    cells = heatmap_cells(agg)
    counts = {int(k): int(v) for k, v in (n_pairs_by_k or pairs_per_k(agg)).items()}
    ks = [int(k) for k in agg["divergence_indices"]]
    sites = list(agg["sites"])
    layers = list(agg["layers"])
    n_pos = max(len(agg["labels"][k]) for k in agg["divergence_indices"])
    row_h, cell_w, font = _grid_sizes(n_pos, len(layers), max_height - 200)
    missing = bool(cells["mean"].null_count())
    scale = color_scale(metric, cells["mean"].drop_nulls().to_list())
    data = cells.with_columns(
        pl.col("site").replace_strict({s: site_title(s, "|") for s in sites}).alias("site_title"),
        pl.format("{} · {}", pl.col("label"), pl.col("position")).alias("token"),
    )
    groups = []
    for k in ks:
        block = data.filter(pl.col("divergence_index") == k)
        n_k = counts.get(k, 0)
        base = _layer_token_base(
            layers,
            cell_w,
            font,
            [
                alt.Tooltip("site:N"),
                alt.Tooltip("divergence_index:O", title="k"),
                alt.Tooltip("layer:O"),
                alt.Tooltip("position:O"),
                alt.Tooltip("label:N", title="token (example pair)"),
                alt.Tooltip("mean:Q", format=".3f"),
                alt.Tooltip("std:Q", format=".3f"),
                alt.Tooltip("count:Q", title="pairs in cell"),
            ],
        )
        values = base.mark_rect().encode(
            color=alt.Color("mean:Q", title=LEGEND_TITLES[metric], scale=scale)
        )
        empty = base.mark_rect(color=NO_DATA)
        cells_view = alt.layer(
            empty.transform_filter("datum.count == 0"),
            values.transform_filter("datum.count > 0"),
            data=block,
        ).properties(width=cell_w * len(layers), height=row_h * len(agg["labels"][k]))
        groups.append(
            _panel_group(
                cells_view,
                "site_title:N",
                [site_title(s, "|") for s in sites],
                alt.TitleParams(
                    f"k = {k} ({ordinal(k + 1)} statement changed) · "
                    f"{n_k} pair{'s' if n_k != 1 else ''}",
                    fontSize=13,
                    anchor="middle",
                ),
            )
        )
    total = sum(counts.get(k, 0) for k in ks)
    heading = title or (
        f"Activation patching A → B: where does the changed statement matter? ({total} pairs)"
    )
    return _grid_figure(
        groups,
        len(sites),
        cell_w * len(layers),
        heatmap_caption(metric, missing),
        heading,
        f"Mean {METRIC_TITLES[metric]} over pairs, per site, layer and token",
    )


def _grid_sizes(n_pos: int, n_layers: int, height: int) -> tuple[int, int, int]:
    """Row height, cell width and token label font size of a layer × token panel whose rows
    share ``height`` CSS pixels (what the figure's titles and caption leave)."""
    row_h = max(7, min(14, height // max(n_pos, 1)))
    cell_w = max(6, min(24, 240 // max(n_layers, 1)))
    font = max(7, min(11, row_h - 2))
    return row_h, cell_w, font


def _layer_token_base(
    layers: Sequence[int], cell_w: int, font: int, tooltip: list[alt.Tooltip]
) -> alt.Chart:
    """The encoding of a layer × token panel: layers across (labels thinned to fit ``cell_w``),
    tokens down in position order, the labels of ``*`` tokens bold and black."""
    marked = "indexof(datum.value, '* ·') >= 0"
    token_axis = alt.Axis(
        title=None,
        labelFontSize=font,
        labelLimit=150,
        labelFontWeight=alt.ExprRef(f"{marked} ? 'bold' : 'normal'"),
        labelColor=alt.ExprRef(f"{marked} ? 'black' : '#444444'"),
    )
    return alt.Chart().encode(
        x=alt.X(
            "layer:O",
            axis=alt.Axis(labelAngle=0, title="layer", values=_thin(layers, cell_w)),
            sort=layers,
        ),
        y=alt.Y(
            "token:N",
            axis=token_axis,
            sort=alt.EncodingSortField(field="position", order="ascending"),
        ),
        tooltip=tooltip,
    )


def _panel_group(
    view: alt.LayerChart, column: str, sort: list[str], title: alt.TitleParams
) -> alt.FacetChart:
    """One divergence index's group: ``view`` faceted across ``column`` (headers split at
    ``|`` into lines), under ``title``."""
    return view.facet(
        column=alt.Column(
            column,
            sort=sort,
            header=alt.Header(title=None, labelExpr="split(datum.value, '|')", labelFontSize=11),
        ),
        spacing=6,
    ).properties(title=title)


def _grid_figure(
    groups: list[alt.FacetChart],
    n_panels: int,
    panel_w: int,
    caption: list[str],
    heading: str,
    subtitle: str,
) -> alt.VConcatChart:
    """The groups side by side, the caption under them wrapped to the estimated chart width
    (``n_panels`` panels of ``panel_w`` pixels per group), heading and subtitle above, one
    colour scale shared by every panel."""
    est_width = len(groups) * (90 + n_panels * (panel_w + 6))
    wrapped = [part for line in caption for part in textwrap.wrap(line, max(est_width, 620) // 6)]
    body = alt.hconcat(*groups, spacing=18).properties(
        title=alt.TitleParams(
            wrapped,
            orient="bottom",
            anchor="start",
            fontSize=11,
            fontWeight="normal",
            color="#333333",
            offset=14,
        )
    )
    return (
        alt.vconcat(body)
        .properties(title=alt.TitleParams(heading, subtitle=subtitle, anchor="start", fontSize=15))
        .resolve_scale(color="shared")
        .configure_view(stroke=None)
        .configure_legend(titleLimit=200)
    )


def _thin(values: Sequence[int], cell_w: int) -> list[int]:
    """Every layer label when they fit horizontally, else every n-th."""
    step = math.ceil(18 / max(cell_w, 1)) if cell_w < 18 else 1
    return list(values)[::step]


def heatmap_chart(cells: pl.DataFrame, metric: str, title: str | None = None) -> alt.TopLevelMixin:
    """Draw tidy cells (``patching.effect_cells``) with ``heatmap_figure``'s layout.

    Kept for callers that hold cells rather than the aggregate; prefer ``heatmap_figure``.
    """
    return heatmap_figure(_aggregate_from_cells(cells, metric), metric, title=title)


def _aggregate_from_cells(cells: pl.DataFrame, metric: str) -> dict[str, Any]:
    sites = cells["site"].unique(maintain_order=True).to_list()
    ks = sorted(cells["divergence_index"].unique().to_list())
    layers = sorted(cells["layer"].unique().to_list())
    n_pos = int(cells["position"].max()) + 1
    stats = np.full((len(sites), len(ks), 3, len(layers), n_pos), np.nan)
    labels: dict[int, list[str]] = {}
    for row in cells.iter_rows(named=True):
        si, ki = sites.index(row["site"]), ks.index(row["divergence_index"])
        li = layers.index(row["layer"])
        stats[si, ki, :, li, row["position"]] = (row["mean"], row["std"], row["count"])
        labels.setdefault(row["divergence_index"], {})[row["position"]] = row["label"]  # type: ignore[index]
    labels = {k: [v[t] for t in sorted(v)] for k, v in labels.items()}  # type: ignore[attr-defined]
    return {
        "metric": metric,
        "sites": sites,
        "divergence_indices": ks,
        "layers": layers,
        "labels": labels,
        "stats": stats,
    }


# ---------------------------------------------------------------------------------------------
# Token traces


ROLE_DASHES = {"changed": [1, 0], "strongest": [6, 3], "last": [2, 2]}
ROLE_SHAPES = {"changed": "circle", "strongest": "square", "last": "triangle-up"}
ROLE_COLORS = {"changed": "#d62728", "strongest": "#1f77b4", "last": "#2ca02c"}


def trace_lines(frame: pl.DataFrame, row: Mapping[str, Any], n_strongest: int = 1) -> pl.DataFrame:
    """Which positions get a line, and the legend name of each: ``position, role, name``.

    Roles: ``changed`` (every position where A and B differ), ``strongest`` (the
    ``n_strongest`` other positions with the largest ``|value|`` over all sites and layers),
    ``last`` (the last prompt token, where the answer is read).
    """
    tokens_b = list(row["tokens"])
    tokens_a = list(row.get("tokens_a") or tokens_b)
    changed = [int(t) for t in row["diff_positions"]]
    last = int(row["n_tokens"]) - 1
    taken = {*changed, last}
    peaks = (
        frame.filter(~pl.col("position").is_in(list(taken)))
        .group_by("position")
        .agg(pl.col("value").abs().max().alias("peak"))
        .drop_nulls()
        .sort(["peak", "position"], descending=[True, False])
    )
    strongest = peaks["position"].head(n_strongest).to_list()
    lines = []
    for t in changed:
        name = f"changed token: `{tokens_b[t]}` in B, `{tokens_a[t]}` in A (position {t})"
        lines.append((t, "changed", name))
    for t in strongest:
        lines.append((t, "strongest", f"strongest other token: `{tokens_b[t]}` (position {t})"))
    name = f"last token: `{tokens_b[last]}` (position {last}, where the answer is read)"
    lines.append((last, "last", name))
    return pl.DataFrame(lines, schema=["position", "role", "name"], orient="row")


def traces_title(
    row: Mapping[str, Any], statement_a: str | None = None, statement_b: str | None = None
) -> tuple[str, list[str]]:
    """Title and subtitle: which statement changed from what (B) to what (A), both answers."""
    statement_a = statement_a or row.get("statement_a")
    statement_b = statement_b or row.get("statement_b")
    answers = f"answer {row['ground_truth_b']} in B, {row['ground_truth_a']} in A"
    k = row.get("divergence_index")
    where = f"statement {k} ({ordinal(int(k) + 1)})" if k is not None else "one statement"
    if statement_a and statement_b:
        change = f"{where} changed from `{statement_b}` (B) to `{statement_a}` (A)"
    else:
        tokens_b, tokens_a = row["tokens"], row.get("tokens_a") or row["tokens"]
        diff = [int(t) for t in row["diff_positions"]]
        b = " ".join(tokens_b[t] for t in diff)
        a = " ".join(tokens_a[t] for t in diff)
        change = f"{where} changed token `{b}` (B) to `{a}` (A)"
    title = f"Pair {row['pair_id']}: {change}; {answers}"
    subtitle = [
        "Each line patches A's activation at one token of B into B's run, one layer at a time; "
        "the legend names the token's role.",
    ]
    return title, subtitle


def traces_figure(
    frame: pl.DataFrame,
    row: Mapping[str, Any],
    metric: str,
    *,
    statement_a: str | None = None,
    statement_b: str | None = None,
    sites: Sequence[str] | None = None,
    n_strongest: int = 1,
    title: str | None = None,
) -> alt.FacetChart:
    """One pair's effect by layer, one line per patched token, one panel per site.

    ``frame`` and ``row`` are ``patching.example_frame``'s (columns ``site, layer, position,
    label, value``; the pair's first row). Sites keep ``sites`` order (default: their order in
    ``frame``, i.e. the stage's) and the heatmap's display names. Lines of different roles differ
    in colour, dash and point shape, and are nudged apart horizontally so equal values stay
    visible. ``statement_a/b`` (the pairs stage's columns) name the change in the title.
    """
    _check_metric(metric)
    if frame.is_empty():
        raise ChartError(f"pair {row.get('pair_id')!r} has no cells to draw")
    sites = list(sites or frame["site"].unique(maintain_order=True).to_list())
    lines = trace_lines(frame, row, n_strongest)
    names = lines["name"].to_list()
    roles = lines["role"].to_list()
    width = 0.1 * (len(names) - 1)
    offsets = {name: -width / 2 + 0.1 * i for i, name in enumerate(names)}
    data = (
        frame.join(lines, on="position", how="inner")
        .with_columns(
            pl.col("site").replace_strict({s: site_title(s) for s in sites}).alias("site_title"),
            (pl.col("layer") + pl.col("name").replace_strict(offsets)).alias("x"),
            pl.col("name").alias("marker"),  # its own field, so the legend shows dashed lines
        )
        .sort("site", "name", "layer")
    )
    layers = sorted(frame["layer"].unique().to_list())
    legend = alt.Legend(
        title="patched token (role)",
        orient="bottom",
        direction="vertical",
        symbolType="stroke",
        symbolSize=600,
        symbolStrokeWidth=2.5,
        labelFontSize=12,
        labelLimit=500,
    )
    line_enc = dict(
        x=alt.X(
            "x:Q",
            title="layer patched",
            scale=alt.Scale(domain=[layers[0] - 0.4, layers[-1] + 0.4], nice=False),
            axis=alt.Axis(values=layers, format="d", labelAngle=0, grid=False),
        ),
        y=alt.Y("value:Q", title=METRIC_TITLES[metric], scale=alt.Scale(zero=True)),
        color=alt.Color(
            "name:N",
            sort=names,
            scale=alt.Scale(domain=names, range=[ROLE_COLORS[r] for r in roles]),
            legend=legend,
        ),
        strokeDash=alt.StrokeDash(
            "name:N",
            sort=names,
            scale=alt.Scale(domain=names, range=[ROLE_DASHES[r] for r in roles]),
            legend=legend,
        ),
        tooltip=[
            alt.Tooltip("site_title:N", title="site"),
            alt.Tooltip("layer:O"),
            alt.Tooltip("name:N", title="token"),
            alt.Tooltip("value:Q", format=".3f"),
        ],
    )
    lines_layer = alt.Chart().mark_line(strokeWidth=2).encode(**line_enc)
    points_layer = (
        alt.Chart()
        .mark_point(size=45, filled=True, opacity=1)
        .encode(
            x="x:Q",
            y="value:Q",
            color=alt.Color("marker:N", sort=names, legend=None),
            shape=alt.Shape(
                "marker:N",
                sort=names,
                scale=alt.Scale(domain=names, range=[ROLE_SHAPES[r] for r in roles]),
                legend=None,
            ),
            tooltip=line_enc["tooltip"],
        )
    )
    refs = [0.0, 1.0] if metric == "normalised" else [0.0]
    rules = [
        alt.Chart().mark_rule(color="#999999", strokeWidth=1).encode(y=alt.datum(ref))
        for ref in refs
    ]
    heading, subtitle = traces_title(row, statement_a, statement_b)
    return (
        alt.layer(*rules, lines_layer, points_layer, data=data)
        .resolve_scale(shape="independent")
        .properties(width=230, height=190)
        .facet(
            column=alt.Column(
                "site_title:N",
                sort=[site_title(s) for s in sites],
                header=alt.Header(title=None, labelFontSize=12),
            ),
            spacing=14,
        )
        .properties(
            title=alt.TitleParams(title or heading, subtitle=subtitle, anchor="start", fontSize=14)
        )
    )


def traces_name(pair_id: str, metric: str) -> str:
    """File stem of a pair's traces: ``traces-<pair id>-<metric>``."""
    return f"traces-{pair_id}-{metric}"


def heatmap_name(metric: str) -> str:
    """File stem of a metric's heatmap: ``heatmap-<metric>``."""
    return f"heatmap-{metric}"


def trace_chart(
    example: pl.DataFrame, metric: str, highlight: Sequence[int], title: str | None = None
) -> alt.TopLevelMixin:
    """Old entry point (no pair row): lines for ``highlight`` positions, named by position.

    Prefer ``traces_figure``, which names each line's role and the change in the title.
    """
    data = example.filter(pl.col("position").is_in(list(highlight))).with_columns(
        pl.format("{} · {}", pl.col("label"), pl.col("position")).alias("token")
    )
    sites = example["site"].unique(maintain_order=True).to_list()
    return (
        alt.Chart(
            data.with_columns(
                pl.col("site").replace_strict({s: site_title(s) for s in sites}).alias("site_title")
            )
        )
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="layer patched", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("value:Q", title=METRIC_TITLES.get(metric, metric)),
            color=alt.Color("token:N", sort=alt.EncodingSortField(field="position")),
            strokeDash=alt.StrokeDash("token:N", sort=alt.EncodingSortField(field="position")),
        )
        .properties(width=230, height=190)
        .facet(column=alt.Column("site_title:N", title=None, sort=[site_title(s) for s in sites]))
        .properties(title=title or "Token traces")
    )


# ---------------------------------------------------------------------------------------------
# Accuracy


MODEL_SHAPES = ["circle", "square", "triangle-up", "diamond", "cross", "triangle-down"]
MODEL_DASHES = [[1, 0], [6, 3], [2, 2], [8, 3, 2, 3], [1, 3]]


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _chosen(chosen: Any) -> tuple[str, int, str | None] | None:
    """``(model_id, seq_len, family)`` of a ``choose.Choice``, a mapping or a 2-tuple."""
    if chosen is None:
        return None
    if isinstance(chosen, tuple | list):
        return str(chosen[0]), int(chosen[1]), None
    return str(_field(chosen, "model_id")), int(_field(chosen, "seq_len")), _field(chosen, "family")


def accuracy_figure(
    summary: pl.DataFrame,
    threshold: float | None = None,
    chosen: Any = None,
    version: str | None = None,
    *,
    title: str = "Exact-match accuracy by program length",
) -> alt.LayerChart:
    """Accuracy by length, one line per model (colour + point shape + dash), Wilson 95% bars.

    ``summary`` is ``benchmark.summarize``'s frame (``model_id, family, seq_len, accuracy,
    ci_low, ci_high, n``). ``threshold`` (the choice's minimum accuracy; default
    ``chosen.min_accuracy``) is a dashed rule; ``chosen`` (a ``choose.Choice``, a mapping or a
    ``(model_id, seq_len)`` tuple) is ringed and labelled. Models are nudged apart along x so
    their intervals do not hide each other. ``version`` goes in the subtitle.
    """
    if summary.is_empty():
        raise ChartError("the benchmark summary is empty: nothing to draw")
    families = summary["family"].unique().to_list() if "family" in summary.columns else []
    series = (
        pl.format("{} ({})", pl.col("model_id"), pl.col("family"))
        if len(families) > 1
        else pl.col("model_id")
    )
    data = summary.with_columns(series.alias("series"))
    order = data["series"].unique(maintain_order=True).to_list()
    step = 0.08
    offsets = {s: (i - (len(order) - 1) / 2) * step for i, s in enumerate(order)}
    data = data.with_columns(
        (pl.col("seq_len") + pl.col("series").replace_strict(offsets)).alias("x")
    )
    lengths = sorted(summary["seq_len"].unique().to_list())
    x = alt.X(
        "x:Q",
        title="statements in the program (length)",
        scale=alt.Scale(domain=[lengths[0] - 0.5, lengths[-1] + 0.5], nice=False),
        axis=alt.Axis(values=lengths, format="d", labelAngle=0, grid=False),
    )
    y_scale = alt.Scale(domain=[0, 1])
    models = dict(
        sort=order,
        scale=alt.Scale(domain=order),
        legend=alt.Legend(
            title="model",
            orient="bottom",
            direction="vertical",
            labelLimit=420,
            symbolOpacity=1,
            symbolStrokeWidth=0,
            symbolSize=110,
            labelFontSize=12,
        ),
    )
    tooltip = [
        alt.Tooltip("series:N", title="model"),
        alt.Tooltip("seq_len:Q", title="length"),
        alt.Tooltip("accuracy:Q", format=".3f"),
        alt.Tooltip("ci_low:Q", title="Wilson 95% low", format=".3f"),
        alt.Tooltip("ci_high:Q", title="Wilson 95% high", format=".3f"),
        alt.Tooltip("n:Q", title="programs"),
    ]
    base = alt.Chart(data).encode(x=x, color=alt.Color("series:N", **models))
    bars = base.mark_rule(strokeWidth=1.5, opacity=0.8).encode(
        y=alt.Y("ci_low:Q", scale=y_scale), y2="ci_high:Q"
    )
    lines = base.mark_line(strokeWidth=2).encode(
        y=alt.Y("accuracy:Q", title="exact-match accuracy", scale=y_scale),
        strokeDash=alt.StrokeDash(
            "series:N", sort=order, scale=alt.Scale(domain=order, range=MODEL_DASHES), legend=None
        ),
    )
    points = base.mark_point(filled=True, size=70, opacity=1).encode(
        y="accuracy:Q",
        shape=alt.Shape(
            "series:N", **{**models, "scale": alt.Scale(domain=order, range=MODEL_SHAPES)}
        ),
        tooltip=tooltip,
    )
    layers: list[alt.Chart] = [bars, lines, points]
    threshold = threshold if threshold is not None else _field(chosen, "min_accuracy")
    if threshold is not None:
        rule = pl.DataFrame({"t": [float(threshold)], "x": [lengths[-1] + 0.45]})
        layers.append(alt.Chart(rule).mark_rule(strokeDash=[5, 4], color="#555555").encode(y="t:Q"))
        layers.append(
            alt.Chart(rule)
            .mark_text(align="right", baseline="top", dy=3, color="#555555", fontSize=11)
            .encode(x=alt.X("x:Q"), y="t:Q", text=alt.value(f"choice threshold {threshold:g}"))
        )
    pick = _chosen(chosen)
    if pick is not None:
        layers += _choice_layers(data, pick, chosen, len(families) > 1)
    subtitle = [
        "Error bars: Wilson 95% interval over the programs of each (model, length)",
        "; ".join(
            [
                *(
                    ["dashed line: the threshold the choice requires"]
                    if threshold is not None
                    else []
                ),
                *(["ringed: the chosen (model, length)"] if pick is not None else []),
            ]
        ),
        f"benchmark version {version}" if version else "",
    ]
    return (
        alt.layer(*layers)
        .resolve_scale(color="shared", shape="shared")
        .properties(
            width=460,
            height=280,
            title=alt.TitleParams(
                title, subtitle=[line for line in subtitle if line], anchor="start", fontSize=14
            ),
        )
    )


def _choice_layers(
    data: pl.DataFrame, pick: tuple[str, int, str | None], chosen: Any, by_family: bool
) -> list[alt.Chart]:
    """A black ring on the chosen (model, length) and a label above it (below, near 1.0)."""
    model_id, seq_len, family = pick
    match = data.filter((pl.col("model_id") == model_id) & (pl.col("seq_len") == seq_len))
    if family is not None and by_family:
        match = match.filter(pl.col("family") == family)
    if match.is_empty():
        acc = _field(chosen, "accuracy")
        if acc is None:
            raise ChartError(
                f"the chosen model {model_id!r} at length {seq_len} is not in the summary"
            )
        match = pl.DataFrame({"x": [float(seq_len)], "accuracy": [float(acc)]})
    mark = (
        match.select("x", "accuracy")
        .head(1)
        .with_columns(pl.lit(f"chosen: {model_id}, length {seq_len}").alias("label"))
    )
    high = float(mark["accuracy"][0]) > 0.85
    ring = (
        alt.Chart(mark)
        .mark_point(shape="circle", size=420, filled=False, strokeWidth=2.5, color="black")
        .encode(x="x:Q", y="accuracy:Q")
    )
    text = dict(
        align="center", baseline="top" if high else "bottom", dy=16 if high else -16, fontSize=11
    )
    halo = alt.Chart(mark).mark_text(
        **text, fontWeight="bold", stroke="white", strokeWidth=4, strokeJoin="round"
    )
    label = alt.Chart(mark).mark_text(**text, fontWeight="bold", color="black")
    enc = dict(x="x:Q", y="accuracy:Q", text="label:N")
    return [ring, halo.encode(**enc), label.encode(**enc)]


def accuracy_chart(summary: pl.DataFrame, title: str | None = None) -> alt.LayerChart:
    """Old entry point: ``accuracy_figure`` without threshold or choice marks."""
    return accuracy_figure(summary, title=title or "Exact-match accuracy by program length")


# ---------------------------------------------------------------------------------------------
# Saving


def save_chart(
    chart: alt.TopLevelMixin,
    out_dir: Path,
    name: str,
    formats: Sequence[ChartFormat] = ("html", "png"),
    scale_factor: float = 2,
) -> list[Path]:
    """Save ``chart`` as ``out_dir/name.<fmt>``; HTML is self-contained (works offline), PNG is
    rendered at ``scale_factor`` × its CSS size. No file keeps the Hugging Face token."""
    from seqpatch.redact import redact_chart, redact_file

    chart = redact_chart(chart)  # labels may name a path that held the token
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        if fmt not in ("html", "png", "svg"):
            raise ChartError(f"unknown chart format {fmt!r}; use html, png or svg")
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        if fmt == "html":
            chart.save(path, inline=True)
        elif fmt == "png":
            chart.save(path, scale_factor=scale_factor)
        else:
            chart.save(path)
        redact_file(path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Causal tracing (ROME)


TRACING_PANELS: dict[str, tuple[str, str]] = {
    "resid": ("single restored state", "(residual stream)"),
    "mlp": ("MLP outputs", "(window of {w} layer{s})"),
    "attn": ("attention outputs", "(window of {w} layer{s})"),
}
AIE_COLORS = [WHITE, "#807dba", "#3f007d"]  # white → purple: restoring brings the answer back
AIE_NEGATIVE = "#b35806"  # orange: restoring lowers the answer's probability


def tracing_panel_title(kind: str, window: int, sep: str = "|") -> str:
    """``resid`` → ``single restored state|(residual stream)``; windows name their width."""
    head, tail = TRACING_PANELS.get(kind, (kind, ""))
    return sep.join([head, tail.format(w=window, s="" if window == 1 else "s")]).strip(sep)


def aie_scale(values: Iterable[float]) -> tuple[alt.Scale, bool]:
    """The AIE colour scale and whether it is diverging; 0 is white either way.

    Sequential white → purple on ``[0, max]`` (a nice ceiling), clamped, when no value falls
    below −5% of the maximum (those small negatives are noise and draw white); else diverging,
    orange below 0, symmetric at the largest ``|value|``.
    """
    finite = [v for v in values if v is not None and math.isfinite(v)]
    high = _nice_ceiling(max([*finite, 0.0]) or 1.0)
    low = min([*finite, 0.0])
    if low >= -0.05 * high:
        return (
            alt.Scale(domain=[0, high / 2, high], range=AIE_COLORS, clamp=True, interpolate="lab"),
            False,
        )
    bound = _nice_ceiling(max(high, -low))
    return (
        alt.Scale(
            domain=[-bound, 0, bound / 2, bound],
            range=[AIE_NEGATIVE, *AIE_COLORS],
            clamp=True,
            interpolate="lab",
        ),
        True,
    )


def tracing_cells(summary: Mapping[str, Any]) -> pl.DataFrame:
    """``plots.tracing_summary`` as tidy cells: ``kind, divergence_index, layer, position, label,
    corrupted, aie`` (``aie`` null where no program has that position)."""
    grid = np.asarray(summary["by_position"], dtype=np.float64)  # [K, kinds, layers, positions]
    layers = [int(layer) for layer in summary["layers"]]
    frames = []
    for ki, k in enumerate(summary["divergence_indices"]):
        labels = list(summary["labels"][k])
        corrupted = set(summary["corrupted"][k])
        n_pos = len(labels)
        for kind_i, kind in enumerate(summary["kinds"]):
            values = grid[ki, kind_i, :, :n_pos].reshape(-1)
            frames.append(
                _panel_cells(
                    ("kind", kind),
                    k,
                    layers,
                    labels,
                    corrupted=[t in corrupted for t in range(n_pos)] * len(layers),
                    aie=values,
                )
            )
    if not frames:
        raise ChartError("the causal trace has no cells to draw")
    return pl.concat(frames).with_columns(pl.col("aie").fill_nan(None))


def tracing_caption(summary: Mapping[str, Any], diverging: bool, missing: bool) -> list[str]:
    """The lines under the causal-trace chart: what is corrupted, restored and coloured."""
    window = int(summary["window"])
    layers = len(summary["layers"])
    what = {
        "changed": "the tokens of the changed statement (the binding the pair alters)",
        "diff": "the tokens where A and B differ (the value being bound)",
        "chain": "every statement of the query's reference chain",
    }.get(str(summary["corrupt"]), f"statement {summary['corrupt']}")
    lines = [
        f"Corrupted: {what}, marked * and bold; their input embeddings get Gaussian noise of "
        f"σ = {summary['noise_scale']:g} × std(embeddings) = {summary['sigma']:.3g}, "
        f"{summary['n_samples']} draws per program (seeds stored in the rows).",
        "Rows: the tokens of one example program per k (numbered by position); the grid "
        "averages every traced program with that k at each position.",
        "Colour: average indirect effect AIE = P(answer | corrupted, that state restored to its "
        "clean value) − P(answer | corrupted), P over the full vocabulary; 0 = white.",
        "Single restored state: the residual stream entering layer l (layer 0 = the embeddings). "
        f"MLP / attention: the outputs of a window of w = {window} layer"
        f"{'' if window == 1 else 's'} centred on l (ROME's 10 of 48, scaled to {layers} "
        "layers: w = max(1, round(10·L/48))).",
        "k = the statement the pair changes (counted from 0); one group of panels per k.",
    ]
    lines.append(
        "Orange = restoring that state lowers the answer's probability."
        if diverging
        else "Slightly negative values (noise) are drawn white."
    )
    if missing:
        lines.append("Grey = no traced program has a token at that position.")
    return lines


def tracing_figure(
    summary: Mapping[str, Any], *, title: str | None = None, max_height: int = 900
) -> alt.VConcatChart:
    """ROME's causal-trace figure: per divergence index, three panels (single restored state,
    MLP window, attention window), layers across, tokens down, corrupted tokens marked.

    ``summary`` is ``plots.tracing_summary``'s: the AIE grid ``by_position`` ``[k, kind, layer,
    position]``, example ``labels`` and ``corrupted`` positions per ``k``, program ``counts`` and
    mean clean / corrupted probabilities (overall and ``by_k``), and the trace's parameters.
    Each group's title carries its program count and its clean → corrupted probability; the
    subtitle the overall ones; a caption says what is corrupted, restored and coloured.
    """
    cells = tracing_cells(summary)
    kinds = list(summary["kinds"])
    layers = [int(layer) for layer in summary["layers"]]
    ks = [int(k) for k in summary["divergence_indices"]]
    window = int(summary["window"])
    n_pos = max(len(summary["labels"][k]) for k in summary["divergence_indices"])
    row_h, cell_w, font = _grid_sizes(n_pos, len(layers), max_height - 220)
    scale, diverging = aie_scale(cells["aie"].drop_nulls().to_list())
    missing = bool(cells["aie"].null_count())
    panel_titles = [tracing_panel_title(kind, window) for kind in kinds]
    data = cells.with_columns(
        pl.col("kind")
        .replace_strict({kind: tracing_panel_title(kind, window) for kind in kinds})
        .alias("panel"),
        pl.format(
            "{}{} · {}",
            pl.col("label"),
            pl.when(pl.col("corrupted")).then(pl.lit("*")).otherwise(pl.lit("")),
            pl.col("position"),
        ).alias("token"),
    )
    counts = {int(k): int(v) for k, v in summary["counts"].items()}
    by_k = summary.get("by_k", {})
    groups = []
    for k in ks:
        block = data.filter(pl.col("divergence_index") == k)
        base = _layer_token_base(
            layers,
            cell_w,
            font,
            [
                alt.Tooltip("kind:N", title="restored"),
                alt.Tooltip("divergence_index:O", title="k"),
                alt.Tooltip("layer:O"),
                alt.Tooltip("position:O"),
                alt.Tooltip("label:N", title="token (example program)"),
                alt.Tooltip("corrupted:N"),
                alt.Tooltip("aie:Q", title="AIE", format=".3f"),
            ],
        )
        values = base.mark_rect().encode(
            color=alt.Color("aie:Q", title=["average", "indirect effect"], scale=scale)
        )
        empty = base.mark_rect(color=NO_DATA)
        outline = base.mark_rect(fill=None, stroke="#222222", strokeWidth=0.6)
        view = alt.layer(
            empty.transform_filter("!isValid(datum.aie)"),
            values.transform_filter("isValid(datum.aie)"),
            outline.transform_filter("datum.corrupted"),
            data=block,
        ).properties(width=cell_w * len(layers), height=row_h * len(summary["labels"][k]))
        n_k = counts.get(k, 0)
        probs = by_k.get(k)
        what = "corrupted" if summary["corrupt"] in ("changed", "diff") else "changed"
        heading = f"k = {k} ({ordinal(k + 1)} statement {what}) · {n_k} program" + (
            "s" if n_k != 1 else ""
        )
        groups.append(
            _panel_group(
                view,
                "panel:N",
                panel_titles,
                alt.TitleParams(
                    heading,
                    subtitle=(
                        f"P(answer): clean {probs[0]:.2f}, corrupted {probs[1]:.2f}"
                        if probs
                        else ""
                    ),
                    fontSize=13,
                    anchor="middle",
                ),
            )
        )
    total = sum(counts.get(k, 0) for k in ks)
    model = summary.get("model")
    heading = title or (
        "Causal tracing (ROME): which restored clean states bring the answer back?"
        f" ({total} program{'s' if total != 1 else ''}{f', {model}' if model else ''})"
    )
    subtitle = (
        f"Mean P(correct answer) over programs: clean {summary['clean_prob']:.3f}, corrupted "
        f"{summary['corrupted_prob']:.3f} (noise on the * tokens); colour = mean gain from "
        "restoring one state"
    )
    return _grid_figure(
        groups,
        len(kinds),
        cell_w * len(layers),
        tracing_caption(summary, diverging, missing),
        heading,
        subtitle,
    )


def tracing_name() -> str:
    """File stem of the causal-trace chart: ``causal-trace``."""
    return "causal-trace"


# ---------------------------------------------------------------------------------------------
# Grids over other axes: layer × head heatmaps, whole-stream layer lines

SITE_TITLES.update(
    {
        "head_q": ("attention heads", "(queries, pre-RoPE)"),
        "head_k": ("attention heads", "(keys, pre-RoPE)"),
        "head_v": ("attention heads", "(values)"),
    }
)
POSITION_SET_TITLES = {
    "all": "every position at once",
    "from-divergence": "every position from the first changed token on, at once",
}


def _cells_frame(cells: pl.DataFrame, sites: Sequence[str]) -> pl.DataFrame:
    if cells.is_empty():
        raise ChartError("the aggregate has no cells to draw")
    return cells.with_columns(
        pl.col("site").replace_strict({s: site_title(s, "|") for s in sites}).alias("site_title")
    )


def head_heatmap_figure(
    cells: pl.DataFrame,
    agg: Mapping[str, Any],
    metric: str | None = None,
    n_pairs_by_k: Mapping[int, int] | None = None,
) -> alt.TopLevelMixin:
    """Layer × head heatmaps (``patching.effect_cells`` of a ``layer,head[,pos]`` grid): one
    row of panels per site, one panel per divergence index, layers across, heads down.

    With a position axis each (layer, head) shows its strongest position: the mean effect at
    the position whose mean has the largest magnitude (the tooltip names the token).
    """
    metric = metric or agg.get("metric", "normalised")
    _check_metric(metric)
    sites = list(agg["sites"])
    if "position" in cells.columns:
        cells = (
            cells.with_columns(pl.col("mean").abs().alias("_size"))
            .sort("_size", descending=True, nulls_last=True)
            .group_by(["site", "divergence_index", "layer", "head"], maintain_order=True)
            .first()
            .drop("_size")
        )
    data = _cells_frame(cells, sites)
    counts = {int(k): int(v) for k, v in (n_pairs_by_k or pairs_per_k(agg)).items()}
    data = data.with_columns(
        pl.col("divergence_index")
        .replace_strict(
            {k: f"k = {k} · {counts.get(int(k), 0)} pairs" for k in agg["divergence_indices"]},
            return_dtype=pl.String,
        )
        .alias("k_title")
    )
    layers, heads = list(agg["layers"]), list(agg["heads"])
    tooltip = [
        alt.Tooltip("site:N"),
        alt.Tooltip("divergence_index:O", title="k"),
        alt.Tooltip("layer:O"),
        alt.Tooltip("head:O"),
        alt.Tooltip("mean:Q", format=".3f"),
        alt.Tooltip("std:Q", format=".3f"),
        alt.Tooltip("count:Q", title="pairs in cell"),
    ]
    if "position" in data.columns:
        tooltip += [alt.Tooltip("position:O"), alt.Tooltip("label:N", title="token")]
    cell = 22 if len(heads) <= 16 else 12
    chart = (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X("layer:O", sort=layers, axis=alt.Axis(labelAngle=0)),
            y=alt.Y("head:O", sort=heads),
            color=alt.Color(
                "mean:Q",
                title=LEGEND_TITLES[metric],
                scale=color_scale(metric, data["mean"].to_list()),
            ),
            tooltip=tooltip,
        )
        .properties(width=max(90, cell * len(layers)), height=cell * len(heads))
        .facet(
            row=alt.Row(
                "site_title:N",
                sort=[site_title(s, "|") for s in sites],
                header=alt.Header(title=None, labelExpr="split(datum.value, '|')"),
            ),
            column=alt.Column(
                "k_title:N",
                sort=[
                    f"k = {k} · {counts.get(int(k), 0)} pairs" for k in agg["divergence_indices"]
                ],
                header=alt.Header(title=None),
            ),
        )
    )
    where = (
        "at its strongest position"
        if "position" in cells.columns
        else POSITION_SET_TITLES.get(agg.get("span") or "all", "every position at once")
    )
    return chart.properties(
        title=alt.TitleParams(
            "Which attention heads carry the changed statement? (A → B, one head patched)",
            subtitle=f"Mean {METRIC_TITLES[metric]} over pairs, each head patched {where}; "
            "k = the statement that differs",
            anchor="start",
        )
    ).configure_view(stroke=None)


def layer_line_figure(
    cells: pl.DataFrame,
    agg: Mapping[str, Any],
    metric: str | None = None,
    n_pairs_by_k: Mapping[int, int] | None = None,
) -> alt.TopLevelMixin:
    """Whole-stream patching (``patching.effect_cells`` of a ``layer`` grid): the mean effect by
    layer, one line per divergence index, one panel per site; the band is ± one std."""
    metric = metric or agg.get("metric", "normalised")
    _check_metric(metric)
    sites = list(agg["sites"])
    counts = {int(k): int(v) for k, v in (n_pairs_by_k or pairs_per_k(agg)).items()}
    data = _cells_frame(cells, sites).with_columns(
        pl.col("divergence_index")
        .replace_strict(
            {k: f"k = {k} ({counts.get(int(k), 0)})" for k in agg["divergence_indices"]},
            return_dtype=pl.String,
        )
        .alias("k"),
        (pl.col("mean") - pl.col("std")).alias("low"),
        (pl.col("mean") + pl.col("std")).alias("high"),
    )
    base = alt.Chart().encode(
        x=alt.X("layer:O", axis=alt.Axis(labelAngle=0, title="layer patched")),
        color=alt.Color("k:N", title=["changed statement", "(pairs)"]),
    )
    band = base.mark_area(opacity=0.15).encode(y="low:Q", y2="high:Q")
    line = base.mark_line(point=True).encode(
        y=alt.Y("mean:Q", title=METRIC_TITLES[metric]),
        tooltip=[
            alt.Tooltip("site:N"),
            alt.Tooltip("k:N"),
            alt.Tooltip("layer:O"),
            alt.Tooltip("mean:Q", format=".3f"),
            alt.Tooltip("std:Q", format=".3f"),
            alt.Tooltip("count:Q", title="pairs"),
        ],
    )
    span = POSITION_SET_TITLES.get(agg.get("span") or "all", "every position at once")
    return (
        alt.layer(band, line, data=data)
        .properties(width=260, height=200)
        .facet(
            column=alt.Column(
                "site_title:N",
                sort=[site_title(s, "|") for s in sites],
                header=alt.Header(title=None, labelExpr="split(datum.value, '|')"),
            )
        )
        .properties(
            title=alt.TitleParams(
                "Whole-stream patching A → B: from which layer on does B take A's answer?",
                subtitle=f"Mean {METRIC_TITLES[metric]} over pairs; A's activation patched at "
                f"{span}",
                anchor="start",
            )
        )
        .configure_view(stroke=None)
    )


def layers_name(metric: str) -> str:
    """File stem of a whole-stream chart: ``layers-<metric>``."""
    return f"layers-{metric}"


# ---------------------------------------------------------------------------------------------
# The strongest heads of a layer,head,pos grid, token by token


def top_heads(cells: pl.DataFrame, n: int = 6) -> pl.DataFrame:
    """The ``n`` (layer, head) pairs of each site with the largest peak mean effect.

    ``cells`` is ``patching.effect_cells`` of a ``layer,head,pos`` grid. A head's peak is its
    largest ``|mean|`` over every divergence index and position; returns ``site, layer, head,
    peak`` (the signed mean at the peak), ranked by ``|peak|`` within each site, sites in the
    order they first appear.
    """
    if cells.is_empty():
        raise ChartError("the aggregate has no cells to draw")
    if "position" not in cells.columns or "head" not in cells.columns:
        raise ChartError(
            "top heads need a layer,head,pos grid (build it with --axes layer,head,pos)"
        )
    if n < 1:
        raise ChartError(f"the number of top heads must be at least 1, not {n}")
    sites = list(dict.fromkeys(cells["site"].to_list()))
    peaks = (
        cells.drop_nulls("mean")
        .filter(pl.col("mean").is_not_nan())
        .with_columns(pl.col("mean").abs().alias("_size"))
        .sort(["_size", "layer", "head"], descending=[True, False, False])
        .group_by(["site", "layer", "head"], maintain_order=True)
        .agg(pl.col("mean").first().alias("peak"), pl.col("_size").first().alias("_size"))
    )
    ranked = [
        peaks.filter(pl.col("site") == site)
        .sort(["_size", "layer", "head"], descending=[True, False, False])
        .head(n)
        for site in sites
    ]
    return pl.concat(ranked).select("site", "layer", "head", "peak")


def head_name(layer: int, head: int) -> str:
    """``L0 H5``: how the charts and the docs name a head."""
    return f"L{layer} H{head}"


def top_heads_figure(
    cells: pl.DataFrame,
    agg: Mapping[str, Any],
    metric: str | None = None,
    n_pairs_by_k: Mapping[int, int] | None = None,
    n_top: int = 6,
) -> alt.TopLevelMixin:
    """Per-position panels for the strongest heads of a ``layer,head,pos`` grid.

    One row per head of ``top_heads(cells, n_top)`` (per site, strongest first), one column per
    divergence index; each panel is the mean effect over pairs (bars) of patching that head at
    one token, tokens of the column's example pair on x (``*`` = where A and B differ). The
    row header names the head and its peak.
    """
    metric = metric or agg.get("metric", "normalised")
    _check_metric(metric)
    chosen = top_heads(cells, n_top)
    counts = {int(k): int(v) for k, v in (n_pairs_by_k or pairs_per_k(agg)).items()}
    ks = [int(k) for k in agg["divergence_indices"]]
    k_titles = {
        k: f"k = {k} ({ordinal(k + 1)} statement changed) · {counts.get(k, 0)} pairs" for k in ks
    }
    rank = {
        (row["site"], row["layer"], row["head"]): i
        for i, row in enumerate(chosen.iter_rows(named=True))
    }
    multi_site = chosen["site"].n_unique() > 1
    titles = {
        key: (f"{site_title(key[0])} · " if multi_site else "")
        + f"{head_name(key[1], key[2])} · peak {peak:+.2f}"
        for key, peak in zip(rank, chosen["peak"].to_list(), strict=True)
    }
    data = (
        cells.join(chosen.select("site", "layer", "head"), on=["site", "layer", "head"])
        .filter(pl.col("count") > 0)
        .with_columns(
            pl.struct("site", "layer", "head")
            .map_elements(
                lambda s: titles[(s["site"], s["layer"], s["head"])], return_dtype=pl.String
            )
            .alias("head_title"),
            pl.struct("site", "layer", "head")
            .map_elements(lambda s: rank[(s["site"], s["layer"], s["head"])], return_dtype=pl.Int64)
            .alias("rank"),
            pl.col("divergence_index")
            .replace_strict(k_titles, return_dtype=pl.String)
            .alias("k_title"),
            pl.format("{} · {}", pl.col("label"), pl.col("position")).alias("token"),
        )
    )
    n_pos = max(len(agg["labels"][k]) for k in ks)
    changed = "indexof(datum.value, '* ·') >= 0"
    chart = (
        alt.Chart(data)
        .mark_bar()
        .encode(
            x=alt.X(
                "token:N",
                sort=alt.EncodingSortField(field="position", order="ascending"),
                axis=alt.Axis(
                    title=None,
                    labelAngle=-90,
                    labelFontSize=8,
                    labelFontWeight=alt.ExprRef(f"{changed} ? 'bold' : 'normal'"),
                    labelColor=alt.ExprRef(f"{changed} ? 'black' : '#666666'"),
                ),
            ),
            y=alt.Y("mean:Q", title=LEGEND_TITLES[metric], axis=alt.Axis(tickCount=3)),
            color=alt.condition("datum.mean >= 0", alt.value(TOWARDS_A), alt.value(TOWARDS_B)),
            tooltip=[
                alt.Tooltip("site:N"),
                alt.Tooltip("head_title:N", title="head"),
                alt.Tooltip("divergence_index:O", title="k"),
                alt.Tooltip("position:O"),
                alt.Tooltip("label:N", title="token (example pair)"),
                alt.Tooltip("mean:Q", format=".3f"),
                alt.Tooltip("std:Q", format=".3f"),
                alt.Tooltip("count:Q", title="pairs in cell"),
            ],
        )
        .properties(width=max(160, 9 * n_pos), height=70)
        .facet(
            row=alt.Row(
                "head_title:N",
                sort=alt.EncodingSortField(field="rank", order="ascending"),
                header=alt.Header(title=None, labelAngle=0, labelAlign="left", labelFontSize=11),
            ),
            column=alt.Column(
                "k_title:N", sort=[k_titles[k] for k in ks], header=alt.Header(title=None)
            ),
            spacing={"row": 8, "column": 14},
        )
        .resolve_scale(x="independent")
    )
    caption = [
        "Bars: mean over pairs of patching A's activation of that one head, at that one token, "
        "into B; blue = towards A's answer, red = away from it.",
        "x: the tokens of one example pair per column (B's prompt, numbered by position); * marks "
        "the tokens where A and B differ. Rows: the heads with the largest peak (any k, any "
        "token), strongest first.",
    ]
    return chart.properties(
        title=alt.TitleParams(
            f"Where in the prompt do the top {len(chosen)} heads carry the changed statement?",
            subtitle=[
                f"Mean {METRIC_TITLES[metric]} over pairs, one head at one token patched",
                *caption,
            ],
            anchor="start",
        )
    ).configure_view(stroke=None)


def top_heads_name(metric: str) -> str:
    """File stem of the top heads' per-position chart: ``top-heads-<metric>``."""
    return f"top-heads-{metric}"
