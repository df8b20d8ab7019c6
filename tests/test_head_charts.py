"""The top heads' per-position chart of a layer,head,pos patching stage."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from seqpatch import charts, pipeline, plots
from seqpatch.stages import patching
from seqpatch.store import Store
from tests.test_patching_stage import build_pairs, model_cache, tiny_handle

N_TOP = 3


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A tiny Llama's head_z stage over (layer, head, position): its ref and rows."""
    root = tmp_path_factory.mktemp("heads")
    handle = tiny_handle(root, "llama")
    data_dir = build_pairs(handle, root / "data")
    ref = pipeline.build_patching(
        ("head_z",),
        axes=("layer", "head", "pos"),
        activations="none",
        data_dir=data_dir,
        models=model_cache(handle),
        progress=False,
    )
    return ref, Store(data_dir).load("patching", ref.version)


def stored_top_heads(folder, n):
    """The ``n`` (layer, head) with the largest peak |mean| in the stored heatmap array, read
    with numpy alone: ``[(layer, head, signed peak)]``, strongest first."""
    index = json.loads((folder / patching.HEATMAP_INDEX_FILE).read_text())
    stats = np.load(folder / index["metrics"]["normalised"]["file"])
    assert index["axes"][-3:] == ["layer", "head", "position"]
    mean = stats[0, :, 0]  # [k, layer, head, position]
    size = np.nan_to_num(np.abs(mean), nan=-1.0)
    peaks = []
    for li, layer in enumerate(index["layers"]):
        for hi, head in enumerate(index["heads"]):
            at = np.unravel_index(np.argmax(size[:, li, hi]), size[:, li, hi].shape)
            peaks.append((layer, head, float(mean[:, li, hi][at])))
    peaks.sort(key=lambda p: -abs(p[2]))
    return peaks[:n]


def test_top_heads_are_the_largest_stored_effects(stage):
    ref, rows = stage
    want = stored_top_heads(ref.path, N_TOP)
    assert abs(want[0][2]) > abs(want[-1][2])  # a real ranking, not ties
    agg = patching.aggregate(rows, "normalised")
    got = charts.top_heads(patching.effect_cells(agg), N_TOP)
    assert [(r["layer"], r["head"]) for r in got.iter_rows(named=True)] == [w[:2] for w in want]
    np.testing.assert_allclose(got["peak"].to_numpy(), [w[2] for w in want], rtol=1e-12)

    spec = plots.top_heads_chart(rows, n_top=N_TOP).to_dict()
    (values,) = spec["datasets"].values()
    drawn = pl.DataFrame(values)
    titles = {charts.head_name(layer, head) for layer, head, _ in want}
    assert {t.split(" · ")[0] for t in drawn["head_title"].unique()} == titles
    # one bar per (head, k, token) the pairs cover, with the stored mean
    first = drawn.filter(pl.col("rank") == 0).sort("divergence_index", "position")
    layer, head, _ = want[0]
    cells = patching.effect_cells(agg).filter(
        (pl.col("layer") == layer) & (pl.col("head") == head) & (pl.col("count") > 0)
    )
    np.testing.assert_allclose(
        first["mean"].to_numpy(), cells.sort("divergence_index", "position")["mean"].to_numpy()
    )


def test_stage_writes_the_chart(stage):
    ref, _ = stage
    stem = charts.top_heads_name("normalised")
    png = ref.path / f"{stem}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (ref.path / f"{stem}.html").stat().st_size > 0


def test_peak_keeps_its_sign_and_ranks_by_magnitude():
    cells = pl.DataFrame(
        {
            "site": ["head_z"] * 4,
            "divergence_index": [1, 1, 2, 2],
            "layer": [0, 1, 0, 1],
            "head": [0, 2, 0, 2],
            "position": [3, 3, 4, 5],
            "label": ["a", "a", "b", "c"],
            "mean": [0.2, 0.1, -0.3, 0.25],
            "std": [0.0] * 4,
            "count": [5] * 4,
        }
    )
    got = charts.top_heads(cells, 2)
    assert got.rows() == [("head_z", 0, 0, -0.3), ("head_z", 1, 2, 0.25)]


def test_top_heads_need_a_position_axis():
    cells = pl.DataFrame({"site": ["head_z"], "layer": [0], "head": [0], "mean": [0.1]})
    with pytest.raises(charts.ChartError, match="layer,head,pos"):
        charts.top_heads(cells)
