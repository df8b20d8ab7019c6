"""The prompt format of each registry model per program family, chosen by measurement.

A prompt that reads well on one family can be degenerate on another: SmolLM2's chat prompt
answers ``1`` to every one-statement arithmetic program. ``scripts/pretrained_prompts.py``
measures greedy accuracy and the share of the most common answer for each (format, family,
length) — lengths 1, 3, 5, 20 programs each — and each family takes the most accurate format
that never gives one answer to ≥ 90% of a length's programs (ties: the earlier format listed).
The tables are in ``docs/pretrained.md`` §4, and ``tests/test_prompt_defaults.py`` recomputes
this choice from them. Families not listed use the entry's ``prompt_format``.
"""

from __future__ import annotations

FAMILY_FORMATS: dict[str, tuple[tuple[str, str], ...]] = {
    # code-chat: degenerate on arithmetic (all `1` at one statement); code-1shot: `2` to 19 of
    # 20 five-statement arithmetic programs
    "smollm2-135m-instruct": (
        ("arithmetic", "code"),
        ("binding", "code-3shot"),
        ("modular", "code-chat"),
    ),
    # no chat template; code-3shot answers `1` to every five-statement arithmetic program
    "gemma3-270m": (
        ("arithmetic", "code"),
        ("binding", "code-3shot"),
        ("modular", "code"),
    ),
}
