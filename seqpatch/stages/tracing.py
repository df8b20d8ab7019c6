"""Stage ``tracing``: ROME's causal trace of one program of each pair (Meng et al. 2022, §2.1).

One row per traced program (program B of each pair by default). The program reads its prompt
followed by the answer tokens that do not tell values apart — the pair's shared answer prefix,
and any leading whitespace-only token — and the target is the next answer token, the first one
that carries the value, read at the last position over the full vocabulary. (Tokenizers that
split `` 6`` into ``Ġ`` and ``6``, like SmolLM2's and Gemma-3's, would otherwise make every
trace measure P(``Ġ``), which no corruption of the program's values changes: schema 1 did.) The embeddings of the corrupted tokens
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

**Calibrated noise** (``noise_scale="auto"``): ν = 3 leaves some models' answers untouched
(SmolLM2: P(answer) 0.766 clean and corrupted), and a trace whose corruption does nothing has
nothing to restore. With ``auto`` the stage takes the smallest ν of ``NOISE_LADDER`` for which
the mean corrupted P(answer) over the first ``calibration_programs`` traced programs (the very
noise draws their traces use) is at most ``AUTO_FRACTION`` of their mean clean P(answer)
(``calibrate_noise``); the ladder's probabilities and the choice are recorded in provenance
(``calibration``) and the chosen ν in every row (``noise_scale``). No ν on the ladder reaching
it is an error that says so.

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
SCHEMA_VERSION = 3  # 2: the row's ν (noise_scale="auto"); 3: the target carries the value
NOISE_LADDER = (3.0, 6.0, 12.0, 24.0, 48.0, 96.0)  # ROME's ν first, then doubling
AUTO_FRACTION = 0.5  # "corrupted": mean corrupted P(answer) at most half the clean one
PARENTS = (ParentSpec("pairs"),)
AIE_FILE, AIE_ROLES_FILE, AIE_INDEX_FILE = "aie.npy", "aie_roles.npy", "aie.json"
SHARD_SIZE = 25  # programs per resumable shard


def parse_noise_scale(text: str) -> float | str:
    """``auto`` or a positive number (the CLI's ``--noise-scale``)."""
    from seqpatch.options import OptionsError

    if text.strip() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise OptionsError(f"--noise-scale takes a number > 0 or auto, not {text!r}") from None
    check_finite("noise_scale", value, OptionsError, above=0, at_most=MAX_NOISE_SCALE)
    return value


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
    noise_scale: float | str = option(
        ROME_NOISE_SCALE,
        "ν: noise σ = ν × std(input embeddings) (ROME: 3), or auto: the smallest ν of "
        f"{', '.join(f'{x:g}' for x in NOISE_LADDER)} that brings the mean P(answer) of the "
        "first --calibration-programs programs to at most half its clean value.",
        parse=parse_noise_scale,
        cli_default="3",
    )
    calibration_programs: int = option(
        10, "Programs the auto noise calibration averages over.", min=1
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
        if self.noise_scale != "auto":
            if isinstance(self.noise_scale, str):
                raise TracingStageError(
                    f"noise_scale must be a number > 0 or 'auto', got {self.noise_scale!r}"
                )
            check_finite(
                "noise_scale", self.noise_scale, TracingStageError, above=0, at_most=MAX_NOISE_SCALE
            )
        if self.calibration_programs < 1:
            raise TracingStageError(
                f"calibration_programs must be >= 1, got {self.calibration_programs}"
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
            "noise_scale": Value("float64"),
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
    stored = list(row[f"input_ids_{side}"])
    prompt_ids = stored[: int(row["n_tokens"]) - int(row["answer_prefix_len"])]
    if list(handle.tokenizer(prompt)["input_ids"]) != prompt_ids:
        raise TracingStageError(
            f"pair {row['pair_id']}: the model's tokenizer no longer reads the stored prompt as "
            "the stored input ids; rebuild the pairs stage with this model"
        )
    truth = int(row[f"ground_truth_{side}"])
    answer = handle.answer_token_ids([truth], prompt=prompt)[0]
    n = int(row["answer_prefix_len"])  # shared with the other program's answer
    while n < len(answer) - 1 and not handle.tokenizer.decode([answer[n]]).strip():
        n += 1  # a whitespace-only token says nothing about the value
    ids = prompt_ids + list(answer[:n])
    target = answer[n]
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


def sigma_for(
    handle: ModelHandle,
    cfg: TracingConfig,
    programs: list[_Program],
    noise_scale: float | None = None,
) -> float:
    """σ = ν × std: of the whole embedding matrix (``vocab``), or of the corrupted tokens of
    every traced program (``corrupted``). ν is ``noise_scale``, else the config's number."""
    if noise_scale is None:
        if cfg.noise_scale == "auto":
            raise TracingStageError("sigma_for needs ν: calibrate it first (resolve_noise)")
        noise_scale = float(cfg.noise_scale)
    if cfg.sigma_basis == "vocab":
        return noise_scale * embedding_std(handle)
    ids = [p.ids[t] for p in programs for t in p.positions]
    return noise_scale * embedding_std(handle, ids)


def corrupted_probs(handle: ModelHandle, prog: _Program, sigma: float, seeds: list[int]) -> Any:
    """P(target) at the last position, clean and under each noise draw: ``(clean, [samples])``.

    A plain forward with a forward hook on the embedding module that adds ``Corruption``'s
    noise, independent of the tracing engine (whose ``corrupted_prob`` it must equal)."""
    import torch

    corruption = Corruption(tuple(prog.positions), tuple(seeds), sigma)
    noise = corruption.noise(handle.d_model).to(handle.device)  # [samples, P, d]
    ids = torch.tensor([prog.ids] * (len(seeds) + 1), device=handle.device)
    positions = list(prog.positions)

    def add(_module: Any, _args: Any, output: Any) -> Any:
        output = output.clone()
        output[1:, positions] += noise.to(output.dtype)
        return output

    hook = handle.submodule(handle.adapter.embed).register_forward_hook(add)
    try:
        with torch.no_grad():
            logits = handle.hf_model(input_ids=ids).logits[:, -1].float()
    finally:
        hook.remove()
    probs = torch.softmax(logits, dim=-1)[:, prog.target].double().cpu().numpy()
    return float(probs[0]), probs[1:]


def calibrate_noise(
    handle: ModelHandle,
    cfg: TracingConfig,
    programs: list[_Program],
    basis: list[_Program],
    ladder: tuple[float, ...] = NOISE_LADDER,
) -> tuple[float, list[dict[str, Any]]]:
    """The smallest ν of ``ladder`` whose mean corrupted P(answer) over ``programs`` is at most
    ``AUTO_FRACTION`` × their mean clean P(answer), and every rung tried (``noise_scale,
    clean_prob, corrupted_prob, chosen``). Each program uses the noise draws its trace uses;
    ``basis`` are the programs σ's ``corrupted`` basis reads (``sigma_for``). Raises
    ``TracingStageError`` when no rung gets there."""
    steps: list[dict[str, Any]] = []
    for nu in ladder:
        sigma = sigma_for(handle, cfg, basis, nu)
        clean, corrupted = [], []
        for prog in programs:
            seeds = noise_seeds(cfg.seed, f"{prog.row['pair_id']}/{cfg.program}", cfg.n_samples)
            p_clean, p_noisy = corrupted_probs(handle, prog, sigma, seeds)
            clean.append(p_clean)
            corrupted.append(float(np.mean(p_noisy)))
        step = {
            "noise_scale": float(nu),
            "clean_prob": float(np.mean(clean)),
            "corrupted_prob": float(np.mean(corrupted)),
        }
        step["chosen"] = step["corrupted_prob"] <= AUTO_FRACTION * step["clean_prob"]
        steps.append(step)
        if step["chosen"]:
            return float(nu), steps
    last = steps[-1]
    raise TracingStageError(
        f"no noise scale up to ν = {ladder[-1]:g} brings P(answer) to half its clean value "
        f"({last['clean_prob']:.3f} clean, {last['corrupted_prob']:.3f} corrupted); corrupt "
        "more tokens (--corrupt chain) or give --noise-scale explicitly"
    )


def resolve_noise(
    handle: ModelHandle, cfg: TracingConfig, selected: Dataset, family: Family
) -> tuple[float, list[dict[str, Any]]]:
    """ν for this build: the config's number, or ``calibrate_noise`` on the first
    ``calibration_programs`` selected programs (memoized per model and config, so shards of
    one build calibrate once)."""
    if cfg.noise_scale != "auto":
        return float(cfg.noise_scale), []
    key = (id(handle), cfg, len(selected))
    if key not in _CALIBRATIONS:
        n = min(cfg.calibration_programs, len(selected))
        programs = [prepare_program(handle, cfg, row, family) for row in selected.select(range(n))]
        basis = []
        if cfg.sigma_basis == "corrupted":  # σ reads every traced program, as in the trace
            basis = [prepare_program(handle, cfg, row, family) for row in selected]
        _CALIBRATIONS[key] = calibrate_noise(handle, cfg, programs, basis)
    return _CALIBRATIONS[key]


_CALIBRATIONS: dict[tuple, tuple[float, list[dict[str, Any]]]] = {}


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
    noise_scale, calibration = resolve_noise(handle, cfg, selected, family)
    if cfg.sigma_basis == "vocab":
        sigma = sigma_for(handle, cfg, [], noise_scale)
    else:  # σ depends on every traced program, so each shard reads them all
        traced = [prepare_program(handle, cfg, row, family) for row in selected]
        sigma = sigma_for(handle, cfg, traced, noise_scale)
    begin = index * inputs.shard_size
    rows = selected.select(range(begin, min(begin + inputs.shard_size, len(selected))))
    out: dict[str, list] = {name: [] for name in features(1, 1, 1)}
    with progress_bar(len(rows), f"tracing shard {index}", enabled=inputs.progress) as bar:
        for row in rows:
            prog = prepare_program(handle, cfg, row, family)
            engine = inputs.runtime.engine
            values = trace_program(handle, cfg, prog, sigma, window, width, engine)
            _append(out, {**values, "noise_scale": noise_scale})
            bar.update(1)
    dataset = Dataset.from_dict(out, features=features(len(cfg.kinds), handle.n_layers, width))
    extra: dict[str, Any] = {"sigma": sigma, "window": window, "programs": len(rows)}
    if calibration:  # a list, so that merging shards keeps it whole (numbers would add up)
        extra["calibration"] = calibration
    return Built(dataset, extra)


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
        "noise_scale": float(first["noise_scale"]),
        "n_samples": cfg.n_samples,
        "n_programs": len(rows),
        "clean_prob_mean": float(np.mean(rows["clean_prob"])),
        "corrupted_prob_mean": float(np.mean(rows["corrupted_prob"])),
    }
    return {
        AIE_FILE: npy(summary["by_position"]),
        AIE_ROLES_FILE: npy(summary["by_role"]),
        AIE_INDEX_FILE: json.dumps(index, indent=2) + "\n",
        **tracing_chart_artifacts(
            rows, inputs.specs[0] if inputs.specs else None, float(first["noise_scale"])
        ),
    }
