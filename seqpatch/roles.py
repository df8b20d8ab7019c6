"""Each prompt token's role in the data flow of its program, so pairs of different lengths align.

A chain study patches the tokens that the changed value can travel through — the changed
statement, the later statements of the query's backward slice (the *hops*), the question and the
last token (``slice_positions``) — and averages pairs by what each position *is*, not by its
absolute index. ``token_roles`` labels every token of a prompt:

- ``hop{h}:{part}`` — a token of a statement of the query's slice at or after the changed index
  ``k``: ``h = 0`` is the changed statement, ``h = 1`` the next statement of the slice, …;
  ``part`` is ``var`` (the assigned variable), ``=`` (the operator, ``abs(…`` and brackets
  included), ``value`` (the operand: constant or copied variable) or ``end`` (the line's
  separator, ``\\n`` or ``;``). Spaces belong to the part they precede (`` 5`` is ``value``);
  a part of several tokens numbers its later ones ``value+1``, ``value+2``;
- ``question:{j}`` — the ``j``-th token after the last statement's separator (the cue, the chat
  template's turn markers, ``#x:``), except the final one;
- ``last`` — the final token, where the answer is read;
- ``answer`` — tokens of a shared answer prefix appended after the prompt;
- ``stmt`` — a token of a statement outside that part of the slice; ``context`` — anything before
  the program (instruction, few-shot examples, BOS, the chat template's system turn).

Roles come from the tokenizer's character offsets (fast tokenizers), so they hold for any
tokenizer that splits text at arbitrary places; the program is located in the prompt as the last
occurrence of its rendered lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from seqpatch.errors import SeqpatchError
from seqpatch.programs import Program, Renderer

PARTS = ("var", "=", "value", "end")
STATEMENT_SEPARATORS = ("\n", ";")  # what ends a line: the code and compact renderers' separators
SLICE_PREFIXES = ("hop", "question", "last")


class RolesError(SeqpatchError, ValueError):
    """A prompt whose tokens cannot be mapped back to its program."""


def _statement_chars(text: str, target: str, operand: int | str) -> list[str]:
    """The part of every character of one rendered statement (spaces: the next part's)."""
    roles = ["="] * len(text)
    roles[: len(target)] = ["var"] * len(target)
    value = str(operand)
    at = text.rfind(value)
    if at > len(target) - 1:
        roles[at : at + len(value)] = ["value"] * len(value)
    for i in range(len(text) - 2, -1, -1):  # a space takes the role of what follows it
        if text[i] == " ":
            roles[i] = roles[i + 1]
    return roles


def char_roles(
    program: Program, prompt: str, divergence_index: int, renderer: Renderer
) -> list[str]:
    """The role of every character of ``prompt`` (``last`` is decided per token, not here)."""
    sep = "\n" if renderer == "code" else ";"
    statements = (*program.preamble, *program.statements)
    lines = [s.render(renderer) for s in statements]
    block = sep.join(lines) + sep
    start = prompt.rfind(block)
    if start < 0:
        raise RolesError(
            f"the prompt does not contain its program's {renderer} lines; token roles need a "
            "format that shows the program verbatim"
        )
    deps = program.dependencies()
    hops = [i for i in deps if i >= divergence_index] if divergence_index in deps else []
    roles = ["context"] * start
    n_pre = len(program.preamble)
    for j, (stmt, line) in enumerate(zip(statements, lines, strict=True)):
        index = j - n_pre
        if index in hops:
            h = hops.index(index)
            parts = _statement_chars(line, stmt.target, stmt.operand)
            roles += [f"hop{h}:{p}" for p in parts] + [f"hop{h}:end"]
        else:
            roles += ["stmt"] * (len(line) + 1)
    question = len(prompt) - len(roles)
    return roles + ["question"] * question


def token_roles(
    tokenizer: Any,
    prompt: str,
    input_ids: Sequence[int],
    program: Program,
    divergence_index: int,
    renderer: Renderer = "code",
) -> list[str]:
    """One role per token of ``input_ids`` (the prompt's ids, then any shared answer prefix).

    Raises ``RolesError`` when the tokenizer has no character offsets or the ids are not the
    prompt's."""
    if not getattr(tokenizer, "is_fast", False):
        raise RolesError(f"{type(tokenizer).__name__} gives no character offsets; use a fast one")
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    if list(input_ids[: len(ids)]) != ids:
        raise RolesError("input_ids do not start with the prompt's tokens; cannot label them")
    chars = char_roles(program, prompt, divergence_index, renderer)
    labels: list[str] = []
    for begin, end in offsets:
        labels.append(chars[begin] if end > begin else "context")
    seen: dict[str, int] = {}
    out: list[str] = []
    for t, label in enumerate(labels):
        if label == "question":
            label = f"question:{sum(1 for x in labels[:t] if x == 'question')}"
        elif label.startswith("hop"):
            n = seen.get(label, 0)
            seen[label] = n + 1
            label = label if n == 0 else f"{label}+{n}"
        out.append(label)
    out += ["answer"] * (len(input_ids) - len(ids))
    out[-1] = "last"
    return out


def slice_positions(roles: Sequence[str]) -> list[int]:
    """The positions a chain study patches: the slice's hops from the change on, the question's
    tokens and the last token (roles starting with ``SLICE_PREFIXES``)."""
    return [t for t, role in enumerate(roles) if role.startswith(SLICE_PREFIXES)]


def role_key(role: str) -> tuple[int, int, int, int]:
    """Sort roles in reading order: hops (by hop, part, repeat), question tokens, last."""
    if role.startswith("hop"):
        hop, _, rest = role[3:].partition(":")
        part, _, repeat = rest.partition("+")
        return (0, int(hop), PARTS.index(part), int(repeat or 0))
    if role.startswith("question:"):
        return (1, int(role.split(":")[1]), 0, 0)
    if role == "answer":
        return (2, 0, 0, 0)
    if role == "last":
        return (3, 0, 0, 0)
    return (-1, 0, 0, 0)


def selected_positions(ids_a: Sequence[int], ids_b: Sequence[int], tokenizer: Any) -> list[int]:
    """The ``changed+ends+last`` cells of one pair: the tokens where A and B differ, every
    position from the first of them on whose next token starts or holds a statement separator
    (``STATEMENT_SEPARATORS``: the last token of each later line, of the query and of the chat
    template's lines) and the final token, where the answer is read. Empty changes give ``[T-1]``.
    """
    length = len(ids_b)
    changed = [t for t in range(length) if ids_a[t] != ids_b[t]]
    first = changed[0] if changed else length - 1
    ends = [
        t
        for t in range(first, length - 1)
        if any(sep in tokenizer.decode([int(ids_b[t + 1])]) for sep in STATEMENT_SEPARATORS)
    ]
    return sorted({*changed, *ends, length - 1})


def chosen_positions(selection: str, batch: dict[str, list], i: int, tokenizer: Any) -> list[int]:
    """The patched cells of pair ``i`` of a pairs ``batch`` under ``changed+ends+last`` or
    ``slice`` (the patching stage's position selections other than ``all``)."""
    if selection == "slice":
        roles = batch["roles"][i] if "roles" in batch else []
        if not roles:
            raise RolesError(
                "--positions slice needs the pairs' token roles, which pairs built before "
                "schema 2 lack; rebuild the pairs stage"
            )
        return slice_positions(roles)
    return selected_positions(batch["input_ids_a"][i], batch["input_ids_b"][i], tokenizer)
