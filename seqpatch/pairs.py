"""Counterfactual program pairs: two programs that differ in exactly one statement.

A pair ``(A, B)`` shares every statement before the divergence index ``k``, differs at ``k`` in
one op or operand (same target variable), and shares the suffix after ``k`` (drawn once,
applied to both). Patching A's activations into B's run then asks where the model carries what
statement ``k`` changed.

What is verified, not assumed:

- **equal token length** under the model's actual tokenizer and prompt format — ``x //= 3`` and
  ``x += 3`` differ in length for many BPE tokenizers, and a pair whose prompts differ in length
  has no position-by-position correspondence to patch along;
- **distinct answers** by default (a pair with equal answers has nothing to switch);
- whether step ``k`` can influence the queried value at all (``affects_query``): it can iff ``k``
  is in the query's backward data-flow slice (``Program.dependencies``). The slice depends only
  on which variables later statements read and overwrite, so it is the same for A and B.

**Chains.** ``chain_depth(program, k)`` counts the statements of the query's slice from ``k`` on
(``k`` included; 0 when ``k`` is outside the slice): changing ``a = 5`` in ``a = 5; b = a; c = b;
#c:`` has depth 3, a direct ``c = 5`` right before ``#c:`` depth 1. The statements after ``k`` in
the slice depend only on later statements and ``k``'s target, so A and B share the depth.
``min_depth``/``max_depth`` keep only programs whose change travels that far, and
``changed_role`` only changes of one kind (``statement_role``: ``root`` — a constant in both
programs, the value at a chain's start; ``link`` — a copy in both, the chain redirected;
``update`` — an in-place op). Programs refused by these filters are counted as ``chain``.

Every rejected draw is counted by reason (``RejectionCounts``: ``token_length``,
``equal_answers``, ``chain``) so that a stage can report why pairs were hard to find. Reasons that need a
model (a wrong answer) are counted by the stage that runs it (``seqpatch.stages.pairs``).

Without an ``rng`` the draw is seeded with ``DEFAULT_SEED`` (``make_counterfactual_pair(8, 3)``
returns the same pair on every call); pass a ``random.Random`` or an int seed for other draws.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from seqpatch.programs import Family, Program, ProgramError, Statement, get_family

TokenizeFn = Callable[[Program], Sequence[int]]
"""Maps a program to the token ids the model reads (prompt format + tokenizer)."""

REJECTION_REASONS = ("token_length", "equal_answers", "chain")
STATEMENT_ROLES = ("root", "link", "update")
CHANGED_ROLES = ("any", *STATEMENT_ROLES)
DEFAULT_SEED = 0


class PairError(ProgramError):
    """A pair cannot be made as asked (bad index, or no valid change within the bound)."""


@dataclass
class RejectionCounts:
    """How many candidate changes were drawn and why each rejected one was rejected."""

    drawn: int = 0
    token_length: int = 0
    equal_answers: int = 0
    chain: int = 0  # whole programs refused by the depth or changed-role filters

    def add(self, other: RejectionCounts) -> None:
        for name in ("drawn", *REJECTION_REASONS):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ("drawn", *REJECTION_REASONS)}


@dataclass(frozen=True)
class PairMetadata:
    divergence_index: int
    affects_query: bool
    answers_differ: bool
    diff_positions: tuple[int, ...]  # token indices where the two prompts differ
    n_tokens: int | None  # None when no tokenizer was given
    counts: RejectionCounts = field(compare=False)
    chain_depth: int = 0  # statements from k to the query along its slice (``chain_depth``)


def chain_depth(program: Program, index: int) -> int:
    """How many statements of the query's slice lie at or after ``index`` (0 if ``index`` is not
    in the slice): the number of statements the changed value passes through to the query."""
    deps = program.dependencies()
    return sum(1 for i in deps if i >= index) if index in deps else 0


def statement_role(statement: Statement) -> str:
    """``root`` (assigns a constant), ``link`` (copies a variable) or ``update`` (an op in place)."""
    if statement.op != "set":
        return "update"
    return "link" if isinstance(statement.operand, str) else "root"


def replace_statement(program: Program, index: int, statement) -> Program:
    """``program`` with ``statements[index]`` replaced (re-interpreted, so derived fields follow)."""
    statements = list(program.statements)
    statements[index] = statement
    return Program(program.family, tuple(statements), program.query, program.preamble)


def make_counterfactual_pair(
    seq_len: int,
    divergence_index: int,
    rng: random.Random | int | None = None,
    family: str | Family = "binding",
    tokenizer: TokenizeFn | None = None,
    allow_equal_answers: bool = False,
    require_affects_query: bool = False,
    max_programs: int = 200,
    min_depth: int = 0,
    max_depth: int = 0,
    changed_role: str = "any",
) -> tuple[Program, Program, PairMetadata]:
    """Draw a counterfactual pair of ``seq_len``-statement programs diverging at ``divergence_index``.

    The change at ``k`` is redrawn (every alternative the family allows, in random order) until
    the token lengths match and, unless ``allow_equal_answers``, the answers differ; if no change
    of the current program works, a fresh program is drawn, at most ``max_programs`` times, after
    which ``PairError`` says what kept failing. ``tokenizer`` maps a program to the ids the model
    reads; without it token lengths are not checked and ``n_tokens`` is ``None``. ``rng`` is a
    ``random.Random`` (advanced by the draw), an int seed, or ``None`` for ``DEFAULT_SEED``.
    ``min_depth``/``max_depth`` (0: no bound) keep programs whose ``chain_depth`` at ``k`` lies
    in the bounds, ``changed_role`` (``CHANGED_ROLES``) changes that keep ``k``'s role.
    """
    if not isinstance(rng, random.Random):
        rng = random.Random(DEFAULT_SEED if rng is None else rng)
    fam = get_family(family)
    if seq_len < 1:
        raise PairError(f"seq_len must be >= 1, got {seq_len}")
    if not 0 <= divergence_index < seq_len:
        raise PairError(
            f"divergence_index {divergence_index} is out of range for seq_len {seq_len} "
            f"(valid: 0..{seq_len - 1})"
        )
    if changed_role not in CHANGED_ROLES:
        raise PairError(f"unknown changed role {changed_role!r}; use one of {CHANGED_ROLES}")
    if max_depth and max_depth < min_depth:
        raise PairError(f"max_depth {max_depth} is below min_depth {min_depth}")
    filtered = bool(min_depth or max_depth or changed_role != "any")
    counts = RejectionCounts()
    for _ in range(max_programs):
        a = fam.sample(seq_len, rng)
        depth = chain_depth(a, divergence_index)
        role = statement_role(a.statements[divergence_index])
        if filtered and (
            depth < min_depth
            or (max_depth and depth > max_depth)
            or changed_role not in ("any", role)
        ):
            counts.chain += 1
            continue
        affects = divergence_index in a.dependencies()
        if require_affects_query and not affects:
            continue
        if not affects and not allow_equal_answers:
            counts.drawn += 1  # no change at k can alter the answer: one draw, rejected as equal
            counts.equal_answers += 1
            continue
        ids_a = tokenizer(a) if tokenizer is not None else None
        options = fam.alternatives(a, divergence_index)
        if changed_role != "any":
            options = [o for o in options if statement_role(o) == changed_role]
        rng.shuffle(options)
        for statement in options:
            b = replace_statement(a, divergence_index, statement)
            counts.drawn += 1
            if ids_a is not None:
                ids_b = tokenizer(b)  # type: ignore[misc]
                if len(ids_b) != len(ids_a):
                    counts.token_length += 1
                    continue
            if a.answer == b.answer and not allow_equal_answers:
                counts.equal_answers += 1
                continue
            diff = (
                tuple(i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)) if x != y)
                if ids_a is not None
                else ()
            )
            meta = PairMetadata(
                divergence_index=divergence_index,
                affects_query=affects,
                answers_differ=a.answer != b.answer,
                diff_positions=diff,
                n_tokens=len(ids_a) if ids_a is not None else None,
                counts=counts,
                chain_depth=depth,
            )
            return a, b, meta
    raise PairError(
        f"no valid {fam.name} pair at seq_len={seq_len}, divergence_index={divergence_index} "
        f"after {max_programs} programs ({counts.as_dict()}); try --allow-equal-answers or "
        "another divergence index" + (" or a smaller depth" if filtered else "")
    )
