"""Stage ``tracing``: ROME's causal trace of one program of each pair (Meng et al. 2022, §2.1).

One row per traced program (program B of each pair by default). The program reads its prompt
(``input_ids`` without any answer prefix); the target is the first token of its correct answer,
read at the last position over the full vocabulary. The embeddings of the corrupted tokens
(``corrupt``, below) get Gaussian noise of σ = ν × std(embeddings) in each of ``n_samples``
draws, each from a recorded seed (``seeds``); then each state is restored in turn
(``seqpatch.interventions.tracing``): the residual stream entering a layer at one position
(kind ``resid``), and windows of ``w`` consecutive layers of MLP outputs (``mlp``) and
attention outputs (``attn``) at one position.

Stored per program: ``clean_prob``, ``corrupted_prob`` (mean over samples) and the per-sample
``corrupted_probs``; ``restored`` ``[kinds, layers, positions]`` (mean over samples) and
``indirect_effect = restored − corrupted_prob``. Positions beyond a program's ``n_tokens`` are
NaN (programs of one stage may differ in length). The artifacts hold the average indirect effect
(AIE) per kind: by raw position for each divergence index (``aie.npy``), and by token role
relative to the corrupted tokens as in ROME's Figure 2 (``aie_roles.npy``); ``aie.json``
describes both arrays' axes.

What ``corrupt`` names (token positions of the traced program's statements, found through the
tokenizer's character offsets):

- ``changed`` (default) — the whole statement at the pair's divergence index, e.g. ``b=4``:
  the binding whose value the pair changes;
- ``diff`` — only the tokens where A and B differ (the value being bound itself);
- ``chain`` — every statement of the query's reference chain (``dependencies``);
- ``<i>`` — statement ``i`` (0-based, preamble excluded).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Array3D, Features, List, Value

from seqpatch.bounds import MAX_NOISE_SCALE, check_finite
from seqpatch.charts.tracing_data import ROLES as ROLES
from seqpatch.charts.tracing_data import aie
from seqpatch.charts.tracing_data import roles as roles
from seqpatch.errors import SeqpatchError
from seqpatch.interventions.tracing import (
    KINDS,
    ROME_NOISE_SCALE,
    ROME_SAMPLES,
    Corruption,
    default_window,
    embedding_std,
    noise_seeds,
    trace,
)
from seqpatch.options import SEED_HELP, check_seed, csv, option
from seqpatch.stages.base import Built, ParentSpec, no_checks

if TYPE_CHECKING:
    from datasets import Dataset

    from seqpatch.models import ModelHandle
    from seqpatch.programs import Family, Program
    from seqpatch.stages.base import Artifact, Inputs
    from seqpatch.store import StageRef

STAGE = "tracing"
SCHEMA_VERSION = 1
PARENTS = (ParentSpec("pairs"),)
AIE_FILE, AIE_ROLES_FILE, AIE_INDEX_FILE = "aie.npy", "aie_roles.npy", "aie.json"
SHARD_SIZE = 25  # programs per resumable shard


class TracingStageError(SeqpatchError):
    """Bad tracing config, or a program whose corrupted tokens cannot be found."""


@dataclass(frozen=True)
class TracingConfig:
    """ROME's parameters (defaults are the paper's) and which programs and tokens to trace."""

    corrupt: str = option(
        "changed",
        "Tokens to corrupt: changed (the changed statement), diff (where A and B differ), chain "
        "(the query's reference chain) or a statement index such as 0.",
    )
    program: str = option("b", "Which program of each pair: a (source) or b (target).")
    noise_scale: float = option(
        ROME_NOISE_SCALE, "ν: noise σ = ν × std(input embeddings) (ROME: 3).", min=0
    )
    n_samples: int = option(ROME_SAMPLES, "Noise draws per program (ROME: 10).", min=1)
    window: int | None = option(
        None,
        "Layers per restored MLP/attention window [default: max(1, round(10·L/48)), ROME's 10 "
        "of 48 scaled to the model's depth].",
        min=1,
        show_default=False,
    )
    sigma_basis: str = option(
        "vocab",
        "std over the whole embedding matrix (vocab) or over the corrupted tokens of every "
        "traced program (corrupted, ROME's choice).",
    )
    kinds: tuple[str, ...] = option(
        KINDS, "What to restore: resid, mlp, attn (comma-separated).", parse=csv
    )
    # each program costs 3·L·T restorations × samples
    n_programs: int = option(100, "Trace the first N pairs (0: all of them).", min=0)
    seed: int = option(0, SEED_HELP)

    def __post_init__(self) -> None:
        corrupt = str(self.corrupt)
        if corrupt not in ("changed", "diff", "chain") and not corrupt.isdigit():
            raise TracingStageError(
                f"unknown corrupt target {corrupt!r}; use changed, diff, chain or a statement "
                "index such as 0"
            )
        object.__setattr__(self, "corrupt", corrupt)
        if self.program not in ("a", "b"):
            raise TracingStageError(f"program must be 'a' or 'b', got {self.program!r}")
        check_finite(
            "noise_scale", self.noise_scale, TracingStageError, above=0, at_most=MAX_NOISE_SCALE
        )
        if self.n_samples < 1:
            raise TracingStageError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.window is not None and self.window < 1:
            raise TracingStageError(
                f"window must be >= 1 (or None for the rule), got {self.window}"
            )
        if self.sigma_basis not in ("vocab", "corrupted"):
            raise TracingStageError(
                f"sigma_basis must be 'vocab' or 'corrupted', got {self.sigma_basis!r}"
            )
        kinds = tuple(dict.fromkeys(self.kinds))
        if not kinds or any(k not in KINDS for k in kinds):
            raise TracingStageError(f"kinds must be a non-empty subset of {', '.join(KINDS)}")
        object.__setattr__(self, "kinds", kinds)
        check_seed(self.seed)
        if self.n_programs < 0:
            raise TracingStageError(f"n_programs must be >= 0, got {self.n_programs}")


CONFIG = TracingConfig
prepare = no_checks


def features(n_kinds: int, n_layers: int, n_positions: int) -> Features:
    grid = Array3D(shape=(n_kinds, n_layers, n_positions), dtype="float32")
    return Features(
        {
            "pair_id": Value("string"),
            "program": Value("string"),
            "divergence_index": Value("int32"),
            "affects_query": Value("bool"),
            "n_tokens": Value("int32"),
            "input_ids": List(Value("int32")),
            "tokens": List(Value("string")),
            "corrupt": Value("string"),
            "corrupted_positions": List(Value("int32")),
            "target_id": Value("int64"),
            "target_label": Value("string"),
            "sigma": Value("float64"),
            "window": Value("int32"),
            "kinds": List(Value("string")),
            "layers": List(Value("int32")),
            "seeds": List(Value("int64")),
            "clean_prob": Value("float64"),
            "corrupted_prob": Value("float64"),
            "corrupted_probs": List(Value("float64")),
            "restored": grid,
            "indirect_effect": grid,
        }
    )


def model_specs(cfg: TracingConfig, parents: dict[str, StageRef]) -> tuple[str, ...]:
    """The model the pairs were solved by."""
    return (str(parents["pairs"].provenance["config"]["model"]),)


# ---------------------------------------------------------------------------------------------
# Which tokens to corrupt


def statement_positions(handle: ModelHandle, program: Program, prompt: str) -> list[list[int]]:
    """Token positions of each statement of ``program`` in ``prompt`` (preamble excluded).

    The program's rendering (``compact`` for the compact format, ``code`` otherwise) is found as
    the last occurrence in the prompt (few-shot examples come before it); a token belongs to a
    statement when its character span overlaps the statement's.
    """
    from seqpatch.prompts import CompactFormat

    renderer = "compact" if isinstance(handle.prompt_format, CompactFormat) else "code"
    sep = ";" if renderer == "compact" else "\n"
    lines = [s.render(renderer) for s in (*program.preamble, *program.statements)]
    body = sep.join(lines)
    start = prompt.rfind(body)
    if start < 0:
        raise TracingStageError(
            f"cannot find the program's {renderer} rendering in its prompt; the prompt format "
            "must contain the program's statements verbatim"
        )
    spans = []
    offset = start
    for line in lines:
        spans.append((offset, offset + len(line)))
        offset += len(line) + len(sep)
    spans = spans[len(program.preamble) :]
    enc = handle.tokenizer(prompt, return_offsets_mapping=True)
    result: list[list[int]] = []
    for begin, end in spans:
        result.append(
            [t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < b and a < end and b > begin]
        )
    return result


def corrupted_positions(
    corrupt: str, row: dict[str, Any], program: Program, statements: list[list[int]], side: str
) -> list[int]:
    """Positions named by ``corrupt`` (see the module docstring) for one pairs row."""
    k = int(row["divergence_index"])
    if corrupt == "changed":
        chosen = statements[k]
    elif corrupt == "diff":
        chosen = list(row["diff_positions"])
    elif corrupt == "chain":
        chosen = [t for i in row[f"dependencies_{side}"] for t in statements[i]]
    else:
        index = int(corrupt)
        if index >= program.seq_len:
            raise TracingStageError(
                f"statement {index} does not exist: the programs have {program.seq_len} "
                f"statements (0..{program.seq_len - 1})"
            )
        chosen = statements[index]
    if not chosen:
        raise TracingStageError(f"pair {row['pair_id']}: no tokens to corrupt for {corrupt!r}")
    return sorted(set(int(t) for t in chosen))


@dataclass(frozen=True)
class _Program:
    row: dict[str, Any]
    ids: list[int]
    tokens: list[str]
    target: int
    positions: list[int]


def prepare_program(
    handle: ModelHandle, cfg: TracingConfig, row: dict[str, Any], family: Family
) -> _Program:
    """What one pairs row's traced program needs: prompt ids, target token, corrupted positions."""
    from seqpatch.programs import Program

    side = cfg.program
    program = Program.parse(row[f"program_{side}"], family)
    prompt = row[f"prompt_{side}"]
    ids = list(row[f"input_ids_{side}"])[: int(row["n_tokens"]) - int(row["answer_prefix_len"])]
    if list(handle.tokenizer(prompt)["input_ids"]) != ids:
        raise TracingStageError(
            f"pair {row['pair_id']}: the model's tokenizer no longer reads the stored prompt as "
            "the stored input ids; rebuild the pairs stage with this model"
        )
    truth = int(row[f"ground_truth_{side}"])
    target = handle.answer_token_ids([truth], prompt=prompt)[0][0]
    statements = statement_positions(handle, program, prompt)
    positions = corrupted_positions(cfg.corrupt, row, program, statements, side)
    tokens = handle.tokenizer.convert_ids_to_tokens(ids)
    return _Program(row, ids, tokens, int(target), positions)


