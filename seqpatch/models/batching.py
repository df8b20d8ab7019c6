"""Left-padded batches of token ids, and teacher forcing of answers after their prompts.

Every batched forward in seqpatch pads on the left with the tokenizer's own ``pad`` (its pad
token, ``padding_side="left"``) and passes ``position_ids`` counted from each row's first real
token, so padding shifts no position and a row's logits do not depend on its batch mates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from seqpatch.models.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import BatchEncoding

    from seqpatch.models.handle import ModelHandle


def pad_left(tokenizer: Any, seqs: Sequence[Sequence[int]]) -> BatchEncoding:
    """``input_ids``, ``attention_mask`` and ``position_ids`` ``[rows, width]`` of ``seqs``.

    Rows are left-padded with the tokenizer's pad token (positions of pads are 0). Raises
    ``ModelLoadError`` when rows differ in length and the tokenizer has no pad token.
    """
    from transformers import BatchEncoding

    rows = [list(seq) for seq in seqs]
    if tokenizer.pad_token_id is not None:
        batch = tokenizer.pad(
            {"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt"
        )
    elif len({len(row) for row in rows}) == 1:
        ids = torch.tensor(rows, dtype=torch.long)
        batch = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    else:
        raise ModelLoadError(
            "this tokenizer has no pad (or EOS) token, so prompts of different lengths cannot be "
            "batched; set tokenizer.pad_token, or pass one prompt at a time"
        )
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


@dataclass(frozen=True)
class TeacherForced:
    """What one teacher-forced forward says about each row's answer (lists run over rows).

    ``logprobs``: the answer's log-probability, summed over its tokens; ``ranks``: the rank of
    its first token in the whole vocabulary where it is predicted (1 = top; ties count in its
    favour); ``greedy``: whether the argmax at every answer position is the answer's token (greedy
    decoding would emit the answer); ``candidate_logits``: ``[rows, n_candidates]`` float32
    logits of the requested candidate tokens where answer token ``scored[row]`` is predicted
    (``None`` unless candidates were asked for).
    """

    logprobs: list[float]
    ranks: list[int]
    greedy: list[bool]
    candidate_logits: torch.Tensor | None = None


@torch.no_grad()
def teacher_forced(
    handle: ModelHandle,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[int]] | None = None,
    scored: Sequence[int] | None = None,
) -> TeacherForced:
    """Read each (non-empty) answer after its prompt in one left-padded forward, without grad.

    ``candidates[row]`` (the same count per row) are read at the position predicting answer
    token ``scored[row]`` (default 0). Logits are computed only where answers are predicted
    (``logits_to_keep``). Locally this is one plain forward of ``handle.hf_model``; for a remote
    handle one nnsight trace on NDIF, from which only the small results above come back, never
    the ``[rows, keep, vocab]`` logits. That trace body repeats ``_readout`` inline because it
    may name only the nnsight model, ``torch`` and tensors (NDIF does not have seqpatch).
    """
    seqs = [list(p) + list(a) for p, a in zip(prompt_ids, answer_ids, strict=True)]
    batch = pad_left(handle.tokenizer, seqs)
    ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    keep = max(len(a) for a in answer_ids) + 1  # logits only where answers are predicted
    targets = ids[:, ids.shape[1] - keep + 1 :]  # the token that logit column i predicts
    starts = [keep - 1 - len(a) for a in answer_ids]  # column whose logits predict answer[0]
    start_cols = torch.tensor(starts)
    first_ids = torch.tensor([a[0] for a in answer_ids])
    offsets = [0] * len(seqs) if scored is None else list(scored)
    score_cols = torch.tensor([s + k for s, k in zip(starts, offsets, strict=True)])
    wanted = torch.tensor([list(c) for c in candidates]) if candidates is not None else None
    if handle.remote:
        model = handle.model
        chosen = None
        # nnsight moves the inputs to the model's device (the server's GPU)
        with handle.trace(
            input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
        ):
            logits = model.output.logits.float()
            device = logits.device
            rows = torch.arange(logits.shape[0], device=device)
            step_targets = targets.to(device)
            token_logprobs = torch.log_softmax(logits, dim=-1)[:, :-1]
            token_logprobs = token_logprobs.gather(-1, step_targets[..., None])[..., 0].save()
            hits = (logits[:, :-1].argmax(-1) == step_targets).save()
            first = logits[rows, start_cols.to(device)]
            ranks = ((first > first.gather(-1, first_ids.to(device)[:, None])).sum(-1) + 1).save()
            if wanted is not None:
                chosen = logits[rows, score_cols.to(device)].gather(-1, wanted.to(device)).save()
    else:
        device = handle.device
        out = handle.hf_model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=keep,
        )
        token_logprobs, hits, ranks, chosen = _readout(
            out.logits[:, -keep:].float(), targets, start_cols, first_ids, score_cols, wanted
        )
    spans = [(start, start + len(answer)) for start, answer in zip(starts, answer_ids, strict=True)]
    return TeacherForced(
        logprobs=[float(token_logprobs[row, a:b].sum()) for row, (a, b) in enumerate(spans)],
        ranks=[int(rank) for rank in ranks.tolist()],
        greedy=[bool(hits[row, a:b].all()) for row, (a, b) in enumerate(spans)],
        candidate_logits=None if chosen is None else chosen.cpu(),
    )


def _readout(
    logits: torch.Tensor,
    targets: torch.Tensor,
    start_cols: torch.Tensor,
    first_ids: torch.Tensor,
    score_cols: torch.Tensor,
    wanted: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """From ``logits`` ``[rows, keep, vocab]`` (column ``keep - 1``: the last token): each
    column's log-probability of the token it predicts and whether it is the argmax
    (``[rows, keep - 1]``), each row's rank of its first answer token, and the candidates'
    logits at each row's scored column."""
    device = logits.device
    rows = torch.arange(logits.shape[0], device=device)
    step_targets = targets.to(device)
    token_logprobs = torch.log_softmax(logits, dim=-1)[:, :-1]
    token_logprobs = token_logprobs.gather(-1, step_targets[..., None])[..., 0]
    hits = logits[:, :-1].argmax(-1) == step_targets
    first = logits[rows, start_cols.to(device)]
    ranks = (first > first.gather(-1, first_ids.to(device)[:, None])).sum(-1) + 1
    chosen = None
    if wanted is not None:
        chosen = logits[rows, score_cols.to(device)].gather(-1, wanted.to(device))
    return token_logprobs.cpu(), hits.cpu(), ranks.cpu(), chosen
