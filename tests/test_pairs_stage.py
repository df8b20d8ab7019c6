"""The pairs stage: structure of every row, token lengths under a BPE tokenizer, model filter.

The model filter needs a model that solves the task, which a random-weight model does not: the
tests wrap a tiny real architecture's handle with an *oracle* forward that reads the program
back from the token ids and puts all its mass on the true answer's tokens (optionally erring
on chosen answers). Everything else — tokenizer, prompt format, answer tokens — is the real path.
"""

from __future__ import annotations

import dataclasses
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seqpatch.executor import execute
from seqpatch.models import load_model
from seqpatch.pairs import PairError, make_counterfactual_pair
from seqpatch.programs import Program, derive_seed
from seqpatch.stages.base import ModelCache
from seqpatch.stages.pairs import REJECTIONS, PairsConfig, PairsStageError, _score
from seqpatch.store import Store
from seqpatch.testing import save_tiny_model


class Oracle(torch.nn.Module):
    """Next-token logits of a model that answers every program correctly (unless ``wrong``)."""

    def __init__(self, handle, family: str, wrong=lambda answer: False) -> None:
        super().__init__()
        self.handle, self.family, self.wrong = handle, family, wrong

    def program_of(self, text: str) -> tuple[Program, str]:
        fmt = self.handle.prompt_format.name
        if fmt == "compact":
            body = text[: text.index(":") + 1]
            return Program.parse(body, self.family, "compact"), body
        cue = re.search(r"# The final value of ([a-z]) is", text)
        assert cue is not None
        lines = text[: cue.start()].strip().split("\n")
        code = [ln for ln in lines if ln and not ln.startswith("#")]
        program = Program.parse("\n".join([*code, f"#{cue.group(1)}:"]), self.family, "code")
        return program, text[: cue.end()]

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0):
        vocab = len(self.handle.tokenizer)
        logits = torch.zeros(*input_ids.shape, vocab)
        tok = self.handle.tokenizer
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            offset = int((mask == 0).sum())
            real = ids[offset:].tolist()
            text = tok.decode(real, skip_special_tokens=True)
            program, prompt = self.program_of(text)
            answer = program.answer + (1 if self.wrong(program.answer) else 0)
            n_prompt = len(self.handle.tokenizer(prompt)["input_ids"])
            target = self.handle.answer_token_ids([answer], prompt=prompt)[0]
            for j, token in enumerate(target):
                t = offset + n_prompt - 1 + j
                if t < input_ids.shape[1]:
                    logits[row, t, token] = 10.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])  # 0 keeps every position


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("bpe") / "m", tokenizer="bpe")
    return load_model(str(folder))


@pytest.fixture(scope="module")
def compact_llama(tmp_path_factory):
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("wl") / "m", tokenizer="wordlevel")
    return load_model(str(folder), prompt_format="compact")


def build(handle, tmp_path, family, wrong=lambda a: False, **kw):
    """Build the stage through the executor, with ``handle``'s oracle as the model ``tiny``."""
    oracle_handle = dataclasses.replace(handle, hf_model=Oracle(handle, family, wrong))
    cfg = PairsConfig(model="tiny", family=family, **kw)
    models = ModelCache()
    models.put("tiny", oracle_handle)
    ref = execute("pairs", cfg, store=Store(tmp_path), models=models, progress=False)
    return ref, Store(tmp_path).load("pairs", ref.version)


def expected_rejections(handle, ref, wrong=lambda a: False) -> dict[str, int]:
    """The stored rejection counts, recomputed independently: every candidate the build drew is
    regenerated alone from its seed and classified in the stage's order."""
    cfg = PairsConfig(**ref.provenance["config"])
    out = dict.fromkeys(("token_length", "equal_answers", "changes_drawn", "a_wrong", "b_wrong"), 0)
    out.update(answer_is_prefix=0, no_valid_change=0, chain=0)
    for i in range(ref.provenance["extra"]["candidates"]):
        k = cfg.divergence_indices[i % len(cfg.divergence_indices)]
        rng = random.Random(derive_seed("pair", cfg.seed, cfg.family, cfg.seq_len, i))
        try:
            a, b, meta = make_counterfactual_pair(
                cfg.seq_len,
                k,
                rng,
                cfg.family,
                tokenizer=handle.prompt_ids,
                allow_equal_answers=cfg.allow_equal_answers,
                min_depth=cfg.min_depth,
                max_depth=cfg.max_depth,
                changed_role=cfg.changed_role,
            )
        except PairError:
            out["no_valid_change"] += 1
            continue
        out["token_length"] += meta.counts.token_length
        out["equal_answers"] += meta.counts.equal_answers
        out["chain"] += meta.counts.chain
        out["changes_drawn"] += meta.counts.drawn
        fmt = handle.prompt_format
        ans_a = handle.answer_token_ids([a.answer], prompt=fmt.prompt(a))[0]
        ans_b = handle.answer_token_ids([b.answer], prompt=fmt.prompt(b))[0]
        shorter, longer = sorted((ans_a, ans_b), key=len)
        if ans_a != ans_b and longer[: len(shorter)] == shorter:
            out["answer_is_prefix"] += 1
        elif wrong(a.answer):
            out["a_wrong"] += 1
        elif wrong(b.answer):
            out["b_wrong"] += 1
    return out


