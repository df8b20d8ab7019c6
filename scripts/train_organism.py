"""Train the seqpatch organism from the command line (a thin wrapper of ``train_organism``).

Every field of ``OrganismTrainConfig`` is an option, e.g.::

    python scripts/train_organism.py --out seqpatch/organism/weights --seed 0
    python scripts/train_organism.py --out /tmp/organism --steps 300 --max-len 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from seqpatch.organism.train import OrganismTrainConfig, train_organism


def parse_args() -> tuple[OrganismTrainConfig, str, bool]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder that receives the trained model")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    for f in dataclasses.fields(OrganismTrainConfig):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default
        )
    args = parser.parse_args()
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(OrganismTrainConfig)}
    return OrganismTrainConfig(**values), args.out, not args.no_progress


def main() -> None:
    cfg, out, progress = parse_args()
    metrics = train_organism(cfg, out, progress=progress)
    summary = {k: metrics[k] for k in ("n_params", "train_wall_s", "train_cpu_s")}
    print(json.dumps({**summary, "accuracy_by_length": metrics["accuracy_by_length"]}, indent=2))


if __name__ == "__main__":
    main()
