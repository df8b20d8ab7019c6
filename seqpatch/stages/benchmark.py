"""Stage ``benchmark``: how well each model solves each program, before anything is patched.

One row per (model, program). For every model the prompt is ``prompt_format.prompt(program)``
and three measurements are taken, all under ``torch.no_grad()`` on left-padded batches:

- ``continuation``: the greedy continuation (``generate``, no sampling), cut at the first
  newline, EOS or after ``max_new_tokens`` tokens — fewer if the model's own generation config
  says so (``ModelHandle.max_answer_tokens``: the organism answers with exactly one token and
  was never trained on what follows it); ``prediction`` is the integer it starts with
  (``prompt_format.parse_prediction``) and ``correct`` says whether it equals the answer;
- ``answer_logprob``: the teacher-forced log-probability of the true answer text, summed over
  all of its tokens (prompt followed by ``prompt_format.answer_text(answer)``);
- ``answer_rank``: the rank of the answer's first token among the whole vocabulary at the
  position where the answer starts (1 = the model's top choice; ties count in its favour).

Generation goes through nnsight (``handle.model.generate``); teacher forcing is one plain
forward locally (``seqpatch.models.teacher_forced``) and one nnsight trace for a remote handle,
so with ``remote=True`` (``seqpatch build benchmark --remote``) the same measurements run on
NDIF's hosted copy of a Hub model.

Resumable model by model: one shard per model, so a rerun after an interruption skips the
models already finished. Every model is loaded, and every answer checked to be representable by
its tokenizer (``prepare``), before anything is written.

``summarize(rows)`` gives accuracy per (model, family, seq_len) with Wilson 95% intervals; the
stage's artifact ``results_summary.csv`` is written into the version at its commit. The accuracy
chart is drawn once per study, outside the version (``accuracy_chart_artifacts``: ``seqpatch
run``, ``seqpatch plot accuracy``), where it can mark the choice made from this version and the
length studied; the version holds no second, unannotated copy. ``summary_artifacts`` redraws the
summary elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from datasets import Features, Value

from seqpatch.errors import SeqpatchError
from seqpatch.options import option
from seqpatch.stages.base import Artifact, Built, Inputs, ParentSpec, chart_artifacts

if TYPE_CHECKING:
    import polars as pl
    from datasets import Dataset

    from seqpatch.models import ModelHandle
    from seqpatch.store import StageRef

STAGE = "benchmark"
PARENT_STAGE = "programs"
SCHEMA_VERSION = 1
SUMMARY_CSV = "results_summary.csv"
CHART_NAME = "accuracy"
WILSON_Z = 1.959963984540054  # two-sided 95% normal quantile

FEATURES = Features(
    {
        "model_id": Value("string"),
        "model_spec": Value("string"),
        "model_revision": Value("string"),
        "n_params": Value("int64"),
        "program_id": Value("string"),
        "family": Value("string"),
        "seq_len": Value("int32"),
        "answer": Value("int64"),
        "prompt": Value("string"),
        "continuation": Value("string"),
        "prediction": Value("int64"),
        "correct": Value("bool"),
        "answer_logprob": Value("float32"),
        "answer_rank": Value("int64"),
    }
)
"""``prediction`` is null when the continuation does not start with an integer."""


class BenchmarkError(SeqpatchError):
    """A model cannot be benchmarked (not loadable, unsupported, cannot represent an answer)."""


@dataclass(frozen=True)
class BenchmarkConfig:
    """Which models to run and how.

    ``models`` are specs as ``load_model`` takes them (``builtin``, a folder, a Hub id), each
    optionally suffixed ``:compact``, ``:code`` or ``:code-chat`` to choose its prompt format
    (default: ``compact`` for the organism, ``code`` otherwise).
    """

    models: tuple[str, ...] = option(
        ("builtin",),
        "Comma-separated: builtin, local folders, Hub ids; add :compact, :code or :code-chat to "
        "choose a model's prompt format.",
        parse=lambda text: parse_models(text),
    )
    # rows per forward pass; in the config since padding can move the last ulp
    batch_size: int = option(64, "Prompts per forward.")
    # enough for '-123' plus a stop token under digit-wise tokenizers
    max_new_tokens: int = option(8, "Longest greedy continuation, in tokens.")

    def __post_init__(self) -> None:
        models = tuple(m.strip() for m in self.models)
        if not models or any(not m for m in models):
            raise BenchmarkError(
                f"--models needs one or more model specs separated by commas, got {self.models!r}"
            )
        if len(set(models)) != len(models):
            raise BenchmarkError(f"--models lists a model twice: {', '.join(models)}")
        for name, value in (
            ("batch_size", self.batch_size),
            ("max_new_tokens", self.max_new_tokens),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BenchmarkError(f"{name} must be an integer >= 1, got {value!r}")
        object.__setattr__(self, "models", models)


def parse_models(text: str) -> tuple[str, ...]:
    """``"builtin,Qwen/Qwen2.5-0.5B"`` → ``("builtin", "Qwen/Qwen2.5-0.5B")``."""
    return tuple(part.strip() for part in text.split(","))


CONFIG = BenchmarkConfig
PARENTS = (ParentSpec(PARENT_STAGE),)
SHARD_SIZE = None  # one shard per model


# ---------------------------------------------------------------------------------------------
# Loading and checking models


@dataclass(frozen=True)
class ModelInfo:
    """The identity of one benchmarked model, as stored in rows and provenance.

    ``remote`` says where its forward passes run (NDIF or here); it is not part of the identity:
    the same nnsight code on the same weights gives the same rows wherever it runs.
    """

    spec: str
    model_id: str
    revision: str | None
    n_params: int
    description: Mapping[str, Any]
    remote: bool = False

    @classmethod
    def of(cls, spec: str, handle: ModelHandle) -> ModelInfo:
        return cls(
            spec,
            handle.model_id,
            handle.revision,
            handle.n_params,
            handle.describe(),
            handle.remote,
        )


def _programs(rows: Dataset | Mapping[str, Sequence[Any]]) -> list[Any]:
    from seqpatch.programs import Program

    return [Program.parse(t, f) for t, f in zip(rows["text"], rows["family"], strict=True)]


def check_model(handle: ModelHandle, programs: Dataset) -> None:
    """Raise ``BenchmarkError`` unless every answer tokenizes as a suffix of its prompt."""
    from seqpatch.models import AnswerTokenizationError

    fmt = handle.prompt_format
    for program in _programs(programs):
        try:
            handle.answer_token_ids([program.answer], prompt=fmt.prompt(program))
        except AnswerTokenizationError as err:
            raise BenchmarkError(f"model {handle.spec!r} cannot be benchmarked: {err}") from err


def _open(inputs: Inputs, spec: str) -> ModelHandle:
    """The model of ``spec`` (with its optional ``:format``); load failures name the spec."""
    from seqpatch.models import ModelLoadError
    from seqpatch.prompts import PromptFormatError

    try:
        return inputs.models.get(spec)
    except (ModelLoadError, PromptFormatError) as err:
        raise BenchmarkError(f"cannot benchmark model {spec!r}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Running one model


def _greedy(handle: ModelHandle, prompt_ids: Sequence[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations, each cut at EOS and at the first newline.

    nnsight's ``generate`` (on NDIF for a remote handle); the generated ids are read off
    ``tracer.result``, the whole prompt followed by the new tokens.
    """
    from seqpatch.models import pad_left

    tok = handle.tokenizer
    batch = pad_left(tok, prompt_ids)
    ids = batch["input_ids"]
    model = handle.model  # `with` must call model.generate itself (nnsight finds the block there)
    with model.generate(
        input_ids=ids,
        attention_mask=batch["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        remote=handle.remote,
    ) as tracer:
        out = tracer.result.save()
    texts = []
    for row in out[:, ids.shape[1] :].tolist():
        if tok.eos_token_id is not None and tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        text = tok.decode(row, skip_special_tokens=True)
        texts.append(text.split("\n", 1)[0])
    return texts


def _run_batch(
    batch: dict[str, list[Any]], handle: ModelHandle, info: ModelInfo, cfg: BenchmarkConfig
) -> dict[str, list[Any]]:
    import torch

    from seqpatch.models import teacher_forced

    fmt = handle.prompt_format
    programs = _programs(batch)
    prompts = [fmt.prompt(p) for p in programs]
    prompt_ids = [list(handle.tokenizer(p)["input_ids"]) for p in prompts]
    answer_ids = [
        handle.answer_token_ids([a], prompt=p)[0]
        for a, p in zip(batch["answer"], prompts, strict=True)
    ]
    with torch.no_grad():
        forced = teacher_forced(handle, prompt_ids, answer_ids)
        limit = min(cfg.max_new_tokens, handle.max_answer_tokens or cfg.max_new_tokens)
        continuations = _greedy(handle, prompt_ids, limit)
    predictions = [fmt.parse_prediction(c) for c in continuations]
    n = len(prompts)
    return {
        "model_id": [info.model_id] * n,
        "model_spec": [info.spec] * n,
        "model_revision": [info.revision] * n,
        "n_params": [info.n_params] * n,
        "program_id": batch["program_id"],
        "family": batch["family"],
        "seq_len": batch["seq_len"],
        "answer": batch["answer"],
        "prompt": prompts,
        "continuation": continuations,
        "prediction": predictions,
        "correct": [p == a for p, a in zip(predictions, batch["answer"], strict=True)],
        "answer_logprob": forced.logprobs,
        "answer_rank": forced.ranks,
    }


def _shard_extra(rows: Dataset, info: ModelInfo) -> dict[str, Any]:
    summary = summarize(rows)
    where = {"remote": True} if info.remote else {}  # provenance only, not identity
    return {
        "models": {
            info.spec: {
                **dict(info.description),
                **where,
                "summary": summary.drop("model_spec", "model_id").to_dicts(),
            }
        }
    }


# ---------------------------------------------------------------------------------------------
# The stage: one resumable shard per model


def model_specs(cfg: BenchmarkConfig, parents: Mapping[str, StageRef]) -> tuple[str, ...]:
    return cfg.models


def prepare(inputs: Inputs, cfg: BenchmarkConfig) -> None:
    """Load every model and check it can score every program, before anything is written.

    Models after the first are released again, so several large models never sit in memory
    together; the first stays loaded for the first shard.
    """
    programs = inputs.rows(PARENT_STAGE)
    for index, spec in enumerate(cfg.models):
        check_model(_open(inputs, spec), programs)
        if index:
            inputs.models.release(spec)


def n_shards(inputs: Inputs, cfg: BenchmarkConfig) -> int:
    return len(cfg.models)


def build_shard(inputs: Inputs, cfg: BenchmarkConfig, index: int) -> Built:
    """The rows of model ``index`` over every program (on NDIF when the models are remote)."""
    spec = cfg.models[index]
    handle = _open(inputs, spec)
    info = ModelInfo.of(spec, handle)
    parent = inputs.rows(PARENT_STAGE)
    rows = parent.map(
        _run_batch,
        batched=True,
        batch_size=cfg.batch_size,
        fn_kwargs={"handle": handle, "info": info, "cfg": cfg},
        remove_columns=parent.column_names,
        features=FEATURES,
        new_fingerprint=inputs.fingerprint(STAGE, spec),
        desc=f"benchmark {info.model_id}",
    )
    del handle
    inputs.models.release(spec)
    return Built(rows, _shard_extra(rows, info))


def artifacts(rows: Dataset, cfg: BenchmarkConfig, inputs: Inputs) -> dict[str, Artifact]:
    """``results_summary.csv``, written into the version at commit (the accuracy chart is drawn
    outside it: ``accuracy_chart_artifacts``)."""
    return {SUMMARY_CSV: summarize(rows).write_csv}


# ---------------------------------------------------------------------------------------------
# Summary and chart


def wilson_interval(successes: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no rounding residue
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def summarize(rows: Dataset | pl.DataFrame) -> pl.DataFrame:
    """Accuracy per (model, family, seq_len) with Wilson 95% intervals.

    Columns: ``model_spec, model_id, model_revision, n_params, family, seq_len, n, n_correct,
    accuracy, ci_low, ci_high``, sorted by model order of appearance, family and length.
    """
    import polars as pl

    frame = rows if isinstance(rows, pl.DataFrame) else _frame(rows)
    keys = ["model_spec", "model_id", "model_revision", "n_params", "family", "seq_len"]
    summary = (
        frame.with_row_index("_row")
        .group_by(keys)
        .agg(
            pl.col("_row").min().alias("_first"),
            pl.len().alias("n"),
            pl.col("correct").cast(pl.Int64).sum().alias("n_correct"),
        )
        .with_columns((pl.col("n_correct") / pl.col("n")).alias("accuracy"))
    )
    bounds = [
        wilson_interval(k, n) for k, n in zip(summary["n_correct"], summary["n"], strict=True)
    ]
    summary = summary.with_columns(
        pl.Series("ci_low", [lo for lo, _ in bounds], dtype=pl.Float64),
        pl.Series("ci_high", [hi for _, hi in bounds], dtype=pl.Float64),
    )
    order = summary.group_by("model_spec").agg(pl.col("_first").min().alias("_model_first"))
    return (
        summary.join(order, on="model_spec")
        .sort("_model_first", "family", "seq_len")
        .drop("_first", "_model_first")
    )


def _frame(rows: Dataset) -> pl.DataFrame:
    import polars as pl

    columns = ["model_spec", "model_id", "model_revision", "n_params", "family", "seq_len"]
    return pl.DataFrame({c: rows[c] for c in [*columns, "correct"]})


def labelled(summary: pl.DataFrame) -> pl.DataFrame:
    """``summary`` with ``model_id`` suffixed by the prompt format (``org/m:code-1shot``) where
    one model was benchmarked under several formats, so tables and charts keep them apart."""
    import polars as pl

    from seqpatch.stages.base import split_model_spec

    if "model_spec" not in summary.columns:  # one row per model already
        return summary
    specs = summary.select("model_id", "model_spec").unique()
    shared = {m for m, n in specs.group_by("model_id").len().iter_rows() if n > 1}
    labels = [
        f"{model}:{split_model_spec(spec)[1] or 'default'}" if model in shared else model
        for model, spec in summary.select("model_id", "model_spec").iter_rows()
    ]
    return summary.with_columns(pl.Series("model_id", labels))


def accuracy_table(summary: pl.DataFrame) -> str:
    """Accuracy in percent per (model, family) and length, as text for the terminal: one row per
    model and family, one column per length (the Wilson intervals are in the csv and chart)."""
    summary = labelled(summary)
    lengths = sorted(set(summary["seq_len"].to_list()))
    rows = [["model (family)", *(str(n) for n in lengths)]]
    for (model, family), group in summary.group_by(["model_id", "family"], maintain_order=True):
        cells = dict(zip(group["seq_len"].to_list(), group["accuracy"].to_list(), strict=True))
        rows.append(
            [
                f"{model} ({family})",
                *(f"{100 * cells[n]:.0f}" if n in cells else "" for n in lengths),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(["accuracy % by length:", *lines])


def load_summary(ref: StageRef) -> pl.DataFrame:
    """The summary of a stored benchmark version (computed from its rows)."""
    from datasets import Dataset

    from seqpatch.redact import restore_rows

    return summarize(restore_rows(Dataset.load_from_disk(str(ref.path))))


def summary_artifacts(ref: StageRef) -> dict[str, Artifact]:
    """``results_summary.csv`` of a stored version, as an artifact to write elsewhere
    (``seqpatch.store.write_artifacts``)."""
    return {SUMMARY_CSV: load_summary(ref).write_csv}


def accuracy_chart_artifacts(
    ref: StageRef,
    formats: Sequence[str] = ("html", "png"),
    chosen: Mapping[str, Any] | None = None,
    studied: int | None = None,
    cap_reason: str = "",
) -> dict[str, Artifact]:
    """Accuracy by length (one line per model) of a stored version, as artifacts to write
    elsewhere (``seqpatch.store.write_artifacts``).

    ``chosen`` (``chosen_model.json``'s contents) marks the choice and its threshold when it
    was made from this version; ``studied`` the length the study went on with when it is not the
    chosen one (``cap_reason`` says why).
    """
    from seqpatch.charts import accuracy_figure

    mark = chosen if chosen and chosen.get("benchmark_version") == ref.version else None
    chart = accuracy_figure(
        labelled(load_summary(ref)),
        threshold=mark["min_accuracy"] if mark else None,
        chosen=(mark["model_id"], mark["seq_len"]) if mark else None,
        version=ref.version,
        studied=studied,
        cap_reason=cap_reason,
    )
    return chart_artifacts(chart, CHART_NAME, tuple(formats))
