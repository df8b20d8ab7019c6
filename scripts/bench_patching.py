"""Benchmark the patching sweep engine against the naive loop (one nnsight trace per cell).

Both sweep the same pairs over every (layer, position) cell of one site and must agree to 1e-5
(float32), on the candidates' logits and on the full-vocabulary log-normaliser. The default
model is a random-weight Llama of the organism's size (4 layers, d_model 128, a word-level
tokenizer, ~1M parameters); ``--model builtin`` (or a folder) measures a real checkpoint. Pairs are random token sequences shaped like counterfactual pairs: equal up to
a divergence index, one token changed there, the same suffix after it.

    python scripts/bench_patching.py                      # ~1 minute on 2 CPU cores
    python scripts/bench_patching.py --model builtin --pairs 64 --append

``--append`` adds the table, and the command that made it, to ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from seqpatch.interventions import SweepStats, first_token_ids, get_activations, sweep
from seqpatch.models import ModelHandle, load_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Patching sweep"


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


def naive_loop(handle, src, tgt, site, cand_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The original roadmap's loop: for each pair, layer and position, one patched trace.

    Returns the candidates' logits ``[n, L, T, C]`` and the log-normaliser ``[n, L, T]``.
    """
    n, length = tgt.shape
    out = torch.empty(n, handle.n_layers, length, len(cand_ids))
    lse = torch.empty(n, handle.n_layers, length)
    unembed = handle.envoy(handle.adapter.unembed)
    with torch.no_grad():
        for p in range(n):
            donor = get_activations(handle, src[p], site)[site]  # [layers, positions, d]
            for layer in range(handle.n_layers):
                for pos in range(length):
                    with handle.trace(input_ids=tgt[p : p + 1]):
                        handle.read(site, layer)[:, pos] = donor[layer, pos]
                        logits = unembed.output[:, -1].save()
                    out[p, layer, pos] = logits[0, cand_ids].float()
                    lse[p, layer, pos] = logits[0].float().logsumexp(-1)
    return out, lse


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

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
        command = "python scripts/bench_patching.py " + shlex.join(sys.argv[1:])
        text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
        if SECTION not in text:
            text = text.rstrip() + f"\n\n{SECTION}\n"
        text = text.rstrip() + f"\n\n`{command}` ({time.strftime('%Y-%m-%d')}):\n\n{report}\n"
        DOCS.write_text(text)


if __name__ == "__main__":
    main()
