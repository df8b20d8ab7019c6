"""Charts that cannot mislead (issue 25, item 4).

Each test draws a small synthetic patching stage shaped like the README's SmolLM2 study: byte-
level BPE tokens (``Ġare``, ``Ċ``), the ``changed+ends+last`` selection (most positions never
patched, NaN), a negative cell of −0.33 (layer 2's attention at the last token), and, where
asked, attribution rows or many divergence indices. The charts are read back from their specs
(and one PNG's pixel size).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import polars as pl
import pytest
from datasets import Dataset, Value

from seqpatch import charts
from seqpatch.charts.grid_data import aggregate, effect_cells, example_frame
from seqpatch.charts.tokens import decode_piece, display_token
from seqpatch.stages import patching

SITES = ("resid_pre", "attn_out")
N_LAYERS = 4
# a chat prompt as SmolLM2's byte-level BPE splits it; the digit (position 10) is what changes
TOKENS_B = [
    "<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġhelpful", "<|im_end|>", "Ċ",
    "a", "Ġ=", "Ġ", "5", "Ċ", "#", "Ġa", ":", "<|im_end|>", "Ċ", "assistant", "Ġ",
]  # fmt: skip
CHANGED = 11
PATCHED = (CHANGED, 12, 17, 19)  # the changed digit, the line ends after it, the last token
NEGATIVE = -0.33


def _zero(name: str, shape: tuple[int, ...]):
    feature = patching.features(*shape, 10)[name]
    if hasattr(feature, "shape"):
        return np.zeros(feature.shape, np.float32)
    if isinstance(feature, Value):
        return {"string": "", "bool": False}.get(feature.dtype, 0)
    return []


def pretrained_like(
    ks=(3,), pairs: int = 3, method: str = "exact", span: str = "changed+ends+last"
) -> Dataset:
    """Rows with the patching stage's schema: NaN except at ``PATCHED``; the digit carries the
    effect early, the last token late; attention at the last token, layer 2: −0.33."""
    n_pos = len(TOKENS_B)
    rows: dict[str, list] = {name: [] for name in patching.features(1, 1, 1)}
    for k in ks:
        for i in range(pairs):
            tokens_a = list(TOKENS_B)
            tokens_a[CHANGED] = "8"
            for site in SITES:
                norm = np.full((N_LAYERS, n_pos), np.nan, np.float32)
                for layer in range(N_LAYERS):
                    late = layer / (N_LAYERS - 1)
                    norm[layer, CHANGED] = (1 - late) if site == "resid_pre" else 0.05
                    norm[layer, 12] = 0.0
                    norm[layer, 17] = 0.01
                    norm[layer, 19] = late if site == "resid_pre" else 0.0
                if site == "attn_out":
                    norm[2, 19] = NEGATIVE
                values = {
                    "pair_id": f"p-k{k}-{i}",
                    "site": site,
                    "method": method,
                    "divergence_index": k,
                    "affects_query": True,
                    "n_tokens": n_pos,
                    "tokens": TOKENS_B,
                    "tokens_a": tokens_a,
                    "diff_positions": [CHANGED],
                    "layers": list(range(N_LAYERS)),
                    "axes": ["layer", "pos"],
                    "span": span,
                    "ground_truth_a": 8,
                    "ground_truth_b": 5,
                    "candidate_labels": [str(d) for d in range(10)],
                    "answer_index_a": 8,
                    "answer_index_b": 5,
                    "normalised": norm,
                    "prob_delta": -0.9 * norm,
                    "prob_delta_candidates": -0.9 * norm,
                    "logit_diff": -6.0 + 12.0 * norm,
                }
                for name in rows:
                    rows[name].append(
                        values[name] if name in values else _zero(name, (N_LAYERS, n_pos))
                    )
    return Dataset.from_dict(rows, features=patching.features(N_LAYERS, n_pos, 10))


def text_of(chart) -> str:
    return json.dumps(chart.to_dict(), ensure_ascii=False)


def drawn_cells(chart) -> pl.DataFrame:
    """Every cell row the chart's datasets carry (the heatmap's inline data)."""
    frames = [pl.DataFrame(v) for v in chart.to_dict()["datasets"].values() if v]
    return pl.concat(frames, how="diagonal_relaxed")


@pytest.fixture(scope="module")
def rows() -> Dataset:
    return pretrained_like()


# ---------------------------------------------------------------------------------------------
# Token labels


def test_byte_level_pieces_are_decoded_and_whitespace_is_marked():
    assert [display_token(t) for t in ("Ġhelpful", "Ċ", "Ġ", "ĠĠ", "▁the")] == [
        "·helpful",
        "↵",
        "·",
        "··",
        "·the",
    ]
    assert decode_piece("Ã©") == "é"  # two byte characters, one UTF-8 letter
    for kept in ("<|im_start|>", "café", "a=5;", "//=", "9"):  # not byte-level, or plain ASCII
        assert display_token(kept) == kept


def test_heatmap_shows_decoded_tokens_not_raw_bpe(rows):
    chart = charts.heatmap_figure(aggregate(rows))
    labels = set(drawn_cells(chart)["label"].to_list())
    assert {"↵", "·"} <= labels and not any("Ġ" in x or "Ċ" in x for x in labels)
    caption = " ".join(charts.heatmap_caption("normalised", whitespace=True))
    assert "· = a space, ↵ = a new line" in caption
    assert "· =" in text_of(chart)  # the caption (wrapped) says what the marks are
    assert "↵ (12)" in set(drawn_cells(chart)["token"].to_list())  # label, then its position


# ---------------------------------------------------------------------------------------------
# Only patched rows, negative values, saturation


def test_heatmap_draws_only_patched_rows_and_says_so(rows):
    chart = charts.heatmap_figure(aggregate(rows))
    assert sorted(set(drawn_cells(chart)["position"].to_list())) == list(PATCHED)
    assert "Only patched positions are drawn (4 of 20 at k = 3)" in text_of(chart)
    assert "Grey = no pair" not in text_of(chart)  # no grey rows left to explain


def test_negative_cell_is_drawn_in_colour_not_white(rows):
    chart = charts.heatmap_figure(aggregate(rows))
    cells = drawn_cells(chart)
    cell = cells.filter(
        (pl.col("site") == "attn_out") & (pl.col("layer") == 2) & (pl.col("position") == 19)
    )
    assert cell["mean"].to_list() == [pytest.approx(NEGATIVE)] and cell["count"].to_list() == [3]
    scale = charts.color_scale("normalised", cells["mean"].drop_nulls().to_list())
    low, zero, _ = scale.domain
    assert low <= NEGATIVE < zero == 0 and scale.range[0] == charts.TOWARDS_B


def test_logit_diff_scale_spans_its_values_without_saturating(rows):
    values = aggregate(rows, "logit_diff")["stats"][:, :, 0]
    peak = float(np.nanmax(np.abs(values)))
    scale = charts.color_scale("logit_diff", values[np.isfinite(values)].tolist())
    assert scale.domain[0] == -scale.domain[-1] and peak <= scale.domain[-1] <= 2 * peak


# ---------------------------------------------------------------------------------------------
# Attribution is named an estimate


def test_attribution_is_named_an_estimate_in_title_subtitle_and_legend():
    rows = pretrained_like(method="attribution")
    spec = charts.heatmap_figure(aggregate(rows)).to_dict()
    assert "estimate" in spec["title"]["text"] and "not exact" in spec["title"]["text"]
    assert spec["title"]["subtitle"].startswith("Estimated mean")
    assert "estimated" in json.dumps(spec["vconcat"][0]["hconcat"][0]["spec"]["layer"])
    frame, row = example_frame(rows, "normalised")
    traces = charts.traces_figure(frame, row, "normalised").to_dict()
    assert "first-order estimate" in json.dumps(traces["title"]["subtitle"])
    assert "attribution estimate" in json.dumps(traces["spec"], ensure_ascii=False)
    exact = charts.heatmap_figure(aggregate(pretrained_like())).to_dict()
    assert "estimate" not in json.dumps(exact["title"]) and "Activation patching" in json.dumps(
        exact["title"]
    )


# ---------------------------------------------------------------------------------------------
# Traces name only drawn lines


def test_trace_legend_names_only_lines_that_are_drawn(rows):
    frame, row = example_frame(rows, "normalised")
    lines = charts.trace_lines(frame, row)
    assert set(lines["position"].to_list()) <= set(PATCHED)
    assert lines["role"].to_list() == ["changed", "strongest", "last"]
    assert "<|im_start|>" not in " ".join(lines["name"].to_list())  # position 0: never patched
    assert "`·`" in lines["name"][-1]  # the last token, a space, shown as a mark
    chart = charts.traces_figure(frame, row, "normalised")
    data = pl.concat([pl.DataFrame(v) for v in chart.to_dict()["datasets"].values()])
    assert set(data["name"].to_list()) == set(lines["name"].to_list())


# ---------------------------------------------------------------------------------------------
# Subtitles say where the patch went


def _layer_rows(span: str) -> Dataset:
    base = pretrained_like(span=span)
    rows = base.to_dict()
    rows["axes"] = [["layer"]] * len(base)
    grids = {m: [np.nanmean(np.asarray(g), axis=-1) for g in rows[m]] for m in patching.METRICS}
    rows.update(grids)
    feats = patching.features(N_LAYERS, 10)
    keep = {k: v for k, v in rows.items() if k in feats}
    keep["logits"] = [np.zeros((N_LAYERS, 10), np.float32)] * len(base)
    keep["lse"] = [np.zeros(N_LAYERS, np.float32)] * len(base)
    return Dataset.from_dict(keep, features=feats)


@pytest.mark.parametrize(
    ("span", "words"),
    [
        ("before-last", "up to, not including, the last token"),
        ("last", "the last token alone"),
        ("all", "every position at once"),
    ],
)
def test_whole_stream_subtitle_names_the_position_set(span, words):
    rows = _layer_rows(span)
    agg = aggregate(rows)
    chart = charts.layer_line_figure(effect_cells(agg), agg)
    subtitle = chart.to_dict()["title"]["subtitle"]
    assert words in subtitle
    if span != "all":
        assert "every position at once" not in subtitle


def test_selection_is_named_in_the_heatmap_subtitle(rows):
    subtitle = charts.heatmap_figure(aggregate(rows)).to_dict()["title"]["subtitle"]
    assert "only the changed tokens" in subtitle


# ---------------------------------------------------------------------------------------------
# Wide studies and picking k / sites


def test_many_divergence_indices_wrap_into_rows_under_2500_px(tmp_path):
    rows = pretrained_like(ks=tuple(range(8)), pairs=1)
    chart = charts.heatmap_figure(aggregate(rows))
    (png,) = charts.save_chart(chart, tmp_path, "wide", ("png",))
    width, _ = struct.unpack(">II", png.read_bytes()[16:24])
    assert width <= 2500, width
    body = chart.to_dict()["vconcat"][0]
    assert len(body["vconcat"]) >= 2  # rows of groups, not one long line


def test_aggregate_keeps_only_the_asked_k_and_sites():
    rows = pretrained_like(ks=(1, 4, 6), pairs=1)
    agg = aggregate(rows, ks=[1, 4], sites=["resid_pre"])
    assert agg["divergence_indices"] == [1, 4] and agg["sites"] == ["resid_pre"]
    assert agg["stats"].shape[:2] == (1, 2)
    with pytest.raises(charts.ChartError, match=r"no divergence index 5 .* it has 1, 4, 6"):
        aggregate(rows, ks=[5])
    with pytest.raises(charts.ChartError, match="no site 'mlp_out'"):
        aggregate(rows, sites=["mlp_out"])


# ---------------------------------------------------------------------------------------------
# The causal trace says what its outlined boxes are


def test_tracing_caption_explains_outlined_boxes_and_decodes_tokens(tmp_path):
    n_pos = len(TOKENS_B)
    grid = np.zeros((1, 3, N_LAYERS, n_pos))
    grid[0, 0, :2, CHANGED] = 0.6  # restoring the corrupted digit early brings the answer back
    summary = {
        "kinds": ["resid", "mlp", "attn"],
        "layers": list(range(N_LAYERS)),
        "divergence_indices": [3],
        "by_position": grid,
        "labels": {3: [display_token(t) for t in TOKENS_B]},
        "corrupted": {3: [CHANGED]},
        "counts": {3: 4},
        "by_k": {3: (0.9, 0.2)},
        "clean_prob": 0.9,
        "corrupted_prob": 0.2,
        "window": 1,
        "sigma": 0.3,
        "noise_scale": 3.0,
        "n_samples": 2,
        "corrupt": "changed",
        "model": "m",
    }
    chart = charts.tracing_figure(summary)
    caption = " ".join(charts.tracing_caption(summary, False, False))
    assert "outlined" in caption and "outlined white box" in caption
    text = text_of(chart)
    assert '"stroke": "#222222"' in text  # the outline the caption explains is drawn
    assert "Ġ" not in text and "Ċ" not in text


# ---------------------------------------------------------------------------------------------
# Accuracy: labels apart, the capped length shown


def _accuracy_summary() -> pl.DataFrame:
    acc = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.93, 0.93, 0.84, 0.8, 0.75, 0.7]
    return pl.DataFrame(
        [
            {
                "model_id": "seqpatch/organism",
                "family": "binding",
                "seq_len": n + 1,
                "accuracy": a,
                "ci_low": a - 0.05,
                "ci_high": min(1.0, a + 0.03),
                "n": 100,
            }
            for n, a in enumerate(acc)
        ]
    )


def _texts(spec: dict) -> dict[str, dict]:
    """Each text layer's words → its mark and the x of its data."""
    out = {}
    for layer in spec["layer"]:
        if layer["mark"].get("type") == "text" and "value" in layer["encoding"]["text"]:
            rows = spec["datasets"][layer["data"]["name"]]
            out[layer["encoding"]["text"]["value"]] = {**layer["mark"], "x": rows[0].get("x")}
    return out