def pairs_family(pairs_config: Mapping[str, Any]) -> Family:
    """The family the pairs were drawn from (with its non-stock settings), from their config."""
    from seqpatch.programs import get_family

    params = pairs_config.get("family_params") or {}
    if params:
        from seqpatch.organism.train import family_from_params

        return family_from_params(pairs_config["family"], dict(params))
    return get_family(pairs_config["family"])


# ---------------------------------------------------------------------------------------------
# Building


def _selected(inputs: Inputs, cfg: TracingConfig) -> Dataset:
    pairs = inputs.rows("pairs")
    n = len(pairs) if cfg.n_programs == 0 else min(cfg.n_programs, len(pairs))
    return pairs.select(range(n))


def sigma_for(handle: ModelHandle, cfg: TracingConfig, programs: list[_Program]) -> float:
    """σ = ν × std: of the whole embedding matrix (``vocab``), or of the corrupted tokens of
    every traced program (``corrupted``)."""
    if cfg.sigma_basis == "vocab":
        return cfg.noise_scale * embedding_std(handle)
    ids = [p.ids[t] for p in programs for t in p.positions]
    return cfg.noise_scale * embedding_std(handle, ids)


def n_shards(inputs: Inputs, cfg: TracingConfig) -> int:
    return max(1, -(-len(_selected(inputs, cfg)) // inputs.shard_size))


def build_shard(inputs: Inputs, cfg: TracingConfig, index: int) -> Built:
    """Rows of programs ``[index · shard_size, (index + 1) · shard_size)``."""
    from datasets import Dataset

    from seqpatch.progress import progress_bar

    handle = inputs.model
    family = pairs_family(inputs.parents["pairs"].provenance["config"])
    selected = _selected(inputs, cfg)
    width = max(selected["n_tokens"]) if len(selected) else 1
    window = cfg.window if cfg.window is not None else default_window(handle.n_layers)
    if cfg.sigma_basis == "vocab":
        sigma = sigma_for(handle, cfg, [])
    else:  # σ depends on every traced program, so each shard reads them all
        traced = [prepare_program(handle, cfg, row, family) for row in selected]
        sigma = sigma_for(handle, cfg, traced)
    begin = index * inputs.shard_size
    rows = selected.select(range(begin, min(begin + inputs.shard_size, len(selected))))
    out: dict[str, list] = {name: [] for name in features(1, 1, 1)}
    with progress_bar(len(rows), f"tracing shard {index}", enabled=inputs.progress) as bar:
        for row in rows:
            prog = prepare_program(handle, cfg, row, family)
            engine = inputs.runtime.engine
            _append(out, trace_program(handle, cfg, prog, sigma, window, width, engine))
            bar.update(1)
    dataset = Dataset.from_dict(out, features=features(len(cfg.kinds), handle.n_layers, width))
    return Built(dataset, {"sigma": sigma, "window": window, "programs": len(rows)})


def build(inputs: Inputs, cfg: TracingConfig) -> Built:
    """All programs in one go (the executor uses the shards; this is for direct calls)."""
    from datasets import concatenate_datasets

    shards = [build_shard(inputs, cfg, i) for i in range(n_shards(inputs, cfg))]
    rows = concatenate_datasets([s.rows for s in shards])
    return Built(rows, {**shards[0].stats, "programs": len(rows)})


def trace_program(
    handle: ModelHandle,
    cfg: TracingConfig,
    prog: _Program,
    sigma: float,
    window: int,
    width: int,
    engine: str = "auto",
) -> dict[str, Any]:
    """One row: the program's causal trace, grids padded with NaN to ``width`` positions."""
    row = prog.row
    seeds = noise_seeds(cfg.seed, f"{row['pair_id']}/{cfg.program}", cfg.n_samples)
    corruption = Corruption(tuple(prog.positions), tuple(seeds), sigma)
    result = trace(
        handle,
        prog.ids,
        prog.target,
        corruption,
        kinds=cfg.kinds,
        window=window,
        method=engine,  # type: ignore[arg-type]
    )
    grid = np.full((len(cfg.kinds), handle.n_layers, width), np.nan, dtype=np.float32)
    restored, effect = grid.copy(), grid.copy()
    restored[:, :, : len(prog.ids)] = result.restored_prob
    effect[:, :, : len(prog.ids)] = result.indirect_effect
    return {
        "pair_id": row["pair_id"],
        "program": cfg.program,
        "divergence_index": row["divergence_index"],
        "affects_query": row["affects_query"],
        "n_tokens": len(prog.ids),
        "input_ids": prog.ids,
        "tokens": prog.tokens,
        "corrupt": cfg.corrupt,
        "corrupted_positions": prog.positions,
        "target_id": prog.target,
        "target_label": handle.tokenizer.convert_ids_to_tokens([prog.target])[0],
        "sigma": sigma,
        "window": window,
        "kinds": list(cfg.kinds),
        "layers": result.layers,
        "seeds": seeds,
        "clean_prob": result.clean_prob,
        "corrupted_prob": result.corrupted_prob,
        "corrupted_probs": result.corrupted_probs.tolist(),
        "restored": restored,
        "indirect_effect": effect,
    }


def _append(out: dict[str, list], values: dict[str, Any]) -> None:
    for name, value in values.items():
        out[name].append(value)


def artifacts(rows: Dataset, cfg: TracingConfig, inputs: Inputs) -> dict[str, Artifact]:
    """``aie.npy`` (by position), ``aie_roles.npy`` (by role), ``aie.json`` (their axes) and the
    three-panel causal-trace chart (``causal-trace.html/.png``, ``plots.tracing_chart``)."""
    import io

    from seqpatch.plots import tracing_chart_artifacts

    summary = aie(rows)

    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    first = rows[0]
    index = {
        "metric": "indirect_effect (P_restored - P_corrupted), mean over programs",
        AIE_FILE: ["divergence_index", "kind", "layer", "position"],
        AIE_ROLES_FILE: ["kind", "layer", "role"],
        "kinds": summary["kinds"],
        "layers": summary["layers"],
        "divergence_indices": summary["divergence_indices"],
        "roles": summary["roles"],
        "corrupt": cfg.corrupt,
        "program": cfg.program,
        "window": int(first["window"]),
        "sigma": float(first["sigma"]),
        "n_samples": cfg.n_samples,
        "n_programs": len(rows),
        "clean_prob_mean": float(np.mean(rows["clean_prob"])),
        "corrupted_prob_mean": float(np.mean(rows["corrupted_prob"])),
    }
    return {
        AIE_FILE: npy(summary["by_position"]),
        AIE_ROLES_FILE: npy(summary["by_role"]),
        AIE_INDEX_FILE: json.dumps(index, indent=2) + "\n",
        **tracing_chart_artifacts(rows, inputs.specs[0] if inputs.specs else None, cfg.noise_scale),
    }
