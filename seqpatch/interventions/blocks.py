"""The small, exact building blocks, written with nnsight: read activations, patch one cell.

These are the operations a reader can follow line by line (and run on NDIF with a remote
handle); the sweep engine (``seqpatch.interventions.sweep``) computes the same patches in bulk.

- ``get_activations(handle, prompts, sites)`` — site tensors stacked ``[layers, positions, d]``
  per prompt; a batch of prompts adds a leading batch axis. Positions are unpadded indices
  (0 = first real token), also in left-padded batches: a list, a ``range`` or a ``slice``
  (``positions=slice(0, 5)``).
- ``patch_and_run(handle, src, tgt, layer, token_idx, site)`` — the target run with the site
  tensor of one (layer, position) replaced by the source's, scored as the original roadmap's
  Δ = P(target answer | patched) − P(target answer | clean target), probabilities over the full
  vocabulary at the last position, on the answer's first token. ``float(result)`` is Δ; the
  original experiments' keyword ``act_key=`` is accepted for ``site``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nnsight
import torch

from seqpatch.interventions.sites import (
    SITE_ORDER,
    SWEEP_SITES,
    InterventionError,
    check_sites,
    resolve_indices,
)
from seqpatch.models import SITES
from seqpatch.models.sites import SITE_ALIASES

if TYPE_CHECKING:
    from seqpatch.models import ModelHandle, Site

DIGITS: tuple[int, ...] = tuple(range(10))


def _encode(handle: ModelHandle, prompts: str | Sequence[str] | torch.Tensor) -> dict[str, Any]:
    """Model inputs for a trace: left-padded text, or unpadded ids ``[B, T]`` as given.

    A remote handle's inputs stay on the CPU (its ``device`` is the meta skeleton's).
    """
    if isinstance(prompts, torch.Tensor):
        ids = (prompts[None] if prompts.ndim == 1 else prompts).long()
        return {"input_ids": ids if handle.remote else ids.to(handle.device)}
    return dict(handle.encode(prompts))


def _reads(handle: ModelHandle, keys: Sequence[tuple[Site, int]]) -> list[tuple[Any, bool, Any]]:
    """``(envoy, reads_input, n_heads)`` per ``(site, layer)``: what a trace body needs to find a
    site tensor, as nnsight envoys and plain values. A body that names only these (never the
    handle or a ``SiteRef``) ships to NDIF, where seqpatch is not installed."""
    reads = []
    for site, layer in keys:
        ref = handle.module(site, layer)
        reads.append((handle.envoy(ref.path), ref.kind == "input", ref.n_heads))
    return reads


def _positions_of(positions: list[int] | slice | None, length: int) -> list[int]:
    """The positions a prompt of ``length`` tokens is read at, in output order (may be out of
    range: those columns stay NaN). ``None`` is every position; a slice is applied to the
    prompt's own positions, so ``slice(-3, None)`` is each prompt's last three tokens."""
    if positions is None:
        return list(range(length))
    if isinstance(positions, slice):
        return list(range(length))[positions]
    return positions


def get_activations(
    handle: ModelHandle,
    prompts: str | Sequence[str] | torch.Tensor,
    sites: Site | Iterable[Site],
    positions: Iterable[int] | slice | None = None,
    layers: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Site tensors of ``prompts``: ``{site: [layers, positions, d_model]}`` per prompt.

    ``prompts`` is one string (no batch axis in the result), a list of strings (a left-padded
    batch: ``[batch, layers, positions, d_model]``) or token ids ``[B, T]`` without padding.
    ``positions`` are unpadded indices, negative ones counting from each prompt's end: a list
    (or ``range``), or a ``slice`` applied to each prompt's own positions (``slice(0, 5)``: the
    first five tokens); by default all positions. Prompts shorter than the widest selection
    have NaN beyond their end. ``head_z`` (or ``head``) gives ``[..., n_heads, d_head]`` and
    ``mlp_post`` ``[..., d_mlp]`` in place of ``d_model``. Values are in the model's dtype.
    """
    if isinstance(positions, int | str) or not (
        positions is None or isinstance(positions, slice | Iterable)
    ):
        raise InterventionError(
            f"positions must be a list of indices, a range or a slice, got {positions!r}; "
            "for one position write [t]"
        )
    if positions is not None and not isinstance(positions, slice):
        positions = [int(p) for p in positions]
    single = isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.ndim == 1)
    sites = check_sites([sites] if isinstance(sites, str) else sites, (*SITES, *SITE_ALIASES))
    layer_idx = resolve_indices(layers, handle.n_layers, "layer")
    batch = _encode(handle, prompts)
    mask = batch.get("attention_mask")
    ids = batch["input_ids"]
    lengths = mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
    padded_len = ids.shape[1]
    order = sorted(sites, key=lambda site: SITE_ORDER.index(SITE_ALIASES.get(site, site)))
    keys = [(site, layer) for layer in sorted(set(layer_idx)) for site in order]  # run order
    reads = _reads(handle, keys)
    # One list saved inside the block is what comes back from NDIF (a dict from outside the
    # block, filled inside it, would stay on the server); the body is SiteRef.read, inlined.
    with torch.no_grad(), handle.trace(**batch):
        values = nnsight.save([])
        for envoy, reads_input, n_heads in reads:
            value = envoy.input if reads_input else envoy.output
            value = value[0] if isinstance(value, tuple) else value
            values.append(value if n_heads is None else value.unflatten(-1, (n_heads, -1)))
    saved = dict(zip(keys, values, strict=True))
    wanted = [_positions_of(positions, length) for length in lengths.tolist()]
    n_pos = max(len(cols) for cols in wanted)
    result = {}
    for site in sites:
        stacked = torch.stack([saved[(site, layer)] for layer in layer_idx], dim=1)
        out = stacked.new_full((*stacked.shape[:2], n_pos, *stacked.shape[3:]), float("nan"))
        for row, length in enumerate(lengths.tolist()):
            for col, pos in enumerate(wanted[row]):
                if -length <= pos < length:
                    out[row, :, col] = stacked[row, :, padded_len - length + pos % length]
        result[site] = out[0] if single else out
    return result


