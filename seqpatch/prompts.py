"""Prompt formats: how a program becomes the text a model reads, and how its answer is read back.

A format's ``prompt(program)`` ends exactly where the answer starts, so the answer is the model's
next token(s) and patching metrics can score the answer candidates' logits at the last position.
``answer_text(value)`` is what should follow (``"5"`` for the organism, ``" 5"`` after the code
cue), and ``parse_prediction(continuation)`` reads an integer back from generated text.

- ``CompactFormat`` — the built-in organism's format: ``a=5;b=a;#b:`` then ``5``.
- ``CodeFormat`` — for pretrained models: an instruction comment, optional few-shot examples, the
  program as Python lines, and a cue ``# The final value of x is`` so that the answer follows as
  `` 5``. With ``chat=True`` the request is wrapped in the tokenizer's chat template and the
  assistant turn starts with the cue.

Formats are frozen dataclasses; ``describe()`` returns what provenance records. Few-shot examples
depend only on ``(seed, family, seq_len)`` — never on the queried program, except that an example
equal to it is replaced — so both programs of a counterfactual pair share the same prefix.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from seqpatch.errors import SeqpatchError
from seqpatch.programs import Program, derive_seed, get_family

_INTEGER_RE = re.compile(r"^\s*(-?\d+)")


class PromptFormatError(SeqpatchError, ValueError):
    """A format cannot render as asked (e.g. chat wrapping with a tokenizer that has no template)."""


class PromptFormat(ABC):
    """Renders programs into prompts and reads integer answers back."""

    name: ClassVar[str]

    @abstractmethod
    def prompt(self, program: Program) -> str:
        """The text the model reads; it ends right where the answer starts."""

    @abstractmethod
    def answer_text(self, value: int) -> str:
        """The text that should follow ``prompt(...)`` when the answer is ``value``."""

    def parse_prediction(self, continuation: str) -> int | None:
        """The integer a generated continuation starts with, or ``None`` if it starts otherwise."""
        match = _INTEGER_RE.match(continuation)
        return int(match.group(1)) if match else None

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able settings that, with the model, determine every prompt (for provenance)."""

    def reference_prompt(self) -> str:
        """A typical prompt: the context in which answer texts are tokenized when none is given."""
        return self.prompt(Program.parse("a=1;#a:", "binding", "compact"))


@dataclass(frozen=True)
class CompactFormat(PromptFormat):
    """The organism's format: the ``compact`` rendering, answer digits with no leading space."""

    name: ClassVar[str] = "compact"

    def prompt(self, program: Program) -> str:
        return program.render("compact")

    def answer_text(self, value: int) -> str:
        return str(value)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