@pytest.mark.parametrize("chosen_len", [2, 10, 12])
def test_threshold_label_sits_away_from_the_chosen_label(chosen_len):
    spec = charts.accuracy_figure(
        _accuracy_summary(), 0.8, ("seqpatch/organism", chosen_len)
    ).to_dict()
    label = _texts(spec)["choice threshold 0.8"]
    assert label["baseline"] == "bottom"  # above its line
    far_end = 1 - 0.45 if chosen_len >= 7.5 else 14 + 0.45
    assert label["x"] == pytest.approx(far_end)


def test_the_capped_length_studied_is_drawn_and_named():
    spec = charts.accuracy_figure(
        _accuracy_summary(),
        0.8,
        ("seqpatch/organism", 10),
        studied=8,
        cap_reason="capped by --max-seq-len 8",
    ).to_dict()
    assert "studied: length 8" in _texts(spec)
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "the length studied, 8 (the chosen 10, capped by --max-seq-len 8)" in subtitle
    plain = charts.accuracy_figure(_accuracy_summary(), 0.8, ("seqpatch/organism", 10), studied=10)
    assert "studied" not in json.dumps(plain.to_dict())  # nothing to say when not capped


def test_plot_heatmap_draws_only_the_asked_k_and_sites(tmp_path):
    from seqpatch.plots import heatmap_chart, plot_heatmap

    rows = pretrained_like(ks=(1, 4, 6), pairs=1)
    spec = heatmap_chart(rows, ks=[1, 4], sites=["resid_pre"]).to_dict()
    groups = spec["vconcat"][0]["hconcat"]
    assert [g["title"]["text"].split(" (")[0] for g in groups] == ["k = 1", "k = 4"]
    assert {g["facet"]["column"]["sort"][0] for g in groups} == {
        charts.site_title("resid_pre", "|")
    }
    assert len(groups[0]["facet"]["column"]["sort"]) == 1 and "(2 pairs)" in spec["title"]["text"]
    paths = plot_heatmap(rows, tmp_path, ks=[4], sites=["attn_out"])
    assert {p.name for p in paths} == {
        "heatmap-normalised-k4-attn_out.html",
        "heatmap-normalised-k4-attn_out.png",
    }


