"""The pairs stage: structure of every row, token lengths under a BPE tokenizer, model filter.

The model filter needs a model that solves the task, which a random-weight model does not: the
tests wrap a tiny real architecture's handle with an *oracle* forward that reads the program
back from the token ids and puts all its mass on the true answer's tokens (optionally erring
on chosen answers). Everything else — tokenizer, prompt format, answer tokens — is the real path.
"""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seqpatch.models import load_model
from seqpatch.programs import Program
from seqpatch.stages import build_stage
from seqpatch.stages.pairs import PairsConfig, PairsStageError
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

    def forward(self, input_ids, attention_mask, position_ids=None):
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
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("bpe") / "m", tokenizer="bpe")
    return load_model(str(folder))


@pytest.fixture(scope="module")
def compact_llama(tmp_path_factory):
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("wl") / "m", tokenizer="wordlevel")
    return load_model(str(folder), prompt_format="compact")


def build(handle, tmp_path, family, wrong=lambda a: False, **kw):
    oracle_handle = dataclasses.replace(handle, hf_model=Oracle(handle, family, wrong))
    cfg = PairsConfig(model="tiny", family=family, **kw)
    ref = build_stage(
        "pairs",
        cfg,
        data_dir=tmp_path,
        model=handle.describe(),
        handle=oracle_handle,
        progress=False,
    )
    from seqpatch.store import Store

    return ref, Store(tmp_path).load("pairs", ref.version)


def check_rows(rows, handle, family):
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
        assert row["answer_index_a"] != row["answer_index_b"]
        labels, ids = row["candidate_labels"], row["candidate_ids"]
        for program, index in ((a, row["answer_index_a"]), (b, row["answer_index_b"])):
            assert handle.tokenizer.decode([ids[index]]).strip() == labels[index]
            assert labels[index] in str(program.answer)
        assert len(row["tokens"]) == row["n_tokens"]


def test_bpe_pairs_have_equal_lengths_and_counts(bpe_llama, tmp_path):
    ref, rows = build(bpe_llama, tmp_path, "arithmetic", seq_len=4, n_pairs=40, batch_size=64)
    assert len(rows) == 40
    check_rows(rows, bpe_llama, "arithmetic")
    rejections = ref.provenance["extra"]["rejections"]
    assert rejections["token_length"] > 0  # the BPE tokenizer really splits ops unevenly
    assert rejections["not_digit_scored"] >= 0
    assert sorted(set(rows["divergence_index"])) == [0, 1, 2, 3]


def test_compact_pairs_and_model_rejections(compact_llama, tmp_path):
    ref, rows = build(
        compact_llama,
        tmp_path,
        "binding",
        wrong=lambda answer: answer == 7,
        seq_len=6,
        n_pairs=60,
        divergence_indices=(1, 4),
    )
    check_rows(rows, compact_llama, "binding")
    assert 7 not in rows["ground_truth_a"] and 7 not in rows["ground_truth_b"]
    rejections = ref.provenance["extra"]["rejections"]
    assert rejections["a_wrong"] > 0 and rejections["b_wrong"] > 0
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
