"""DAS: interchange-intervention accuracy against the subspace dimension (``iia_figure``)."""

from __future__ import annotations

import altair as alt
import polars as pl

from seqpatch.charts.tokens import display_token


def iia_figure(table: pl.DataFrame) -> alt.FacetChart:
    """IIA on the test pairs against k (log scale), one panel per cell: DAS and its controls as
    lines, the full-vector patch as a dashed rule. ``table`` is ``stages.das.table``'s frame."""
    frame = table.with_columns(
        pl.col("token").map_elements(display_token, return_dtype=pl.String)
    ).with_columns(
        pl.format("#{} {} L{} · {} '{}'", "rank", "site", "layer", "position", "token").alias(
            "cell"
        )
    )
    ks = sorted(set(frame["k"].to_list()))
    colors = alt.Scale(
        domain=["das", "shuffled", "random"], range=["#1f77b4", "#ff7f0e", "#7f7f7f"]
    )
    lines = (
        alt.Chart()
        .mark_line(point=True)
        .transform_filter(alt.datum.method != "full")
        .encode(
            x=alt.X(
                "k:Q",
                scale=alt.Scale(type="log", base=2),
                axis=alt.Axis(values=ks, format="d"),
                title="subspace dimension k",
            ),
            y=alt.Y("iia:Q", scale=alt.Scale(domain=[0, 1]), title="IIA (test pairs)"),
            color=alt.Color("method:N", scale=colors, title="basis"),
            tooltip=["cell:N", "method:N", "k:Q", alt.Tooltip("iia:Q", format=".3f")],
        )
    )
    rule = (
        alt.Chart()
        .mark_rule(strokeDash=[4, 3], color="black")
        .transform_filter(alt.datum.method == "full")
        .encode(y="iia:Q", tooltip=[alt.Tooltip("iia:Q", format=".3f", title="full patch IIA")])
    )
    return (
        alt.layer(lines, rule, data=frame)
        .properties(width=220, height=180)
        .facet(facet=alt.Facet("cell:N", title=None, sort=alt.SortField("rank")), columns=3)
        .properties(title="DAS: IIA vs subspace dimension k (dashed: full-vector patch)")
    )


def iia_name() -> str:
    """File stem of the DAS chart: ``iia_vs_k``."""
    return "iia_vs_k"
