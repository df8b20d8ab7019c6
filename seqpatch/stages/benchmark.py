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

Both passes go through nnsight (``handle.trace`` and ``handle.model.generate``), so the same code runs
here or, with ``remote=True`` (``seqpatch build benchmark --remote``), on NDIF's hosted copy of a
Hub model; locally it gives exactly what a direct ``transformers`` forward and ``generate`` give.

Resumable model by model: the store builds one shard per model (``Store.build_sharded``), so a
rerun after an interruption skips the models already finished. Every model is loaded, and every
answer checked to be representable by its tokenizer, before anything is written.

``summarize(rows)`` gives accuracy per (model, family, seq_len) with Wilson 95% intervals;
``write_summary`` and ``write_accuracy_chart`` put ``results_summary.csv`` and
``accuracy.html/.png`` next to a stored version (the CLI calls them after a build).
"""

from __future__ import annotations

import gc
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Features, Value

from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    import os

    import polars as pl
    from datasets import Dataset

    from seqpatch.models import ModelHandle
    from seqpatch.store import StageRef, Store

STAGE = "benchmark"
PARENT_STAGE = "programs"
SCHEMA_VERSION = 1
SUMMARY_CSV = "results_summary.csv"
CHART_NAME = "accuracy"
WILSON_Z = 1.959963984540054  # two-sided 95% normal quantile
FORMAT_SEPARATOR = ":"

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

    models: tuple[str, ...]
    batch_size: int = 64  # rows per forward pass; recorded since padding can move the last ulp
    max_new_tokens: int = 8  # enough for '-123' plus a stop token under digit-wise tokenizers

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


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"path:compact"`` → ``("path", "compact")``; a suffix that is no format name stays."""
    from seqpatch.prompts import PROMPT_FORMATS

    head, sep, tail = spec.rpartition(FORMAT_SEPARATOR)
    if sep and head and tail in (*PROMPT_FORMATS, "code-chat"):
        return head, tail
    return spec, None


# ---------------------------------------------------------------------------------------------
# Loading and checking models


@dataclass(frozen=True)
class ModelInfo:
    """The identity of one benchmarked model, as stored in rows and provenance.

    ``remote`` says where its forward passes run (NDIF or here); it is not part of the identity
    (see ``build_benchmark``).
    """

    spec: str
    model_id: str
    revision: str | None
    n_params: int
    description: Mapping[str, Any]
    remote: bool = False


def open_model(spec: str, remote: bool = False) -> ModelHandle:
    """Load ``spec`` (with its optional ``:format``), turning load failures into ``BenchmarkError``.

    ``remote=True`` opens NDIF's copy of a Hub model (``load_model(..., remote=True)``).
    """
    from seqpatch.models import ModelLoadError, load_model
    from seqpatch.prompts import PromptFormatError

    name, fmt = split_spec(spec)
    try:
        return load_model(name, prompt_format=fmt, remote=remote)
    except (ModelLoadError, PromptFormatError) as err:
        raise BenchmarkError(f"cannot benchmark model {spec!r}: {err}") from err


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


def check_models(specs: Sequence[str], programs: Dataset, remote: bool = False) -> list[ModelInfo]:
    """Load every model and check it can be scored on ``programs``; returns their identities.

    Models are released after the check (they are loaded again, one at a time, when built), so
    several large models never sit in memory together. ``remote=True``: every model runs on
    NDIF (only their meta skeletons and tokenizers are loaded here).
    """
    infos = []
    for spec in specs:
        handle = open_model(spec, remote)
        check_model(handle, programs)
        infos.append(
            ModelInfo(
                spec,
                handle.model_id,
                handle.revision,
                handle.n_params,
                handle.describe(),
                remote,
            )
        )
        device = handle.device
        del handle
        _free_memory(device)
    return infos