def first_differing_token(handle, a: Program, b: Program) -> tuple[int, int]:
    """A's and B's answer tokens at the scored position, from the tokenizer alone."""
    fmt = handle.prompt_format
    ans_a = handle.tokenizer(fmt.prompt(a) + fmt.answer_text(a.answer))["input_ids"]
    ans_b = handle.tokenizer(fmt.prompt(b) + fmt.answer_text(b.answer))["input_ids"]
    ans_a, ans_b = ans_a[len(handle.prompt_ids(a)) :], ans_b[len(handle.prompt_ids(b)) :]
    if ans_a == ans_b:
        return ans_a[0], ans_b[0]
    j = next(j for j, (x, y) in enumerate(zip(ans_a, ans_b, strict=False)) if x != y)
    return ans_a[j], ans_b[j]


def check_rows(rows, handle, family, equal_answers=False):
    n_candidates = len(rows[0]["candidate_ids"])
    for row in rows:
        a = Program.parse(row["program_a"], family)
        b = Program.parse(row["program_b"], family)
        k = row["divergence_index"]
        assert a.statements[:k] == b.statements[:k]
        assert a.statements[k] != b.statements[k]
        assert a.statements[k + 1 :] == b.statements[k + 1 :]
        assert row["ground_truth_a"] == a.answer and row["ground_truth_b"] == b.answer
        ids_a = handle.prompt_ids(a)
        ids_b = handle.prompt_ids(b)
        assert len(ids_a) == len(ids_b)
        assert row["input_ids_a"][: len(ids_a)] == ids_a
        assert len(row["input_ids_a"]) == len(row["input_ids_b"]) == row["n_tokens"]
        assert row["diff_positions"] == [
            i
            for i, (x, y) in enumerate(zip(row["input_ids_a"], row["input_ids_b"], strict=True))
            if x != y
        ]
        assert row["affects_query"] == (k in a.dependencies())
        # the stored logits rank each program's true answer first
        assert int(np.argmax(row["model_logits_a"])) == row["answer_index_a"]
        assert int(np.argmax(row["model_logits_b"])) == row["answer_index_b"]
        assert (row["answer_index_a"] == row["answer_index_b"]) == (a.answer == b.answer)
        assert equal_answers or a.answer != b.answer
        labels, ids = row["candidate_labels"], row["candidate_ids"]
        assert len(ids) == len(labels) == len(row["model_logits_a"]) == n_candidates
        assert labels[:10] == [str(d) for d in range(10)]
        # each answer index is the first slot holding that answer's first differing token
        scored = first_differing_token(handle, a, b)
        for program, index, token in zip(
            (a, b), ("answer_index_a", "answer_index_b"), scored, strict=True
        ):
            assert ids[row[index]] == token and ids.index(token) == row[index]
            assert handle.tokenizer.decode([token]).strip() == labels[row[index]]
            assert labels[row[index]] in str(program.answer)
        assert len(row["tokens"]) == row["n_tokens"] == len(row["roles"])
        roles = row["roles"]
        assert roles[-1] == "last"
        changed = {roles[t] for t in row["diff_positions"]}
        if row["affects_query"]:  # the changed tokens are the changed statement's
            assert all(r.startswith("hop0:") for r in changed), (changed, row["tokens"])
        else:
            assert changed == {"stmt"}
        hops = {r.split(":")[0] for r in roles if r.startswith("hop")}
        assert len(hops) == (row["chain_depth"] if row["affects_query"] else 0)


