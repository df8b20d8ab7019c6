"""docs/tutorial.py (jupytext) is the source of docs/tutorial.ipynb, and the notebook runs: from
the main job through the Python API and the results API to the study page, in under two
minutes on the organism."""

from __future__ import annotations

import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

DOCS = Path(__file__).resolve().parent.parent / "docs"
BUDGET_S = 120


def _code(notebook: nbformat.NotebookNode) -> list[str]:
    return [cell.source.strip() for cell in notebook.cells if cell.cell_type == "code"]


def test_the_rendered_notebook_is_the_script():
    script = jupytext.read(DOCS / "tutorial.py")
    rendered = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    assert _code(rendered) == _code(script)
    texts = [c.source.strip() for c in rendered.cells if c.cell_type == "markdown"]
    assert texts == [c.source.strip() for c in script.cells if c.cell_type == "markdown"]
    executed = [c for c in rendered.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in executed)  # the committed notebook ran
    errors = [o for c in executed for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []


def test_the_tutorial_runs_in_under_two_minutes(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQPATCH_TUTORIAL_DATA", str(tmp_path / "data"))
    notebook = jupytext.read(DOCS / "tutorial.py")
    client = NotebookClient(
        notebook,
        timeout=BUDGET_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    assert seconds < BUDGET_S, f"the tutorial took {seconds:.0f} s"
    outputs = "".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "the answer's position holds it from layer" in outputs
    assert (tmp_path / "data" / "reports").is_dir()
    pages = list((tmp_path / "data" / "reports").glob("*/index.html"))
    assert len(pages) == 1 and pages[0].stat().st_size > 100_000
