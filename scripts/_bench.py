"""What the benchmark scripts share: a competing CPU-bound process, and appending to the docs.

Imported by the scripts run as ``python scripts/<name>.py`` (their folder is on ``sys.path``).
"""

from __future__ import annotations

import multiprocessing
import shlex
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def _spin() -> None:
    while True:
        pass


@contextmanager
def competing_process() -> Iterator[None]:
    """One CPU-bound process spinning on a core for the duration: the 'loaded' machine (spawned,
    so it holds none of the caller's threads or memory)."""
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
    spinner.start()
    try:
        yield
    finally:
        spinner.terminate()
        spinner.join()


def command_line(script: str) -> str:
    """How this run was invoked, as the docs quote it: ``python scripts/<name>.py <args>``."""
    return "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])


def print_and_append(text: str, docs: Path, append: bool) -> None:
    """Print ``text``; with ``append``, also add it to the end of ``docs``."""
    print(text)
    if append:
        with docs.open("a") as out:
            out.write(text)