def _free_memory(device: Any) -> None:
    """Return a released model's memory (the caller has dropped its last reference)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Running one model


def _pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any, Any]:
    """``input_ids, attention_mask, position_ids`` of left-padded ``seqs`` (positions count from
    each row's first real token, so padding shifts nothing)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _pad_id(handle: ModelHandle) -> int:
    tok = handle.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _teacher_forced(
    handle: ModelHandle, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]]
) -> tuple[list[float], list[int]]:
    """Summed log-probability of each answer after its prompt, and its first token's rank.

    One nnsight trace, on NDIF for a remote handle. Only small results leave it: the
    log-probability of each of the last ``keep - 1`` tokens and each row's rank, never the
    ``[batch, keep, vocab]`` logits (a large download from NDIF). The trace body names only the
    nnsight model, ``torch`` and tensors, so it ships to NDIF without seqpatch.
    """
    import torch

    seqs = [p + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
    ids, mask, positions = _pad_left(seqs, _pad_id(handle))
    keep = max(len(a) for a in answer_ids) + 1  # logits only where answers are predicted
    targets = ids[:, ids.shape[1] - keep + 1 :]  # the token that logit column i predicts
    starts = [keep - 1 - len(a) for a in answer_ids]  # column whose logits predict answer[0]
    start_cols = torch.tensor(starts)
    first_ids = torch.tensor([a[0] for a in answer_ids])
    model = handle.model
    # nnsight moves the inputs to the model's device (the server's GPU when remote)
    with handle.trace(
        input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
    ):
        logits = model.output.logits.float()  # [batch, keep, vocab]; column keep-1: last token
        device = logits.device
        token_logprobs = torch.log_softmax(logits, dim=-1)[:, :-1]
        token_logprobs = token_logprobs.gather(-1, targets.to(device)[..., None])[..., 0].save()
        first = logits[torch.arange(logits.shape[0], device=device), start_cols.to(device)]
        ranks = ((first > first.gather(-1, first_ids.to(device)[:, None])).sum(-1) + 1).save()
    logprobs = [
        float(token_logprobs[row, start : start + len(answer)].sum())
        for row, (start, answer) in enumerate(zip(starts, answer_ids, strict=True))
    ]
    return logprobs, [int(rank) for rank in ranks.tolist()]


def _greedy(handle: ModelHandle, prompt_ids: Sequence[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations, each cut at EOS and at the first newline.

    nnsight's ``generate`` (on NDIF for a remote handle); the generated ids are read off
    ``tracer.result``, the whole prompt followed by the new tokens.
    """
    ids, mask, _ = _pad_left(prompt_ids, _pad_id(handle))
    tok = handle.tokenizer
    model = handle.model  # `with` must call model.generate itself (nnsight finds the block there)
    with model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=_pad_id(handle),
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

    fmt = handle.prompt_format
    programs = _programs(batch)
    prompts = [fmt.prompt(p) for p in programs]
    prompt_ids = [list(handle.tokenizer(p)["input_ids"]) for p in prompts]
    answer_ids = [
        handle.answer_token_ids([a], prompt=p)[0]
        for a, p in zip(batch["answer"], prompts, strict=True)
    ]
    with torch.no_grad():
        logprobs, ranks = _teacher_forced(handle, prompt_ids, answer_ids)
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
        "answer_logprob": logprobs,
        "answer_rank": ranks,
    }


def model_fingerprint(parent_fingerprint: str | None, cfg: BenchmarkConfig, info: ModelInfo) -> str:
    """The fingerprint of one model's rows: config, parent rows and model identity."""
    from seqpatch.store import canonical_json

    key = canonical_json(
        {
            "stage": STAGE,
            "schema_version": SCHEMA_VERSION,
            "config": cfg,
            "parent": parent_fingerprint,
            "model": info.description,
        }
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def run_model(parent: Dataset, cfg: BenchmarkConfig, info: ModelInfo) -> Dataset:
    """The benchmark rows of one model over every program of ``parent`` (on NDIF when
    ``info.remote``)."""
    handle = open_model(info.spec, info.remote)
    if handle.revision != info.revision:
        raise BenchmarkError(
            f"model {info.spec!r} changed while benchmarking (revision {info.revision} became "
            f"{handle.revision}); rerun the benchmark"
        )
    device = handle.device
    try:
        return parent.map(
            _run_batch,
            batched=True,
            batch_size=cfg.batch_size,
            fn_kwargs={"handle": handle, "info": info, "cfg": cfg},
            remove_columns=parent.column_names,
            features=FEATURES,
            keep_in_memory=True,  # never write cache files into the parent's version folder
            new_fingerprint=model_fingerprint(parent._fingerprint, cfg, info),
            desc=f"benchmark {info.model_id}",
        )
    finally:
        del handle
        _free_memory(device)


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
# The stage


def build(parent: Dataset, cfg: BenchmarkConfig, remote: bool = False) -> Any:
    """Every model's rows over ``parent`` (the programs), in memory, with summary statistics.

    The stage contract's entry point; ``build_benchmark`` is the resumable, stored variant.
    ``remote=True`` runs every model on NDIF.
    """
    from datasets import concatenate_datasets

    from seqpatch.store import Built, merge_extra

    infos = check_models(cfg.models, parent, remote)
    parts = [run_model(parent, cfg, info) for info in infos]
    extras = [_shard_extra(rows, info) for rows, info in zip(parts, infos, strict=True)]
    return Built(concatenate_datasets(parts), merge_extra(extras))


def models_identity(infos: Sequence[ModelInfo]) -> dict[str, str]:
    """One ``{"id", "revision"}`` record for several models (versions depend on every weight)."""
    from seqpatch.store import canonical_json

    revisions = canonical_json([[i.spec, i.model_id, i.revision] for i in infos])
    return {
        "id": ",".join(i.model_id for i in infos),
        "revision": "sha256:" + hashlib.sha256(revisions.encode()).hexdigest()[:16],
    }


def build_benchmark(
    cfg: BenchmarkConfig,
    *,
    programs: str = "latest",
    store: Store | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    remote: bool = False,
) -> StageRef:
    """Benchmark ``cfg.models`` on a stored ``programs`` version, one resumable shard per model.

    Every model is loaded and checked before anything is written; a stored version with the same
    config, programs and model weights is reused without running any model.

    ``remote=True`` runs the forward passes and generation on NDIF through nnsight (Hub ids
    only; needs ``NDIF_API_KEY`` and the network). It is deliberately not part of
    ``BenchmarkConfig`` and so not of the version: the rows are the same computation, the same
    nnsight code on the same weights (model id and revision), wherever it runs, just as the
    device is not part of the version. A version built remotely is reused by a local run and
    the other way round; its provenance says ``"remote": true`` per model.
    """
    from seqpatch.store import Built, Store

    store = store if store is not None else Store(data_dir)
    parent_ref = store.resolve(PARENT_STAGE, programs)
    parent = store.load(PARENT_STAGE, parent_ref.version)
    infos = check_models(cfg.models, parent, remote)

    def build_shard(index: int) -> Built:
        rows = run_model(parent, cfg, infos[index])
        return Built(rows, _shard_extra(rows, infos[index]))

    return store.build_sharded(
        STAGE,
        SCHEMA_VERSION,
        cfg,
        len(infos),
        build_shard,
        parent=parent_ref,
        model=models_identity(infos),
    )


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


def load_summary(ref: StageRef) -> pl.DataFrame:
    """The summary of a stored benchmark version (computed from its rows)."""
    from datasets import Dataset

    return summarize(Dataset.load_from_disk(str(ref.path)))


def write_summary(ref: StageRef, out_dir: Path | None = None) -> Path:
    """Write ``results_summary.csv`` into the version folder (or ``out_dir``); returns its path."""
    out = Path(out_dir) if out_dir is not None else ref.path
    out.mkdir(parents=True, exist_ok=True)
    path = out / SUMMARY_CSV
    tmp = out / f".{SUMMARY_CSV}.tmp"
    load_summary(ref).write_csv(tmp)
    tmp.replace(path)
    return path


def write_accuracy_chart(
    ref: StageRef, out_dir: Path | None = None, formats: Sequence[str] = ("html", "png")
) -> list[Path]:
    """Draw accuracy by length (one line per model) into the version folder or ``out_dir``."""
    from seqpatch.charts import accuracy_chart, save_chart

    out = Path(out_dir) if out_dir is not None else ref.path
    chart = accuracy_chart(load_summary(ref), title=f"Accuracy by program length ({ref.version})")
    return save_chart(chart, out, CHART_NAME, formats)
