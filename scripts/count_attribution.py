"""Count the forward work of attribution patching on the restart core (no timing).

Every ``RestartableRun`` that ``attribution.estimates`` builds is recorded: a base run's work is
its rows × the layers it ran (``depth``: ``upto`` or all) × tokens, a restart's is the core's own
counter (``counters.token_layers``). Random token pairs (targets differ from sources in their
second half), seed 0.

    python scripts/count_attribution.py --model smollm2-135m-instruct --site resid_pre
    python scripts/count_attribution.py --model smollm2-135m-instruct --layers 5,9

The work floor it checks: the sources' forward plus the targets' forward, ``2·b·L·T``
token-layers at most (less when the highest swept layer is below the last), and one backward.
"""

from __future__ import annotations

import argparse

import torch

from seqpatch.interventions import attribution
from seqpatch.interventions.restart import RestartableRun
from seqpatch.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--site", default="resid_pre")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--layers", default=None, help="comma-separated (default: every layer)")
    args = parser.parse_args()
    runs: list[RestartableRun] = []

    class Counted(RestartableRun):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            runs.append(self)

    attribution.RestartableRun = Counted  # type: ignore[misc]
    handle = load_model(args.model)
    n, length = args.pairs, args.tokens
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(100, 1000, (n, length), generator=gen)
    tgt = src.clone()
    tgt[:, length // 2 :] = torch.randint(100, 1000, (n, length - length // 2), generator=gen)
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    attribution.estimates(handle, src, tgt, args.site, list(range(100, 110)), 0, 1, layers=layers)
    base = [r.n * r.depth * r.length for r in runs]
    restarts = sum(r.counters.token_layers for r in runs)
    forwards = sum(r.counters.forwards for r in runs)
    n_layers = handle.n_layers
    print(
        f"{args.model}: L={n_layers}, {n} pairs of {length} tokens, site {args.site}, layers "
        f"{args.layers or 'all'}, path {runs[0].method}"
    )
    print(f"forwards {forwards}: base runs of depths {[r.depth for r in runs]} + restarts")
    print(
        f"forward token-layers {sum(base) + restarts:,}: base runs {base}, restart {restarts} "
        f"(2*b*L*T = {2 * n * n_layers * length:,})"
    )


if __name__ == "__main__":
    main()
