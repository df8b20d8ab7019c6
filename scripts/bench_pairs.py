"""Benchmark the pairs stage: how long ``n`` valid counterfactual pairs take from a model.

Target (issue: the pairs stage): 2,000 valid pairs from the organism in under 2 minutes on 2
CPU cores. Builds into a fresh temporary data dir (nothing reused), prints the wall time, the
acceptance rate and the rejection counts, and with ``--append`` adds them, with the command, to
``docs/benchmarks.md``.

    python scripts/bench_pairs.py                       # builtin, seq_len 8, 2000 pairs
    python scripts/bench_pairs.py --seq-len 6 --n-pairs 500 --append
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Pairs stage"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--n-pairs", type=int, default=2000)
    parser.add_argument("--divergence-index", default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--append", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from seqpatch.models import load_model
    from seqpatch.pipeline import build_pairs

    start = time.perf_counter()
    handle = load_model(args.model)
    loaded = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as data_dir:
        start = time.perf_counter()
        ref = build_pairs(
            args.model,
            args.seq_len,
            args.divergence_index,
            args.n_pairs,
            data_dir=data_dir,
            handle=handle,
            progress=False,
        )
        seconds = time.perf_counter() - start
    extra = ref.provenance["extra"]
    rejections = ", ".join(f"{k} {v}" for k, v in extra["rejections"].items())
    command = "python " + shlex.join(["scripts/bench_pairs.py", *sys.argv[1:]])
    lines = [
        f"`{command}` ({date.today().isoformat()}, torch threads {torch.get_num_threads()}, "
        f"{platform.machine()}, torch {torch.__version__}):",
        "",
        f"- model `{args.model}` ({handle.n_params:,} parameters, loaded in {loaded:.1f} s), "
        f"seq_len {args.seq_len}, divergence index {args.divergence_index}",
        f"- **{extra['accepted']} pairs in {seconds:.1f} s** ({extra['accepted'] / seconds:.0f} "
        f"pairs/s) from {extra['candidates']} candidates "
        f"({extra['accepted'] / extra['candidates']:.1%} accepted)",
        f"- rejections: {rejections}",
        "",
    ]
    print("\n".join(lines))
    if args.append:
        text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
        if SECTION not in text:
            text = text.rstrip() + (
                f"\n\n{SECTION}\n\n`scripts/bench_pairs.py` builds the pairs stage from scratch "
                "(fresh data dir, model already loaded) and times it. Target: 2,000 valid pairs "
                "from the organism in under 2 minutes on 2 CPU cores.\n"
            )
        DOCS.write_text(text.rstrip() + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
