"""Patching metrics, computed from the candidates' logits and the full-vocabulary normaliser.

Conventions — the same as the sweep engine (``seqpatch.interventions.sweep``):

- **Source** (program A, answer A) is the run whose activations are copied in; **target**
  (program B, answer B) is the run being patched and scored. The original roadmap called the
  source "clean" and the target "corrupted"; here both are clean runs of two programs.
- Every array ends with the candidate axis ``[..., n_candidates]``: next-token logits at the
  target's last position, e.g. the ten digits. Sweep results are
  ``[n_pairs, layers, positions, n_candidates]``; baselines (unpatched runs) are
  ``[n_pairs, n_candidates]``.
- ``answer_a`` / ``answer_b`` are *indices into the candidate axis* (not token ids). An int
  applies to every cell; an array applies per leading index: its shape is a prefix of the logits'
  leading shape (one per pair, say), broadcast over the remaining axes (the grid's: layers,
  heads, positions).
  Baselines broadcast the same way: their leading shape is a prefix of the patched one's.
- ``*_lse`` are log-normalisers: the log-sum-exp of the model's logits over its **whole
  vocabulary** at the same position, shaped like the logits without the candidate axis
  (``[n_pairs, layers, positions]``, baselines ``[n_pairs]``). ``logit - lse`` is a
  full-vocabulary log-probability. The sweep engine returns them beside the logits
  (``interventions.Readout``), and the patching stage stores them.

Metrics (all float32, numpy in → numpy out, torch in → torch out):

- ``prob_delta`` = P(B | patched) − P(B | target baseline), probabilities over the model's
  **whole vocabulary** (``exp(logit_B - lse)``): exactly the original roadmap's Δ, and what
  ``patch_and_run`` reports. Negative where the patch destroys the target's answer.
- ``prob_delta_candidates`` — the same difference with probabilities a softmax **over the
  candidates only** (it needs no normaliser). It equals ``prob_delta`` when all the mass sits on
  the candidates; with mass outside them (a pretrained model) the two disagree, the candidate
  variant being the larger in magnitude.
- ``logit_diff`` = logit(A) − logit(B): positive when the model prefers the source's answer.
  Softmax-invariant, so it reads the same over candidates and over the full vocabulary.
- ``normalised`` = (LD_patched − LD_target) / (LD_source − LD_target), with LD the logit
  difference in the patched run, the target baseline and the source baseline: 0 = no effect,
  1 = the target now prefers A exactly as much as the source does. NaN where the two baselines
  agree (LD_source == LD_target: nothing to normalise by).

Multi-token answers are scored on their first token (``interventions.first_token_ids``), which
is where two different one-digit answers differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _float(x: Any) -> np.ndarray | torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype != torch.float64 else x
    x = np.asarray(x)
    return x if x.dtype == np.float64 else x.astype(np.float32)


def _expand(index: Any, leading: tuple[int, ...], like: Any) -> Any:
    """An answer index (int or per-prefix array) as ``[*leading, 1]`` for gathering."""
    if isinstance(like, torch.Tensor):
        idx = torch.as_tensor(index, dtype=torch.long, device=like.device)
    else:
        idx = np.asarray(index, dtype=np.int64)
    if tuple(idx.shape) != tuple(leading[: idx.ndim]):
        raise ValueError(
            f"answer index of shape {tuple(idx.shape)} does not match the leading axes "
            f"{tuple(leading)} of the logits: give an int, or one index per leading entry "
            "(e.g. per pair)"
        )
    idx = idx.reshape(*idx.shape, *([1] * (len(leading) - idx.ndim + 1)))
    if isinstance(idx, torch.Tensor):
        return idx.expand(*leading, 1)
    return np.broadcast_to(idx, (*leading, 1))


def _pick(logits: Any, index: Any) -> Any:
    """``logits[..., index]`` with ``index`` an int or per-prefix array; shape ``logits[..., 0]``."""
    idx = _expand(index, tuple(logits.shape[:-1]), logits)
    if isinstance(logits, torch.Tensor):
        return logits.gather(-1, idx)[..., 0]
    return np.take_along_axis(logits, idx, axis=-1)[..., 0]


def _align(baseline: Any, patched_ndim: int) -> Any:
    """A baseline ``[*prefix, C]`` reshaped to broadcast against ``[*prefix, *rest, C]``."""
    extra = patched_ndim - baseline.ndim
    if extra < 0:
        raise ValueError("a baseline cannot have more axes than the patched logits")
    shape = (*baseline.shape[:-1], *([1] * extra), baseline.shape[-1])
    return baseline.reshape(shape)


def candidate_probs(logits: Array) -> Array:
    """Softmax over the candidate axis (the last one), in float32."""
    logits = _float(logits)
    if isinstance(logits, torch.Tensor):
        return logits.softmax(-1)
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def answer_prob(logits: Array, lse: Array, answer: Any) -> Array:
    """P(answer) over the whole vocabulary: ``exp(logits[..., answer] - lse)``, float32.

    ``logits`` ``[..., C]`` are candidate logits, ``lse`` ``[...]`` their run's log-normaliser.
    """
    logits, lse = _float(logits), _float(lse)
    if tuple(lse.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"lse of shape {tuple(lse.shape)} must be the logits' shape without the candidate "
            f"axis, {tuple(logits.shape[:-1])}"
        )
    log_p = _pick(logits, answer) - lse
    return log_p.exp() if isinstance(log_p, torch.Tensor) else np.exp(log_p)


def prob_delta(
    patched: Array,
    target_baseline: Array,
    answer_b: Any,
    *,
    patched_lse: Array,
    baseline_lse: Array,
) -> Array:
    """P(answer B | patched) − P(answer B | target baseline) over the whole vocabulary.

    The roadmap's Δ. ``patched_lse`` ``[*prefix, *rest]`` and ``baseline_lse`` ``[*prefix]`` are
    the log-normalisers of ``patched`` ``[*prefix, *rest, C]`` and ``target_baseline``
    ``[*prefix, C]``.
    """
    patched, baseline = _float(patched), _float(target_baseline)
    p_base = answer_prob(baseline, baseline_lse, answer_b)
    p_base = p_base.reshape(_align(baseline, patched.ndim).shape[:-1])
    return answer_prob(patched, patched_lse, answer_b) - p_base


def prob_delta_candidates(patched: Array, target_baseline: Array, answer_b: Any) -> Array:
    """P(answer B | patched) − P(answer B | target baseline), softmax over the candidates only."""
    patched, baseline = _float(patched), _float(target_baseline)
    baseline = _align(baseline, patched.ndim)
    p_patched = _pick(candidate_probs(patched), answer_b)
    p_base = _pick(candidate_probs(baseline), answer_b)
    return p_patched - p_base


def logit_diff(logits: Array, answer_a: Any, answer_b: Any) -> Array:
    """logit(A) − logit(B): > 0 where the source's answer is preferred."""
    logits = _float(logits)
    return _pick(logits, answer_a) - _pick(logits, answer_b)


