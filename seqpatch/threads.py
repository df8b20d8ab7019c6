"""How many CPU threads torch uses: chosen per model size, overridable, recorded in provenance.

On a 2-core laptop with other processes busy, small matrices run 2.5–3× slower with two
OpenMP threads than with one (each thread spins waiting for the other to be scheduled); large
matrices gain from two. ``choose_threads`` takes one thread below ``SINGLE_THREAD_BELOW``
parameters and up to ``MAX_THREADS`` above it — the crossover measured by
``scripts/bench_threads.py`` (``docs/benchmarks.md``). ``--threads N`` or ``SEQPATCH_THREADS``
override it. The thread count never changes a stored version: results agree to float
tolerance (tested), and provenance records the count used.
"""

from __future__ import annotations

import os

from seqpatch.errors import SeqpatchError

THREADS_ENV = "SEQPATCH_THREADS"
SINGLE_THREAD_BELOW = 50_000_000  # parameters; see docs/benchmarks.md "Threads"
MAX_THREADS = 4  # past this a CPU forward of these models gains little and starves the laptop


def requested_threads() -> int | None:
    """``$SEQPATCH_THREADS`` as a positive int, or ``None`` when unset."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SeqpatchError(f"{THREADS_ENV}={text!r}: give a whole number of threads >= 1")
    return value


def choose_threads(n_params: int | None) -> int:
    """The thread count for a model of ``n_params`` parameters (the override wins)."""
    requested = requested_threads()
    if requested is not None:
        return requested
    if n_params is None or n_params < SINGLE_THREAD_BELOW:
        return 1
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def use_threads(n_params: int | None) -> int:
    """Set torch's intra-op thread count for a model of ``n_params`` parameters; returns it."""
    import torch

    threads = choose_threads(n_params)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
