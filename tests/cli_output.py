"""Assertions on what a failed CLI command leaves behind: one error line, an untouched folder."""

from __future__ import annotations

from pathlib import Path


def error_line(stderr: str) -> str:
    """The one error line (model loading may print progress bars before it)."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "Error: " in line]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert stderr.endswith(lines[0] + "\n")
    return lines[0]


def snapshot(folder: Path) -> list[str]:
    """Every path under ``folder``, relative and sorted: compare before and after a command."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
