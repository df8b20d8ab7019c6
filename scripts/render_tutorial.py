"""Render docs/tutorial.ipynb from docs/tutorial.py: execute the script as a notebook in a
temporary folder (its data go there) and write it with its outputs.

    python scripts/render_tutorial.py

tests/test_tutorial.py checks that the notebook's cells are the script's and that it ran.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> int:
    notebook = jupytext.read(DOCS / "tutorial.py")
    os.environ.pop("SEQPATCH_TUTORIAL_DATA", None)  # the default, relative folder
    with tempfile.TemporaryDirectory() as folder:
        client = NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": folder}}
        )
        client.execute()
    for cell in notebook.cells:
        cell.get("metadata", {}).pop("execution", None)
        if cell.cell_type == "code":  # progress bars and library warnings are not the tutorial
            cell.outputs = [
                out
                for out in cell.outputs
                if not (out.output_type == "stream" and out.name == "stderr")
            ]
    nbformat.write(notebook, DOCS / "tutorial.ipynb")
    print(DOCS / "tutorial.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
