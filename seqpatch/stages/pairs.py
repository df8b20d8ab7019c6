"""Stage ``pairs``: counterfactual program pairs that the model answers correctly.

Candidates are numbered ``0, 1, 2, …``; candidate ``i`` diverges at
``divergence_indices[i % len(divergence_indices)]`` and is drawn from its own RNG
(``derive_seed("pair", seed, family, seq_len, i)``), so the stage is deterministic and any row
can be regenerated alone. Candidates are generated and scored in rounds of ``.map`` calls
(batched forward passes on both programs); a candidate becomes a row only if the model answers
both programs correctly, and the first ``n_pairs`` accepted candidates (in candidate order) are
kept. Every rejection is counted by reason and stored in the provenance.

Scoring: the model reads ``prompt(program)`` followed by the *common prefix* of the two answers'
token ids; the scored position is the last token, where the first differing answer token is
predicted (for single-token answers — the organism's digits — the prefix is empty). A program is
answered correctly when greedy decoding would produce every token of its answer (teacher-forced
argmax at each answer position). ``model_logits_a/b`` are the logits of the ten digit tokens
(``candidate_ids``, labels ``0``…``9``) at the scored position; a pair whose first differing
answer tokens are not digit tokens (e.g. ``-3`` vs ``4``) is rejected as ``not_digit_scored``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Features, List, Value

from seqpatch.errors import SeqpatchError
from seqpatch.pairs import PairError, RejectionCounts, make_counterfactual_pair
from seqpatch.programs import Family, Program, derive_seed, get_family

if TYPE_CHECKING:
    from datasets import Dataset

    from seqpatch.models import ModelHandle

STAGE = "pairs"
SCHEMA_VERSION = 1
N_CANDIDATES = 10  # the ten digit tokens
MODEL_REJECTIONS = ("a_wrong", "b_wrong", "not_digit_scored")

FEATURES = Features(
    {
        "pair_id": Value("string"),
        "candidate": Value("int64"),
        "family": Value("string"),
        "seq_len": Value("int32"),
        "divergence_index": Value("int32"),
        "program_a": Value("string"),
        "program_b": Value("string"),
        "prompt_a": Value("string"),
        "prompt_b": Value("string"),
        "statement_a": Value("string"),
        "statement_b": Value("string"),
        "query": Value("string"),
        "ground_truth_a": Value("int64"),
        "ground_truth_b": Value("int64"),
        "answers_differ": Value("bool"),
        "affects_query": Value("bool"),
        "dependencies_a": List(Value("int32")),
        "dependencies_b": List(Value("int32")),
        "n_tokens": Value("int32"),
        "input_ids_a": List(Value("int32")),
        "input_ids_b": List(Value("int32")),
        "tokens": List(Value("string")),
        "tokens_a": List(Value("string")),
        "diff_positions": List(Value("int32")),
        "answer_prefix_len": Value("int32"),
        "candidate_ids": List(Value("int64")),
        "candidate_labels": List(Value("string")),
        "answer_index_a": Value("int32"),
        "answer_index_b": Value("int32"),
        "model_logits_a": List(Value("float32")),
        "model_logits_b": List(Value("float32")),
    }
)
"""``tokens`` are the target (B) prompt's token strings, ``tokens_a`` the source's (they differ
at ``diff_positions``). ``answer_index_a/b`` index ``candidate_ids`` (the digit of the answers'
first differing token)."""


class PairsStageError(SeqpatchError):
    """The pairs stage cannot reach its target (acceptance too low, bad config)."""


@dataclass(frozen=True)
class PairsConfig:
    """Which pairs to build. ``divergence_indices`` empty means every index ``0..seq_len-1``."""

    model: str
    seq_len: int
    n_pairs: int = 2000
    divergence_indices: tuple[int, ...] = ()
    family: str = "binding"
    seed: int = 0
    allow_equal_answers: bool = False
    batch_size: int = 512  # candidates per forward pass: large batches amortise Python overhead
    max_candidates_factor: int = 10  # give up after n_pairs * factor candidates
    family_params: dict[str, Any] = field(default_factory=dict)  # non-stock family settings

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise PairsStageError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.n_pairs < 1:
            raise PairsStageError(f"n_pairs must be >= 1, got {self.n_pairs}")
        if not self.divergence_indices:
            object.__setattr__(self, "divergence_indices", tuple(range(self.seq_len)))
        object.__setattr__(self, "divergence_indices", tuple(sorted(set(self.divergence_indices))))
        bad = [k for k in self.divergence_indices if not 0 <= k < self.seq_len]
        if bad:
            raise PairsStageError(
                f"divergence index {bad[0]} is out of range for seq_len {self.seq_len} "
                f"(valid: 0..{self.seq_len - 1}, or 'all')"
            )


def parse_divergence_indices(text: str, seq_len: int) -> tuple[int, ...]:
    """``all``, ``3`` or ``0,2,5`` → indices (validated by ``PairsConfig``)."""
    if text.strip() == "all":
        return tuple(range(seq_len))
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise PairsStageError(
            f"cannot read divergence index {text!r}; use 'all', one index '3' or a list '0,2,5'"
        ) from None


def family_for(cfg: PairsConfig) -> Family:
    fam = get_family(cfg.family)
    if cfg.family_params:
        from seqpatch.organism.train import family_from_params

        fam = family_from_params(cfg.family, cfg.family_params)
    return fam


def _fingerprint(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _generate(batch: dict[str, list], cfg: PairsConfig, handle: ModelHandle) -> dict[str, list]:
    """Draw the candidate pairs of ``batch["candidate"]`` (no model run yet)."""
    fam = family_for(cfg)
    out: dict[str, list] = {
        "candidate": [],
        "program_a": [],
        "program_b": [],
        "divergence_index": [],
        "counts": [],
    }
    for candidate in batch["candidate"]:
        k = cfg.divergence_indices[candidate % len(cfg.divergence_indices)]
        rng = random.Random(derive_seed("pair", cfg.seed, cfg.family, cfg.seq_len, candidate))
        try:
            a, b, meta = make_counterfactual_pair(
                cfg.seq_len,
                k,
                rng,
                fam,
                tokenizer=handle.prompt_ids,
                allow_equal_answers=cfg.allow_equal_answers,
            )
            texts = (a.render("code"), b.render("code"))
        except PairError:
            texts = ("", "")
            meta = None
        out["candidate"].append(candidate)
        out["program_a"].append(texts[0])
        out["program_b"].append(texts[1])
        out["divergence_index"].append(k)
        out["counts"].append(json.dumps(meta.counts.as_dict() if meta else {"exhausted": 1}))
    return out


def _digit_ids(handle: ModelHandle, prompt: str) -> list[int]:
    return [ids[0] for ids in handle.answer_token_ids(range(10), prompt=prompt)]


def _score(batch: dict[str, list], cfg: PairsConfig, handle: ModelHandle) -> dict[str, list]:
    """Run the model on both programs of each candidate; fill logits and correctness."""
    import torch

    fam = family_for(cfg)
    rows: list[dict[str, Any]] = []
    sequences: list[list[int]] = []
    for text_a, text_b, k in zip(
        batch["program_a"], batch["program_b"], batch["divergence_index"], strict=True
    ):
        row: dict[str, Any] = {"status": "ok" if text_a else "exhausted"}
        rows.append(row)
        if not text_a:
            continue
        a, b = Program.parse(text_a, fam), Program.parse(text_b, fam)
        prompt_a, prompt_b = handle.prompt_format.prompt(a), handle.prompt_format.prompt(b)
        ids_a, ids_b = handle.prompt_ids(a), handle.prompt_ids(b)
        ans_a = handle.answer_token_ids([a.answer], prompt=prompt_a)[0]
        ans_b = handle.answer_token_ids([b.answer], prompt=prompt_b)[0]
        prefix = 0
        while prefix < min(len(ans_a), len(ans_b)) and ans_a[prefix] == ans_b[prefix]:
            prefix += 1
        if prefix == 0:
            digits = _digit_ids(handle, prompt_b)
        else:  # the first differing token continues a shared answer prefix: bare digits
            digits = [handle.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        scored_a = ans_a[prefix] if prefix < len(ans_a) else None
        scored_b = ans_b[prefix] if prefix < len(ans_b) else None
        if scored_a not in digits or scored_b not in digits or scored_a == scored_b:
            row["status"] = "not_digit_scored"
            continue
        row.update(
            a=a,
            b=b,
            k=k,
            prompt_a=prompt_a,
            prompt_b=prompt_b,
            input_a=ids_a + ans_a[:prefix],
            input_b=ids_b + ans_b[:prefix],
            prefix=prefix,
            digits=digits,
            index_a=digits.index(scored_a),
            index_b=digits.index(scored_b),
            seq_a=len(sequences),
        )
        sequences += [ids_a + ans_a, ids_b + ans_b]
        row["n_prompt"] = (len(ids_a), len(ids_b))
    logits_at, correct = _teacher_forced(handle, sequences, rows) if sequences else ({}, {})
    out: dict[str, list] = {name: [] for name in (*FEATURES, "status")}
    for candidate, row in zip(batch["candidate"], rows, strict=True):
        if row["status"] == "ok":
            s = row["seq_a"]
            if not correct[s]:
                row["status"] = "a_wrong"
            elif not correct[s + 1]:
                row["status"] = "b_wrong"
        out["status"].append(row["status"])
        if row["status"] != "ok":
            for name in FEATURES:
                out[name].append(None)
            continue
        a, b, k = row["a"], row["b"], row["k"]
        s = row["seq_a"]
        digits = torch.tensor(row["digits"])
        tokens_b = handle.tokenizer.convert_ids_to_tokens(row["input_b"])
        tokens_a = handle.tokenizer.convert_ids_to_tokens(row["input_a"])
        values = {
            "pair_id": f"{cfg.family}-L{cfg.seq_len}-k{k}-{candidate:07d}",
            "candidate": candidate,
            "family": cfg.family,
            "seq_len": cfg.seq_len,
            "divergence_index": k,
            "program_a": a.render("code"),
            "program_b": b.render("code"),
            "prompt_a": row["prompt_a"],
            "prompt_b": row["prompt_b"],
            "statement_a": a.statements[k].render("code"),
            "statement_b": b.statements[k].render("code"),
            "query": a.query,
            "ground_truth_a": a.answer,
            "ground_truth_b": b.answer,
            "answers_differ": a.answer != b.answer,
            "affects_query": k in a.dependencies(),
            "dependencies_a": a.dependencies(),
            "dependencies_b": b.dependencies(),
            "n_tokens": len(row["input_b"]),
            "input_ids_a": row["input_a"],
            "input_ids_b": row["input_b"],
            "tokens": tokens_b,
            "tokens_a": tokens_a,
            "diff_positions": [
                i
                for i, (x, y) in enumerate(zip(row["input_a"], row["input_b"], strict=True))
                if x != y
            ],
            "answer_prefix_len": row["prefix"],
            "candidate_ids": row["digits"],
            "candidate_labels": [str(d) for d in range(10)],
            "answer_index_a": row["index_a"],
            "answer_index_b": row["index_b"],
            "model_logits_a": logits_at[s][digits].numpy(),
            "model_logits_b": logits_at[s + 1][digits].numpy(),
        }
        for name in FEATURES:
            out[name].append(values[name])
    return out


def _teacher_forced(
    handle: ModelHandle, sequences: list[list[int]], rows: list[dict[str, Any]]
) -> tuple[dict[int, Any], dict[int, bool]]:
    """For each full sequence (prompt + answer): logits at the scored position and whether the
    argmax reproduces every answer token (greedy decoding would emit the answer)."""
    import torch

    n_prompt: dict[int, int] = {}
    scored: dict[int, int] = {}
    for row in rows:
        if "seq_a" in row:
            s = row["seq_a"]
            n_prompt[s], n_prompt[s + 1] = row["n_prompt"]
            scored[s] = n_prompt[s] + row["prefix"] - 1
            scored[s + 1] = n_prompt[s + 1] + row["prefix"] - 1
    width = max(len(seq) for seq in sequences)
    pad = handle.tokenizer.pad_token_id or 0
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = handle.hf_model(
            input_ids=ids.to(handle.device),
            attention_mask=mask.to(handle.device),
            position_ids=position_ids.to(handle.device),
        ).logits.float()
    logits_at: dict[int, Any] = {}
    correct: dict[int, bool] = {}
    for i, seq in enumerate(sequences):
        offset = width - len(seq)
        predicted = logits[i, offset + n_prompt[i] - 1 : offset + len(seq) - 1].argmax(-1).cpu()
        correct[i] = predicted.tolist() == seq[n_prompt[i] :]
        logits_at[i] = logits[i, offset + scored[i]].cpu()
    return logits_at, correct


def build(
    parent: Dataset | None, cfg: PairsConfig, handle: ModelHandle, progress: bool = True
) -> Any:
    """Generate, score and filter candidates until ``cfg.n_pairs`` pairs are accepted.

    Returns a ``Built`` whose ``extra`` holds the rejection counts. Raises ``PairsStageError``
    when ``n_pairs * max_candidates_factor`` candidates are not enough, naming the reasons.
    """
    from datasets import Dataset, concatenate_datasets

    from seqpatch.progress import progress_bar
    from seqpatch.store import Built

    if parent is not None:
        raise PairsStageError("the pairs stage draws its own programs and takes no parent stage")
    key = _fingerprint(STAGE, SCHEMA_VERSION, asdict(cfg), handle.describe())
    counts = RejectionCounts()
    model_counts = dict.fromkeys(MODEL_REJECTIONS, 0)
    exhausted = 0
    kept: list[Dataset] = []
    n_kept = 0
    limit = cfg.n_pairs * cfg.max_candidates_factor
    start = 0
    with progress_bar(cfg.n_pairs, f"pairs (seq_len {cfg.seq_len})", enabled=progress) as bar:
        while n_kept < cfg.n_pairs:
            if start >= limit:
                raise PairsStageError(
                    f"only {n_kept} of {cfg.n_pairs} pairs after {start} candidates "
                    f"(the bound is n_pairs x {cfg.max_candidates_factor}); rejections: "
                    f"{_rejections(counts, model_counts, exhausted)}. Choose a length the model "
                    "solves (see `seqpatch choose`) or allow more candidates"
                )
            # ask for what is missing plus a margin for the acceptance rate seen so far
            rate = n_kept / start if start else 1.0
            want = cfg.n_pairs - n_kept
            size = min(limit - start, max(cfg.batch_size, int(want / max(rate, 0.05) * 1.1)))
            chunk = Dataset.from_dict({"candidate": list(range(start, start + size))})
            drawn = chunk.map(
                _generate,
                batched=True,
                batch_size=cfg.batch_size,
                fn_kwargs={"cfg": cfg, "handle": handle},
                new_fingerprint=f"{key}-gen-{start}",
            )
            scored = drawn.map(
                _score,
                batched=True,
                batch_size=cfg.batch_size,
                fn_kwargs={"cfg": cfg, "handle": handle},
                remove_columns=drawn.column_names,
                features=Features({**FEATURES, "status": Value("string")}),
                new_fingerprint=f"{key}-score-{start}",
            )
            for raw in drawn["counts"]:
                parsed = json.loads(raw)
                exhausted += parsed.pop("exhausted", 0)
                counts.add(RejectionCounts(**parsed))
            statuses = np.array(scored["status"])
            for reason in MODEL_REJECTIONS:
                model_counts[reason] += int((statuses == reason).sum())
            accepted = np.flatnonzero(statuses == "ok")[: cfg.n_pairs - n_kept]
            kept.append(scored.select(accepted).remove_columns("status"))
            n_kept += len(accepted)
            bar.update(len(accepted))
            start += size
    dataset = concatenate_datasets(kept).cast(FEATURES)
    extra = {
        "candidates": start,
        "accepted": n_kept,
        "rejections": _rejections(counts, model_counts, exhausted),
        "model": handle.describe(),
    }
    return Built(dataset, extra)


def _rejections(counts: RejectionCounts, model_counts: dict[str, int], exhausted: int) -> dict:
    """Rejections by reason. ``token_length``/``equal_answers`` count redrawn changes inside
    candidate generation; ``a_wrong``/``b_wrong``/``not_digit_scored`` count whole candidates."""
    out = counts.as_dict()
    out.pop("a_wrong"), out.pop("b_wrong")
    out["changes_drawn"] = out.pop("drawn")
    out.update(model_counts)
    out["no_valid_change"] = exhausted
    return out


def resolve_model_spec(model: str, data_dir: Any = None) -> str:
    """``chosen`` → the model spec in ``<data_dir>/chosen_model.json``; anything else as is."""
    if model != "chosen":
        return model
    from seqpatch.choose import read_chosen

    return read_chosen(data_dir)["model_spec"]


def default_family(model: str) -> tuple[str, dict[str, Any]]:
    """The family (name, non-stock parameters) to draw pairs from for ``model``.

    The organism is asked about the family it was trained on; other models default to
    ``binding``.
    """
    if model != "builtin":
        return "binding", {}
    from seqpatch.organism import organism_family, training_record

    fam = organism_family()
    stock = get_family(fam.name)
    params = training_record()["family"]["params"]
    return fam.name, ({} if fam is stock else dict(params))


def build_pairs(
    model: str = "builtin",
    seq_len: int = 8,
    divergence: str = "all",
    n_pairs: int = 2000,
    seed: int = 0,
    family: str | None = None,
    allow_equal_answers: bool = False,
    data_dir: Any = None,
    progress: bool = True,
    handle: ModelHandle | None = None,
):
    """Load the model and build (or reuse) the pairs stage; returns the ``StageRef``."""
    from seqpatch.stages import build_stage

    spec = resolve_model_spec(model, data_dir)
    if family is None:
        family, params = default_family(spec)
    else:
        params = {}
    cfg = PairsConfig(
        model=spec,
        seq_len=seq_len,
        n_pairs=n_pairs,
        divergence_indices=parse_divergence_indices(divergence, seq_len),
        family=family,
        seed=seed,
        allow_equal_answers=allow_equal_answers,
        family_params=params,
    )
    if handle is None:
        from seqpatch.models import load_model

        handle = load_model(spec)
    return build_stage(
        STAGE,
        cfg,
        data_dir=data_dir,
        model=handle.describe(),
        handle=handle,
        progress=progress,
    )