def test_a_wide_head_study_puts_each_k_on_its_own_row():
    ks, layers, heads = list(range(8)), list(range(30)), list(range(9))
    cells = pl.DataFrame(
        [
            {"site": "head_z", "divergence_index": k, "layer": la, "head": h, "mean": 0.1}
            | {"std": 0.0, "count": 2}
            for k in ks
            for la in layers
            for h in heads
        ]
    )
    agg = {"sites": ["head_z"], "divergence_indices": ks, "layers": layers, "heads": heads}
    spec = charts.head_heatmap_figure(cells, agg, "normalised", dict.fromkeys(ks, 2)).to_dict()
    assert spec["facet"]["row"]["field"] == "k_title"  # 8 × 30 layers would be ~3,000 px across
    narrow = {**agg, "divergence_indices": [0, 1], "layers": [0, 1, 2, 3]}
    two = cells.filter((pl.col("divergence_index") < 2) & (pl.col("layer") < 4))
    spec = charts.head_heatmap_figure(two, narrow, "normalised", {0: 2, 1: 2}).to_dict()
    assert spec["facet"]["column"]["field"] == "k_title"


def test_top_heads_of_a_wide_study_wrap_into_rows():
    ks, n_pos = list(range(6)), 80
    cells = pl.DataFrame(
        [
            {"site": "head_z", "divergence_index": k, "layer": 0, "head": h, "position": t}
            | {"label": f"t{t}", "mean": 0.1 * h, "std": 0.0, "count": 2}
            for k in ks
            for h in range(3)
            for t in range(n_pos)
        ]
    )
    agg = {"sites": ["head_z"], "divergence_indices": ks, "labels": {k: ["t"] * n_pos for k in ks}}
    spec = charts.top_heads_figure(cells, agg, "normalised", dict.fromkeys(ks, 2)).to_dict()
    rows = spec["vconcat"]
    per_row = [len(r["facet"]["column"]["sort"]) for r in rows]
    assert sum(per_row) == len(ks) and max(per_row) * (9 * n_pos + 14) + 150 <= 1250