def test_bpe_pairs_have_equal_lengths_and_counts(bpe_llama, tmp_path):
    ref, rows = build(bpe_llama, tmp_path, "arithmetic", seq_len=4, n_pairs=40, batch_size=64)
    assert len(rows) == 40
    check_rows(rows, bpe_llama, "arithmetic")
    rejections = ref.provenance["extra"]["rejections"]
    assert rejections["token_length"] > 0  # the BPE tokenizer really splits ops unevenly
    assert set(rejections) == {*REJECTIONS, "changes_drawn"}
    assert rejections == expected_rejections(bpe_llama, ref)
    assert sorted(set(rows["divergence_index"])) == [0, 1, 2, 3]


def test_negative_and_multi_digit_answers_are_scored_on_their_own_tokens(bpe_llama, tmp_path):
    """``-3`` vs ``4`` and ``12`` vs ``7``: the first differing answer token is not a digit, so
    it is scored in the two answer slots that follow the ten digits (issue 14)."""
    ref, rows = build(bpe_llama, tmp_path, "arithmetic", seq_len=3, n_pairs=60, batch_size=64)
    check_rows(rows, bpe_llama, "arithmetic")
    assert {len(ids) for ids in rows["candidate_ids"]} == {12}
    slot_labels = {
        row["candidate_labels"][row[index]]
        for row in rows
        for index in ("answer_index_a", "answer_index_b")
        if row[index] >= 10
    }
    assert "-" in slot_labels  # a negative answer against a non-negative one
    assert any(label.isdigit() and len(label) > 1 for label in slot_labels)  # e.g. `12`
    answers = [*rows["ground_truth_a"], *rows["ground_truth_b"]]
    assert min(answers) < 0 and max(answers) > 9
    assert ref.provenance["extra"]["rejections"] == expected_rejections(bpe_llama, ref)


def test_an_answer_whose_tokens_prefix_the_other_is_rejected(bpe_llama):
    """``1`` vs ``14`` read as ``1`` then ``4``: A's answer ends where B's continues, so no token
    stands for A at the scored position; the candidate is counted as ``answer_is_prefix``."""
    a = Program.parse("x = 0\nx += 5\nx -= 4\n#x:", "arithmetic")
    b = Program.parse("x = 0\nx += 5\nx += 9\n#x:", "arithmetic")
    fmt = bpe_llama.prompt_format
    ans_a = bpe_llama.answer_token_ids([a.answer], prompt=fmt.prompt(a))[0]
    ans_b = bpe_llama.answer_token_ids([b.answer], prompt=fmt.prompt(b))[0]
    assert len(ans_a) == 1 and ans_b[:1] == ans_a  # the case under test, under this tokenizer
    cfg = PairsConfig(model="tiny", family="arithmetic", seq_len=2)
    oracle = dataclasses.replace(bpe_llama, hf_model=Oracle(bpe_llama, "arithmetic"))
    batch = {
        "candidate": [0, 1],
        "program_a": [a.render("code"), b.render("code")],
        "program_b": [b.render("code"), a.render("code")],
        "divergence_index": [1, 1],
    }
    assert _score(batch, cfg, oracle)["status"] == ["answer_is_prefix"] * 2


def test_equal_answer_pairs_are_kept_when_allowed(compact_llama, bpe_llama, tmp_path):
    """With ``allow_equal_answers`` a pair whose answers are equal is scored on the answer's
    first token, both answer indices the same slot."""
    for handle, family in ((compact_llama, "binding"), (bpe_llama, "arithmetic")):
        ref, rows = build(
            handle,
            tmp_path / family,
            family,
            seq_len=4,
            n_pairs=40,
            batch_size=64,
            allow_equal_answers=True,
        )
        check_rows(rows, handle, family, equal_answers=True)
        equal = [row for row in rows if row["ground_truth_a"] == row["ground_truth_b"]]
        assert len(equal) >= 5
        for row in equal:
            assert not row["answers_differ"]
            assert row["answer_prefix_len"] == 0  # scored where the answer's first token is read
            prompt = handle.prompt_ids(Program.parse(row["program_b"], family))
            assert row["input_ids_b"] == prompt
        assert ref.provenance["extra"]["rejections"] == expected_rejections(handle, ref)


