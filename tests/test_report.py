"""`seqpatch report`: the study page is self-contained, written outside stored versions, and
works in a real browser (Debian's Chromium driven by Playwright): no console errors, every chart
drawn, and a click on a heatmap cell shows the pairs behind it with the API's numbers."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from seqpatch import plots
from seqpatch.cli import app
from seqpatch.report import ReportError, build_report
from seqpatch.views import Study

CHROMIUM = "/usr/bin/chromium"  # Debian's package (`apt-get install -y chromium`, see .ci/run)


@pytest.fixture(scope="module")
def page(organism_study, tmp_path_factory) -> Path:
    return build_report(Study(organism_study), tmp_path_factory.mktemp("page") / "study.html")


def test_the_page_needs_no_network_and_holds_every_section(page, organism_study):
    text = page.read_text()
    markup = re.sub(r"(?s)(<script[^>]*>).*?</script>", r"\1</script>", text)  # tags, no code
    assert markup.count("<script") == 3  # the inlined Vega bundle, the data, the page's code
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", markup)  # nothing loaded
    study = Study(organism_study)
    for ref in study.patching_refs():
        assert f'id="patching-{ref.version}"' in text
    for section in ("findings", "accuracy", "pairs", "tracing", "das", "lineage"):
        assert f'<section id="{section}">' in text
    assert "95% CI" in text and "changes_drawn" not in text.split('id="pairs"')[1][:2000]


def test_the_cli_writes_beside_the_stages_and_refuses_a_stored_version(organism_study, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(organism_study, copy)
    result = CliRunner().invoke(app, ["report", "--data-dir", str(copy)])
    assert result.exit_code == 0, result.output
    study = Study(copy)
    expected = copy / "reports" / study.pairs_ref.version / "index.html"
    assert result.output.strip() == f"report: {expected}" and expected.stat().st_size > 100_000
    inside = study.ref("patching").path / "page.html"
    with pytest.raises(ReportError, match="inside the stored version"):
        build_report(study, inside)
    bad = CliRunner().invoke(app, ["report", "--metric", "nope", "--data-dir", str(copy)])
    assert bad.exit_code == 2 and "unknown metric 'nope'" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


@contextmanager
def chromium(page: Path) -> Iterator[tuple[Any, list[str], list[str]]]:
    """``page`` opened in Chromium with every request outside ``file:`` refused, once every
    chart is drawn: the tab, the console's errors and the URLs requested (both filled as the
    page runs)."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))

            def offline(route) -> None:
                requests.append(route.request.url)
                if route.request.url.startswith("file:"):
                    route.continue_()
                else:
                    route.abort()

            tab.route("**/*", offline)
            tab.goto(page.as_uri())
            tab.wait_for_selector("body[data-charts-rendered]", timeout=60_000)
            yield tab, errors, requests
        finally:
            browser.close()


def drawn_marks(tab: Any) -> list[int]:
    """How many marks (paths, lines) each chart of the page drew."""
    return tab.evaluate(
        "[...document.querySelectorAll('div.chart')].map(d => d.querySelectorAll("
        '\'svg g[class*="mark-"] path, svg g[class*="mark-"] line\').length)'
    )


def test_the_page_renders_in_chromium_and_the_drill_down_answers_a_click(page, organism_study):
    study = Study(organism_study)
    with chromium(page) as (tab, errors, requests):
        n_charts = tab.locator("div.chart").count()
        assert n_charts == 7  # accuracy, 3 patching grids, one pair's traces, tracing, DAS
        assert int(tab.evaluate("document.body.dataset.chartsRendered")) == n_charts
        marks = drawn_marks(tab)
        assert all(n > 0 for n in marks), marks

        layer_pos = next(
            r for r in study.patching_refs() if study.grid(r)["axes"] == ("layer", "pos")
        )
        heatmap = tab.locator(f"#patching-{layer_pos.version} div.chart").first
        cells = heatmap.locator("g.mark-rect path[aria-label*='mean']")
        label = cells.nth(cells.count() - 1).get_attribute("aria-label")
        cells.nth(cells.count() - 1).click()
        tab.wait_for_selector("#drill-pairs tbody tr", timeout=10_000)
        tab.wait_for_selector("#drill-hist svg g.mark-rect path", timeout=10_000)
        panel = tab.inner_text("#drill")
    assert errors == []
    assert requests == [page.as_uri()]
    fields = dict(part.split(": ", 1) for part in label.split("; "))
    expected = study.patching(layer_pos.version, ("normalised",)).filter(
        pl.col("site") == fields["site"],
        pl.col("divergence_index") == int(fields["k"]),
        pl.col("layer") == int(fields["layer"]),
        pl.col("position") == int(fields["position"]),
    )
    row = expected.row(0, named=True)
    assert f"mean {row['mean']:.3f}" in panel and f"n {row['n']}" in panel
    assert f"95% CI [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" in panel
    pair_ids = set(
        study.pair_values(
            layer_pos.version, site=fields["site"], divergence_index=int(fields["k"])
        )["pair_id"]
    )
    shown = [pid for pid in pair_ids if pid in panel]
    assert shown  # the pairs that drive the mean, with their programs
    program = study.pairs().filter(pl.col("pair_id") == shown[0])["program_a"][0]
    assert program.splitlines()[0] in panel