@pytest.mark.parametrize(("metric", "blue_when"), [("normalised", ">="), ("prob_delta", "<=")])
def test_top_head_bars_are_blue_where_the_metric_means_towards_a(metric, blue_when):
    cells = pl.DataFrame(
        [
            {"site": "head_z", "divergence_index": 1, "layer": 0, "head": h, "position": t}
            | {"label": f"t{t}", "mean": -0.5 if h else 0.5, "std": 0.0, "count": 2}
            for h in range(2)
            for t in range(3)
        ]
    )
    agg = {"sites": ["head_z"], "divergence_indices": [1], "labels": {1: ["t"] * 3}}
    spec = charts.top_heads_figure(cells, agg, metric, {1: 2}).to_dict()
    color = spec["spec"]["encoding"]["color"]
    assert color["condition"]["test"] == f"datum.mean {blue_when} 0"
    assert color["condition"]["value"] == charts.TOWARDS_A


# ---------------------------------------------------------------------------------------------
# The font of every chart's text


def _text_png(text: str, font: str) -> bytes:
    """``text`` drawn by vl-convert (what ``save_chart`` renders PNGs with) in ``font``."""
    import vl_convert

    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v6.json",
        "data": {"values": [{"t": text}]},
        "mark": {"type": "text", "fontSize": 40, "font": font},
        "encoding": {"text": {"field": "t"}},
        "width": 120,
        "height": 60,
        "config": {"view": {"stroke": None}},
    }
    return vl_convert.vegalite_to_png(spec, scale=1)


