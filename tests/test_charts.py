"""Charts a reader understands without the README (issue 18, point 3).

The patching charts are drawn from a small synthetic patching dataset with the stage's real
schema (``patching.features``), through the stage's own views (``aggregate``,
``example_frame``); the accuracy chart from a ``benchmark.summarize`` frame of made-up rows.
Every chart is rendered to PNG with vl-convert and its pixel size read back.
"""

from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from datasets import Dataset, Value

from seqpatch import charts
from seqpatch.pairs import make_counterfactual_pair
from seqpatch.stages import patching
from seqpatch.stages.benchmark import summarize

SITES = ("resid_pre", "attn_out", "mlp_out")
KS = (1, 4, 7)
N_LAYERS = 4
SEQ_LEN = 8  # 8 statements: 35 compact tokens + <bos> = 36 positions
TOKEN = re.compile(r"//=|\+=|-=|%=|abs|[a-z]|\d|[^\sa-z\d]")


def synthetic_patching(pairs_per_k: dict[int, int], seed: int = 0) -> Dataset:
    """Rows shaped like the patching stage's: real binding pairs, made-up effect grids.

    The normalised effect is high at the changed token in early layers and moves to the last
    token in later layers (what a tracked value looks like), smaller for attention and MLP.
    """
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {name: [] for name in patching.features(1, 1, 1)}
    n_pos = None
    for k, n in pairs_per_k.items():
        for i in range(n):
            a, b, _ = make_counterfactual_pair(SEQ_LEN, k, random.Random(1000 * k + i))
            tokens_a = ["<bos>", *TOKEN.findall(a.render("compact"))]
            tokens_b = ["<bos>", *TOKEN.findall(b.render("compact"))]
            if len(tokens_a) != len(tokens_b):
                continue
            n_pos = n_pos or len(tokens_b)
            diff = [t for t, (x, y) in enumerate(zip(tokens_a, tokens_b, strict=True)) if x != y]
            last = len(tokens_b) - 1
            for site, gain in zip(SITES, (1.0, 0.35, 0.5), strict=True):
                norm = rng.normal(0, 0.03, size=(N_LAYERS, len(tokens_b)))
                for layer in range(N_LAYERS):
                    early = max(0.0, 1 - layer / (N_LAYERS - 1))
                    for t in diff:
                        norm[layer, t] += gain * early
                    norm[layer, last] += gain * (1 - early)
                    norm[layer, min(diff[-1] + 1, last)] += 0.3 * gain * (1 - abs(layer - 1.5))
                norm = norm.astype(np.float32)
                ld_b, ld_a = -4.0, 4.0
                values = {
                    "pair_id": f"binding-L{SEQ_LEN}-k{k}-{i:07d}",
                    "site": site,
                    "divergence_index": k,
                    "affects_query": True,
                    "n_tokens": len(tokens_b),
                    "tokens": tokens_b,
                    "tokens_a": tokens_a,
                    "diff_positions": diff,
                    "layers": list(range(N_LAYERS)),
                    "ground_truth_a": a.answer,
                    "ground_truth_b": b.answer,
                    "candidate_labels": [str(d) for d in range(10)],
                    "answer_index_a": a.answer,
                    "answer_index_b": b.answer,
                    "baseline_logits_a": np.zeros(10, np.float32),
                    "baseline_logits_b": np.zeros(10, np.float32),
                    "logits": np.zeros((N_LAYERS, len(tokens_b), 10), np.float32),
                    "prob_delta": np.clip(-0.95 * norm, -1, 1),
                    "logit_diff": ld_b + norm * (ld_a - ld_b),
                    "normalised": norm,
                }
                values["prob_delta_candidates"] = values["prob_delta"]
                for name in rows:
                    rows[name].append(values[name] if name in values else _zero(name, norm))
    return Dataset.from_dict(rows, features=patching.features(N_LAYERS, n_pos, 10))


def _zero(name: str, grid: np.ndarray):
    """A filler for a column the charts do not read (the schema grows over time)."""
    feature = patching.features(*grid.shape, 10)[name]
    if hasattr(feature, "shape"):
        return np.zeros(feature.shape, np.float32)
    if isinstance(feature, Value):
        return {"string": "", "bool": False}.get(feature.dtype, 0)
    return []


