"""How many CPU threads torch uses: chosen per model size, overridable, recorded in provenance.

Measured by ``scripts/bench_threads.py`` on a 2-core box (``docs/benchmarks.md``, "Threads"):
on a quiet machine two threads run a forward 1.4–1.9× faster at every size, but with one other
CPU-bound process they run it 2× (160 M parameters) to 20× (the organism) *slower* — each
OpenMP thread spins waiting for the other to be scheduled. A laptop always has another process,
so ``choose_threads`` takes one thread below ``SINGLE_THREAD_BELOW`` parameters (where the loss
under load is 5–20×) and half the cores above it (one on a 2-core machine, leaving a core to
the competitor; at most ``MAX_THREADS``). ``--threads N`` or ``SEQPATCH_THREADS`` override it. The thread count never changes a stored version: results agree to float
tolerance (tested), and provenance records the count used.
"""

from __future__ import annotations

import os

from seqpatch.errors import SeqpatchError

THREADS_ENV = "SEQPATCH_THREADS"
SINGLE_THREAD_BELOW = 10_000_000  # parameters; see docs/benchmarks.md "Threads"
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
    return max(1, min(MAX_THREADS, (os.cpu_count() or 1) // 2))


def use_threads(n_params: int | None) -> int:
    """Set torch's intra-op thread count for a model of ``n_params`` parameters; returns it."""
    import torch

    threads = choose_threads(n_params)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
