"""A chain study of one pretrained model: patching, heads, calibrated tracing and DAS, resumable.

Every step is a stored stage version (``seqpatch.store``), so rerunning the same command after
an interruption (a kill, a reboot) reuses every finished version and every finished shard of
the sharded ones, and continues where it stopped. Steps, in the order they run (so a run cut
short still leaves the most basic results):

1. ``probe`` — which prompt format and program length the model solves best *with chains*:
   for each (format, length) a small chain-pairs build (``min_depth=2``, ``changed_role=root``)
   whose solve rate (candidates answered correctly on both programs / candidates scored) is
   measured; the best rate wins (ties: the longer length, then the earlier format);
2. ``pairs`` — ``--n-pairs`` chain pairs at that (format, length);
3. ``patching`` — ``resid_pre``, ``attn_out``, ``mlp_out`` over every layer at the ``slice``
   positions (changed statement, hops, question, last), aggregated by token role;
4. ``tracing`` — ROME's causal trace with the noise calibrated (``noise_scale="auto"``) on
   ``--trace-programs`` programs;
5. ``stream-before-last`` / ``stream-last`` — whole-stream patching of ``resid_pre`` at every
   position from the divergence up to the last token, and at the last token alone;
6. ``heads`` — ``head_z`` by (layer, head) at the ``--head-layers`` layers where ``attn_out``
   patching is strongest;
7. ``das-pairs``, ``das-patching``, ``das`` — DAS needs pairs of one divergence index and one
   token length: ``--das-pairs`` chain pairs at index 0, their ``resid_pre`` slice grid, then
   DAS at the top 3 cells with random and shuffled controls, k = 1, 4, 16, 64, 55% of the
   pairs held out for test.

Each step's wall time, pair count and pairs per minute are appended to ``<data-dir>/study.json``
(kept from the run that built it when a later run reuses the version) and printed.

    nohup nice -n 15 python scripts/study_pretrained.py smollm2-135m-instruct \\
        --data-dir /work/studies/smollm2-135m-instruct >> /work/studies/smollm2.log 2>&1 &

Steps that do not need each other can run in a second process beside the main one, on a second
core: ``--steps das --record das`` builds only the DAS steps (after the shared probe and pairs,
which it reuses) and writes its timings to ``study-das.json``; ``seqpatch.depth.open_study``
reads ``study.json`` and every ``study-*.json`` as one study. Two processes that reach the same
step share its build (the store's shard locks: one computes a shard, the other waits for it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from seqpatch.executor import execute
from seqpatch.options import RuntimeSettings
from seqpatch.stages.base import ModelCache
from seqpatch.stages.das import DasConfig
from seqpatch.stages.pairs import PairsConfig, PairsStageError
from seqpatch.stages.patching import PatchingConfig, aggregate
from seqpatch.stages.tracing import TracingConfig
from seqpatch.store import Store

SITES = ("resid_pre", "attn_out", "mlp_out")
STEPS = ("patching", "tracing", "streams", "heads", "das")
CHAIN = {"family": "binding", "min_depth": 2, "changed_role": "root"}


class Study:
    """The data folder, the loaded models and the log of step timings (``study.json``)."""

    def __init__(self, model: str, data_dir: Path, record: str = "") -> None:
        self.model = model
        self.store = Store(data_dir)
        self.models = ModelCache()
        name = f"study-{record}.json" if record else "study.json"
        self.record_path = Path(data_dir) / name
        self.record: dict[str, Any] = (
            json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        )
        self.record.setdefault("model", model)
        self.record.setdefault("steps", {})

    def step(
        self,
        name: str,
        stage: str,
        cfg: Any,
        parents: dict | None,
        n_pairs: int,
        shard_size: int | None = None,
    ) -> Any:
        """Build (or reuse) one stage version and record its wall time and pairs per minute;
        ``shard_size`` pairs (tracing: programs) per resumable shard of a sharded stage."""
        start = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {stage} …", flush=True)
        runtime = RuntimeSettings(shard_size=shard_size, progress=False)
        ref = execute(stage, cfg, parents, store=self.store, models=self.models, runtime=runtime)
        seconds = time.perf_counter() - start
        old = self.record["steps"].get(name)
        if ref.reused and old and old.get("version") == ref.version:
            entry = old
        else:
            entry = {
                "stage": stage,
                "version": ref.version,
                "seconds": round(seconds, 1),
                "pairs": n_pairs,
                "pairs_per_minute": round(60 * n_pairs / seconds, 2) if seconds else None,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        self.record["steps"][name] = entry
        self.save()
        print(
            f"    {name}: {ref.version} ({entry['seconds']} s, {entry['pairs']} pairs)", flush=True
        )
        return ref

    def save(self) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        tmp.replace(self.record_path)


def spec_for(model: str, fmt: str) -> str:
    return model if fmt == "default" else f"{model}:{fmt}"


def solved_rate(extra: dict[str, Any]) -> float:
    """The share of scored candidates whose two programs the model answered correctly. (Not
    ``accepted / candidates``: the build stops at ``n`` accepted pairs, so that ratio is capped
    by the last batch's size.)"""
    rejections = extra["rejections"]
    failed = sum(rejections[r] for r in ("a_wrong", "b_wrong", "answer_is_prefix"))
    scored = extra["candidates"] - rejections["no_valid_change"]
    return (scored - failed) / scored if scored else 0.0


def probe(study: Study, formats: list[str], lengths: list[int], n: int) -> tuple[str, int]:
    """The (format, length) with the best chain-pair acceptance rate; every rate recorded."""
    rates: dict[str, float] = study.record.setdefault("probe", {})
    for fmt in formats:
        for seq_len in lengths:
            key = f"{fmt}@{seq_len}"
            cfg = PairsConfig(
                model=spec_for(study.model, fmt),
                seq_len=seq_len,
                n_pairs=n,
                batch_size=32,
                max_candidates_factor=12,
                **CHAIN,  # type: ignore[arg-type]
            )
            try:
                ref = study.step(f"probe {key}", "pairs", cfg, {"benchmark": None}, n)
                extra = ref.provenance["extra"]
                rates[key] = solved_rate(extra)
            except PairsStageError as err:  # fewer than n pairs in n * factor candidates
                print(f"    probe {key}: {err}", flush=True)
                rates[key] = 0.0
            study.save()
    best = max(
        rates.items(),
        key=lambda kv: (
            kv[1],
            int(kv[0].split("@")[1]),
            -formats.index(kv[0].split("@")[0]),
        ),
    )
    fmt, seq_len = best[0].split("@")
    study.record["chosen"] = {"format": fmt, "seq_len": int(seq_len), "acceptance": best[1]}
    study.save()
    print(f"    chosen: {fmt} at seq_len {seq_len} (acceptance {best[1]:.2f})", flush=True)
    return fmt, int(seq_len)


def top_layers(rows: Any, site: str, n: int) -> list[int]:
    """The ``n`` layers whose strongest role cell of ``site`` has the largest mean effect."""
    agg = aggregate(rows, "normalised")
    si = agg["sites"].index(site)
    with np.errstate(invalid="ignore"):
        mean = np.nanmax(np.abs(agg["stats"][si, :, 0]), axis=(0, 2))  # [layers]
    order = np.argsort(-np.nan_to_num(mean, nan=-1.0), kind="stable")
    return sorted(int(agg["layers"][i]) for i in order[:n])


def das(study: Study, spec: str, seq_len: int, n: int) -> None:
    """DAS needs pairs of one divergence index and one token length: ``n`` chain pairs at index
    0, their ``resid_pre`` slice grid, then DAS at its top 3 cells.

    55% of the studied pairs are held out for test, so that both real models keep at least 50
    (SmolLM2 has 98 pairs of one length of 150, Gemma-3 138), and the subspace sizes step by 4
    (k = 1, 4, 16, 64): a basis costs a restart from its cell per training row (11.1 s a step
    of 16 pairs × 12 bases at Gemma-3's top cell, one thread; these 4 k train 8 bases)."""
    das_pairs_cfg = PairsConfig(
        model=spec,
        seq_len=seq_len,
        n_pairs=n,
        divergence_indices=(0,),
        **CHAIN,  # type: ignore[arg-type]
    )
    das_pairs = study.step("das-pairs", "pairs", das_pairs_cfg, {"benchmark": None}, n)
    das_patch_cfg = PatchingConfig(sites=("resid_pre",), positions="slice")
    das_patching = study.step(
        "das-patching", "patching", das_patch_cfg, {"pairs": das_pairs, "activations": None}, n, 20
    )
    das_cfg = DasConfig(top_n=3, ks=(1, 4, 16, 64), split=(0.35, 0.1, 0.55))
    study.step("das", "das", das_cfg, {"pairs": das_pairs, "patching": das_patching}, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--formats", default="default,code-1shot")
    parser.add_argument("--lengths", default="3,4,5")
    parser.add_argument("--probe-pairs", type=int, default=16)
    parser.add_argument("--n-pairs", type=int, default=160)
    parser.add_argument("--trace-programs", type=int, default=30)
    parser.add_argument("--trace-samples", type=int, default=5)
    parser.add_argument("--head-layers", type=int, default=3)
    parser.add_argument("--das-pairs", type=int, default=300)
    parser.add_argument("--only", default="", help="'probe': stop after the probe")
    parser.add_argument(
        "--steps",
        default=",".join(STEPS),
        help=f"the steps to run after the pairs (of {', '.join(STEPS)}); a step another "
        "needs is built (or waited for, when another process builds it) first",
    )
    parser.add_argument(
        "--record",
        default="",
        help="write the timings to study-RECORD.json: for steps run in a second process "
        "beside the main one (seqpatch.depth reads both records as one study)",
    )
    args = parser.parse_args()
    steps = set(args.steps.split(","))
    if steps - set(STEPS):
        parser.error(f"unknown steps {sorted(steps - set(STEPS))}; choose from {STEPS}")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    study = Study(args.model, args.data_dir, args.record)
    t0 = time.perf_counter()
    formats = args.formats.split(",")
    fmt, seq_len = probe(
        study, formats, [int(x) for x in args.lengths.split(",")], args.probe_pairs
    )
    spec = spec_for(args.model, fmt)
    if args.only == "probe":
        return
    pairs_cfg = PairsConfig(model=spec, seq_len=seq_len, n_pairs=args.n_pairs, **CHAIN)  # type: ignore[arg-type]
    pairs = study.step("pairs", "pairs", pairs_cfg, {"benchmark": None}, args.n_pairs)
    n = args.n_pairs
    if steps & {"patching", "heads"}:
        patch_cfg = PatchingConfig(sites=SITES, positions="slice")
        patching = study.step(
            "patching", "patching", patch_cfg, {"pairs": pairs, "activations": None}, n, 8
        )
    if "tracing" in steps:
        trace_cfg = TracingConfig(
            noise_scale="auto",
            n_programs=args.trace_programs,
            n_samples=args.trace_samples,
        )
        study.step("tracing", "tracing", trace_cfg, {"pairs": pairs}, args.trace_programs, 2)
    if "streams" in steps:
        for span in ("before-last", "last"):
            cfg = PatchingConfig(sites=("resid_pre",), axes=("layer",), positions=span)
            parents = {"pairs": pairs, "activations": None}
            study.step(f"stream-{span}", "patching", cfg, parents, n, 40)
    if "heads" in steps:
        rows = study.store.load("patching", patching.version)
        layers = top_layers(rows, "attn_out", args.head_layers)
        study.record["head_layers"] = layers
        heads_cfg = PatchingConfig(sites=("head_z",), axes=("layer", "head"), layers=tuple(layers))
        study.step("heads", "patching", heads_cfg, {"pairs": pairs, "activations": None}, n, 20)
    if "das" in steps:
        das(study, spec, seq_len, args.das_pairs)
    study.record["total_seconds_this_run"] = round(time.perf_counter() - t0, 1)
    study.record["complete"] = steps == set(STEPS)
    study.save()
    print("study complete" if steps == set(STEPS) else f"steps {args.steps} done", flush=True)


if __name__ == "__main__":
    main()
