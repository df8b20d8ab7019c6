"""Causal tracing on the organism: the batched compute-floor trace vs ROME's naive loop.

The naive loop is ROME's ``trace_important_states``/``trace_important_window``: one forward per
restored (kind, layer, position), its batch the noise samples, the restoration set by plain
hooks. Both compute every cell of every kind for the same programs, noise and σ; the script
prints their largest disagreement and the speed ratio.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_tracing.py --programs 8 --seq-len 8 --repeats 1
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from seqpatch.interventions.sites import hooked
from seqpatch.interventions.tracing import (
    KIND_SITES,
    KINDS,
    Corruption,
    default_window,
    embedding_std,
    noise_seeds,
    trace,
    window_layers,
)
from seqpatch.models import load_model
from seqpatch.organism import organism_family
from seqpatch.stages.tracing import statement_positions


def naive(handle, ids, target, corruption, window):
    """``[kinds, layers, positions, samples]``: one plain-hook forward per restored cell."""
    n, length, n_layers = corruption.n_samples, len(ids), handle.n_layers
    batch = torch.tensor([ids] * n)
    clean: dict = {}

    def keep(key):
        def fn(x):
            clean[key] = x[0].clone()

        return fn

    sites = {(site, layer) for site in KIND_SITES.values() for layer in range(n_layers)}
    with torch.no_grad(), hooked(handle, {key: keep(key) for key in sites}):
        handle.hf_model(input_ids=batch[:1])
    noise = corruption.noise(handle.d_model)
    pos = torch.tensor(corruption.positions)

    def add_noise(_m, _a, out):
        out = out.clone()
        out[:, pos] += noise.to(out.dtype)
        return out

    def restore(value, t):
        def fn(x):
            x = x.clone()
            x[:, t] = value
            return x

        return fn

    out = np.empty((len(KINDS), n_layers, length, n))
    embed = handle.submodule(handle.adapter.embed).register_forward_hook(add_noise)
    try:
        for k, kind in enumerate(KINDS):
            site = KIND_SITES[kind]
            for layer in range(n_layers):
                group = [layer] if kind == "resid" else window_layers(layer, window, n_layers)
                for t in range(length):
                    hooks = {(site, j): restore(clean[(site, j)][t], t) for j in group}
                    with torch.no_grad(), hooked(handle, hooks):
                        logits = handle.hf_model(input_ids=batch).logits[:, -1]
                    out[k, layer, t] = torch.softmax(logits.double(), -1)[:, target].numpy()
    finally:
        embed.remove()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--programs", type=int, default=8, help="program i corrupts statement i mod seq-len"
    )
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings")
    args = parser.parse_args()
    torch.set_num_threads(1)
    handle = load_model("builtin")
    fam = organism_family()
    sigma = 3 * embedding_std(handle)
    window = default_window(handle.n_layers)
    cases = []
    for i in range(args.programs):
        prog = fam.sample(args.seq_len, random.Random(i))
        prompt = handle.prompt_format.prompt(prog)
        ids = handle.prompt_ids(prog)
        target = handle.answer_token_ids([prog.answer], prompt=prompt)[0][0]
        statement = statement_positions(handle, prog, prompt)[i % args.seq_len]
        seeds = tuple(noise_seeds(0, f"bench-{i}", args.samples))
        cases.append((ids, target, Corruption(tuple(statement), seeds, sigma)))

    def run(fn):
        best, result = float("inf"), None
        for _ in range(args.repeats):
            begin = time.perf_counter()
            result = [fn(*case) for case in cases]
            best = min(best, time.perf_counter() - begin)
        return best, result

    torch.set_grad_enabled(False)
    t_fast, fast = run(lambda ids, target, c: trace(handle, ids, target, c).restored)
    t_naive, slow = run(lambda ids, target, c: naive(handle, ids, target, c, window))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(fast, slow, strict=True))
    cells = sum(len(KINDS) * handle.n_layers * len(ids) for ids, _, _ in cases)
    print(
        f"organism ({handle.n_layers} layers), {args.programs} programs of {args.seq_len} "
        f"statements ({cells} restored cells x {args.samples} samples, window {window})"
    )
    print(f"naive loop (one forward per cell): {t_naive:.3f} s")
    print(f"batched compute-floor trace:       {t_fast:.3f} s")
    print(f"speed ratio {t_naive / t_fast:.1f}x, max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