def test_compact_pairs_and_model_rejections(compact_llama, tmp_path):
    def wrong(answer: int) -> bool:
        return answer == 7

    ref, rows = build(
        compact_llama,
        tmp_path,
        "binding",
        wrong=wrong,
        seq_len=6,
        n_pairs=60,
        divergence_indices=(1, 4),
    )
    check_rows(rows, compact_llama, "binding")
    # the organism's layout: the ten digits, each answer's index is its digit
    assert {len(ids) for ids in rows["candidate_ids"]} == {10}
    assert list(rows["answer_index_a"]) == list(rows["ground_truth_a"])
    assert list(rows["answer_index_b"]) == list(rows["ground_truth_b"])
    assert 7 not in rows["ground_truth_a"] and 7 not in rows["ground_truth_b"]
    rejections = ref.provenance["extra"]["rejections"]
    assert rejections["a_wrong"] > 0 and rejections["b_wrong"] > 0
    assert rejections == expected_rejections(compact_llama, ref, wrong)
    assert rejections["token_length"] == 0  # one token per character: lengths always match
    assert set(rows["divergence_index"]) == {1, 4}
    assert rows.features["model_logits_a"].feature.dtype == "float32"


def test_same_config_same_rows_and_fingerprint(compact_llama, tmp_path):
    first, rows1 = build(compact_llama, tmp_path, "binding", seq_len=5, n_pairs=20)
    second, rows2 = build(compact_llama, tmp_path / "other", "binding", seq_len=5, n_pairs=20)
    assert first.version == second.version
    assert rows1["pair_id"] == rows2["pair_id"] and rows1["program_b"] == rows2["program_b"]
    again, _ = build(compact_llama, tmp_path, "binding", seq_len=5, n_pairs=20)
    assert again.reused and again.path == first.path


def test_unreachable_target_says_why(compact_llama, tmp_path):
    with pytest.raises(PairsStageError, match="a_wrong"):
        build(
            compact_llama,
            tmp_path,
            "binding",
            wrong=lambda answer: True,
            seq_len=4,
            n_pairs=5,
            max_candidates_factor=4,
        )
    assert not (tmp_path / "pairs").exists() or not any(
        (p / "seqpatch.json").exists() for p in (tmp_path / "pairs").iterdir()
    )


def test_bad_divergence_index():
    with pytest.raises(PairsStageError, match="out of range"):
        PairsConfig(model="builtin", seq_len=4, divergence_indices=(4,))


def test_chain_pairs_store_their_depth(compact_llama, tmp_path):
    """``min_depth=2`` keeps changes that reach the query through a later statement; each row's
    ``chain_depth`` is recomputed here by following the chain by hand."""
    ref, rows = build(compact_llama, tmp_path, "binding", seq_len=5, n_pairs=30, min_depth=2)
    check_rows(rows, compact_llama, "binding")
    assert PairsConfig(**ref.provenance["config"]).divergence_indices == (0, 1, 2, 3)
    for row in rows:
        a = Program.parse(row["program_a"], "binding", "code")
        live, path, k = a.query, [], row["divergence_index"]
        for i in range(a.seq_len - 1, k - 1, -1):
            if a.statements[i].target == live:
                path.append(i)
                live = a.statements[i].operand
        assert path[-1] == k  # the walk from the query reached the changed statement
        assert row["chain_depth"] == len(path) >= 2
    assert ref.provenance["extra"]["rejections"]["chain"] > 0
    assert ref.provenance["extra"]["rejections"] == expected_rejections(compact_llama, ref)


def test_chain_filters_that_cannot_be_met_are_refused_before_work():
    with pytest.raises(PairsStageError, match="cannot fit"):
        PairsConfig(model="builtin", seq_len=2, min_depth=3)
    with pytest.raises(PairsStageError, match="cannot reach depth 2"):
        PairsConfig(model="builtin", seq_len=4, min_depth=2, divergence_indices=(3,))
    with pytest.raises(PairsStageError, match="changed role"):
        PairsConfig(model="builtin", seq_len=4, changed_role="constant")


def test_the_rejection_summary_does_not_count_changes_drawn_as_a_rejection():
    from seqpatch.stages.pairs import describe_rejections

    text = describe_rejections({"token_length": 3, "changes_drawn": 120, "wrong_answer_a": 1})
    assert text == "rejections: token_length=3, wrong_answer_a=1; 120 changes drawn"


def test_build_pairs_prints_changes_drawn_apart_from_the_rejections(tmp_path):
    from typer.testing import CliRunner

    from seqpatch.cli import app

    command = ["build", "pairs", "--model", "builtin", "--seq-len", "3", "--n-pairs", "3"]
    result = CliRunner().invoke(app, [*command, "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("candidates ")]
    assert "changes_drawn" not in line and "changes drawn" in line and "rejections: " in line
