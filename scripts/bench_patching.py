"""Benchmark the patching sweep engine against the naive loop (one nnsight trace per cell).

Both sweep the same pairs over every (layer, position) cell of one site and must agree to 1e-5
(float32), on the candidates' logits and on the full-vocabulary log-normaliser. The default
model is a random-weight Llama of the organism's size (4 layers, d_model 128, a word-level
tokenizer, ~1M parameters); ``--model builtin`` (or a folder) measures a real checkpoint. Pairs are random token sequences shaped like counterfactual pairs: equal up to
a divergence index, one token changed there, the same suffix after it.

    python scripts/bench_patching.py                      # ~1 minute on 2 CPU cores
    python scripts/bench_patching.py --model builtin --pairs 64 --append

``--transformerlens`` instead compares, in one run, TransformerLens 4.x (``pip install
'seqpatch[bench]'``) and the engine on *real pairs*: the organism's (``seqpatch build pairs
--model builtin --seq-len 6``, 40 pairs) and SmolLM2-135M-Instruct's (``--seq-len 3``, 2 pairs,
layers 0, 10, 20, 29 and 12 evenly spaced positions; ``seqpatch models install
smollm2-135m-instruct`` first), each built by
the pipeline into ``--data-dir`` (reused when stored). Grids: ``resid_pre``, ``attn_out``,
``mlp_out`` over (layer, position), ``head_z`` over (layer, head, position) and over (layer,
head) with every position patched at once. TransformerLens runs as its users run it:
``TransformerBridge.boot_transformers`` on its own copy of the model, ``run_with_cache`` of the
sources (only the patched hook kept), its ``get_act_patch_*`` function with all pairs as one
batch per cell, under ``torch.no_grad()``; its metric (the candidates' logits and the
full-vocabulary log-normaliser at the last position) is checked against the engine's. Reported
per grid: TransformerLens time ÷ engine time (median of interleaved rounds), the work ratio, the
engine's speed per token-layer against TransformerLens', and the FLOPs each side ran (counted,
every forward included) with each side's achieved GFLOP/s, against this machine's measured
``torch.mm`` float32 rate.

    python scripts/bench_patching.py --transformerlens --threads 1 --data-dir /tmp/bench-pairs

``--append`` adds the table, and the command that made it, to ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from seqpatch.interventions import SweepStats, first_token_ids, sweep
from seqpatch.interventions.sites import HEAD_SITES, capture_sites, head_ref, site_heads
from seqpatch.interventions.sweep import PatchSpec, patch_grid
from seqpatch.models import ModelHandle, load_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Patching sweep"
TL_SECTION = "## Patching sweep against TransformerLens on real pairs (the exact floor)"


def organism_sized_llama(folder: Path, seed: int) -> ModelHandle:
    """A random Llama with the organism's shape, saved and loaded like any local checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqpatch.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer("wordlevel", add_bos=True)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_model(str(folder), device="cpu")