def synthetic_summary(models: int = 3) -> pl.DataFrame:
    """A ``summarize`` frame: ``models`` models × lengths 1..8, accuracy falling with length."""
    rng = np.random.default_rng(1)
    rows = []
    for m in range(models):
        for seq_len in range(1, 9):
            p = max(0.05, 1 - seq_len * (0.02 + 0.04 * m))
            for correct in rng.random(60) < p:
                rows.append(
                    {
                        "model_spec": f"spec-{m}",
                        "model_id": ["seqpatch/organism", "SmolLM2-135M", "gemma-3-270m"][m % 3],
                        "model_revision": None,
                        "n_params": 10**6 * (m + 1),
                        "family": "binding",
                        "seq_len": seq_len,
                        "correct": bool(correct),
                    }
                )
    return summarize(pl.DataFrame(rows))


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def groups_of(spec: dict) -> list[dict]:
    """A grid figure's groups (one per k), in order, whether in one row or wrapped into rows."""
    body = spec["vconcat"][0]
    rows = body.get("vconcat", [body])
    return [group for row in rows for group in row["hconcat"]]


def spec_text(chart) -> str:
    return json.dumps(chart.to_dict(), ensure_ascii=False)


@pytest.fixture(scope="module")
def rows() -> Dataset:
    return synthetic_patching({1: 4, 4: 3, 7: 5})


# ---------------------------------------------------------------------------------------------
# Heatmap


def test_heatmap_renders_under_2000_px_with_pair_counts_in_every_group(rows, tmp_path):
    agg = patching.aggregate(rows, "normalised")
    assert np.asarray(agg["stats"]).shape == (3, 3, 3, N_LAYERS, 36)  # the size the issue measured
    chart = charts.heatmap_figure(agg, "normalised", {1: 328, 4: 334, 7: 338})
    png, html = charts.save_chart(chart, tmp_path, "heatmap", ("png", "html"))
    width, height = png_size(png)
    assert height <= 2000, (width, height)
    assert width <= 3000, (width, height)
    spec = chart.to_dict()
    group_titles = [g["title"]["text"] for g in groups_of(spec)]
    assert group_titles == [
        "k = 1 (2nd statement changed) · 328 pairs",
        "k = 4 (5th statement changed) · 334 pairs",
        "k = 7 (8th statement changed) · 338 pairs",
    ]
    assert "1000 pairs" in spec["title"]["text"]
    assert html.read_text().count("<script") >= 1 and "cdn.jsdelivr" not in html.read_text()


def test_heatmap_counts_default_to_the_aggregate_counts(rows):
    assert charts.count_pairs(rows) == {1: 4, 4: 3, 7: 5}
    chart = charts.heatmap_figure(patching.aggregate(rows, "normalised"))
    titles = [g["title"]["text"] for g in groups_of(chart.to_dict())]
    assert [t.split(" · ")[-1] for t in titles] == ["4 pairs", "3 pairs", "5 pairs"]


