"""Program families checked against Python itself, and the ``programs`` stage built from them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from seqpatch.errors import SeqpatchError
from seqpatch.executor import execute
from seqpatch.programs import (
    FAMILIES,
    RENDERERS,
    Program,
    ProgramError,
    get_family,
    make_sequence,
    program_rng,
)
from seqpatch.stages.base import StageError
from seqpatch.stages.programs import FEATURES, ProgramsConfig, parse_seq_lens, program_id
from seqpatch.store import Store

FAMILY_NAMES = sorted(FAMILIES)
MAX_LEN = 20
EXAMPLES = 25  # seeds per family and property: 25 x 20 lengths = 500 programs each


def _family_property(test):  # type: ignore[no-untyped-def]
    """Run ``test(family, program, data)`` on programs of every family and every length.

    Each example draws one seed and checks the programs of lengths ``1..MAX_LEN`` sampled from
    it: hypothesis's per-example cost is then shared by twenty programs.
    """

    @pytest.mark.parametrize("family", FAMILY_NAMES)
    @settings(max_examples=EXAMPLES)
    @given(seed=st.integers(0, 2**63 - 1), data=st.data())
    def run(family: str, seed: int, data: st.DataObject) -> None:
        rng = random.Random(seed)
        for seq_len in range(1, MAX_LEN + 1):
            test(family, make_sequence(family, seq_len, rng), data)

    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run


# ---------------------------------------------------------------------------------------------
# What a family promises about its answers


@_family_property
def test_one_digit_families_answer_one_digit(
    family: str, program: Program, data: st.DataObject
) -> None:
    """The pairs stage scores only the ten digit tokens for these families: a promise broken
    here would mis-score pairs."""
    if get_family(family).one_digit_answers:
        assert 0 <= program.answer <= 9
        assert all(v is None or 0 <= v <= 9 for step in program.intermediates for v in step)


def test_one_digit_answers_is_false_where_answers_can_leave_0_to_9() -> None:
    assert [name for name, fam in sorted(FAMILIES.items()) if fam.one_digit_answers] == [
        "binding",
        "modular",
    ]
    answers = {make_sequence("arithmetic", 6, random.Random(s)).answer for s in range(300)}
    assert min(answers) < 0 and max(answers) > 9  # so arithmetic must not claim one digit
    assert not type(get_family("binding"))(max_operand=12).one_digit_answers


# ---------------------------------------------------------------------------------------------
# The interpreter agrees with Python


@_family_property
def test_exec_of_code_rendering_matches_interpreter(
    family: str, program: Program, data: st.DataObject
) -> None:
    """Executing the code rendering line by line gives every intermediate value and the answer."""
    lines = program.render("code").split("\n")
    n_pre = len(get_family(family).preamble)
    assert len(lines) == n_pre + program.seq_len + 1
    assert lines[-1] == f"#{program.query}:"
    namespace: dict = {}
    for line in lines[:n_pre]:
        exec(line, namespace)
    for i, line in enumerate(lines[n_pre:-1]):
        exec(line, namespace)
        assert [namespace.get(v) for v in program.variables] == program.intermediates[i], line
    whole: dict = {}
    exec(program.render("code"), whole)
    assert whole[program.query] == program.answer
    assert program.intermediates[-1][program.variables.index(program.query)] == program.answer


@_family_property
def test_parse_inverts_render(family: str, program: Program, data: st.DataObject) -> None:
    for renderer in RENDERERS:
        text = program.render(renderer)
        assert Program.parse(text, family, renderer) == program
        assert Program.parse(text, family) == program  # renderer detected


@_family_property
def test_row_matches_program(family: str, program: Program, data: st.DataObject) -> None:
    row = program.to_row()
    assert row["family"] == family
    assert row["seq_len"] == len(row["statements"]) == len(row["intermediates"])
    assert row["answer"] == program.answer
    assert all(len(step) == len(row["variables"]) for step in row["intermediates"])
    assert Program.parse(row["compact"], family) == program


# ---------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("family", FAMILY_NAMES)
@settings(max_examples=100)
@given(seq_len=st.integers(1, MAX_LEN), seed=st.integers(0, 2**63 - 1), index=st.integers(0, 10**5))
def test_same_seed_same_program(family: str, seq_len: int, seed: int, index: int) -> None:
    first = make_sequence(family, seq_len, program_rng(seed, family, seq_len, index))
    random.seed(seed + 1)  # global state must not matter
    second = make_sequence(family, seq_len, program_rng(seed, family, seq_len, index))
    assert first == second
    assert first.render("code") == second.render("code")


# Pinned samples: if the sampler changes, stored datasets of the same config would silently
# differ from new builds. Bump seqpatch.stages.programs.SCHEMA_VERSION and update these.
PINNED = {
    "arithmetic": "x=0;x-=5;x+=2;x=abs(x-9);x%=1;x+=4;#x:",
    "binding": "c=6;b=c;c=b;a=b;c=a;#a:",
    "modular": "c=8;c-=5;a=c;c=4;c=a;#a:",
}


def test_pinned_samples_are_stable() -> None:
    assert set(PINNED) == set(FAMILIES)
    for family, compact in PINNED.items():
        assert make_sequence(family, 5, program_rng(0, family, 5, 0)).render("compact") == compact


# ---------------------------------------------------------------------------------------------
# Parse errors

GARBAGE = ("x ** 2", "print(x)", "a = = 1", "x += -3", "b = abs(c - 2)", "q", "a += 3.5")


@_family_property
def test_parse_error_names_the_bad_line(family: str, program: Program, data: st.DataObject) -> None:
    bad = data.draw(st.sampled_from(GARBAGE))
    for renderer in RENDERERS:
        sep = "\n" if renderer == "code" else ";"
        lines = program.render(renderer).split(sep)
        at = data.draw(st.integers(0, len(lines)))
        lines.insert(at, bad)
        with pytest.raises(ProgramError) as err:
            Program.parse(sep.join(lines), family, renderer)
        assert repr(bad) in str(err.value)


def test_parse_error_for_op_outside_the_grammar() -> None:
    with pytest.raises(ProgramError, match=r"'a \+= 3'.*not in the binding grammar"):
        Program.parse("a = 1\na += 3\n#a:", "binding")


def test_parse_error_for_undefined_read_and_missing_query() -> None:
    with pytest.raises(ProgramError, match="reads 'b' before it is assigned"):
        Program.parse("a = b\n#a:", "binding")
    with pytest.raises(ProgramError, match="must end with a query"):
        Program.parse("a = 1\nb = a", "binding")
    with pytest.raises(ProgramError, match="never assigned"):
        Program.parse("a = 1\n#c:", "binding")
    with pytest.raises(ProgramError, match="start with 'x = 0'"):
        Program.parse("x = 1\nx += 2\n#x:", "arithmetic")


def test_program_errors_are_user_errors() -> None:
    with pytest.raises(SeqpatchError, match="known families: arithmetic, binding, modular"):
        get_family("nope")
    assert issubclass(ProgramError, ValueError)
    with pytest.raises(ProgramError, match="seq_len must be >= 1"):
        make_sequence("arithmetic", 0, random.Random(0))


# ---------------------------------------------------------------------------------------------
# Dependencies: a correct backward slice


@_family_property
def test_dependencies_are_a_closed_backward_slice(
    family: str, program: Program, data: st.DataObject
) -> None:
    """Every statement in the slice gets each variable it reads from the slice (or preamble),
    and the last assignment to the query is in it."""
    deps = program.dependencies()
    assert deps == sorted(set(deps))
    assigns_query = [i for i, s in enumerate(program.statements) if s.target == program.query]
    if assigns_query:
        assert assigns_query[-1] in deps
    for i in deps:
        for name in program.statements[i].reads():
            writers = [j for j in range(i) if program.statements[j].target == name]
            if writers:
                assert writers[-1] in deps
    if family != "arithmetic":
        assert 1 <= len(deps) <= get_family(family).max_depth


@_family_property
def test_statements_outside_the_slice_never_change_the_answer(
    family: str, program: Program, data: st.DataObject
) -> None:
    fam = get_family(family)
    deps = set(program.dependencies())
    for k in range(program.seq_len):
        alternatives = fam.alternatives(program, k)
        assert alternatives, k
        assert program.statements[k] not in alternatives
        assert all(alt.target == program.statements[k].target for alt in alternatives)
        if k in deps:
            continue
        for alt in alternatives:
            stmts = list(program.statements)
            stmts[k] = alt
            changed = fam.build(stmts, program.query)  # alternatives keep the program valid
            assert changed.answer == program.answer, (k, alt)
            assert changed.dependencies() == program.dependencies()


def test_slice_statements_can_change_the_answer() -> None:
    """The property above is not vacuous: statements inside the slice do matter."""
    program = Program.parse("a = 1\nb = 2\nc = a\n#c:", "binding")
    assert program.dependencies() == [0, 2]
    fam = get_family("binding")
    answers = {
        fam.build([alt, *program.statements[1:]], "c").answer
        for alt in fam.alternatives(program, 0)
    }
    assert answers - {program.answer}


# ---------------------------------------------------------------------------------------------
# The programs stage


def test_seq_lens_syntax() -> None:
    assert parse_seq_lens("1-10") == tuple(range(1, 11))
    assert parse_seq_lens("3,5,8") == (3, 5, 8)
    assert parse_seq_lens("1-4,8") == (1, 2, 3, 4, 8)
    assert parse_seq_lens(" 8 , 2-3 ") == (2, 3, 8)
    for bad in ("", "1-", "a", "0-3", "5-2", "1..4", "-3", "2,,3"):
        with pytest.raises(ProgramError):
            parse_seq_lens(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "nope"}, "unknown family"),
        ({"seq_lens": ()}, "seq_lens is empty"),
        ({"seq_lens": (0, 2)}, "seq_len must be an integer >= 1"),
        ({"seq_lens": (2, 2)}, "repeated"),
        ({"n_per_len": 0}, "n_per_len must be an integer >= 1"),
        ({"seed": -1}, "seed must be"),
        ({"seed": True}, "seed must be"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    args = {"family": "arithmetic", "seq_lens": (1, 2), "n_per_len": 3, "seed": 0} | kwargs
    with pytest.raises(ProgramError, match=message):
        ProgramsConfig(**args)


def test_config_normalises_lengths() -> None:
    assert ProgramsConfig("binding", (5, 1, 3), 2).seq_lens == (1, 3, 5)


def build(cfg: ProgramsConfig, data_dir: Path) -> tuple[str, Dataset]:
    """The stage built (or found) by the executor: its version and stored rows."""
    ref = execute("programs", cfg, store=Store(data_dir), progress=False)
    return ref.version, Store(data_dir).load("programs", ref.version)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_build_rows(family: str, tmp_path) -> None:
    cfg = ProgramsConfig(family, (1, 4, 7), n_per_len=6, seed=3)
    _, rows = build(cfg, tmp_path)
    assert rows.features == FEATURES
    assert rows.num_rows == 18
    table = list(rows)
    assert [r["program_id"] for r in table] == [
        program_id(family, n, i) for n in (1, 4, 7) for i in range(6)
    ]
    for row in table:
        program = make_sequence(
            family, row["seq_len"], program_rng(3, family, row["seq_len"], row["index"])
        )
        assert {k: row[k] for k in program.to_row()} == program.to_row()
        assert row["depth"] == len(row["dependencies"])
        assert row["seed"] == 3
        assert Program.parse(row["text"], family) == program


def test_intermediates_keep_nulls(tmp_path) -> None:
    _, rows = build(ProgramsConfig("binding", (MAX_LEN,), n_per_len=20, seed=0), tmp_path)
    firsts = [r["intermediates"][0] for r in rows]
    assert any(None in step for step in firsts)  # variables not yet assigned stay null


def test_same_config_same_version_and_rows(tmp_path) -> None:
    cfg = ProgramsConfig("modular", (2, 3), n_per_len=4, seed=1)
    (v1, first), (v2, second) = build(cfg, tmp_path / "a"), build(cfg, tmp_path / "b")
    assert v1 == v2 and first._fingerprint == second._fingerprint
    assert first.to_dict() == second.to_dict()
    v3, other = build(ProgramsConfig("modular", (2, 3), n_per_len=4, seed=2), tmp_path / "a")
    assert v3 != v1 and other["text"] != first["text"]


def test_build_refuses_a_parent(tmp_path) -> None:
    cfg = ProgramsConfig("binding", (1,), n_per_len=1)
    with pytest.raises(StageError, match="has no parent 'benchmark'"):
        execute("programs", cfg, {"benchmark": "latest"}, store=Store(tmp_path), progress=False)