@pytest.fixture(scope="module")
def chain_study(tmp_path_factory) -> Path:
    """Chain pairs of the organism (the changed value reaches the query through at least two
    statements) and their ``--positions slice`` grid, which is drawn by token role: as
    ``seqpatch build pairs --min-depth 2`` then ``build patching --positions slice`` make it."""
    from seqpatch.pipeline import build_pairs, build_patching

    data_dir = tmp_path_factory.mktemp("chain")
    build_pairs(seq_len=4, n_pairs=8, min_depth=2, data_dir=data_dir, progress=False)
    build_patching(("resid_pre",), positions="slice", data_dir=data_dir, progress=False)
    return data_dir


def test_a_role_grid_renders_and_a_click_shows_the_pairs_of_that_role(chain_study, tmp_path):
    """A slice grid's rows are roles, and one role sits at different positions in different
    pairs: the page draws it with no console error, and a click on a role's cell shows the mean
    over each pair's own token of that role (the API's number) and those pairs."""
    study = Study(chain_study)
    ref = study.ref("patching")
    values = study.pair_values(ref.version, site="resid_pre")
    moved = values.group_by("divergence_index", "token_role").agg(pl.col("position").n_unique())
    assert (moved["position"] > 1).any()  # a role at several positions: not an index grid
    spec = json.dumps(plots.heatmap_chart(study.rows(ref)).to_dict(), ensure_ascii=False)
    assert "per site, layer and token role" in spec and "Rows: token roles" in spec
    assert "one example pair" not in spec  # the token caption would not be true of role rows
    page = build_report(study, tmp_path / "chain.html")
    with chromium(page) as (tab, errors, requests):
        marks = drawn_marks(tab)
        assert marks and all(n > 0 for n in marks), marks
        heatmap = tab.locator(f"#patching-{ref.version} div.chart").first
        cells = heatmap.locator("g.mark-rect path[aria-label*='mean']")
        labels = [cells.nth(i).get_attribute("aria-label") for i in range(cells.count())]
        fields = [dict(part.split(": ", 1) for part in label.split("; ")) for label in labels]
        assert all("position" not in f for f in fields)  # no index passed off as a token's
        assert {"hop0:value", "hop1:var", "last"} <= {f["token role"] for f in fields}
        movers = {
            (int(k), role)
            for k, role in moved.filter(pl.col("position") > 1)
            .select("divergence_index", "token_role")
            .iter_rows()
        }
        pick = max(  # the strongest cell of a role that moves: a mean far from 0
            (i for i, f in enumerate(fields) if (int(f["k"]), f["token role"]) in movers),
            key=lambda i: abs(float(fields[i]["mean"])),
        )
        cells.nth(pick).click()
        tab.wait_for_selector("#drill-pairs tbody tr", timeout=10_000)
        tab.wait_for_selector("#drill-hist svg g.mark-rect path", timeout=10_000)
        panel = tab.inner_text("#drill")
    assert errors == []
    assert requests == [page.as_uri()]
    cell = fields[pick]
    k, layer, role = int(cell["k"]), int(cell["layer"]), cell["token role"]
    row = (
        study.patching(ref.version, ("normalised",))
        .filter(
            pl.col("site") == "resid_pre",
            pl.col("divergence_index") == k,
            pl.col("layer") == layer,
            pl.col("role") == role,
        )
        .row(0, named=True)
    )
    assert f"role {role}" in panel
    assert f"mean {row['mean']:.3f}" in panel and f"n {row['n']}" in panel
    assert f"95% CI [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" in panel
    behind = values.filter(
        pl.col("divergence_index") == k, pl.col("layer") == layer, pl.col("token_role") == role
    )
    assert len(behind) == row["n"] and behind["position"].n_unique() > 1
    shown = [pid for pid in study.pairs()["pair_id"] if pid in panel]
    assert sorted(shown) == sorted(behind["pair_id"])  # n <= N_DRIVERS here: every one listed
