"""Stage ``pairs``: counterfactual program pairs that the model answers correctly.

Candidates are numbered ``0, 1, 2, …``; candidate ``i`` diverges at
``divergence_indices[i % len(divergence_indices)]`` and is drawn from its own RNG
(``derive_seed("pair", seed, family, seq_len, i)``), so the stage is deterministic and any row
can be regenerated alone. Candidates are generated and scored in rounds of ``.map`` calls
(batched forward passes on both programs); a candidate becomes a row only if the model answers
both programs correctly, and the first ``n_pairs`` accepted candidates (in candidate order) are
kept. Every rejection is counted by reason and stored in the provenance (``REJECTIONS``; the
stored ``rejections`` dict is the one source of these counts).

Scoring: the model reads ``prompt(program)`` followed by the *common prefix* of the two answers'
token ids; the scored position is the last token, where the first differing answer token is
predicted (for single-token answers — the organism's digits — the prefix is empty). A program is
answered correctly when greedy decoding would produce every token of its answer (teacher-forced
argmax at each answer position). Two cases are special:

- equal answers (``allow_equal_answers``): both programs have the same answer tokens, nothing
  differs, so the scored position is the answer's *first* token (prefix empty) and
  ``answer_index_a == answer_index_b``;
- one answer's tokens are a proper prefix of the other's (``1`` vs ``19`` when ``19`` is read
  as ``1``, ``9``): one program's first differing "token" is the end of its answer, which no
  candidate token stands for, so the candidate is rejected as ``answer_is_prefix``.

Candidates (``candidate_ids``, ``candidate_labels``): ``model_logits_a/b`` hold their logits at
the scored position, and every row of a stage has the same number of them, because downstream
stages store logits as a fixed-size array over candidates:

- slots ``0..9`` are the ten digit tokens as they are tokenized at the scored position (labels
  ``0``…``9``) — the digit's answer text after the prompt when the prefix is empty, the bare
  digit tokens after a shared answer prefix;
- when the family can produce answers other than one digit (``Family.one_digit_answers`` is
  false: ``arithmetic``, with negative and multi-digit answers), two more slots follow: slot
  ``10`` is A's first differing answer token and slot ``11`` is B's (labels: the decoded token,
  stripped), so ``-3`` vs ``4`` is scored on ``-`` vs ``4`` and ``12`` vs ``7`` on ``12`` vs ``7``
  when the tokenizer reads ``12`` as one token. These slots are filled on every row, even when
  they repeat a digit slot.

``answer_index_a/b`` is the *first* slot holding that program's scored token, so for digit
answers it is the digit itself (the organism's stored rows are unchanged: ten candidates, index
= answer). A candidate-softmax over the slots must count each distinct token id once (slots 10 and
11 may repeat a digit or each other); metrics that read only the two answer slots and the
full-vocabulary normaliser are unaffected.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Features, List, Value

from seqpatch.bounds import MAX_CANDIDATES, MAX_PAIRS, check_count
from seqpatch.errors import SeqpatchError
from seqpatch.options import option
from seqpatch.pairs import (
    CHANGED_ROLES,
    PairError,
    RejectionCounts,
    chain_depth,
    make_counterfactual_pair,
)
from seqpatch.programs import Family, Program, Renderer, derive_seed, get_family
from seqpatch.roles import token_roles
from seqpatch.stages.base import Built, Inputs, ParentSpec, no_artifacts, no_checks

if TYPE_CHECKING:
    from collections.abc import Mapping

    from datasets import Dataset

    from seqpatch.models import ModelHandle
    from seqpatch.store import StageRef

STAGE = "pairs"
SCHEMA_VERSION = 2  # 2: chain_depth (and the chain filters' rejections)
N_DIGITS = 10  # candidate slots 0..9: the ten digit tokens
N_ANSWER_SLOTS = 2  # slots 10, 11 (families with other answers): A's and B's first differing token
MODEL_REJECTIONS = ("a_wrong", "b_wrong", "answer_is_prefix")
REJECTIONS = (
    "token_length",
    "equal_answers",
    "chain",
    *MODEL_REJECTIONS,
    "no_valid_change",
)
"""Every reason the stored ``rejections`` count (besides ``changes_drawn``): ``token_length``
and ``equal_answers`` count redrawn changes inside candidate generation, ``chain`` programs the
depth and role filters refused, the others whole candidates."""

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
        "chain_depth": Value("int32"),
        "dependencies_a": List(Value("int32")),
        "dependencies_b": List(Value("int32")),
        "n_tokens": Value("int32"),
        "input_ids_a": List(Value("int32")),
        "input_ids_b": List(Value("int32")),
        "tokens": List(Value("string")),
        "tokens_a": List(Value("string")),
        "roles": List(Value("string")),
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
at ``diff_positions``). ``candidate_ids`` has ``n_candidates(family)`` entries on every row (see
the module docstring); ``answer_index_a/b`` index the first slot holding each answer's first
differing token (its first token when the answers are equal). ``roles`` gives each token of
B its role in the data flow (``seqpatch.roles.token_roles``: ``hop0:value``, ``question:3``,
``last``…), which ``--positions slice`` patches and charts align by. ``chain_depth`` is how many
statements of the query's slice the changed value passes through (``seqpatch.pairs.chain_depth``:
1 = the queried variable is assigned directly, 0 = the change cannot reach the query)."""


