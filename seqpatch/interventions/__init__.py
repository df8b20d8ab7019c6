"""Interventions: read activations, patch one cell, and sweep every cell in bulk.

- ``blocks`` — ``get_activations`` and ``patch_and_run``, the exact building blocks (nnsight);
- ``sweep`` — the batched patching engine: ``patch_grid`` runs a ``PatchSpec`` (site, named
  axes ``layer``/``head``/``pos``/``span``) into a ``GridResult``; ``sweep`` (the
  ``(layer, pos)`` grid) and ``candidate_logits`` return a ``Readout`` (candidate logits + the
  full vocabulary's log-normaliser);
- ``restart`` — ``RestartableRun``, the one restartable run under patching, tracing and DAS
  (its docstring states the compute floor); ``_layers`` — the layer runner it drives;
  ``_grid`` — the sweep's bookkeeping;
- ``sites`` — shared errors, hooks and head layouts; the site lists come from the site table
  (``seqpatch.site_table``).

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
from seqpatch.interventions.sites import (
    GRID_SITES,
    HEAD_SITES,
    SWEEP_SITES,
    InterventionError,
)
from seqpatch.interventions.sweep import (
    GRID_AXES,
    GridResult,
    PatchSpec,
    Readout,
    SweepStats,
    candidate_logits,
    patch_grid,
    sweep,
)

__all__ = [
    "DIGITS",
    "GRID_AXES",
    "GRID_SITES",
    "HEAD_SITES",
    "SWEEP_SITES",
    "GridResult",
    "InterventionError",
    "PatchResult",
    "PatchSpec",
    "Readout",
    "SweepStats",
    "candidate_logits",
    "first_token_ids",
    "get_activations",
    "patch_and_run",
    "patch_grid",
    "sweep",
]
