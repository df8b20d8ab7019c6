"""Program families: grammar, interpreter, renderers and parser.

A *program* is a short straight-line program over a few variables that ends with a query
(``#x:`` — "what is x now?").  A *family* fixes the grammar (which statements may appear),
how programs are sampled, and therefore what a model must track to answer.

Contract every family keeps (checked by property tests against Python itself):

- ``program.answer`` and ``program.intermediates`` equal what ``exec`` of
  ``program.render("code")`` produces;
- ``Program.parse(program.render(r), family) == program`` for both renderers;
- ``make_sequence(family, seq_len, random.Random(s))`` is a pure function of its arguments.

Renderers:

- ``code``: one Python statement per line, then the query line ``#x:`` (a comment, so the text
  still executes). This is what pretrained models read.
- ``compact``: statements without spaces joined by ``;`` — ``a=5;b=a;#b:`` — the built-in
  organism's format, short enough for a word-level tokenizer.

The ``preamble`` is a fixed start (``x = 0`` for ``arithmetic``) that is not one of the
``seq_len`` statements: divergence indices and intermediates count ``statements`` only.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from seqpatch.errors import SeqpatchError

Renderer = Literal["code", "compact"]
RENDERERS: tuple[Renderer, ...] = ("code", "compact")
QUERY_RE = re.compile(r"^#\s*([a-z])\s*:$")


class ProgramError(SeqpatchError, ValueError):
    """Malformed program text or an impossible request to a family."""


@dataclass(frozen=True)
class Statement:
    """One assignment: ``target <op> operand``.

    ``op`` is one of ``Statement.OPS``; ``operand`` is an ``int`` constant or, for ``set``, the
    name of the variable copied.
    """

    target: str
    op: str
    operand: int | str

    OPS: ClassVar[tuple[str, ...]] = (
        "set",  # target = operand (constant or variable)
        "add",  # target += v
        "sub",  # target -= v
        "floordiv",  # target //= v
        "mod",  # target %= v
        "absdiff",  # target = abs(target - v)
        "add_mod",  # target = (target + v) % 10
        "sub_mod",  # target = (target - v) % 10
    )

    def __post_init__(self) -> None:
        if self.op not in self.OPS:
            raise ProgramError(f"unknown op {self.op!r}; expected one of {self.OPS}")
        if isinstance(self.operand, str) and self.op != "set":
            raise ProgramError(f"op {self.op!r} takes a constant, not variable {self.operand!r}")

    def reads(self) -> tuple[str, ...]:
        """Variables whose current value this statement reads."""
        if self.op == "set":
            return (self.operand,) if isinstance(self.operand, str) else ()
        return (self.target,)

    def apply(self, env: dict[str, int]) -> int:
        """The value ``target`` takes; raises ``ProgramError`` on an undefined read."""
        for name in self.reads():
            if name not in env:
                raise ProgramError(f"{self.render('code')!r} reads {name!r} before it is assigned")
        v = self.operand
        if self.op == "set":
            return env[v] if isinstance(v, str) else v
        x = env[self.target]
        assert isinstance(v, int)
        match self.op:
            case "add":
                return x + v
            case "sub":
                return x - v
            case "floordiv":
                return x // v
            case "mod":
                return x % v
            case "absdiff":
                return abs(x - v)
            case "add_mod":
                return (x + v) % 10
            case "sub_mod":
                return (x - v) % 10
        raise AssertionError(self.op)

    def render(self, renderer: Renderer) -> str:
        t, v = self.target, self.operand
        code = {
            "set": f"{t} = {v}",
            "add": f"{t} += {v}",
            "sub": f"{t} -= {v}",
            "floordiv": f"{t} //= {v}",
            "mod": f"{t} %= {v}",
            "absdiff": f"{t} = abs({t} - {v})",
            "add_mod": f"{t} = ({t} + {v}) % 10",
            "sub_mod": f"{t} = ({t} - {v}) % 10",
        }
        compact = {
            "set": f"{t}={v}",
            "add": f"{t}+={v}",
            "sub": f"{t}-={v}",
            "floordiv": f"{t}//={v}",
            "mod": f"{t}%={v}",
            "absdiff": f"{t}=abs({t}-{v})",
            "add_mod": f"{t}+={v}",
            "sub_mod": f"{t}-={v}",
        }
        return (code if renderer == "code" else compact)[self.op]


# Each entry: (op, regex over a statement with spaces removed). Operands are single tokens.
_STATEMENT_PATTERNS: dict[str, tuple[tuple[str, re.Pattern[str]], ...]] = {
    "code": (
        ("absdiff", re.compile(r"^([a-z])=abs\(([a-z])-(\d+)\)$")),
        ("add_mod", re.compile(r"^([a-z])=\(([a-z])\+(\d+)\)%10$")),
        ("sub_mod", re.compile(r"^([a-z])=\(([a-z])-(\d+)\)%10$")),
        ("floordiv", re.compile(r"^([a-z])//=(\d+)$")),
        ("mod", re.compile(r"^([a-z])%=(\d+)$")),
        ("add", re.compile(r"^([a-z])\+=(\d+)$")),
        ("sub", re.compile(r"^([a-z])-=(\d+)$")),
        ("set", re.compile(r"^([a-z])=(\d+|[a-z])$")),
    ),
}
_STATEMENT_PATTERNS["compact"] = (
    ("absdiff", _STATEMENT_PATTERNS["code"][0][1]),
    ("floordiv", re.compile(r"^([a-z])//=(\d+)$")),
    ("mod", re.compile(r"^([a-z])%=(\d+)$")),
    ("add", re.compile(r"^([a-z])\+=(\d+)$")),
    ("sub", re.compile(r"^([a-z])-=(\d+)$")),
    ("set", re.compile(r"^([a-z])=(\d+|[a-z])$")),
)


def parse_statement(line: str, family: Family, renderer: Renderer) -> Statement:
    """Parse one rendered statement of ``family``; raises ``ProgramError`` naming the line."""
    squeezed = re.sub(r"\s+", "", line)
    for op, pattern in _STATEMENT_PATTERNS[renderer]:
        m = pattern.match(squeezed)
        if m is None:
            continue
        groups = m.groups()
        if len(groups) == 3:
            if groups[0] != groups[1]:
                raise ProgramError(f"statement {line!r}: both sides must name the same variable")
            target, operand = groups[0], groups[2]
        else:
            target, operand = groups
        if renderer == "compact" and family.modular and op in ("add", "sub"):
            op = f"{op}_mod"
        value: int | str = int(operand) if operand.isdigit() else operand
        stmt = Statement(target, op, value)
        family.check_statement(stmt, line)
        return stmt
    raise ProgramError(f"cannot parse statement {line!r} as {family.name} ({renderer} rendering)")


@dataclass(frozen=True)
class Program:
    """A sampled program: its statements, query and everything derived by interpretation."""

    family: str
    statements: tuple[Statement, ...]
    query: str
    preamble: tuple[Statement, ...] = ()
    _trace: tuple[tuple[dict[str, int], ...], dict[str, int]] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        env: dict[str, int] = {}
        for stmt in self.preamble:
            env[stmt.target] = stmt.apply(env)
        states = []
        for stmt in self.statements:
            env[stmt.target] = stmt.apply(env)
            states.append(dict(env))
        if self.query not in env:
            raise ProgramError(f"query #{self.query}: asks for a variable never assigned")
        object.__setattr__(self, "_trace", (tuple(states), env))

    @property
    def seq_len(self) -> int:
        return len(self.statements)

    @property
    def answer(self) -> int:
        return self._trace[1][self.query]

    @property
    def variables(self) -> tuple[str, ...]:
        """Variables in order of first assignment (preamble first)."""
        seen: dict[str, None] = {}
        for stmt in (*self.preamble, *self.statements):
            seen.setdefault(stmt.target, None)
        return tuple(seen)

    @property
    def intermediates(self) -> list[list[int | None]]:
        """``[statement][variable]`` value after each statement; ``None`` if not yet assigned."""
        return [[state.get(v) for v in self.variables] for state in self._trace[0]]

    def dependencies(self, upto: int | None = None, variable: str | None = None) -> list[int]:
        """Indices of the statements the value of ``variable`` depends on (a backward slice).

        Defaults to the queried variable after the last statement. For ``binding`` this is the
        query's reference chain, and its length is the referential depth. A statement outside
        the slice cannot influence the answer whatever its operand.
        """
        upto = self.seq_len if upto is None else upto
        live = {self.query if variable is None else variable}
        used: list[int] = []
        for i in range(upto - 1, -1, -1):
            stmt = self.statements[i]
            if stmt.target in live:
                used.append(i)
                live.discard(stmt.target)
                live.update(stmt.reads())
        return sorted(used)

    def render(self, renderer: Renderer = "code") -> str:
        lines = [s.render(renderer) for s in (*self.preamble, *self.statements)]
        lines.append(self.render_query())
        return ("\n" if renderer == "code" else ";").join(lines)

    def render_query(self) -> str:
        return f"#{self.query}:"

    @classmethod
    def parse(cls, text: str, family: str | Family, renderer: Renderer | None = None) -> Program:
        """Read a rendered program back. The renderer is detected when not given."""
        fam = get_family(family)
        if renderer is None:
            renderer = "code" if "\n" in text.strip() or ";" not in text else "compact"
        sep = "\n" if renderer == "code" else ";"
        lines = [ln.strip() for ln in text.strip().split(sep)]
        if not lines or not QUERY_RE.match(lines[-1]):
            raise ProgramError(
                f"program must end with a query line like '#x:'; got {lines[-1] if lines else ''!r}"
            )
        query = QUERY_RE.match(lines[-1]).group(1)  # type: ignore[union-attr]
        body = lines[:-1]
        n_pre = len(fam.preamble)
        preamble = tuple(parse_statement(ln, fam, renderer) for ln in body[:n_pre])
        if preamble != fam.preamble:
            want = "; ".join(s.render(renderer) for s in fam.preamble)
            raise ProgramError(f"{fam.name} programs start with {want!r}; got {body[:n_pre]!r}")
        statements = tuple(parse_statement(ln, fam, renderer) for ln in body[n_pre:])
        return fam.build(statements, query)

    def to_row(self) -> dict:
        """The columns shared by every stage that stores a program."""
        return {
            "family": self.family,
            "seq_len": self.seq_len,
            "text": self.render("code"),
            "compact": self.render("compact"),
            "statements": [s.render("code") for s in self.statements],
            "query": self.query,
            "answer": self.answer,
            "variables": list(self.variables),
            "intermediates": self.intermediates,
            "dependencies": self.dependencies(),
        }


class Family:
    """Grammar + sampler. Subclasses define ``sample_statements`` and the allowed ops."""

    name: ClassVar[str]
    ops: ClassVar[frozenset[str]]
    modular: ClassVar[bool] = False
    preamble: tuple[Statement, ...] = ()

    def __init__(self, variables: str = "abc", max_operand: int = 9) -> None:
        self.variable_names = tuple(variables)
        self.max_operand = max_operand

    @property
    def one_digit_answers(self) -> bool:
        """Whether every answer this family can produce is one digit ``0..9``.

        The pairs stage then scores the ten digit tokens only; otherwise (negative or multi-digit
        answers) it adds the answers' own first differing tokens as candidates.
        """
        return False

    def check_statement(self, stmt: Statement, line: str) -> None:
        if stmt.op not in self.ops:
            raise ProgramError(
                f"statement {line!r}: op {stmt.op!r} is not in the {self.name} grammar"
            )

    def build(self, statements: Sequence[Statement], query: str) -> Program:
        return Program(self.name, tuple(statements), query, self.preamble)

    def sample(self, seq_len: int, rng: random.Random) -> Program:
        if seq_len < 1:
            raise ProgramError(f"seq_len must be >= 1, got {seq_len}")
        return self._sample(seq_len, rng)

    def _sample(self, seq_len: int, rng: random.Random) -> Program:
        raise NotImplementedError

    def alternatives(self, program: Program, index: int) -> list[Statement]:
        """Every statement that may replace ``statements[index]`` and keep the program valid.

        Used by counterfactual pairs: same target, one op or operand changed.
        """
        raise NotImplementedError


class ArithmeticFamily(Family):
    """Experiment 1: ``x = 0`` then ``seq_len`` ops on ``x`` with operands 1..9."""

    name = "arithmetic"
    ops = frozenset({"set", "add", "sub", "floordiv", "mod", "absdiff"})
    step_ops: ClassVar[tuple[str, ...]] = ("add", "sub", "floordiv", "mod", "absdiff")

    def __init__(self, variables: str = "x", max_operand: int = 9) -> None:
        super().__init__(variables, max_operand)
        self.preamble = (Statement(self.variable_names[0], "set", 0),)

    def _sample(self, seq_len: int, rng: random.Random) -> Program:
        x = self.variable_names[0]
        stmts = [
            Statement(x, rng.choice(self.step_ops), rng.randint(1, self.max_operand))
            for _ in range(seq_len)
        ]
        return self.build(stmts, x)

    def alternatives(self, program: Program, index: int) -> list[Statement]:
        old = program.statements[index]
        return [
            Statement(old.target, op, v)
            for op in self.step_ops
            for v in range(1, self.max_operand + 1)
            if (op, v) != (old.op, old.operand)
        ]


class BindingFamily(Family):
    """Variable binding: each line assigns a digit or copies an earlier variable.

    The query's reference chain (``dependencies()``) has depth ``1..max_depth``; the other
    assignments form distractor chains. Depths are drawn uniformly among those the sampled
    program offers, so deep chains are not starved.
    """

    name = "binding"
    ops = frozenset({"set"})

    def __init__(
        self,
        variables: str = "abc",
        max_operand: int = 9,
        copy_prob: float = 0.7,
        max_depth: int = 4,
    ) -> None:
        super().__init__(variables, max_operand)
        self.copy_prob = copy_prob  # copies make chains; constants end them
        self.max_depth = max_depth

    @property
    def one_digit_answers(self) -> bool:
        return self.max_operand <= 9  # every value is a constant 0..max_operand or a copy of one

    def _statement(self, target: str, defined: Iterable[str], rng: random.Random) -> Statement:
        sources = [v for v in defined if v != target]
        if sources and rng.random() < self.copy_prob:
            return Statement(target, "set", rng.choice(sources))
        return Statement(target, "set", rng.randint(0, self.max_operand))

    def _sample(self, seq_len: int, rng: random.Random) -> Program:
        while True:
            stmts: list[Statement] = []
            defined: dict[str, None] = {}
            for _ in range(seq_len):
                stmt = self._statement(rng.choice(self.variable_names), defined, rng)
                stmts.append(stmt)
                defined.setdefault(stmt.target, None)
            probe = self.build(stmts, stmts[-1].target)
            by_depth: dict[int, list[str]] = {}
            for v in defined:
                depth = len(probe.dependencies(variable=v))
                if depth <= self.max_depth:
                    by_depth.setdefault(depth, []).append(v)
            if by_depth:
                depth = rng.choice(sorted(by_depth))
                return self.build(stmts, rng.choice(by_depth[depth]))

    def alternatives(self, program: Program, index: int) -> list[Statement]:
        old = program.statements[index]
        before = {s.target for s in program.statements[:index]}
        options: list[Statement] = [
            Statement(old.target, "set", c) for c in range(self.max_operand + 1)
        ]
        options += [Statement(old.target, "set", v) for v in sorted(before) if v != old.target]
        return [s for s in options if s != old]


class ModularFamily(BindingFamily):
    """Binding plus ``v += d`` / ``v -= d`` modulo 10: every value stays one digit."""

    name = "modular"
    ops = frozenset({"set", "add_mod", "sub_mod"})
    modular = True

    def __init__(
        self,
        variables: str = "abc",
        max_operand: int = 9,
        copy_prob: float = 0.4,
        update_prob: float = 0.3,
        max_depth: int = 4,
    ) -> None:
        super().__init__(variables, max_operand, copy_prob, max_depth)
        self.update_prob = update_prob  # share of statements that update a variable in place

    @property
    def one_digit_answers(self) -> bool:
        return self.max_operand <= 9  # constants 0..max_operand; updates stay in 0..9 (mod 10)

    def _statement(self, target: str, defined: Iterable[str], rng: random.Random) -> Statement:
        defined = list(defined)
        if target in defined and rng.random() < self.update_prob:
            return Statement(target, rng.choice(("add_mod", "sub_mod")), rng.randint(1, 9))
        return super()._statement(target, defined, rng)

    def alternatives(self, program: Program, index: int) -> list[Statement]:
        old = program.statements[index]
        options = super().alternatives(program, index)
        if old.target in {s.target for s in program.statements[:index]}:
            options += [
                Statement(old.target, op, v)
                for op in ("add_mod", "sub_mod")
                for v in range(1, 10)
                if (op, v) != (old.op, old.operand)
            ]
        return options


FAMILIES: dict[str, Family] = {
    "arithmetic": ArithmeticFamily(),
    "binding": BindingFamily(),
    "modular": ModularFamily(),
}


def get_family(family: str | Family) -> Family:
    if isinstance(family, Family):
        return family
    try:
        return FAMILIES[family]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ProgramError(f"unknown family {family!r}; known families: {known}") from None


def make_sequence(family: str | Family, seq_len: int, rng: random.Random) -> Program:
    """Sample one program of ``seq_len`` statements from ``family``."""
    return get_family(family).sample(seq_len, rng)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (independent of ``PYTHONHASHSEED``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def program_rng(seed: int, family: str, seq_len: int, index: int) -> random.Random:
    """The RNG of program ``index`` of one (family, seq_len) cell: rows are reproducible alone."""
    return random.Random(derive_seed("program", seed, family, seq_len, index))
