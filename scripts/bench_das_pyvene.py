"""Compare pyvene's DAS intervention with seqpatch's on the organism: same result, time per step.

pyvene is not a seqpatch dependency; run this with a Python that has both (a scratch venv that
sees seqpatch's packages, ``pip install --no-deps pyvene``; ``import pyvene`` also needs
matplotlib and seaborn, which it imports at import time). ``docs/das.md`` records the result.

    /tmp/pyvene-venv/bin/python scripts/bench_das_pyvene.py

Both train one ``k``-dimensional orthonormal basis at ``resid_pre`` of one layer and position on
random token pairs with one Adam step per call, and first check that the two interchanges give
the same logits with the same basis.
"""

from __future__ import annotations

import argparse
import time

import torch

from seqpatch.interventions import das
from seqpatch.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=36)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--pos", type=int, default=19)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import pyvene

    torch.manual_seed(0)
    torch.set_num_threads(1)
    handle = load_model("builtin")
    model = handle.hf_model
    vocab = model.config.vocab_size
    n, length = args.pairs, args.tokens
    src, tgt = torch.randint(5, vocab, (n, length)), torch.randint(5, vocab, (n, length))
    labels, cand = torch.randint(0, 10, (n,)), torch.arange(10)

    config = pyvene.IntervenableConfig(
        representations=[
            pyvene.RepresentationConfig(
                args.layer, "block_input", "pos", 1, low_rank_dimension=args.k
            )
        ],
        intervention_types=pyvene.LowRankRotatedSpaceIntervention,
    )
    intervenable = pyvene.IntervenableModel(config, model)
    intervenable.disable_model_gradients()
    where = {"sources->base": ([[[args.pos]] * n], [[[args.pos]] * n])}
    ours = das.SiteInterchange(handle, "resid_pre", args.layer, args.pos, src, tgt, cand)

    (intervention,) = intervenable.interventions.values()
    basis = intervention.rotate_layer.weight.detach().T  # [k, d]
    _, out = intervenable({"input_ids": tgt}, [{"input_ids": src}], where)
    rows = torch.arange(n)
    theirs = out.logits[:, -1, cand].detach()
    mine = ours.logits(rows, das.swap(ours.base, ours.source, basis)).detach()
    print(f"max |pyvene - seqpatch| logits: {(theirs - mine).abs().max().item():.2e}")

    optimizer = torch.optim.Adam(intervenable.get_trainable_parameters(), lr=1e-2)

    def pyvene_steps() -> None:
        for _ in range(args.steps):
            _, out = intervenable({"input_ids": tgt}, [{"input_ids": src}], where)
            loss = torch.nn.functional.cross_entropy(out.logits[:, -1, cand], labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def seqpatch_steps() -> None:
        train = das.TrainConfig(epochs=args.steps, batch_size=n)
        das.train_bases(ours, [das.BasisSpec(args.k, labels, 0)], rows, rows[:0], train)

    for name, run in (("pyvene", pyvene_steps), ("seqpatch", seqpatch_steps)):
        run()  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(
            f"{name}: {cpu / args.steps * 1e3:.0f} ms CPU / step, "
            f"{wall / args.steps * 1e3:.0f} ms wall / step "
            f"({n} pairs × {length} tokens, resid_pre L{args.layer} · {args.pos}, k={args.k})"
        )


if __name__ == "__main__":
    main()
