"""One pair's effect by layer, one line per patched token (``traces_figure``).

Lines are labelled by the token's role (changed token, strongest other token, last token), sites
in the heatmap's order and names; roles differ in colour, dash and point shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import polars as pl

from seqpatch.charts.style import METRIC_TITLES, ChartError, _check_metric, ordinal, site_title
from seqpatch.charts.tokens import display_token

ROLE_DASHES = {"changed": [1, 0], "strongest": [6, 3], "last": [2, 2]}
ROLE_SHAPES = {"changed": "circle", "strongest": "square", "last": "triangle-up"}
ROLE_COLORS = {"changed": "#d62728", "strongest": "#1f77b4", "last": "#2ca02c"}


def trace_lines(frame: pl.DataFrame, row: Mapping[str, Any], n_strongest: int = 1) -> pl.DataFrame:
    """Which positions get a line, and the legend name of each: ``position, role, name``.

    Roles: ``changed`` (every position where A and B differ), ``strongest`` (the
    ``n_strongest`` other positions with the largest ``|value|`` over all sites and layers),
    ``last`` (the last prompt token, where the answer is read). Only positions with a value
    (a patched cell) get a line, so the legend never names a line that is not drawn. Token
    names are display labels (``tokens.display_token``: · = a space, ↵ = a new line).
    """
    tokens_b = [display_token(t) for t in row["tokens"]]
    tokens_a = [display_token(t) for t in (row.get("tokens_a") or row["tokens"])]
    drawn = set(
        frame.filter(pl.col("value").is_not_null() & pl.col("value").is_finite())["position"]
        .unique()
        .to_list()
    )
    changed = [int(t) for t in row["diff_positions"] if int(t) in drawn]
    last = int(row["n_tokens"]) - 1
    taken = {*changed, last}
    peaks = (
        frame.filter(~pl.col("position").is_in(list(taken)) & pl.col("position").is_in(list(drawn)))
        .filter(pl.col("value").is_finite())
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
    if last in drawn:
        name = f"last token: `{tokens_b[last]}` (position {last}, where the answer is read)"
        lines.append((last, "last", name))
    return pl.DataFrame(
        lines, schema={"position": pl.Int64, "role": pl.String, "name": pl.String}, orient="row"
    )


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
        tokens_b = [display_token(t) for t in row["tokens"]]
        tokens_a = [display_token(t) for t in (row.get("tokens_a") or row["tokens"])]
        diff = [int(t) for t in row["diff_positions"]]
        b = " ".join(tokens_b[t] for t in diff)
        a = " ".join(tokens_a[t] for t in diff)
        change = f"{where} changed token `{b}` (B) to `{a}` (A)"
    title = f"Pair {row['pair_id']}: {change}; {answers}"
    if row.get("method") == "attribution":
        subtitle = [
            "Attribution patching: each line is a first-order estimate (not a measured patch) of "
            "patching A's activation at one token of B into B's run, one layer at a time; the "
            "legend names the token's role.",
        ]
    else:
        subtitle = [
            "Each line patches A's activation at one token of B into B's run, one layer at a "
            "time; the legend names the token's role.",
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
    if lines.is_empty():
        raise ChartError(f"pair {row.get('pair_id')!r} has no patched cell to draw")
    names = lines["name"].to_list()
    roles = lines["role"].to_list()
    width = 0.1 * (len(names) - 1)
    offsets = {name: -width / 2 + 0.1 * i for i, name in enumerate(names)}
    data = (
        frame.join(lines, on="position", how="inner")
        .filter(pl.col("value").is_finite())
        .with_columns(
            pl.col("site").replace_strict({s: site_title(s) for s in sites}).alias("site_title"),
            (pl.col("layer") + pl.col("name").replace_strict(offsets)).alias("x"),
            pl.col("name").alias("marker"),  # its own field, so the legend shows dashed lines
        )
        .sort("site", "name", "layer")
    )
    layers = sorted(frame["layer"].unique().to_list())
    estimate = row.get("method") == "attribution"
    legend = alt.Legend(
        title="patched token (role), attribution estimate" if estimate else "patched token (role)",
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
        y=alt.Y(
            "value:Q",
            title=("estimated " if estimate else "") + METRIC_TITLES[metric],
            scale=alt.Scale(zero=True),
        ),
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


def trace_chart(
    example: pl.DataFrame, metric: str, highlight: Sequence[int], title: str | None = None
) -> alt.TopLevelMixin:
    """Old entry point (no pair row): lines for ``highlight`` positions, named by position.

    Prefer ``traces_figure``, which names each line's role and the change in the title.
    """
    data = example.filter(pl.col("position").is_in(list(highlight))).with_columns(
        pl.format("{} ({})", pl.col("label"), pl.col("position")).alias("token")
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
