"""Time the main job twice in one go: on a quiet machine, then with one competing process.

Runs ``seqpatch run`` (default settings) on a fresh data dir, then again on another fresh data
dir while one CPU-bound process this script starts spins on a core, and reports both wall
times and their ratio — the issue's targets are quiet ≤ 90 s and loaded ≤ 1.5× quiet on a
2-core box. ``--append`` writes the result to docs/benchmarks.md.

    python scripts/bench_run.py --append
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from _bench import command_line, competing_process, print_and_append

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _run(extra: list[str]) -> tuple[float, list[str]]:
    with tempfile.TemporaryDirectory() as data_dir:
        command = [sys.executable, "-m", "seqpatch", "run", "--quiet", "--data-dir", data_dir]
        start = time.perf_counter()
        done = subprocess.run([*command, *extra], capture_output=True, text=True, check=True)
        return time.perf_counter() - start, done.stdout.splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--append", action="store_true")
    parser.add_argument("run_args", nargs="*", help="extra options for seqpatch run")
    args = parser.parse_args()
    quiet, lines = _run(args.run_args)
    print(f"quiet: {quiet:.1f} s", flush=True)
    with competing_process():
        loaded, _ = _run(args.run_args)
    print(f"loaded: {loaded:.1f} s ({loaded / quiet:.2f}× quiet)")
    steps = [line.strip() for line in lines if line.startswith("  ") and "rows" in line]
    command = command_line("scripts/bench_run.py")
    text = "\n".join(
        [
            "",
            "## Main job, quiet and loaded",
            "",
            f"`{command}` ({date.today().isoformat()}, {platform.machine()}, "
            f"{multiprocessing.cpu_count()} cores, fresh data dirs, default settings): "
            f"**quiet {quiet:.0f} s**, **loaded {loaded:.0f} s** with one competing CPU-bound "
            f"process (**{loaded / quiet:.2f}×**). Steps of the quiet run:",
            "",
            *[f"- {step}" for step in steps],
            "",
        ]
    )
    print_and_append(text, DOCS, args.append)


if __name__ == "__main__":
    main()