class PairsStageError(SeqpatchError):
    """The pairs stage cannot reach its target (acceptance too low, bad config)."""


@dataclass(frozen=True)
class PairsConfig:
    """Which pairs to build. ``divergence_indices`` empty means every index ``0..seq_len-1``
    (with ``min_depth``: every index from which a chain that deep fits in the program).

    ``min_depth``/``max_depth`` (0: no bound) and ``changed_role`` select chain pairs
    (``seqpatch.pairs``): ``min_depth=2`` keeps changes that reach the query through at least
    one later statement (``a = 5; b = a; #b:``).
    """

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
    min_depth: int = option(
        0,
        "Keep changes that reach the query through a chain of at least this many statements "
        "(2: at least one hop, as in a = 5; b = a; #b:). 0: no bound.",
        min=0,
    )
    max_depth: int = option(0, "Keep chains of at most this many statements (0: no bound).", min=0)
    changed_role: str = option(
        "any",
        "Keep one kind of change: any, root (a constant in both programs), link (a copy in "
        "both) or update (an op in place).",
    )

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise PairsStageError(f"seq_len must be >= 1, got {self.seq_len}")
        check_count("n_pairs", self.n_pairs, MAX_PAIRS, PairsStageError, "kept pairs")
        check_count(
            "n_pairs x max_candidates_factor",
            self.n_pairs * self.max_candidates_factor,
            MAX_CANDIDATES,
            PairsStageError,
            "candidates drawn",
        )
        if self.min_depth < 0 or self.max_depth < 0:
            raise PairsStageError("min_depth and max_depth must be >= 0 (0: no bound)")
        if self.max_depth and self.max_depth < self.min_depth:
            raise PairsStageError(
                f"max_depth {self.max_depth} is below min_depth {self.min_depth}; raise it or "
                "leave it 0 (no bound)"
            )
        if self.min_depth > self.seq_len:
            raise PairsStageError(
                f"min_depth {self.min_depth} cannot fit in {self.seq_len} statements; use "
                f"--seq-len {self.min_depth} or more"
            )
        if self.changed_role not in CHANGED_ROLES:
            raise PairsStageError(
                f"unknown changed role {self.changed_role!r}; use one of {', '.join(CHANGED_ROLES)}"
            )
        if not self.divergence_indices:
            reach = range(self.seq_len - max(self.min_depth, 1) + 1)
            object.__setattr__(self, "divergence_indices", tuple(reach))
        object.__setattr__(self, "divergence_indices", tuple(sorted(set(self.divergence_indices))))
        bad = [k for k in self.divergence_indices if not 0 <= k < self.seq_len]
        if bad:
            raise PairsStageError(
                f"divergence index {bad[0]} is out of range for seq_len {self.seq_len} "
                f"(valid: 0..{self.seq_len - 1}, or 'all')"
            )
        short = [k for k in self.divergence_indices if self.seq_len - k < self.min_depth]
        if short:
            raise PairsStageError(
                f"a change at index {short[0]} cannot reach depth {self.min_depth} in "
                f"{self.seq_len} statements; use indices up to {self.seq_len - self.min_depth}"
            )