def make_pairs(handle: ModelHandle, n: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    rng = random.Random(seed)
    specials = set(handle.tokenizer.all_special_ids)
    vocab = [i for i in range(len(handle.tokenizer)) if i not in specials]
    src = torch.tensor([[rng.choice(vocab) for _ in range(length)] for _ in range(n)])
    tgt = src.clone()
    for row in range(n):
        k = rng.randrange(1, length - 1)
        tgt[row, k] = rng.choice([v for v in vocab if v != int(src[row, k])])
    return src, tgt


def naive_loop(
    handle: ModelHandle,
    src: torch.Tensor,
    tgt: torch.Tensor,
    site: str,
    cand_ids: list[int],
    axes: tuple[str, ...] = ("layer", "pos"),
    layers: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original roadmap's loop: for each pair and cell, one patched nnsight trace.

    ``axes`` as in ``PatchSpec`` (``layer,pos``; ``layer,head`` with every position patched at
    once; ``layer,head,pos``). Returns the candidates' logits ``[n, L', H', P', C]`` and the
    log-normaliser ``[n, L', H', P']`` (``H'`` = 1 without a head axis, ``P'`` = 1 without a
    position axis).
    """
    n, length = tgt.shape
    layers = list(range(handle.n_layers)) if layers is None else layers
    heads: list[int | None] = list(range(site_heads(handle, site) or 0)) or [None]
    heads = heads if "head" in axes else [None]
    positions: list[slice | int] = list(range(length)) if "pos" in axes else [slice(None)]
    shape = (n, len(layers), len(heads), len(positions))
    out = torch.empty(*shape, len(cand_ids))
    lse = torch.empty(shape)
    unembed = handle.envoy(handle.adapter.unembed)
    with torch.no_grad():
        for p in range(n):
            captured, _ = capture_sites(handle, src[p : p + 1], [site], layers)  # type: ignore[list-item]
            for li, layer in enumerate(layers):
                donor = captured[(site, layer)][0]  # [T, d] or [T, heads, d_head]
                ref = head_ref(handle, site, layer) if site in HEAD_SITES else None
                for hi, head in enumerate(heads):
                    for pi, pos in enumerate(positions):
                        with handle.trace(input_ids=tgt[p : p + 1]):
                            if ref is None:
                                handle.read(site, layer)[:, pos] = donor[pos]  # type: ignore[arg-type]
                            else:  # the o_proj input, heads side by side
                                dh = ref.d_head
                                cols = slice(head * dh, (head + 1) * dh)  # type: ignore[operator]
                                handle.envoy(ref.path).input[:, pos, cols] = donor[pos, head]
                            logits = unembed.output[:, -1].save()
                        out[p, li, hi, pi] = logits[0, cand_ids].float()
                        lse[p, li, hi, pi] = logits[0].float().logsumexp(-1)
    if axes == ("layer", "pos"):  # the layer,pos benchmark's historical shape
        return out[:, :, 0], lse[:, :, 0]
    return out, lse


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The comparison with TransformerLens (--transformerlens), on real pairs

GRIDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("resid_pre", ("layer", "pos")),
    ("attn_out", ("layer", "pos")),
    ("mlp_out", ("layer", "pos")),
    ("head_z", ("layer", "head", "pos")),
    ("head_z", ("layer", "head")),
)
# TransformerLens' function, hook name and axis order for each grid.
TL_SWEEPS = {
    ("resid_pre", ("layer", "pos")): ("get_act_patch_resid_pre", "resid_pre", ("layer", "pos")),
    ("attn_out", ("layer", "pos")): ("get_act_patch_attn_out", "attn_out", ("layer", "pos")),
    ("mlp_out", ("layer", "pos")): ("get_act_patch_mlp_out", "mlp_out", ("layer", "pos")),
    ("head_z", ("layer", "head")): ("get_act_patch_attn_head_out_all_pos", "z", ("layer", "head")),
    ("head_z", ("layer", "head", "pos")): (
        "get_act_patch_attn_head_out_by_pos",
        "z",
        ("layer", "pos", "head"),
    ),
}


@dataclass(frozen=True)
class Workload:
    """One model's share of the comparison: real pairs built by the pipeline
    (``seqpatch build pairs``), and the swept layers.

    SmolLM2 sweeps a spread of layers and, in the by-position grids, of positions (the same
    ones for every method): its real prompts are ~74 tokens, and TransformerLens runs one
    forward of every pair per cell, so the full grids would take hours on one CPU core.
    """

    spec: str  # the model spec given to ``seqpatch build pairs``
    label: str
    statements: int  # --seq-len of the pairs
    pairs: int  # pairs kept (those of the most common token length)
    layers: tuple[int, ...] | None  # None: every layer
    positions: int | None = None  # by-position grids: this many evenly spaced (None: all)

    def swept_positions(self, length: int) -> list[int]:
        """The positions the by-position grids sweep: all, or evenly spaced ending at the last."""
        if self.positions is None or self.positions >= length:
            return list(range(length))
        step = (length - 1) / (self.positions - 1)
        return sorted({round(i * step) for i in range(self.positions)})


WORKLOADS = {
    "builtin": Workload("builtin", "organism (4 layers, d 128, 8 heads)", 6, 40, None),
    "smollm2": Workload(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct (30 layers, d 576, 9 q / 3 kv heads)",
        3,
        2,
        (0, 10, 20, 29),
        12,
    ),
}


def real_pairs(
    work: Workload, data_dir: Path, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sources (A), targets (B) ``[n, T]`` and the answer candidates' token ids of pairs built
    by ``seqpatch build pairs`` (in ``data_dir``, reused when stored): the pairs of the most
    common token length, since TransformerLens patches one batch of equal-length prompts per
    cell."""
    import subprocess
    from collections import Counter

    from seqpatch.store import load_stage

    build = [
        sys.executable, "-m", "seqpatch", "build", "pairs", "--model", work.spec,
        "--seq-len", str(work.statements), "--n-pairs", str(3 * work.pairs),
        "--seed", str(seed), "--data-dir", str(data_dir),
    ]  # fmt: skip
    subprocess.run(build, check=True)
    rows = load_stage("pairs", data_dir)
    rows = [r for r in rows if r["input_ids_a"] is not None]
    length = Counter(len(r["input_ids_b"]) for r in rows).most_common(1)[0][0]
    kept = [r for r in rows if len(r["input_ids_b"]) == length][: work.pairs]
    src = torch.tensor([r["input_ids_a"] for r in kept])
    tgt = torch.tensor([r["input_ids_b"] for r in kept])
    candidates = [list(r["candidate_ids"]) for r in kept]
    if any(c != candidates[0] for c in candidates):
        raise SystemExit("the kept pairs score different candidates; build pairs of one family")
    return src, tgt, candidates[0]


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """This machine's float32 matrix-multiply rate (``torch.mm`` of ``size``² matrices)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def counted_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """The FLOPs of the matrix multiplies ``fn(*args, **kwargs)`` ran (``torch.mm``, ``bmm``,
    ``addmm``, attention kernels: ``FlopCounterMode``'s count), every forward included — the
    engine's base run, TransformerLens' ``run_with_cache``, trimmed layers as trimmed. An
    untimed call: counting slows the ops."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def transformer_lens_bridge(handle: ModelHandle, folder: str) -> Any:
    """TransformerLens' bridge over its own copy of the model (booting switches the copy to
    eager attention in place)."""
    import copy

    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as err:
        raise SystemExit(
            "--transformerlens needs TransformerLens 4.x: pip install 'seqpatch[bench]'"
        ) from err
    bridge = TransformerBridge.boot_transformers(
        folder, hf_model=copy.deepcopy(handle.hf_model), tokenizer=handle.tokenizer, device="cpu"
    )
    bridge.eval()
    return bridge


def tl_grid(
    bridge: Any,
    src: torch.Tensor,
    tgt: torch.Tensor,
    site: str,
    axes: tuple[str, ...],
    layers: list[int],
    n_heads: int,
    cand_ids: list[int],
    positions: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TransformerLens' sweep of the same cells: logits ``[n, L', H', P', C]``, lse, and its
    metric per cell ``[L', H', P']`` (mean over pairs of logit(cand 0) − logit(cand 1)).

    All pairs form one batch per cell, as TransformerLens' patching functions run; the cells
    are given as an ``index_df`` (the swept layers only). The metric records the candidates'
    logits and the full-vocabulary log-normaliser of every patched forward.
    """
    import itertools

    import pandas as pd
    from transformer_lens import patching

    name, hook, tl_axes = TL_SWEEPS[(site, axes)]
    n = tgt.shape[0]
    values = {"layer": layers, "head": list(range(n_heads)), "pos": positions}
    index_df = pd.DataFrame(
        list(itertools.product(*(values[a] for a in tl_axes))), columns=list(tl_axes)
    )
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1].float()
        seen.append((last[:, cand_ids], last.logsumexp(-1)))
        return (last[:, cand_ids[0]] - last[:, cand_ids[1]]).mean()

    with torch.no_grad():
        _, cache = bridge.run_with_cache(src, names_filter=lambda key: key.endswith(f"hook_{hook}"))
        flat = getattr(patching, name)(
            bridge, tgt, cache, metric, index_axis_names=None, index_df=index_df
        )
    n_h = n_heads if "head" in axes else 1
    n_p = len(positions) if "pos" in axes else 1
    out = torch.empty(n, len(layers), n_h, n_p, len(cand_ids))
    lse = torch.empty(n, len(layers), n_h, n_p)
    tl_metric = torch.empty(len(layers), n_h, n_p)
    for row, (logits, norm), value in zip(
        index_df.itertuples(index=False), seen, flat, strict=True
    ):
        cell = row._asdict()
        pos = positions.index(cell["pos"]) if "pos" in cell else 0
        at = (layers.index(cell["layer"]), cell.get("head", 0), pos)
        out[(slice(None), *at)], lse[(slice(None), *at)] = logits, norm
        tl_metric[at] = value
    return out, lse, tl_metric


def engine_grid(
    handle: ModelHandle,
    src: torch.Tensor,
    tgt: torch.Tensor,
    site: str,
    axes: tuple[str, ...],
    layers: list[int],
    cand_ids: list[int],
    positions: list[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, SweepStats]:
    """The engine's sweep as ``[n, L', H', P', C]`` logits and ``[n, L', H', P']`` lse."""
    spec = PatchSpec(site, axes, layers=layers, positions=positions if "pos" in axes else None)
    result = patch_grid(handle, src, tgt, spec, cand_ids, **kwargs)
    logits, lse = result.logits, result.lse
    if "head" not in axes:
        logits, lse = logits.unsqueeze(2), lse.unsqueeze(2)
    if "pos" not in axes:
        logits, lse = logits.unsqueeze(3), lse.unsqueeze(3)
    return logits, lse, result.stats


def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def grid_name(site: str, axes: tuple[str, ...]) -> str:
    """``--grids`` names: the site, with ``_pos`` / ``_all`` for the two head grids."""
    if "head" in axes:
        return f"{site}_{'pos' if 'pos' in axes else 'all'}"
    return site


def grid_label(site: str, axes: tuple[str, ...]) -> str:
    if "head" in axes:
        where = "(layer, head, position)" if "pos" in axes else "(layer, head), all positions"
        return f"`{site}` {where}"
    return f"`{site}` (layer, position)"


def compare_transformerlens(args: argparse.Namespace) -> tuple[str, float]:
    """TransformerLens and the engine on each workload's real pairs and grids, interleaved
    rounds: the report, and the engine's largest disagreement with TransformerLens."""
    peak = matmul_gflops()
    lines = [
        f"Torch threads {torch.get_num_threads()}; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; TransformerLens {_tl_version()}. Real pairs: built by "
        "`seqpatch build pairs` (the command is in each row's model label), those of the most "
        "common token length (TransformerLens patches one equal-length batch per cell). A cell "
        "= one (pair, grid cell) patched; times are medians of "
        f"{args.rounds} interleaved rounds (TransformerLens, engine, …). *× TL*: TransformerLens' "
        "time ÷ the engine's. *Work ÷*: TransformerLens' token-layers (one decoder layer on one "
        "token; L·T per cell) ÷ the engine's (`SweepStats.token_layers`). *Speed/token-layer*: "
        "token-layers per second, engine ÷ TransformerLens (the engine's base run — one forward of "
        "sources and targets — is in its time, not in its token-layers). *FLOP ÷*: the FLOPs "
        "of every matrix multiply each side ran (projections, MLP, attention, unembedding; "
        "`torch.utils.flop_counter.FlopCounterMode`, one untimed pass of each), TransformerLens' "
        "÷ the engine's: every forward counted on both sides (the engine's base run, "
        "TransformerLens' `run_with_cache`), trimmed layers as trimmed. *GFLOP/s*: those FLOPs "
        "÷ each side's time; *rate vs TL*: the engine's ÷ TransformerLens'. This machine's "
        f"`torch.mm` 1024² float32 rate, measured in this run: {peak:.1f} GFLOP/s.",
        "",
        "| model, pairs | grid | pair-cells | TL time (s) | engine time (s) | × TL | work ÷ | speed/token-layer | FLOP ÷ | engine GFLOP/s | TL GFLOP/s | rate vs TL | max abs diff vs TL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    worst = 0.0
    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="bench-"))
    for name in args.models.split(","):
        work = WORKLOADS[name]
        if args.tl_pairs:
            work = replace(work, pairs=args.tl_pairs)
        src, tgt, cand_ids = real_pairs(work, data_dir / name, args.seed)
        handle = load_model(work.spec, device="cpu")
        folder = handle.hf_model.name_or_path
        if work.spec == "builtin":
            from seqpatch.organism import WEIGHTS_DIR

            folder = str(WEIGHTS_DIR)
        bridge = transformer_lens_bridge(handle, folder)
        layers = list(work.layers) if work.layers is not None else list(range(handle.n_layers))
        positions = work.swept_positions(src.shape[1])
        swept = "" if len(positions) == src.shape[1] else f", {len(positions)} positions swept"
        label = (
            f"{work.label}; {len(src)} pairs of {src.shape[1]} tokens{swept} "
            f"(`seqpatch build pairs --model {work.spec} --seq-len {work.statements}`)"
        )
        for site, axes in GRIDS:
            if args.grids and grid_name(site, axes) not in args.grids.split(","):
                continue
            n_heads = site_heads(handle, site) or 1
            warm_up = (handle, src[:2], tgt[:2], site, axes, layers, cand_ids, positions)
            engine_grid(*warm_up)
            t_tl, t_engine = [], []
            for _ in range(args.rounds):
                (tl_logits, tl_lse, tl_metric), seconds = timed(
                    tl_grid, bridge, src, tgt, site, axes, layers, n_heads, cand_ids, positions
                )
                t_tl.append(seconds)
                (logits, lse, stats), seconds = timed(
                    engine_grid, handle, src, tgt, site, axes, layers, cand_ids, positions
                )
                t_engine.append(seconds)
            tl_s, engine_s = statistics.median(t_tl), statistics.median(t_engine)
            tl_flops = counted_flops(
                tl_grid, bridge, src, tgt, site, axes, layers, n_heads, cand_ids, positions
            )
            engine_flops = counted_flops(
                engine_grid, handle, src, tgt, site, axes, layers, cand_ids, positions
            )
            diff = max_diff((logits, lse), (tl_logits, tl_lse))
            ours = (logits[..., 0] - logits[..., 1]).mean(0)
            diff = max(diff, (ours - tl_metric).abs().max().item())
            worst = max(worst, diff)
            work_ratio = stats.naive_token_layers / max(stats.token_layers, 1)
            per_tl = (stats.token_layers / engine_s) / (stats.naive_token_layers / tl_s)
            engine_rate, tl_rate = engine_flops / engine_s / 1e9, tl_flops / tl_s / 1e9
            lines.append(
                f"| {label} | {grid_label(site, axes)} | {stats.cells} | {tl_s:.2f} | "
                f"{engine_s:.2f} | {tl_s / engine_s:.1f}× | {work_ratio:.1f} | {per_tl:.2f}× | "
                f"{tl_flops / engine_flops:.2f} | {engine_rate:.1f} | {tl_rate:.1f} | "
                f"{engine_rate / tl_rate:.2f}× | {diff:.1e} |"
            )
            print(lines[-1], flush=True)
        del bridge
    lines += [
        "",
        f"Agreement: engine vs TransformerLens (logits, lse and its metric per cell) max abs "
        f"diff = {worst:.1e} (must be ≤ 1e-4: both run eager attention on a CPU, "
        "in different batch shapes).",
    ]
    return "\n".join(lines), worst


def _tl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help="builtin, a folder or a Hub id (default: organism-sized random Llama)",
    )
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--length", type=int, default=35, help="tokens per prompt")
    parser.add_argument("--site", default="resid_pre")
    parser.add_argument(
        "--naive-pairs",
        type=int,
        default=8,
        help="pairs timed in the naive loop (it is slow); cells/s extrapolate",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", action="store_true", help=f"append the results to {DOCS}")
    parser.add_argument(
        "--transformerlens",
        action="store_true",
        help="compare naive loop, engine and TransformerLens on resid_pre and head_z grids",
    )
    parser.add_argument(
        "--models",
        default="builtin,smollm2",
        help=f"with --transformerlens: comma-separated, of {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--tl-pairs", type=int, default=None, help="with --transformerlens: pairs per model"
    )
    parser.add_argument(
        "--grids",
        default=None,
        help="with --transformerlens: a subset of "
        + ",".join(grid_name(site, axes) for site, axes in GRIDS)
        + " (default: all)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="with --transformerlens: interleaved timing rounds"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="with --transformerlens: store for the real pairs (default: a new temporary one)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.transformerlens:
        unknown = set(args.models.split(",")) - set(WORKLOADS)
        if unknown:
            parser.error(f"unknown --models {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
        report, worst_tl = compare_transformerlens(args)
        print(report)
        if worst_tl > 1e-4:
            raise SystemExit("the engine disagrees with TransformerLens")
        if args.append:
            append(report, TL_SECTION)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            handle = organism_sized_llama(Path(tmp) / "llama", args.seed)
            model_name = "random Llama, organism-sized (4 layers, d=128)"
        else:
            handle = load_model(args.model)
            model_name = f"{args.model} ({handle.n_layers} layers, d={handle.d_model})"
        src, tgt = make_pairs(handle, args.pairs, args.length, args.seed)
        cand_ids = first_token_ids(handle, range(10), handle.prompt_format.reference_prompt())
        naive_n = min(args.naive_pairs, args.pairs)
        cells_per_pair = handle.n_layers * args.length

        naive, t_naive = timed(
            naive_loop, handle, src[:naive_n], tgt[:naive_n], args.site, cand_ids
        )
        rows = []
        reference = None
        for label, kwargs in [
            ("engine, full forwards (generic path)", {"method": "full", "skip_noops": False}),
            ("engine, compute floor", {"method": "cached", "skip_noops": False}),
            ("engine, compute floor + skip no-op cells", {"method": "cached"}),
        ]:
            stats: list[SweepStats] = []
            sweep(handle, src[:2], tgt[:2], args.site, cand_ids, **kwargs)  # warm-up
            grid, seconds = timed(
                sweep, handle, src, tgt, args.site, cand_ids, stats=stats, **kwargs
            )
            diff = max(
                (got[:naive_n] - want).abs().max().item()
                for got, want in zip(grid, naive, strict=True)
            )
            if reference is None:
                reference = grid
            rows.append((label, seconds, stats[0], diff))

    naive_rate = naive_n * cells_per_pair / t_naive
    lines = [
        f"Model: {model_name}; site `{args.site}`; {args.pairs} pairs × {handle.n_layers} layers × "
        f"{args.length} positions = {args.pairs * cells_per_pair} cells; torch threads "
        f"{torch.get_num_threads()}; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}.",
        "",
        "| method | time (s) | cells/s | speed-up vs naive | work / naive (token-layers) | forwards | max abs diff vs naive |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| naive loop, one nnsight trace per cell ({naive_n} pairs) | {t_naive:.2f} | "
        f"{naive_rate:,.0f} | 1.0× | 1.00 | {naive_n * cells_per_pair} | — |",
    ]
    for label, seconds, stats, diff in rows:
        rate = stats.cells / seconds
        lines.append(
            f"| {label} | {seconds:.2f} | {rate:,.0f} | {rate / naive_rate:.1f}× | "
            f"{stats.work_ratio:.2f} | {stats.forwards} | {diff:.1e} |"
        )
    worst = max(diff for *_, diff in rows)
    lines += [
        "",
        f"Agreement with the naive loop: max |Δlogit|, |Δlse| = {worst:.1e} (must be ≤ 1e-5).",
    ]
    report = "\n".join(lines)
    print(report)
    if worst > 1e-5:
        raise SystemExit("the engine disagrees with the naive loop by more than 1e-5")
    if args.append:
        append(report, SECTION)


def append(report: str, section: str) -> None:
    """Add ``report`` and the command that made it to ``docs/benchmarks.md``, at the end of
    ``section`` (opened at the end of the file when it has none)."""
    command = "python scripts/bench_patching.py " + shlex.join(sys.argv[1:])
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if section not in text:
        text = text.rstrip() + f"\n\n{section}\n"
    start = text.index(section) + len(section)
    end = text.find("\n## ", start)
    end = len(text) if end < 0 else end
    entry = f"\n\n`{command}` ({time.strftime('%Y-%m-%d')}):\n\n{report}\n"
    text = text[:end].rstrip() + entry + text[end:]
    DOCS.write_text(text)


if __name__ == "__main__":
    main()
