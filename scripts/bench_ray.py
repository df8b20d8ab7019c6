"""Benchmark ``--executor ray`` against the local executor on the same patching stage.

Builds the organism's pairs once (untimed), then the same patching stage three times, each in a
fresh data dir: locally (one process), on a local Ray instance with ``--workers`` CPU actors, and
on Ray again with small shards (``--small-shard-size``: the per-shard overhead dominates). Charts are left out
(they are rendered on the driver at commit in every mode, at the same cost). Rows are checked to
be identical to the local build. Prints the timings; ``--append`` adds them, with the command,
to ``docs/benchmarks.md``.

    python scripts/bench_ray.py                         # 256 pairs, shards of 32, 2 actors
    python scripts/bench_ray.py --n-pairs 128 --shard-size 16 --append
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Ray executor"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-pairs", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--sites", default="resid_pre")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--small-shard-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--append", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    import torch

    from seqpatch import pipeline, plots
    from seqpatch.ray_executor import RayExecutor
    from seqpatch.stages import patching
    from seqpatch.store import Store

    plots.patching_chart_artifacts = lambda rows, pairs=None: {}
    sites = tuple(args.sites.split(","))
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    pairs_dir = root / "pairs-store"
    pipeline.build_pairs(
        "builtin", args.seq_len, n_pairs=args.n_pairs, data_dir=pairs_dir, progress=False
    )

    def fresh(name: str) -> Path:
        shutil.copytree(pairs_dir / "pairs", root / name / "pairs")
        return root / name

    def build(data_dir: Path, shard_size: int, **kwargs):
        start = time.perf_counter()
        ref = pipeline.build_patching(
            sites,
            activations="none",
            shard_size=shard_size,
            data_dir=data_dir,
            progress=False,
            **kwargs,
        )
        return ref, time.perf_counter() - start

    local_shards: list[float] = []
    real = patching.build_shard

    def timed(inputs, cfg, index, *rest, **kw):
        start = time.perf_counter()
        built = real(inputs, cfg, index, *rest, **kw)
        local_shards.append(time.perf_counter() - start)
        return built

    patching.build_shard = timed
    local_dir = fresh("local")
    local, local_s = build(local_dir, args.shard_size)
    patching.build_shard = real
    expected = rows_bytes(Store(local_dir).load_ref(local))

    start = time.perf_counter()
    ray.init(num_cpus=args.workers, log_to_driver=False)
    init_s = time.perf_counter() - start
    runs = []
    for shard_size in (args.shard_size, args.small_shard_size):
        executor = RayExecutor(workers=args.workers)
        data_dir = fresh(f"ray-{shard_size}")
        ref, seconds = build(data_dir, shard_size, executor=executor)
        same = None  # another shard size: the same version, other batches (float rounding)
        if shard_size == args.shard_size:
            rows = rows_bytes(Store(data_dir).load_ref(ref))
            same = ref.version == local.version and rows == expected
        runs.append((shard_size, executor, seconds, same))
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)

    n_shards = -(-args.n_pairs // args.shard_size)
    load = os.getloadavg()
    command = "python " + shlex.join(["scripts/bench_ray.py", *sys.argv[1:]])
    lines = [
        f"`{command}` ({date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} "
        f"cores, load average {load[0]:.1f} at the end, torch {torch.__version__}, "
        f"ray {ray.__version__}):",
        "",
        f"Organism, {args.n_pairs} pairs at seq_len {args.seq_len}, sites {', '.join(sites)}, "
        f"{n_shards} shards of {args.shard_size} pairs; torch threads 1 everywhere.",
        "",
        "| executor | wall (s) | fixed cost (s) | model load per actor (s) | compute per shard "
        "(s) | write per shard (s) | idle per shard (s) | rows = local |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        f"| local, 1 process | {local_s:.1f} | {local_s - sum(local_shards):.1f} | — | "
        f"{statistics.mean(local_shards):.2f} | — | — | — |",
    ]
    for shard_size, executor, seconds, same in runs:
        t = list(executor.timings.values())
        setup = max(x["setup"] for x in t)
        compute = statistics.mean(x["compute"] for x in t)
        write = statistics.mean(x["total"] - x["compute"] for x in t)
        busy = sum(x["setup"] + x["total"] for x in t)
        idle = (executor.wall * args.workers - busy) / len(t)
        fixed = seconds - sum(x["total"] for x in t) / args.workers
        lines.append(
            f"| ray, {args.workers} CPU actors, shards of {shard_size} ({len(t)} shards) | "
            f"{seconds:.1f} | {fixed:.1f} | {setup:.1f} | {compute:.2f} | {write:.2f} | "
            f"{idle:.3f} | {'—' if same is None else 'identical' if same else 'DIFFERENT'} |"
        )
    lines += [
        "",
        f"`ray.init(num_cpus={args.workers})` took {init_s:.1f} s (not in the walls above). "
        "Fixed cost = wall − (shard compute + write) / workers: for Ray, actor start, imports "
        "and model load, and the commit on the driver; locally, imports, model load and "
        "commit. Idle per shard = (actor-seconds from the first actor start to the last "
        "shard − actor-seconds in model load, compute and writes) / shards: actor process "
        "start and imports, scheduling, and the tail where one actor waits for the other.",
        "",
    ]
    print("\n".join(lines))
    if args.append:
        text = DOCS.read_text()
        if SECTION not in text:
            text = text.rstrip() + f"\n\n{SECTION}\n\n"
        DOCS.write_text(text.rstrip() + "\n\n" + "\n".join(lines))


def rows_bytes(rows) -> bytes:
    """Every row as Arrow IPC bytes: bitwise equality, NaN cells included."""
    import pyarrow as pa

    table = rows.data.table.combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


if __name__ == "__main__":
    main()