def test_saved_charts_name_a_font_that_has_the_whitespace_marks(tmp_path):
    """Token labels mark spaces, new lines and tabs (``·``, ``↵``, ``⇥``). Left to vl-convert's
    "sans-serif", those came out in a serif fallback (the sans font it picked has no ``↵``).
    Every saved chart now names ``style.FONT`` (HTML with fallbacks for browsers), and that font
    is one vl-convert finds (a family it cannot find draws no text at all) and draws each mark
    in itself, not in the serif fallback."""
    from seqpatch.charts import style
    from seqpatch.charts.tokens import NEWLINE, SPACE, TAB

    rows = pretrained_like(ks=(1,), pairs=1)
    chart = charts.heatmap_figure(aggregate(rows))
    (html,) = charts.save_chart(chart, tmp_path, "heatmap", ("html",))
    assert f'"font": "{style.FONT}, {style.FONT_FALLBACKS}"' in html.read_text()
    assert style.with_font(chart, fallbacks=False).to_dict()["config"]["font"] == style.FONT
    assert style.with_font(chart).to_dict()["config"]["view"]["stroke"] is None  # the rest kept
    blank = _text_png("", style.FONT)
    assert _text_png("x", "NoSuchFont-seqpatch") == blank  # an unknown family draws nothing
    for mark in (SPACE, NEWLINE, TAB, "abc"):
        drawn = _text_png(mark, style.FONT)
        assert drawn != blank, mark  # the family is found and draws the glyph
        assert drawn != _text_png(mark, "DejaVu Serif"), mark  # in itself, not a serif