@dataclass(frozen=True)
class PatchResult:
    """One patched cell, scored on the answer candidates and on the full vocabulary.

    ``*_logits`` are the candidates' next-token logits at the last position (order of
    ``candidates``); ``p_*`` are full-vocabulary probabilities of the target's answer token.
    """

    site: str
    layer: int
    token_idx: int
    candidates: tuple[int, ...]
    candidate_ids: tuple[int, ...]
    answer_src: int
    answer_tgt: int
    patched_logits: torch.Tensor  # [n_candidates] float32
    baseline_logits: torch.Tensor  # [n_candidates] the clean target
    source_logits: torch.Tensor  # [n_candidates] the clean source
    p_tgt_patched: float
    p_tgt_baseline: float

    @property
    def delta(self) -> float:
        """P(target answer | patched) − P(target answer | clean target): < 0 when the patch hurts."""
        return self.p_tgt_patched - self.p_tgt_baseline

    def __float__(self) -> float:
        """Δ as a number, as the original experiments used it: ``float(patch_and_run(...))``."""
        return self.delta


def first_token_ids(handle: ModelHandle, values: Sequence[int], prompt: str) -> list[int]:
    """The first answer token of each value after ``prompt``; distinct, or an error saying why."""
    ids = [pieces[0] for pieces in handle.answer_token_ids(values, prompt=prompt)]
    if len(set(ids)) != len(ids):
        raise InterventionError(
            f"answers {list(values)} do not all start with different tokens ({ids}); they cannot "
            "be told apart on the first token: choose candidates whose first tokens differ"
        )
    return ids


def patch_and_run(
    handle: ModelHandle,
    prompt_src: str,
    prompt_tgt: str,
    layer: int,
    token_idx: int,
    site: Site | None = None,
    answers: tuple[int, int] | None = None,
    candidates: Sequence[int] = DIGITS,
    *,
    act_key: Site | None = None,
) -> PatchResult:
    """Run ``prompt_tgt`` with ``site`` at (``layer``, ``token_idx``) taken from ``prompt_src``.

    ``site`` (default ``resid_pre``; ``act_key`` is the original experiments' name for it) is
    one of ``SWEEP_SITES``. ``answers`` = (source answer, target answer) values; by default the
    clean runs' top candidates. ``token_idx`` may be negative (from the end). Both prompts must
    tokenize to the same length, so that a position means the same token slot in both.
    """
    if site is not None and act_key is not None and site != act_key:
        raise InterventionError(
            f"site={site!r} and act_key={act_key!r} name different sites; act_key is another "
            "name for site: give one of them"
        )
    site = site or act_key or "resid_pre"
    check_sites([site], SWEEP_SITES)
    src, tgt = _encode(handle, prompt_src), _encode(handle, prompt_tgt)
    length = tgt["input_ids"].shape[1]
    if src["input_ids"].shape != tgt["input_ids"].shape:
        raise InterventionError(
            f"source and target prompts tokenize to {src['input_ids'].shape[1]} and {length} "
            "tokens; patching a position needs equal lengths"
        )
    (layer,) = resolve_indices([layer], handle.n_layers, "layer")
    (token_idx,) = resolve_indices([token_idx], length, "token_idx")
    cand_ids = first_token_ids(handle, candidates, prompt_tgt)
    unembed = handle.envoy(handle.adapter.unembed)
    ((envoy, reads_input, n_heads),) = _reads(handle, [(site, layer)])
    # The bodies inline SiteRef.read, so that they ship to NDIF without seqpatch (see _reads).
    with torch.no_grad():
        with handle.trace(**src):
            value = envoy.input if reads_input else envoy.output
            value = value[0] if isinstance(value, tuple) else value
            value = value if n_heads is None else value.unflatten(-1, (n_heads, -1))
            donor = value[:, token_idx].save()
            src_logits = unembed.output[:, -1].save()
        with handle.trace(**tgt):
            clean_logits = unembed.output[:, -1].save()
        with handle.trace(**tgt):
            value = envoy.input if reads_input else envoy.output
            value = value[0] if isinstance(value, tuple) else value
            value = value if n_heads is None else value.unflatten(-1, (n_heads, -1))
            value[:, token_idx] = donor.to(value.device)
            patched = unembed.output[:, -1].save()
    source_c, baseline_c, patched_c = (
        x[0, cand_ids].float().cpu() for x in (src_logits, clean_logits, patched)
    )
    if answers is None:
        answers = (
            candidates[int(source_c.argmax())],
            candidates[int(baseline_c.argmax())],
        )
    answer_src, answer_tgt = answers
    if answer_tgt not in candidates or answer_src not in candidates:
        raise InterventionError(f"answers {answers} must be among the candidates {candidates}")
    tgt_token = cand_ids[list(candidates).index(answer_tgt)]
    p_patched, p_clean = (
        float(x[0].float().softmax(-1)[tgt_token]) for x in (patched, clean_logits)
    )
    return PatchResult(
        site=site,
        layer=layer,
        token_idx=token_idx,
        candidates=tuple(candidates),
        candidate_ids=tuple(cand_ids),
        answer_src=answer_src,
        answer_tgt=answer_tgt,
        patched_logits=patched_c,
        baseline_logits=baseline_c,
        source_logits=source_c,
        p_tgt_patched=p_patched,
        p_tgt_baseline=p_clean,
    )
