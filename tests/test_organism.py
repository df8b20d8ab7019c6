"""The built-in organism: tokenizer, deterministic training, and the shipped weights."""

from __future__ import annotations

import random
from dataclasses import asdict
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from seqpatch.organism import (
    WEIGHTS_DIR,
    OrganismTrainConfig,
    OrganismTrainError,
    build_tokenizer,
    evaluate_organism,
    organism_family,
    train_organism,
    training_record,
)
from seqpatch.organism.tokenizer import CHARACTERS
from seqpatch.organism.train import answer_loss, build_model, training_batch
from seqpatch.programs import FAMILIES, make_sequence

TINY = OrganismTrainConfig(
    n_layers=1,
    d_model=16,
    n_heads=2,
    n_kv_heads=2,
    d_ff=32,
    max_len=3,
    steps=12,
    batch_size=8,
    warmup_steps=2,
    eval_every=0,
    final_eval_n=4,
    loss_log_every=4,
    threads=1,
)


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("renderer", ["compact", "code"])
def test_tokenizer_round_trips_every_family(
    saved_tokenizer: PreTrainedTokenizerFast, family: str, renderer: str
) -> None:
    for i in range(30):
        text = make_sequence(family, 1 + i % 10, random.Random(i)).render(renderer)
        ids = saved_tokenizer(text)["input_ids"]
        assert ids[0] == saved_tokenizer.bos_token_id
        assert len(ids) == len(text) + 1, "one token per character, plus <bos>"
        assert saved_tokenizer.unk_token_id not in ids
        assert saved_tokenizer.decode(ids, skip_special_tokens=True) == text