CONFIG = PairsConfig
PARENTS = (ParentSpec("benchmark", optional=True),)
prepare = no_checks
artifacts = no_artifacts


def parse_divergence_indices(text: str, seq_len: int) -> tuple[int, ...]:
    """``all``, ``3`` or ``0,2,5`` → indices (validated by ``PairsConfig``; ``all`` is ``()``)."""
    if text.strip() == "all":  # the config's default: every index (that can reach min_depth)
        return ()
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
                min_depth=cfg.min_depth,
                max_depth=cfg.max_depth,
                changed_role=cfg.changed_role,
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


def _renderer(handle: ModelHandle) -> Renderer:
    """How the handle's prompts show the program (the organism's compact lines, else code)."""
    from seqpatch.prompts import CompactFormat

    return "compact" if isinstance(handle.prompt_format, CompactFormat) else "code"


def n_candidates(fam: Family) -> int:
    """Candidate slots per row: the ten digits, plus A's and B's answer tokens unless every
    answer of ``fam`` is one digit."""
    return N_DIGITS if fam.one_digit_answers else N_DIGITS + N_ANSWER_SLOTS


def _digit_ids(handle: ModelHandle, prompt: str, prefix: int) -> list[int]:
    """The ten digit tokens as predicted at the scored position (see the module docstring)."""
    if prefix == 0:
        return [ids[0] for ids in handle.answer_token_ids(range(10), prompt=prompt)]
    return [handle.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]


def _score(batch: dict[str, list], cfg: PairsConfig, handle: ModelHandle) -> dict[str, list]:
    """Run the model on both programs of each candidate; fill logits and correctness."""
    from seqpatch.models import teacher_forced

    fam = family_for(cfg)
    answer_slots = n_candidates(fam) > N_DIGITS
    rows: list[dict[str, Any]] = []
    prompts: list[list[int]] = []  # two per scored candidate (a, b), as are the three below
    answers: list[list[int]] = []
    read: list[list[int]] = []
    offsets: list[int] = []
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
        if ans_a != ans_b:  # equal answers are scored on their first token
            while ans_a[prefix] == ans_b[prefix]:
                prefix += 1
                if prefix == min(len(ans_a), len(ans_b)):
                    row["status"] = "answer_is_prefix"
                    break
            if row["status"] != "ok":
                continue
        scored_a, scored_b = ans_a[prefix], ans_b[prefix]
        candidates = _digit_ids(handle, prompt_b, prefix)
        labels = [str(d) for d in range(10)]
        if answer_slots:
            candidates += [scored_a, scored_b]
            labels += [handle.tokenizer.decode([t]).strip() for t in (scored_a, scored_b)]
        elif scored_a not in candidates or scored_b not in candidates:
            raise PairsStageError(
                f"the {fam.name} family has one-digit answers, but {a.answer} or {b.answer} is "
                f"not read as a digit token by this tokenizer ({ans_a} vs {ans_b}); use a model "
                "whose tokenizer has digit tokens"
            )
        row.update(
            a=a,
            b=b,
            k=k,
            prompt_a=prompt_a,
            prompt_b=prompt_b,
            input_a=ids_a + ans_a[:prefix],
            input_b=ids_b + ans_b[:prefix],
            prefix=prefix,
            candidates=candidates,
            labels=labels,
            index_a=candidates.index(scored_a),
            index_b=candidates.index(scored_b),
            seq_a=len(prompts),
        )
        prompts += [ids_a, ids_b]
        answers += [ans_a, ans_b]
        read += [candidates, candidates]
        offsets += [prefix, prefix]
    forced = teacher_forced(handle, prompts, answers, read, offsets) if prompts else None
    greedy = forced.greedy if forced else []
    logits = forced.candidate_logits if forced else None  # [len(prompts), n_candidates]
    out: dict[str, list] = {name: [] for name in (*FEATURES, "status")}
    for candidate, row in zip(batch["candidate"], rows, strict=True):
        if row["status"] == "ok":
            s = row["seq_a"]
            if not greedy[s]:
                row["status"] = "a_wrong"
            elif not greedy[s + 1]:
                row["status"] = "b_wrong"
        out["status"].append(row["status"])
        if row["status"] != "ok":
            for name in FEATURES:
                out[name].append(None)
            continue
        a, b, k = row["a"], row["b"], row["k"]
        s = row["seq_a"]
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
            "chain_depth": chain_depth(a, k),
            "dependencies_a": a.dependencies(),
            "dependencies_b": b.dependencies(),
            "n_tokens": len(row["input_b"]),
            "input_ids_a": row["input_a"],
            "input_ids_b": row["input_b"],
            "tokens": tokens_b,
            "tokens_a": tokens_a,
            "roles": token_roles(
                handle.tokenizer, row["prompt_b"], row["input_b"], b, k, _renderer(handle)
            ),
            "diff_positions": [
                i
                for i, (x, y) in enumerate(zip(row["input_a"], row["input_b"], strict=True))
                if x != y
            ],
            "answer_prefix_len": row["prefix"],
            "candidate_ids": row["candidates"],
            "candidate_labels": row["labels"],
            "answer_index_a": row["index_a"],
            "answer_index_b": row["index_b"],
            "model_logits_a": logits[s].numpy(),  # type: ignore[index]
            "model_logits_b": logits[s + 1].numpy(),  # type: ignore[index]
        }
        for name in FEATURES:
            out[name].append(values[name])
    return out


