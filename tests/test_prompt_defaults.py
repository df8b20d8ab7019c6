"""A registry model's default prompt is never degenerate on a family: never one constant answer.

A prompt can read well on one family and be useless on another — SmolLM2's chat prompt answers
``1`` to every one-statement arithmetic program — so each registry model renders each family with
the format measured best for it (``seqpatch.models.family_formats``). Two checks:

- on the real SmolLM2 (installed by CI, as in ``test_pretrained.py``): greedy answers of the
  default to a handful of programs of every family are not one value for ≥ 90% of them, and the
  same check does flag the chat prompt on arithmetic (so it can fail);
- for every registry model (Gemma-3 is not installed in CI): the measured table in
  ``docs/pretrained.md`` has the default of every family, no row of it is degenerate, and it is
  the format the table's rule picks (``scripts/pretrained_prompts.py``).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from seqpatch.models import load_model, pad_left
from seqpatch.models import pretrained as pt
from seqpatch.models.family_formats import FAMILY_FORMATS
from seqpatch.programs import FAMILIES
from seqpatch.prompts import FamilyFormat, bind_tokenizer, get_prompt_format

DEGENERATE = 0.9  # one answer to this share of a family's programs
DOCS = Path(__file__).resolve().parents[1] / "docs" / "pretrained.md"
ROW = re.compile(
    r"^\| (?P<model>[\w.-]+) \| (?P<format>[\w-]+) \| (?P<family>\w+) \| (?P<length>\d+) \| "
    r"(?P<n>\d+) \| (?P<accuracy>[\d.]+) \| (?P<top>-?\d+|None) \| (?P<share>[\d.]+) \|$"
)


def answers(handle, family: str, seq_len: int, n: int) -> list[int | None]:
    """Greedy answers (first integer of up to 3 new tokens) to ``n`` programs of ``family``."""
    rng = random.Random(f"defaults-{family}-{seq_len}")
    programs = [FAMILIES[family].sample(seq_len, rng) for _ in range(n)]
    fmt, tok = handle.prompt_format, handle.tokenizer
    batch = pad_left(tok, [list(tok(fmt.prompt(p))["input_ids"]) for p in programs])
    with torch.no_grad():
        out = handle.hf_model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [fmt.parse_prediction(t.split("\n", 1)[0]) for t in texts]


def top_share(values: list) -> float:
    return Counter(values).most_common(1)[0][1] / len(values)


@pytest.fixture(scope="module")
def smol():
    pt.install("smollm2-135m-instruct", progress=False)  # a no-op where CI installed it
    return load_model("smollm2-135m-instruct")


def test_smollm2_defaults_answer_more_than_one_value_on_every_family(smol):
    assert isinstance(smol.prompt_format, FamilyFormat)
    for family in FAMILIES:
        got = answers(smol, family, 1, 12)
        assert top_share(got) < DEGENERATE, (family, got)


def test_the_check_flags_the_chat_prompt_on_arithmetic(smol):
    chat = bind_tokenizer(get_prompt_format("code-chat"), smol.tokenizer)
    got = answers(dataclasses.replace(smol, prompt_format=chat), "arithmetic", 1, 12)
    assert top_share(got) >= DEGENERATE, got


def measured() -> dict[str, list[dict[str, str]]]:
    rows: dict[str, list[dict[str, str]]] = {}
    for line in DOCS.read_text().splitlines():
        match = ROW.match(line.strip())
        if match:
            rows.setdefault(match["model"], []).append(match.groupdict())
    return rows


@pytest.mark.parametrize("name", sorted(pt.REGISTRY))
def test_registry_defaults_are_the_measured_non_degenerate_choice(name):
    entry = pt.REGISTRY[name]
    rows = measured().get(name)
    assert rows, f"docs/pretrained.md has no measured prompt table for {name}"
    chosen = dict(FAMILY_FORMATS.get(name, ()))
    formats = list(dict.fromkeys(r["format"] for r in rows))
    for family in FAMILIES:
        default = chosen.get(family, entry.prompt_format)
        of = {f: [r for r in rows if r["format"] == f and r["family"] == family] for f in formats}
        assert of.get(default), f"{name}: no measured rows for {default} on {family}"
        assert all(float(r["share"]) < DEGENERATE for r in of[default]), (family, of[default])
        ok = {
            f: sum(float(r["accuracy"]) for r in rs) / len(rs)
            for f, rs in of.items()
            if rs and all(float(r["share"]) < DEGENERATE for r in rs)
        }
        best = max(ok, key=lambda f: (ok[f], -formats.index(f)))
        assert default == best, f"{name} {family}: registry {default}, table picks {best}"
