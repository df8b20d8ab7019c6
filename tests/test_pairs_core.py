"""make_counterfactual_pair: structure, ground truth, token lengths, data flow."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqpatch.pairs import (
    DEFAULT_SEED,
    PairError,
    RejectionCounts,
    chain_depth,
    make_counterfactual_pair,
    replace_statement,
    statement_role,
)
from seqpatch.programs import FAMILIES, Program


def code_chars(program: Program) -> list[str]:
    """A toy tokenizer in which statements of different ops have different lengths."""
    return list(program.render("code").replace(" ", ""))


@settings(max_examples=150, deadline=None)
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    seq_len=st.integers(1, 12),
    data=st.data(),
    seed=st.integers(0, 2**32),
)
def test_pair_structure(family, seq_len, data, seed):
    k = data.draw(st.integers(0, seq_len - 1))
    try:
        a, b, meta = make_counterfactual_pair(
            seq_len, k, random.Random(seed), family, tokenizer=code_chars
        )
    except PairError:
        return  # e.g. seq_len 1 binding programs where no change keeps the length; counted below
    assert a.statements[:k] == b.statements[:k]
    assert a.statements[k + 1 :] == b.statements[k + 1 :]
    assert a.statements[k] != b.statements[k]
    assert a.statements[k].target == b.statements[k].target
    assert a.query == b.query and a.preamble == b.preamble
    assert len(code_chars(a)) == len(code_chars(b)) == meta.n_tokens
    assert a.answer != b.answer and meta.answers_differ
    assert meta.affects_query == (k in a.dependencies()) == (k in b.dependencies())
    assert meta.affects_query  # distinct answers are impossible otherwise
    ids_a, ids_b = code_chars(a), code_chars(b)
    assert list(meta.diff_positions) == [i for i in range(len(ids_a)) if ids_a[i] != ids_b[i]]
    for program in (a, b):
        env: dict[str, int] = {}
        exec(program.render("code"), {}, env)
        assert env[program.query] == program.answer


def test_pairs_are_found_for_every_family_and_index():
    for family in FAMILIES:
        for k in range(8):
            a, b, _ = make_counterfactual_pair(8, k, random.Random(k), family, tokenizer=code_chars)
            assert a.answer != b.answer


def test_same_seed_same_pair():
    first = make_counterfactual_pair(8, 3, random.Random(7), "modular", tokenizer=code_chars)
    second = make_counterfactual_pair(8, 3, random.Random(7), "modular", tokenizer=code_chars)
    assert first[:2] == second[:2]


def test_the_seeds_call_works_with_a_default_seed():
    """``make_counterfactual_pair(8, 3)`` as the seed writes it: deterministic, seed 0."""
    a, b, meta = make_counterfactual_pair(8, 3)
    assert (a, b) == make_counterfactual_pair(8, 3)[:2]
    assert (a, b) == make_counterfactual_pair(8, 3, random.Random(DEFAULT_SEED))[:2]
    assert (a, b) == make_counterfactual_pair(8, 3, DEFAULT_SEED)[:2]
    assert meta.divergence_index == 3 and a.statements[3] != b.statements[3]
    assert make_counterfactual_pair(8, 3, 1)[:2] == make_counterfactual_pair(8, 3, 1)[:2]
    assert any(make_counterfactual_pair(8, 3, s)[:2] != (a, b) for s in range(1, 4))


def test_counts_add_up_to_the_draws():
    """Every drawn change is either rejected for a counted reason or is the returned pair."""
    assert set(RejectionCounts().as_dict()) == {"drawn", "token_length", "equal_answers", "chain"}
    for seed in range(30):
        _, _, meta = make_counterfactual_pair(
            6, seed % 6, random.Random(seed), "arithmetic", tokenizer=code_chars
        )
        counts = meta.counts
        assert counts.drawn == counts.token_length + counts.equal_answers + 1


def test_token_length_mismatches_are_redrawn_and_counted():
    rejected = 0
    for seed in range(30):
        a, b, meta = make_counterfactual_pair(
            6, 2, random.Random(seed), "arithmetic", tokenizer=code_chars
        )
        assert len(code_chars(a)) == len(code_chars(b))
        rejected += meta.counts.token_length
    assert rejected > 0  # `x //= 3` vs `x += 3` really occur and are refused


def test_allow_equal_answers_keeps_unaffected_changes():
    seen_unaffected = False
    for seed in range(50):
        a, b, meta = make_counterfactual_pair(
            8, 0, random.Random(seed), "binding", allow_equal_answers=True
        )
        if not meta.affects_query:
            seen_unaffected = True
            assert a.answer == b.answer
    assert seen_unaffected


def test_divergence_index_out_of_range():
    with pytest.raises(PairError, match="out of range"):
        make_counterfactual_pair(4, 4, random.Random(0))
    with pytest.raises(PairError, match="out of range"):
        make_counterfactual_pair(4, -1, random.Random(0))


def test_impossible_request_says_why():
    def never_equal(program: Program) -> list[int]:
        return [0] * (100 + program.answer)  # distinct answers never share a length

    with pytest.raises(PairError, match="token_length"):
        make_counterfactual_pair(3, 1, random.Random(0), "arithmetic", never_equal, max_programs=5)


def test_replace_statement_reinterprets():
    p = FAMILIES["binding"].sample(5, random.Random(1))
    k = p.dependencies()[-1]
    new = FAMILIES["binding"].alternatives(p, k)[0]
    q = replace_statement(p, k, new)
    assert q.statements[k] == new
    env: dict[str, int] = {}
    exec(q.render("code"), {}, env)
    assert env[q.query] == q.answer


def walk_chain(program: Program, index: int) -> int:
    """The chain depth at ``index`` by running a binding program forward, each value carrying
    the statements it was assigned through (independent of ``dependencies()``)."""
    paths: dict[str, tuple[int, ...]] = {}
    for i, stmt in enumerate(program.statements):
        source = paths[stmt.operand] if isinstance(stmt.operand, str) else ()
        paths[stmt.target] = (*source, i)
    path = paths[program.query]
    return len(path) - path.index(index) if index in path else 0


def test_chain_depth_counts_hops_to_the_query():
    p = Program.parse("a = 5\nb = a\nc = b\n#c:", "binding", "code")
    assert [chain_depth(p, k) for k in range(3)] == [3, 2, 1]
    q = Program.parse("a = 5\nb = 3\nc = b\n#c:", "binding", "code")
    assert [chain_depth(q, k) for k in range(3)] == [0, 2, 1]
    for seed in range(200):
        p = FAMILIES["binding"].sample(6, random.Random(seed))
        for k in range(6):
            assert chain_depth(p, k) == walk_chain(p, k), (p.render(), k)


@pytest.mark.parametrize("role", ["root", "link"])
def test_min_depth_and_role_select_chain_pairs(role):
    depths = set()
    for seed in range(40):
        a, b, meta = make_counterfactual_pair(
            6,
            2 + seed % 3,
            random.Random(seed),
            "binding",
            min_depth=2,
            changed_role=role,
            max_programs=2000,  # redirected links often copy an equal value: many draws
        )
        k = meta.divergence_index
        assert meta.chain_depth == chain_depth(a, k) == chain_depth(b, k) >= 2
        assert statement_role(a.statements[k]) == statement_role(b.statements[k]) == role
        assert a.answer != b.answer
        depths.add(meta.chain_depth)
    assert max(depths) >= 3  # deeper chains are reachable, not only the bound
    refused = sum(
        make_counterfactual_pair(6, 1, random.Random(s), "binding", min_depth=2)[2].counts.chain
        for s in range(10)
    )
    assert refused > 0  # programs without such a chain were refused and counted
    with pytest.raises(PairError, match="smaller depth"):
        make_counterfactual_pair(4, 3, random.Random(0), "binding", min_depth=2, max_programs=20)


def test_unfiltered_pairs_are_unchanged_by_the_filters_existence():
    """Without filters the draw consumes the RNG as before: the same pairs as a plain call."""
    for seed in range(10):
        plain = make_counterfactual_pair(6, 2, random.Random(seed), "binding")
        again = make_counterfactual_pair(
            6, 2, random.Random(seed), "binding", min_depth=0, changed_role="any"
        )
        assert plain[:2] == again[:2] and plain[2].counts.chain == 0