def normalised(
    patched: Array,
    target_baseline: Array,
    source_baseline: Array,
    answer_a: Any,
    answer_b: Any,
) -> Array:
    """(LD_patched − LD_target) / (LD_source − LD_target): 0 no effect, 1 full switch to A."""
    patched = _float(patched)
    ld_patched = logit_diff(patched, answer_a, answer_b)
    ld_base = []
    for baseline in (target_baseline, source_baseline):
        ld_base.append(logit_diff(_align(_float(baseline), patched.ndim), answer_a, answer_b))
    ld_target, ld_source = ld_base
    span = ld_source - ld_target
    if isinstance(span, torch.Tensor):
        span = torch.where(span == 0, torch.nan, span)
    else:
        span = np.where(span == 0, np.nan, span)
    return (ld_patched - ld_target) / span


@dataclass(frozen=True)
class MetricInfo:
    """What one stored metric grid means, in every wording seqpatch shows it.

    ``formula`` is what ``heatmap.json`` records beside the array; ``title`` an axis title,
    ``legend`` a colour legend's two lines, ``colour`` the sentence a chart's caption gives its
    colours. ``towards_a`` is the sign that means "B moved towards A's answer" (+1 or −1):
    charts draw that side blue, the other red, 0 white.
    """

    formula: str
    title: str
    legend: tuple[str, str]
    colour: str
    towards_a: int


# The one table of metric meanings: the patching stage, heatmap.json, the charts and the report
# read it (the grids' order is the stage's column order).
METRIC_INFO: dict[str, MetricInfo] = {
    "normalised": MetricInfo(
        formula="(LD_patched − LD_B) / (LD_A − LD_B), LD = logit(A's answer) − logit(B's "
        "answer): 0 = no effect, 1 = B prefers A's answer as much as A does",
        title="normalised effect (0 = none, 1 = switched to A)",
        legend=("normalised", "effect"),
        colour="mean normalised effect over pairs: 0 (white) = B's answer unchanged, 1 (dark "
        "blue) = B now prefers A's answer as much as A does, below 0 (red) = B's own answer "
        "strengthened",
        towards_a=1,
    ),
    "prob_delta": MetricInfo(
        formula="P(B's answer | patched) − P(B's answer | B), probabilities over the whole "
        "vocabulary (the roadmap's Δ)",
        title="Δ P(B's answer)",
        legend=("Δ P(B's", "answer)"),
        colour="mean change in the probability of B's answer: 0 (white) = no change, −1 (blue) "
        "= B's answer lost, +1 (red) = B's answer strengthened",
        towards_a=-1,
    ),
    "logit_diff": MetricInfo(
        formula="logit(A's answer) − logit(B's answer) in the patched run",
        title="logit(A's answer) − logit(B's answer)",
        legend=("logit(A) −", "logit(B)"),
        colour="mean logit(A's answer) − logit(B's answer) after the patch: 0 (white) = both "
        "answers equally likely, blue = prefers A's, red = prefers B's (as unpatched B does)",
        towards_a=1,
    ),
    "prob_delta_candidates": MetricInfo(
        formula="P(B's answer | patched) − P(B's answer | B), softmax over the answer "
        "candidates only",
        title="Δ P(B's answer), softmax over the candidates",
        legend=("Δ P(B's answer)", "(candidates)"),
        colour="mean change in the probability of B's answer among the answer candidates "
        "(softmax over the candidates only): 0 (white) = no change, −1 (blue) = B's answer "
        "lost, +1 (red) = strengthened",
        towards_a=-1,
    ),
}
METRICS = tuple(METRIC_INFO)
