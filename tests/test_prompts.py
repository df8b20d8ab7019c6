"""Prompt formats render programs, end where the answer starts, and read answers back."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqpatch.programs import FAMILIES, Program, make_sequence
from seqpatch.prompts import (
    CodeFormat,
    CompactFormat,
    PromptFormatError,
    check_chat_template,
    get_prompt_format,
)
from seqpatch.testing import build_tiny_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_compact_format():
    program = Program.parse("a=5;b=a;#b:", "binding", "compact")
    fmt = CompactFormat()
    assert fmt.prompt(program) == "a=5;b=a;#b:"
    assert fmt.answer_text(program.answer) == "5"
    assert fmt.parse_prediction("5;c=2") == 5
    assert fmt.parse_prediction("-3") == -3
    assert fmt.parse_prediction(";5") is None
    assert fmt.describe() == {"name": "compact"}


def test_code_format_text():
    program = Program.parse("x = 0\nx += 3\nx //= 2\n#x:", "arithmetic")
    fmt = CodeFormat()
    assert fmt.prompt(program) == (
        "# Run this Python code and track the value of every variable.\n\n"
        "x = 0\nx += 3\nx //= 2\n# The final value of x is"
    )
    assert fmt.answer_text(1) == " 1" and fmt.answer_text(-4) == " -4"
    assert fmt.parse_prediction(" 12\nx = 3") == 12
    assert fmt.parse_prediction(" -7.") == -7
    assert fmt.parse_prediction(" seven") is None
    assert fmt.parse_prediction("") is None


@settings(max_examples=60, deadline=None)
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    seq_len=st.integers(2, 10),
    n_shots=st.integers(0, 3),
    seed=st.integers(0, 2**32),
)
def test_code_prompt_is_python_that_computes_the_answer(family, seq_len, n_shots, seed):
    program = make_sequence(family, seq_len, random.Random(seed))
    fmt = CodeFormat(n_shots=n_shots, seed=seed)
    prompt = fmt.prompt(program)
    assert prompt.endswith(f"# The final value of {program.query} is")
    env: dict[str, int] = {}
    exec(prompt, {}, env)  # examples and program are plain Python; cues are comments
    assert env[program.query] == program.answer
    examples = fmt.examples(program)
    assert len(examples) == n_shots
    for example in examples:
        assert (example.family, example.seq_len) == (program.family, program.seq_len)
        assert example.statements != program.statements
        solved = f"# The final value of {example.query} is {example.answer}\n"
        assert solved in prompt


def test_few_shot_examples_are_deterministic_and_shared_across_programs():
    rng = random.Random(0)
    a, b = (make_sequence("arithmetic", 4, rng) for _ in range(2))
    fmt = CodeFormat(n_shots=2, seed=7)
    prefix = fmt.prompt(a).rsplit("\n\n", 1)[0]
    assert prefix == fmt.prompt(b).rsplit("\n\n", 1)[0]
    assert fmt.prompt(a) == CodeFormat(n_shots=2, seed=7).prompt(a)
    assert fmt.prompt(a) != CodeFormat(n_shots=2, seed=8).prompt(a)
    assert prefix.count("# The final value of x is") == 2


def test_few_shot_examples_skip_the_queried_program():
    fmt = CodeFormat(n_shots=3, seed=0)
    program = make_sequence("binding", 1, random.Random(1))
    first = fmt.examples(make_sequence("binding", 1, random.Random(2)))[0]
    assert all(e.statements != first.statements for e in fmt.examples(first))
    assert all(e.statements != program.statements for e in fmt.examples(program))


def test_format_errors():
    with pytest.raises(PromptFormatError, match="n_shots"):
        CodeFormat(n_shots=-1)
    program = make_sequence("binding", 1, random.Random(0))
    with pytest.raises(PromptFormatError, match="distinct few-shot examples"):
        CodeFormat(n_shots=40).prompt(program)  # only 30 one-statement binding programs exist
    with pytest.raises(PromptFormatError, match="needs a tokenizer"):
        CodeFormat(chat=True).prompt(program)
    with pytest.raises(PromptFormatError, match="known: compact, code, code-chat"):
        get_prompt_format("yaml")


def test_chat_wrapping():
    program = Program.parse("a = 5\nb = a\n#b:", "binding")
    plain = build_tiny_tokenizer("bpe")
    with pytest.raises(PromptFormatError, match="no chat template"):
        check_chat_template(plain)
    with pytest.raises(PromptFormatError, match="no chat template"):
        CodeFormat(chat=True).with_tokenizer(plain)
    chat_tokenizer = build_tiny_tokenizer("bpe")
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    fmt = get_prompt_format("code-chat", n_shots=1).with_tokenizer(chat_tokenizer)
    prompt = fmt.prompt(program)
    assert prompt.startswith("<|user|>\n# Run this Python code")
    assert "a = 5\nb = a\n\nWhat is the final value of b?\n<|assistant|>\n" in prompt
    assert prompt.endswith("<|assistant|>\nThe final value of b is")
    info = fmt.describe()
    assert info["chat"] and len(info["chat_template_sha256"]) == 16
    assert json.loads(json.dumps(info)) == info


def test_describe_records_settings():
    assert CodeFormat().describe() != CodeFormat(n_shots=2).describe()
    assert get_prompt_format("code", n_shots=2) == CodeFormat(n_shots=2)
    assert isinstance(get_prompt_format("compact"), CompactFormat)