@dataclass(frozen=True)
class CodeFormat(PromptFormat):
    """Python lines with an instruction, optional few-shot examples and a final-value cue.

    ``chat=True`` needs ``tokenizer`` (one with a chat template); ``load_model`` fills it in.
    """

    name: ClassVar[str] = "code"

    instruction: str = "# Run this Python code and track the value of every variable."
    cue: str = "# The final value of {var} is"
    chat_cue: str = "The final value of {var} is"  # starts the assistant turn in chat mode
    n_shots: int = 0
    seed: int = 0
    chat: bool = False
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_shots < 0:
            raise PromptFormatError(f"n_shots must be >= 0, got {self.n_shots}")
        if self.chat and self.tokenizer is not None:
            check_chat_template(self.tokenizer)

    def with_tokenizer(self, tokenizer: Any) -> CodeFormat:
        """This format bound to ``tokenizer`` (needed for chat wrapping; checked here)."""
        return replace(self, tokenizer=tokenizer)

    def examples(self, program: Program) -> list[Program]:
        """The few-shot examples shown before ``program``: same family and length, never equal."""
        if self.n_shots == 0:
            return []
        family = get_family(program.family)
        rng = random.Random(derive_seed("few-shot", self.seed, program.family, program.seq_len))
        chosen: list[Program] = []
        for _ in range(100 * self.n_shots):
            candidate = family.sample(program.seq_len, rng)
            same = (candidate.statements, candidate.query) == (program.statements, program.query)
            if not same and candidate not in chosen:
                chosen.append(candidate)
                if len(chosen) == self.n_shots:
                    return chosen
        raise PromptFormatError(
            f"could not draw {self.n_shots} distinct few-shot examples of {program.family} "
            f"programs with {program.seq_len} statements; use fewer shots or longer programs"
        )

    def _code(self, program: Program) -> str:
        return "\n".join(s.render("code") for s in (*program.preamble, *program.statements))

    def _solved(self, program: Program) -> str:
        cue = self.cue.format(var=program.query)
        return f"{self._code(program)}\n{cue}{self.answer_text(program.answer)}"

    def prompt(self, program: Program) -> str:
        blocks = [self.instruction] if self.instruction else []
        blocks += [self._solved(example) for example in self.examples(program)]
        if not self.chat:
            blocks.append(f"{self._code(program)}\n{self.cue.format(var=program.query)}")
            return "\n\n".join(blocks)
        if self.tokenizer is None:
            raise PromptFormatError(
                "CodeFormat(chat=True) needs a tokenizer for its chat template: use "
                "fmt.with_tokenizer(tokenizer), or load_model(..., prompt_format=fmt)"
            )
        blocks.append(self._code(program))
        blocks.append(f"What is the final value of {program.query}?")
        messages = [{"role": "user", "content": "\n\n".join(blocks)}]
        wrapped = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return wrapped + self.chat_cue.format(var=program.query)

    def answer_text(self, value: int) -> str:
        return f" {value}"

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "instruction": self.instruction,
            "cue": self.chat_cue if self.chat else self.cue,
            "n_shots": self.n_shots,
            "seed": self.seed,
            "chat": self.chat,
        }
        if self.chat and self.tokenizer is not None:
            template = str(self.tokenizer.chat_template)
            info["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()[:16]
        return info


def check_chat_template(tokenizer: Any) -> None:
    """Raise ``PromptFormatError`` unless ``tokenizer`` can apply a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptFormatError(
            f"{type(tokenizer).__name__} has no chat template, so prompts cannot be chat-wrapped "
            "(home-built tokenizers such as the organism's have none). Use chat=False, or a "
            "model whose tokenizer_config.json defines chat_template."
        )


@dataclass(frozen=True)
class FamilyFormat(PromptFormat):
    """One named format per program family (a registry model's measured defaults).

    A prompt that suits one family can be degenerate on another (SmolLM2's chat prompt answers
    ``1`` to every one-statement arithmetic program), so ``load_model`` of a registry model
    renders each program with the format measured best for its family (``formats``: pairs of
    family and format name, ``default`` for families not listed). Every member is a code
    format, so answers read the same whatever the family.
    """

    name: ClassVar[str] = "by-family"

    formats: tuple[tuple[str, str], ...]
    default: str = "code"
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for _, fmt in (*self.formats, ("", self.default)):
            if parse_format_name(fmt)[0] not in ("code", "code-chat"):
                raise PromptFormatError(f"a by-family format lists code formats only, not {fmt!r}")

    def with_tokenizer(self, tokenizer: Any) -> FamilyFormat:
        return replace(self, tokenizer=tokenizer)

    def member(self, family: str) -> PromptFormat:
        """The format programs of ``family`` are rendered with."""
        chosen = dict(self.formats).get(family, self.default)
        return bind_tokenizer(get_prompt_format(chosen), self.tokenizer)

    def prompt(self, program: Program) -> str:
        return self.member(program.family).prompt(program)

    def answer_text(self, value: int) -> str:
        return f" {value}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "formats": {family: name for family, name in self.formats},
            "default": self.default,
        }


PROMPT_FORMATS: dict[str, type[PromptFormat]] = {"compact": CompactFormat, "code": CodeFormat}
_SHOTS_RE = re.compile(r"^(code|code-chat)-(\d+)shot$")


def parse_format_name(name: str) -> tuple[str, int]:
    """``code-chat-1shot`` → ``("code-chat", 1)``; ``code`` → ``("code", 0)``."""
    match = _SHOTS_RE.match(name)
    if match:
        return match.group(1), int(match.group(2))
    return name, 0


def is_format_name(name: str) -> bool:
    """Whether ``name`` names a format (``compact``, ``code``, ``code-chat``, ``code-2shot``…)."""
    base, _ = parse_format_name(name)
    return base in (*PROMPT_FORMATS, "code-chat")


def bind_tokenizer(fmt: PromptFormat, tokenizer: Any) -> PromptFormat:
    """``fmt`` with ``tokenizer`` for chat wrapping where it needs one (others unchanged)."""
    if tokenizer is None:
        return fmt
    if isinstance(fmt, FamilyFormat) or (isinstance(fmt, CodeFormat) and fmt.chat):
        return fmt.with_tokenizer(tokenizer)
    return fmt


def get_prompt_format(name: str, **settings: Any) -> PromptFormat:
    """A format by name: ``compact``, ``code``, ``code-chat`` (``CodeFormat(chat=True)``), and
    either code format with worked examples, ``code-1shot`` … ``code-chat-3shot``."""
    base, shots = parse_format_name(name)
    if shots:
        settings = {"n_shots": shots, **settings}
    if base == "code-chat":
        return CodeFormat(chat=True, **settings)
    try:
        return PROMPT_FORMATS[base](**settings)
    except KeyError:
        known = ", ".join([*PROMPT_FORMATS, "code-chat", "code-Nshot", "code-chat-Nshot"])
        raise PromptFormatError(f"unknown prompt format {name!r}; known: {known}") from None
