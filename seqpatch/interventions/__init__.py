"""Interventions: read activations, patch one cell, and sweep every cell in bulk.

- ``blocks`` — ``get_activations`` and ``patch_and_run``, the exact building blocks (nnsight);
- ``sweep`` — ``sweep`` and ``candidate_logits``, the batched patching engine;
- ``sites`` — shared errors and site names; ``_layers`` — the compute-floor layer runner.

Conventions: the *source* donates activations, the *target* is patched and scored; sites mean
what ``docs/architecture.md`` says; positions are unpadded token indices.
"""

from seqpatch.interventions.blocks import (
    DIGITS,
    PatchResult,
    first_token_ids,
    get_activations,
    patch_and_run,
)
from seqpatch.interventions.sites import SWEEP_SITES, InterventionError
from seqpatch.interventions.sweep import SweepStats, candidate_logits, sweep

__all__ = [
    "DIGITS",
    "SWEEP_SITES",
    "InterventionError",
    "PatchResult",
    "SweepStats",
    "candidate_logits",
    "first_token_ids",
    "get_activations",
    "patch_and_run",
    "sweep",
]