@cache
def _fresh_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="".join(CHARACTERS), max_size=40))
def test_tokenizer_round_trips_any_known_text(text: str) -> None:
    tokenizer = _fresh_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_every_answer_digit_is_one_token(saved_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = [saved_tokenizer(str(d), add_special_tokens=False)["input_ids"] for d in range(10)]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == 10
    assert saved_tokenizer.convert_ids_to_tokens([i[0] for i in ids]) == list("0123456789")


def test_tokenizer_pads_left_and_marks_unknown_characters(
    saved_tokenizer: PreTrainedTokenizerFast,
) -> None:
    batch = saved_tokenizer(["a=1;#a:", "a=1;b=a;#b:"], padding=True)
    assert batch["input_ids"][0][0] == saved_tokenizer.pad_token_id
    assert batch["attention_mask"][0][:4] == [0, 0, 0, 0]
    assert saved_tokenizer("A", add_special_tokens=False)["input_ids"] == [
        saved_tokenizer.unk_token_id
    ]


def test_config_rejects_multi_token_answers() -> None:
    with pytest.raises(OrganismTrainError, match="one digit"):
        OrganismTrainConfig(family="arithmetic")
    with pytest.raises(OrganismTrainError, match="min_len"):
        OrganismTrainConfig(min_len=5, max_len=3)


def test_training_is_deterministic_and_depends_on_the_seed(tmp_path, capfd) -> None:
    runs = {}
    for name, seed in [("first", 0), ("again", 0), ("other", 1)]:
        metrics = train_organism(
            OrganismTrainConfig(**{**vars(TINY), "seed": seed}), tmp_path / name, progress=False
        )
        runs[name] = load_file(tmp_path / name / "model.safetensors")
        assert set(metrics["accuracy_by_length"]) == {str(n) for n in range(1, 7)}
    assert runs["first"].keys() == runs["again"].keys()
    assert all(torch.equal(runs["first"][k], runs["again"][k]) for k in runs["first"])
    assert any(not torch.equal(runs["first"][k], runs["other"][k]) for k in runs["first"])
    record = training_record(tmp_path / "first")
    assert record["config"]["seed"] == 0
    assert record["family"] == {"name": "binding", "params": TINY.family_params()}
    assert len(record["loss_curve"]) == 3
    assert "Accuracy" in (tmp_path / "first" / "README.md").read_text()
    assert GenerationConfig.from_pretrained(tmp_path / "first").max_new_tokens == 1
    assert "Writing model shards" not in capfd.readouterr().err, "progress=False must be quiet"
    assert hf_logging.is_progress_bar_enabled(), "transformers' own setting is restored"


@pytest.mark.parametrize("buckets", [2, 3, 8])
def test_length_buckets_change_only_the_padding_not_the_loss_or_gradient(buckets: int) -> None:
    """Bucketed batches (sorted by length, padded per bucket) give the one-forward loss."""
    cfg = OrganismTrainConfig(**{**vars(TINY), "max_len": 8})
    tokenizer = _fresh_tokenizer()
    model = build_model(cfg, len(tokenizer))
    programs = training_batch(cfg, cfg.make_family(), step=0, longest=8)
    assert len({len(p.render("compact")) for p in programs}) > 1, "needs mixed lengths"

    def loss_and_grads(n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = answer_loss(model, tokenizer, programs, buckets=n)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    whole, whole_grads = loss_and_grads(1)
    bucketed, bucketed_grads = loss_and_grads(buckets)
    torch.testing.assert_close(bucketed, whole, rtol=1e-5, atol=1e-5)
    for got, want in zip(bucketed_grads, whole_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_trained_folder_loads_with_plain_transformers(tmp_path) -> None:
    train_organism(TINY, tmp_path, progress=False)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tokenizer.decode(tokenizer("a=5;#a:")["input_ids"], skip_special_tokens=True) == (
        "a=5;#a:"
    )
    logits = model(**tokenizer(["a=5;#a:"], return_tensors="pt")).logits
    assert logits.shape == (1, 8, len(tokenizer))


# --- the shipped organism -------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    model = LlamaForCausalLM.from_pretrained(WEIGHTS_DIR)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(WEIGHTS_DIR)
    return model.eval(), tokenizer


def test_shipped_organism_was_trained_on_the_stock_binding_family() -> None:
    assert organism_family() is FAMILIES["binding"]
    record = training_record()
    assert record["family"]["name"] == "binding"
    assert record["trained_lengths"][1] >= 8


@pytest.mark.parametrize("seq_len", [4, 6, 8])
def test_shipped_organism_solves_held_out_programs_as_its_card_says(shipped, seq_len: int) -> None:
    """Fresh held-out programs (a seed the card's evaluation never used) agree with the card.

    The card claims >= 99% at every trained length (1000 programs each); 400 fresh ones must
    agree within sampling noise.
    """
    model, tokenizer = shipped
    family = organism_family()
    accuracy = evaluate_organism(model, tokenizer, family, [seq_len], n=400, seed=12345)
    stated = training_record()["accuracy_by_length"][str(seq_len)]
    assert abs(accuracy[seq_len] - stated) < 0.02  # ~4 standard errors at 99% and n = 400
    assert accuracy[seq_len] >= 0.97


def test_shipped_organism_generates_exactly_its_answer_token(shipped) -> None:
    """Only the answer token is trained; generate() stops there instead of babbling digits."""
    model, tokenizer = shipped
    assert model.generation_config.max_new_tokens == 1
    prompt = tokenizer(["a=5;b=a;#b:"], return_tensors="pt")
    out = model.generate(**prompt, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1] :]) == "5"


def test_shipped_organism_fits_the_size_budget() -> None:
    assert (WEIGHTS_DIR / "model.safetensors").stat().st_size < 20 * 2**20


def test_model_card_states_accuracy_at_every_trained_length() -> None:
    card = (WEIGHTS_DIR / "README.md").read_text()
    record = training_record()
    lo, hi = record["trained_lengths"]
    assert "## Accuracy" in card
    for length in range(lo, 2 * hi + 1):
        acc = record["accuracy_by_length"][str(length)]
        assert f"| {length} |" in card and f"{100 * acc:.1f}%" in card
    assert all(record["accuracy_by_length"][str(n)] >= 0.99 for n in range(lo, hi + 1))
    assert record["eval_n_per_length"] >= 1000
    assert "99% or better at every trained length" in card and "Below the" not in card
    assert "stops `generate()` after one token" in card


def test_retraining_with_the_defaults_reproduces_the_shipped_config() -> None:
    """`seqpatch organism train --seed 0` (all defaults) is the recipe of the shipped weights."""
    assert training_record()["config"] == asdict(OrganismTrainConfig())


def test_reproduce_command_knows_which_options_the_cli_takes() -> None:
    """The card names `seqpatch organism train` only for options that command really has."""
    import typer.main

    from seqpatch.cli import app
    from seqpatch.organism.card import _CLI_OPTIONS

    organism = typer.main.get_command(app).commands["organism"]  # type: ignore[attr-defined]
    params = {p.name for p in organism.commands["train"].params} - {"out", "progress", "force"}
    assert params == _CLI_OPTIONS
