"""The ``benchmark`` stage, its summary and chart, and ``choose``, on tiny random-weight models.

Two tiny Llamas: a word-level one read in the ``compact`` format (like the organism) and a BPE
one read in the ``code`` format (like a pretrained model). Their answers are random, so the
measurements are checked against independent computations (an unpadded argmax loop, an unpadded
teacher-forced forward), not against expected accuracies.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from seqpatch.choose import ChooseError, choose_model, read_chosen
from seqpatch.cli import app
from seqpatch.models import AnswerTokenizationError, ModelHandle, load_model
from seqpatch.pipeline import build_benchmark
from seqpatch.programs import make_sequence
from seqpatch.stages import benchmark
from seqpatch.stages.base import ModelCache, split_model_spec
from seqpatch.stages.benchmark import (
    FEATURES,
    BenchmarkConfig,
    BenchmarkError,
    wilson_interval,
)
from seqpatch.store import Store, load_stage
from tests.cli_output import error_line, snapshot

runner = CliRunner()
PROGRAMS = ["--family", "arithmetic", "--seq-lens", "1,3", "--n-per-len", "3", "--seed", "5"]
N_PROGRAMS = 6
MAX_NEW = 3  # short continuations keep the test fast; the stop rules are still exercised


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def _cfg(models: dict[str, str]) -> BenchmarkConfig:
    return BenchmarkConfig((models["word"], models["bpe"]), batch_size=4, max_new_tokens=MAX_NEW)


def _build_programs(data_dir: Path) -> None:
    result = invoke("build", "programs", *PROGRAMS, "--data-dir", data_dir)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, models: dict[str, str]) -> Path:
    """A data dir with programs and a benchmark of both models, built through the CLI."""
    data_dir = tmp_path_factory.mktemp("data")
    _build_programs(data_dir)
    result = invoke(
        "build", "benchmark", "--models", f"{models['word']},{models['bpe']}",
        "--batch-size", "4", "--max-new-tokens", str(MAX_NEW), "--data-dir", data_dir,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return data_dir


@pytest.fixture(scope="module")
def handles(models: dict[str, str]) -> dict[str, ModelHandle]:
    out = {}
    for spec in models.values():
        name, fmt = split_model_spec(spec)
        out[spec] = load_model(name, prompt_format=fmt)
    return out


def _greedy_unpadded(handle: ModelHandle, prompt: str, max_new: int) -> tuple[str, int]:
    """A plain argmax loop on one unpadded prompt: the continuation and its first token."""
    tok = handle.tokenizer
    ids = list(tok(prompt)["input_ids"])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = handle.hf_model(torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            if token == tok.eos_token_id:
                break
            new.append(token)
    first = new[0] if new else int(tok.eos_token_id)
    return tok.decode(new, skip_special_tokens=True).split("\n", 1)[0], first


def _teacher_forced_unpadded(handle: ModelHandle, prompt: str, answer: int) -> tuple[float, int]:
    """Log-probability of ``prompt + answer_text`` beyond the prompt, and the first token's rank."""
    tok = handle.tokenizer
    prompt_ids = list(tok(prompt)["input_ids"])
    full = list(tok(prompt + handle.prompt_format.answer_text(answer))["input_ids"])
    assert full[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = handle.hf_model(torch.tensor([full])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    total = sum(float(logprobs[i - 1, full[i]]) for i in range(len(prompt_ids), len(full)))
    at_answer = logits[len(prompt_ids) - 1]
    order = at_answer.argsort(descending=True).tolist()
    return total, order.index(full[len(prompt_ids)]) + 1


# ---------------------------------------------------------------------------------------------
# Rows


def test_schema_rows_and_provenance(built: Path, models: dict[str, str]) -> None:
    rows = load_stage("benchmark", built)
    assert rows.features == FEATURES
    assert rows.num_rows == 2 * N_PROGRAMS
    assert rows["model_spec"] == [models["word"]] * N_PROGRAMS + [models["bpe"]] * N_PROGRAMS
    programs = load_stage("programs", built)
    assert rows["program_id"][:N_PROGRAMS] == programs["program_id"]
    assert rows["answer"][:N_PROGRAMS] == programs["answer"]
    assert rows["prompt"][0] == programs["compact"][0]  # compact format for the word model
    assert rows["prompt"][N_PROGRAMS].endswith("# The final value of x is")
    for row in rows:
        assert row["correct"] == (row["prediction"] == row["answer"])
        assert row["answer_rank"] >= 1 and row["answer_logprob"] < 0
    ref = Store(built).resolve("benchmark")
    parent = Store(built).resolve("programs")
    assert ref.provenance["parents"] == [
        {"stage": "programs", "version": parent.version, "fingerprint": parent.fingerprint}
    ]
    extra = ref.provenance["extra"]
    assert set(extra["models"]) == set(models.values())
    word = extra["models"][models["word"]]
    assert word["n_params"] == rows["n_params"][0]
    assert [s["seq_len"] for s in word["summary"]] == [1, 3]
    assert sum(s["n"] for s in word["summary"]) == N_PROGRAMS


def test_greedy_prediction_agrees_with_an_unpadded_argmax_loop(
    built: Path, handles: dict[str, ModelHandle]
) -> None:
    rows = load_stage("benchmark", built)
    for row in rows:
        handle = handles[row["model_spec"]]
        continuation, first = _greedy_unpadded(handle, row["prompt"], MAX_NEW)
        assert row["continuation"] == continuation, row["program_id"]
        prediction = handle.prompt_format.parse_prediction(continuation)
        assert row["prediction"] == prediction
        assert row["correct"] == (prediction == row["answer"])
        answer_first = handle.answer_token_ids([row["answer"]], prompt=row["prompt"])[0][0]
        assert (row["answer_rank"] == 1) == (first == answer_first)


def test_answer_logprob_and_rank_equal_an_unpadded_teacher_forced_pass(
    built: Path, handles: dict[str, ModelHandle]
) -> None:
    rows = load_stage("benchmark", built)
    for row in rows:
        logprob, rank = _teacher_forced_unpadded(
            handles[row["model_spec"]], row["prompt"], row["answer"]
        )
        assert math.isclose(row["answer_logprob"], logprob, rel_tol=1e-4, abs_tol=1e-4)
        assert row["answer_rank"] == rank

    # multi-token answers, in one padded batch: every answer token must count
    programs = load_stage("programs", built)[:3]
    for spec, handle in handles.items():
        batch = {**programs, "answer": [-37, 12, 98765]}
        info = benchmark.ModelInfo(spec, handle.model_id, handle.revision, handle.n_params, {})
        out = benchmark._run_batch(batch, handle, info, BenchmarkConfig((spec,), max_new_tokens=1))
        for prompt, answer, got in zip(
            out["prompt"], batch["answer"], out["answer_logprob"], strict=True
        ):
            expected, _ = _teacher_forced_unpadded(handle, prompt, answer)
            assert math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-4)
        lengths = [
            len(handle.answer_token_ids([a], prompt=p)[0])
            for a, p in zip(batch["answer"], out["prompt"], strict=True)
        ]
        assert max(lengths) > 1


def test_a_row_the_model_solves_is_correct_with_rank_one(
    built: Path, handles: dict[str, ModelHandle], models: dict[str, str]
) -> None:
    """Random models rarely solve anything: ask them for what they predict and check the
    positive side of ``correct`` and ``answer_rank``."""
    spec = models["word"]
    handle = handles[spec]
    programs = [make_sequence("arithmetic", 2, random.Random(i)) for i in range(30)]
    batch = {
        "program_id": [f"p{i}" for i in range(len(programs))],
        "family": [p.family for p in programs],
        "seq_len": [p.seq_len for p in programs],
        "text": [p.render("code") for p in programs],
        "answer": [p.answer for p in programs],
    }
    fmt = handle.prompt_format
    predicted: list[int | None] = []
    for program in programs:  # stop once a few rows have an integer prediction
        continuation = _greedy_unpadded(handle, fmt.prompt(program), MAX_NEW)[0]
        predicted.append(fmt.parse_prediction(continuation))
        if sum(p is not None for p in predicted) == 3:
            break
    keep = [i for i, p in enumerate(predicted) if p is not None]
    assert keep, "the word-level model should start some continuation with a digit"
    sub = {name: [values[i] for i in keep] for name, values in batch.items()}
    sub["answer"] = [predicted[i] for i in keep]
    info = benchmark.ModelInfo(spec, handle.model_id, handle.revision, handle.n_params, {})
    cfg = BenchmarkConfig((spec,), batch_size=8, max_new_tokens=MAX_NEW)
    out = benchmark._run_batch(sub, handle, info, cfg)
    assert all(out["correct"])
    assert out["answer_rank"] == [1] * len(keep)


# ---------------------------------------------------------------------------------------------
# Reuse and resume


def test_rebuild_reuses_without_running_a_model(
    built: Path, models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = Store(built).resolve("benchmark")

    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a stored benchmark must not be rebuilt")

    monkeypatch.setattr(benchmark, "build_shard", fail)
    monkeypatch.setattr(ModelCache, "get", fail)  # not even loaded to be checked
    again = build_benchmark(_cfg(models), data_dir=built)
    assert again.reused and again.version == before.version
    assert again.fingerprint == before.fingerprint
    assert len(Store(built).versions("benchmark")) == 1


def test_interrupted_build_resumes_with_the_next_model(
    tmp_path: Path, built: Path, models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _build_programs(tmp_path)
    real = benchmark.build_shard
    calls: list[str] = []

    def interrupted(inputs, cfg, index):  # type: ignore[no-untyped-def]
        calls.append(cfg.models[index])
        if cfg.models[index] == models["bpe"]:
            raise KeyboardInterrupt
        return real(inputs, cfg, index)

    monkeypatch.setattr(benchmark, "build_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_benchmark(_cfg(models), data_dir=tmp_path)
    assert calls == [models["word"], models["bpe"]]
    assert Store(tmp_path).versions("benchmark") == []
    partial = [p for p in (tmp_path / "benchmark").iterdir() if p.name.endswith(".partial")]
    assert [p.name for p in partial[0].iterdir() if p.name.startswith("shard")] == ["shard-00000"]

    calls.clear()

    def counted(inputs, cfg, index):  # type: ignore[no-untyped-def]
        calls.append(cfg.models[index])
        return real(inputs, cfg, index)

    monkeypatch.setattr(benchmark, "build_shard", counted)
    ref = build_benchmark(_cfg(models), data_dir=tmp_path)
    assert calls == [models["bpe"]]
    first = Store(built).resolve("benchmark")
    assert ref.version == first.version
    assert ref.fingerprint == first.fingerprint  # same rows, same fingerprint, in another store
    resumed, original = load_stage("benchmark", tmp_path), load_stage("benchmark", built)
    for column in ("program_id", "continuation", "answer_rank", "correct"):
        assert resumed[column] == original[column]


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("seqpatch-test/no-such-model", "could not load 'seqpatch-test/no-such-model'"),
        ("./no/such/folder", "no model folder at './no/such/folder'"),
        ("EMPTY_DIR", "has no config.json"),
        ("BERT_DIR", "architecture 'bert' is not supported"),
    ],
)
def test_a_bad_model_is_one_line_exit_2_and_nothing_is_written(
    tmp_path: Path, models: dict[str, str], offline: None, bad: str, message: str
) -> None:
    data_dir = tmp_path / "data"
    _build_programs(data_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    bad = bad.replace("EMPTY_DIR", str(tmp_path / "empty")).replace(
        "BERT_DIR", str(tmp_path / "bert")
    )
    before = snapshot(data_dir)
    result = invoke(
        "build", "benchmark", "--models", f"{models['word']},{bad}", "--data-dir", data_dir
    )
    assert result.exit_code == 2, result.output
    error = error_line(result.stderr)
    assert message in error and bad in error
    assert snapshot(data_dir) == before


def test_an_unrepresentable_answer_is_refused_before_writing(
    tmp_path: Path, models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _build_programs(tmp_path)
    real = ModelHandle.answer_token_ids

    def picky(self, values, prompt=None):  # type: ignore[no-untyped-def]
        if self.spec.endswith("bpe") and 0 in list(values):
            raise AnswerTokenizationError("answer ' 0' contains a piece unknown to the tokenizer")
        return real(self, values, prompt)

    monkeypatch.setattr(ModelHandle, "answer_token_ids", picky)
    before = snapshot(tmp_path)
    with pytest.raises(BenchmarkError, match=r"cannot be benchmarked: answer ' 0'"):
        build_benchmark(_cfg(models), data_dir=tmp_path)
    assert snapshot(tmp_path) == before


def test_bad_config_and_missing_programs(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="lists a model twice"):
        BenchmarkConfig(("builtin", "builtin"))
    with pytest.raises(BenchmarkError, match="batch_size must be an integer >= 1"):
        BenchmarkConfig(("builtin",), batch_size=0)
    result = invoke("build", "benchmark", "--models", "builtin", "--data-dir", tmp_path)
    assert result.exit_code == 2
    assert "no stored 'programs' stage" in error_line(result.stderr)


def test_the_organism_is_scored_on_its_one_answer_token(tmp_path: Path) -> None:
    """The organism answers with one token and was never trained on what follows it.

    Its generation config says so (``max_new_tokens`` 1), so the greedy prediction is exactly
    the top token of the teacher-forced pass, and the accuracy is the card's (>= 99%), not the
    accuracy of whatever untrained digits it would append.
    """
    programs = ["--family", "binding", "--seq-lens", "2,8", "--n-per-len", "16", "--seed", "3"]
    assert invoke("build", "programs", *programs, "--data-dir", tmp_path).exit_code == 0
    result = invoke("build", "benchmark", "--models", "builtin", "--data-dir", tmp_path)
    assert result.exit_code == 0, result.output
    rows = load_stage("benchmark", tmp_path)
    assert load_model("builtin").max_answer_tokens == 1
    assert all(len(c) == 1 and c.isdigit() for c in rows["continuation"])
    assert rows["correct"] == [rank == 1 for rank in rows["answer_rank"]]
    assert sum(rows["correct"]) >= 0.9 * rows.num_rows


def test_split_model_spec_reads_only_known_format_suffixes() -> None:
    assert split_model_spec("./m:compact") == ("./m", "compact")
    assert split_model_spec("Qwen/Qwen2.5-0.5B-Instruct:code-chat") == (
        "Qwen/Qwen2.5-0.5B-Instruct",
        "code-chat",
    )
    assert split_model_spec("builtin") == ("builtin", None)
    assert split_model_spec("C:/models/x") == ("C:/models/x", None)


# ---------------------------------------------------------------------------------------------
# Summary, chart, choose


def test_wilson_interval_hand_values() -> None:
    # 8/10: p=0.8, z²=3.8415; centre=(0.8+0.19207)/1.38415=0.71674, half=0.22658
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94331, abs=1e-4)
    # 0/n: low 0, high z²/(n+z²) = 3.8415/7.8415 for n=4
    assert wilson_interval(0, 4) == pytest.approx((0.0, 0.48989), abs=1e-4)
    assert wilson_interval(4, 4) == pytest.approx((0.51011, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_summary_csv_and_chart_are_written(built: Path, tmp_path: Path) -> None:
    ref = Store(built).resolve("benchmark")
    files = ref.provenance["files"]  # artifacts written into the version at commit, checksummed
    assert (ref.path / "results_summary.csv").stat().st_size == files["results_summary.csv"]["size"]
    # one accuracy chart per study, drawn outside the version (it marks the choice)
    assert not any(name.startswith("accuracy") for name in files)
    summary = pl.read_csv(ref.path / "results_summary.csv")
    rows = pl.DataFrame(load_stage("benchmark", built).to_dict())
    expected = rows.group_by("model_id", "seq_len").agg(pl.col("correct").mean().alias("acc"))
    joined = summary.join(expected, on=["model_id", "seq_len"])
    assert joined.height == 4 and (joined["accuracy"] - joined["acc"]).abs().max() < 1e-12
    assert (summary["n"] == 3).all() and (summary["ci_low"] <= summary["accuracy"]).all()

    result = invoke("plot", "accuracy", "--out", tmp_path / "fig", "--data-dir", built)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["accuracy.html", "accuracy.png"]
    assert "<html" in (tmp_path / "fig" / "accuracy.html").read_text()[:2000].lower()


def _summary(rows: list[tuple[str, int, int, float]]) -> pl.DataFrame:
    """(model, n_params, seq_len, accuracy) rows as a benchmark summary."""
    return pl.DataFrame(
        {
            "model_spec": [r[0] for r in rows],
            "model_id": [f"org/{r[0]}" for r in rows],
            "model_revision": ["abc"] * len(rows),
            "n_params": [r[1] for r in rows],
            "family": ["arithmetic"] * len(rows),
            "seq_len": [r[2] for r in rows],
            "n": [100] * len(rows),
            "accuracy": [r[3] for r in rows],
            "ci_low": [r[3] - 0.05 for r in rows],
            "ci_high": [r[3] + 0.05 for r in rows],
        }
    )


def test_choose_model_prefers_the_smallest_then_the_longest() -> None:
    summary = _summary(
        [
            ("big", 1000, 6, 0.99), ("big", 1000, 10, 0.95),
            ("small", 10, 4, 0.99), ("small", 10, 6, 0.9), ("small", 10, 7, 0.85),
            ("small", 10, 8, 0.5),
        ]
    )  # fmt: skip
    choice = choose_model(summary, min_accuracy=0.8, min_seq_len=6)
    assert (choice.model_spec, choice.seq_len, choice.accuracy) == ("small", 7, 0.85)
    assert choose_model(summary, 0.95, 6).model_spec == "big"
    assert choose_model(summary, 0.95, 6).seq_len == 10
    with pytest.raises(ChooseError, match=r"closest: org/big at seq_len 6 \(accuracy 0.990\)"):
        choose_model(summary, 0.995, 6)
    with pytest.raises(ChooseError, match=r"no programs with seq_len >= 11 \(longest: 10\)"):
        choose_model(summary, 0.5, 11)


def test_one_model_under_several_formats_in_one_stage(
    tmp_path: Path, models: dict[str, str]
) -> None:
    """``--models m:code,m:code-1shot`` benchmarks one model under two prompt formats: each
    spec's rows carry its own prompts (the 1-shot one shows a solved example first), and the
    summary, table and choice keep them apart."""
    _build_programs(tmp_path)
    specs = (f"{models['bpe']}:code", f"{models['bpe']}:code-1shot")
    result = invoke(
        "build", "benchmark", "--models", ",".join(specs),
        "--batch-size", "4", "--max-new-tokens", "2", "--data-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = load_stage("benchmark", data_dir=tmp_path)
    by_spec = {spec: [r for r in rows if r["model_spec"] == spec] for spec in specs}
    assert [len(v) for v in by_spec.values()] == [N_PROGRAMS, N_PROGRAMS]
    for plain, shot in zip(*by_spec.values(), strict=True):
        assert plain["program_id"] == shot["program_id"]
        assert shot["prompt"].endswith(plain["prompt"].split("\n\n", 1)[1])
        assert shot["prompt"].count("# The final value of") == 2  # the example, then the cue
    summary = benchmark.summarize(rows)
    assert summary["model_spec"].unique().len() == 2
    table = benchmark.accuracy_table(summary)
    assert ":code-1shot (arithmetic)" in table and ":code (arithmetic)" in table


def test_choose_picks_the_format_too() -> None:
    """One model benchmarked under several prompt formats: the choice is (model, format, length),
    the format that reaches the threshold at the longest length (ties: the higher accuracy)."""
    rows = [
        ("m:code-chat", 10, 6, 0.9), ("m:code-chat", 10, 8, 0.5),
        ("m:code-1shot", 10, 6, 0.95), ("m:code-1shot", 10, 8, 0.82),
        ("m:code", 10, 8, 0.85), ("big", 1000, 9, 0.99),
    ]  # fmt: skip
    summary = _summary(rows).with_columns(pl.lit("org/m").alias("model_id"))
    summary = summary.with_columns(
        pl.when(pl.col("model_spec") == "big").then(pl.lit("org/big")).otherwise("model_id")
        .alias("model_id")
    )  # fmt: skip
    choice = choose_model(summary, min_accuracy=0.8, min_seq_len=6)
    assert (choice.model_spec, choice.prompt_format, choice.seq_len) == ("m:code", "code", 8)
    choice = choose_model(summary, min_accuracy=0.9, min_seq_len=6)
    assert (choice.model_spec, choice.prompt_format, choice.seq_len) == (
        "m:code-1shot",
        "code-1shot",
        6,
    )
    assert choose_model(summary, 0.99, 6).prompt_format == "default"


def test_choose_cli_writes_the_smaller_model(
    built: Path, tmp_path: Path, models: dict[str, str]
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(built, data_dir)
    with pytest.raises(ChooseError, match="no model has been chosen yet"):
        read_chosen(data_dir)
    result = invoke("choose", "--min-accuracy", "0", "--min-seq-len", "2", "--data-dir", data_dir)
    assert result.exit_code == 0, result.output
    chosen = read_chosen(data_dir)
    rows = load_stage("benchmark", data_dir)
    sizes = dict(zip(rows["model_spec"], rows["n_params"], strict=True))
    assert sizes[models["word"]] < sizes[models["bpe"]]
    assert chosen["model_spec"] == models["word"] and chosen["seq_len"] == 3
    assert chosen["benchmark_version"] == Store(data_dir).resolve("benchmark").version
    assert chosen["revision"] == rows["model_revision"][0]
    assert "smallest model" in chosen["rule"] and chosen["min_seq_len"] == 2


def test_choose_cli_when_none_qualifies_names_the_closest(built: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(built, data_dir)
    summary = pl.read_csv(Store(data_dir).resolve("benchmark").path / "results_summary.csv")
    best = summary.filter(pl.col("seq_len") >= 3)["accuracy"].max()
    assert best < 1.0  # random tiny models do not solve every program
    result = invoke("choose", "--min-accuracy", "1.0", "--min-seq-len", "3", "--data-dir", data_dir)
    assert result.exit_code == 2, result.output
    error = error_line(result.stderr)
    assert "closest:" in error and f"at seq_len 3 (accuracy {best:.3f})" in error
    assert not (data_dir / "chosen_model.json").exists()


def test_accuracy_table_prints_one_row_per_model_and_family() -> None:
    import polars as pl

    from seqpatch.stages.benchmark import accuracy_table

    summary = pl.DataFrame(
        {
            "model_id": ["m-a", "m-a", "m-b"],
            "family": ["binding"] * 3,
            "seq_len": [1, 2, 1],
            "accuracy": [1.0, 0.5, 0.25],
        }
    )
    assert accuracy_table(summary).splitlines() == [
        "accuracy % by length:",
        "model (family)    1   2",
        "m-a (binding)   100  50",
        "m-b (binding)    25    ",
    ]
