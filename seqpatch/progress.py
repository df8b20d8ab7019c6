"""One progress-bar style for every long step (rich, on stderr, silent when disabled)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Bar(Protocol):
    def update(self, advance: int = 1) -> None: ...


class _Silent:
    def update(self, advance: int = 1) -> None:
        pass


class _RichBar:
    def __init__(self, progress, task) -> None:  # type: ignore[no-untyped-def]
        self._progress, self._task = progress, task

    def update(self, advance: int = 1) -> None:
        self._progress.advance(self._task, advance)


@contextmanager
def progress_bar(total: int | None, description: str, enabled: bool = True) -> Iterator[Bar]:
    """A bar counting to ``total`` (unknown when ``None``) with rate and time left."""
    if not enabled:
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield _RichBar(progress, task)


@contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """Let transformers' own bars (e.g. "Writing model shards") show only when ``enabled``.

    ``--no-progress`` promises quiet logs; transformers prints its bars regardless unless told.
    The previous setting is restored on exit.
    """
    from transformers.utils import logging as hf_logging

    if enabled or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the progress bars and chatter of ``datasets`` and ``transformers`` for a block.

    Their bars ("Map", "Saving the dataset", "Loading weights") use other styles and would bury
    seqpatch's own one-bar-per-step output; their warnings are reported through seqpatch's own
    errors where they matter. Previous settings are restored on exit.
    """
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_bars = not datasets.are_progress_bars_disabled()
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_verbosity = hf_logging.get_verbosity()
    datasets_verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        datasets.logging.set_verbosity(datasets_verbosity)
        if hf_bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(hf_verbosity)