def test_heatmap_caption_says_what_labels_star_and_colours_mean(rows):
    chart = charts.heatmap_figure(patching.aggregate(rows, "normalised"))
    caption = chart.to_dict()["vconcat"][0]["title"]
    assert caption["orient"] == "bottom"
    text = " ".join(caption["text"])
    assert all(len(line) <= 2400 // 6 for line in caption["text"])
    assert "one example pair" in text
    assert "* marks the tokens where A and B differ" in text
    assert "0 (white) = B's answer unchanged" in text and "1 (dark blue)" in text
    assert " ".join(charts.heatmap_caption("normalised")) == text


def test_heatmap_layer_labels_are_horizontal_and_sites_keep_their_order(rows):
    spec = charts.heatmap_figure(patching.aggregate(rows, "normalised")).to_dict()
    group = groups_of(spec)[0]
    assert color_layer(group)["x"]["axis"]["labelAngle"] == 0
    assert group["facet"]["column"]["sort"] == [charts.site_title(s, "|") for s in SITES]


def color_layer(group: dict) -> dict:
    """The encoding of the layer that colours cells by value, in one group of the heatmap."""
    (layer,) = [lay for lay in group["spec"]["layer"] if "color" in lay.get("encoding", {})]
    return layer["encoding"]


def scale_of(chart) -> dict:
    return color_layer(groups_of(chart.to_dict())[0])["color"]["scale"]


def test_normalised_diverges_so_negative_effects_are_visible(rows):
    """A negative normalised effect (B's own answer strengthened, e.g. the README's SmolLM2
    cell of −0.33) is red, not white: the scale is centred at a white 0."""
    scale = scale_of(charts.heatmap_figure(patching.aggregate(rows, "normalised")))
    assert scale["domain"] == [-1, 0, 1] and scale["clamp"] is True
    assert scale["range"] == [charts.TOWARDS_B, "#ffffff", charts.TOWARDS_A]
    assert len(set(scale["range"])) == len(scale["range"])  # white only at 0
    assert "drawn white" not in spec_text(charts.heatmap_figure(patching.aggregate(rows)))


@pytest.mark.parametrize("metric", ["prob_delta", "logit_diff", "prob_delta_candidates"])
def test_signed_metrics_diverge_around_a_white_zero(rows, metric):
    scale = scale_of(charts.heatmap_figure(patching.aggregate(rows, metric)))
    low, mid, high = scale["domain"]
    assert mid == 0 and low == -high and high > 0
    assert scale["range"][1] == "#ffffff"
    # blue = towards A's answer on both: prob_delta < 0 (B's answer lost), logit_diff > 0
    blue = scale["range"][2] if metric == "logit_diff" else scale["range"][0]
    assert blue == charts.TOWARDS_A
    if metric == "logit_diff":  # the bound covers every value
        values = patching.aggregate(rows, metric)["stats"][:, :, 0]
        assert high >= np.nanmax(np.abs(values))


def test_heatmap_marks_cells_without_data_grey_and_says_so(rows):
    agg = patching.aggregate(rows, "normalised")
    agg["stats"] = agg["stats"].copy()
    agg["stats"][0, 0, :, 2, 5] = [np.nan, np.nan, 0]
    cells = charts.heatmap_cells(agg)
    hole = cells.filter(
        (pl.col("site") == SITES[0]) & (pl.col("divergence_index") == 1) & (pl.col("layer") == 2)
    ).filter(pl.col("position") == 5)
    assert hole["mean"].to_list() == [None]
    text = spec_text(charts.heatmap_figure(agg))
    assert "Grey = no pair" in text and charts.NO_DATA in text
    assert "Grey = no pair" not in spec_text(charts.heatmap_figure(patching.aggregate(rows)))


def test_old_heatmap_chart_entry_point_still_draws(rows, tmp_path):
    cells = patching.effect_cells(patching.aggregate(rows, "normalised"))
    chart = charts.heatmap_chart(cells, "normalised", title="t")
    assert chart.to_dict()["title"]["text"] == "t"


def test_unknown_metric_is_one_actionable_error(rows):
    with pytest.raises(charts.ChartError, match="use one of normalised"):
        charts.heatmap_figure(patching.aggregate(rows, "normalised"), "accuracy")


# ---------------------------------------------------------------------------------------------
# Traces


def test_traces_title_legend_sites_and_file_name(rows, tmp_path):
    pair_id = "binding-L8-k4-0000001"
    frame, row = patching.example_frame(rows, "normalised", pair_id)
    a, b, _ = make_counterfactual_pair(SEQ_LEN, 4, random.Random(4001))
    statement_a, statement_b = a.statements[4].render("code"), b.statements[4].render("code")
    chart = charts.traces_figure(
        frame, row, "normalised", statement_a=statement_a, statement_b=statement_b
    )
    name = charts.traces_name(pair_id, "normalised")
    (png,) = charts.save_chart(chart, tmp_path, name, ("png",))
    assert png.name == f"traces-{pair_id}-normalised.png"
    assert png_size(png)[1] <= 1000
    spec = chart.to_dict()
    title = spec["title"]["text"]
    assert f"from `{statement_b}` (B) to `{statement_a}` (A)" in title
    assert f"answer {row['ground_truth_b']} in B, {row['ground_truth_a']} in A" in title
    assert "statement 4 (5th)" in title
    assert spec["facet"]["column"]["sort"] == [charts.site_title(s) for s in SITES]
    (line,) = [layer for layer in spec["spec"]["layer"] if layer["mark"]["type"] == "line"]
    legend = line["encoding"]["color"]["scale"]["domain"]
    assert line["encoding"]["strokeDash"]["scale"]["domain"] == legend
    roles = [entry.split(":")[0] for entry in legend]
    assert roles == ["changed token"] * len(row["diff_positions"]) + [
        "strongest other token",
        "last token",
    ]
    assert legend[-1].startswith(f"last token: `:` (position {row['n_tokens'] - 1}")


def test_trace_lines_pick_the_strongest_other_token_and_stay_apart(rows):
    frame, row = patching.example_frame(rows, "normalised", None)
    lines = charts.trace_lines(frame, row, n_strongest=1)
    changed, last = set(row["diff_positions"]), row["n_tokens"] - 1
    strongest = lines.filter(pl.col("role") == "strongest")["position"].item()
    peaks = (
        frame.filter(~pl.col("position").is_in([*changed, last]))
        .group_by("position")
        .agg(pl.col("value").abs().max())
        .sort("value", descending=True)
    )
    assert strongest == peaks["position"][0]
    data = pl.DataFrame(
        charts.traces_figure(frame, row, "normalised").to_dict()["datasets"].popitem()[1]
    )
    per_layer = data.group_by("site", "layer").agg(pl.col("x").n_unique(), pl.len())
    assert (per_layer["x"] == per_layer["len"]).all()  # no two lines share an x position


def test_traces_without_statements_name_the_changed_tokens(rows):
    frame, row = patching.example_frame(rows, "prob_delta", None)
    title = charts.traces_figure(frame, row, "prob_delta").to_dict()["title"]["text"]
    b = " ".join(row["tokens"][t] for t in row["diff_positions"])
    a = " ".join(row["tokens_a"][t] for t in row["diff_positions"])
    assert f"changed token `{b}` (B) to `{a}` (A)" in title


# ---------------------------------------------------------------------------------------------
# Accuracy


def test_accuracy_names_wilson_marks_threshold_and_choice_and_keeps_version_out_of_title(
    tmp_path,
):
    summary = synthetic_summary(3)
    chart = charts.accuracy_figure(summary, 0.8, ("seqpatch/organism", 5), "abc123def")
    (png,) = charts.save_chart(chart, tmp_path, "accuracy", ("png",))
    assert png_size(png)[1] <= 1000
    spec = chart.to_dict()
    assert "abc123def" not in spec["title"]["text"]
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "Wilson 95% interval" in subtitle and "abc123def" in subtitle
    text = spec_text(chart)
    assert "choice threshold 0.8" in text
    assert "chosen: seqpatch/organism, length 5" in text
    rules = [layer for layer in spec["layer"] if layer["mark"].get("strokeDash") == [5, 4]]
    assert len(rules) == 1
    threshold_rows = spec["datasets"][rules[0]["data"]["name"]]
    assert threshold_rows[0]["t"] == 0.8


def test_accuracy_models_differ_in_colour_shape_and_dash():
    chart = charts.accuracy_figure(synthetic_summary(3))
    spec = chart.to_dict()
    layers = {layer["mark"]["type"]: layer["encoding"] for layer in spec["layer"]}
    shapes = layers["point"]["shape"]["scale"]["range"]
    dashes = layers["line"]["strokeDash"]["scale"]["range"]
    assert len(set(shapes[:3])) == 3 and len({tuple(d) for d in dashes[:3]}) == 3
    xs = pl.DataFrame(spec["datasets"][spec["layer"][0].get("data", spec.get("data"))["name"]])
    assert xs.group_by("seq_len").agg(pl.col("x").n_unique())["x"].min() == 3


def test_accuracy_choice_missing_from_the_summary_is_an_error():
    with pytest.raises(charts.ChartError, match="not in the summary"):
        charts.accuracy_figure(synthetic_summary(1), 0.8, ("nope", 3))