def model_specs(cfg: PairsConfig, parents: Mapping[str, StageRef]) -> tuple[str, ...]:
    return (cfg.model,)


def build(inputs: Inputs, cfg: PairsConfig) -> Built:
    """Generate, score and filter candidates until ``cfg.n_pairs`` pairs are accepted.

    The optional ``benchmark`` parent records which benchmark (and ``seqpatch choose``) the
    studied model, family and length came from; the rows do not depend on it. Returns a
    ``Built`` whose ``stats`` hold the rejection counts. Raises ``PairsStageError`` when
    ``n_pairs * max_candidates_factor`` candidates are not enough, naming the reasons.
    """
    from datasets import Dataset, concatenate_datasets

    from seqpatch.progress import progress_bar

    handle, progress = inputs.model, inputs.progress
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
                    f"(the bound is n_pairs x {cfg.max_candidates_factor}); "
                    f"{describe_rejections(_rejections(counts, model_counts, exhausted))}. "
                    "Choose a length the model solves (see `seqpatch choose`) or allow more "
                    "candidates"
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
                new_fingerprint=inputs.fingerprint("generate", start),
            )
            scored = drawn.map(
                _score,
                batched=True,
                batch_size=cfg.batch_size,
                fn_kwargs={"cfg": cfg, "handle": handle},
                remove_columns=drawn.column_names,
                features=Features({**FEATURES, "status": Value("string")}),
                new_fingerprint=inputs.fingerprint("score", start),
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


def describe_rejections(rejections: Mapping[str, int]) -> str:
    """``rejections: token_length=3, wrong_answer_a=1, …; 120 changes drawn``: the stored
    counts in words, the changes drawn named apart (a total, not a reason to reject)."""
    reasons = ", ".join(f"{k}={v}" for k, v in rejections.items() if k != "changes_drawn")
    drawn = rejections.get("changes_drawn")
    return f"rejections: {reasons}" + (f"; {drawn} changes drawn" if drawn is not None else "")


def _rejections(counts: RejectionCounts, model_counts: dict[str, int], exhausted: int) -> dict:
    """Rejections by reason (``REJECTIONS``) and ``changes_drawn``: ``token_length`` and
    ``equal_answers`` count redrawn changes inside candidate generation, the model's reasons
    (``MODEL_REJECTIONS``) and ``no_valid_change`` count whole candidates."""
    out = counts.as_dict()
    out["changes_drawn"] = out.pop("drawn")
    out.update(model_counts)
    out["no_valid_change"] = exhausted
    return out
