"""How many torch threads to use, by model size: 1 vs 2 threads, quiet and with a competitor.

On a 2-core laptop another process nearly always wants a core. This script times the forward
pass the patching sweep runs most (a batch of ``--batch`` prompts of ``--tokens`` tokens, no
gradient) for models of several sizes, with 1 and 2 torch threads, first on a quiet machine and
then while one CPU-bound process it starts itself spins on a core. The crossover — the size
below which one thread is not slower even when quiet, and much faster when loaded — is
``seqpatch.threads.SINGLE_THREAD_BELOW``. ``--append`` writes the table to docs/benchmarks.md.

    python scripts/bench_threads.py --append
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import time
from datetime import date
from pathlib import Path

from _bench import command_line, competing_process, print_and_append

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

SIZES = {  # name: (layers, d_model, heads, kv heads, d_ff, vocab)
    "organism-sized (4 × 128)": (4, 128, 8, 8, 256, 64),
    "small (6 × 256)": (6, 256, 8, 8, 1024, 4096),
    "medium (12 × 512)": (12, 512, 8, 8, 2048, 16384),
    "SmolLM2-135M-shaped (30 × 576)": (30, 576, 9, 3, 1536, 49152),
}


def _model(layers: int, d: int, heads: int, kv: int, d_ff: int, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=d_ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def _time(model, ids, threads: int, repeats: int) -> float:
    import torch

    torch.set_num_threads(threads)
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    import torch

    rows = []
    for name, dims in SIZES.items():
        model = _model(*dims)
        n_params = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, dims[-1], (args.batch, args.tokens))
        quiet = {t: _time(model, ids, t, args.repeats) for t in (1, 2)}
        with competing_process():
            loaded = {t: _time(model, ids, t, args.repeats) for t in (1, 2)}
        rows.append((name, n_params, quiet, loaded))
        print(
            f"{name}: {n_params:,} params; quiet 1t {quiet[1] * 1e3:.1f} ms, 2t "
            f"{quiet[2] * 1e3:.1f} ms; loaded 1t {loaded[1] * 1e3:.1f} ms, 2t "
            f"{loaded[2] * 1e3:.1f} ms",
            flush=True,
        )
    command = command_line("scripts/bench_threads.py")
    lines = [
        "",
        "## Threads",
        "",
        f"`{command}` ({date.today().isoformat()}, {platform.machine()}, torch "
        f"{torch.__version__}, {multiprocessing.cpu_count()} cores): median of {args.repeats} "
        f"no-grad forwards of a [{args.batch}, {args.tokens}] batch (random-weight Llamas); "
        "'loaded' = while one CPU-bound process the script starts spins on a core.",
        "",
        "| model | parameters | quiet 1 thread (ms) | quiet 2 threads (ms) | loaded 1 thread (ms) "
        "| loaded 2 threads (ms) | loaded 2t / 1t |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n_params, quiet, loaded in rows:
        lines.append(
            f"| {name} | {n_params:,} | {quiet[1] * 1e3:.1f} | {quiet[2] * 1e3:.1f} | "
            f"{loaded[1] * 1e3:.1f} | {loaded[2] * 1e3:.1f} | {loaded[2] / loaded[1]:.2f}× |"
        )
    text = "\n".join(lines) + "\n"
    print_and_append(text, DOCS, args.append)


if __name__ == "__main__":
    main()
