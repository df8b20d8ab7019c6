"""Print the numbers of a chain study (``scripts/study_pretrained.py``) that the README quotes.

For each finished step of ``<data-dir>/study.json`` (and of ``study-*.json``, steps run beside
it): the chosen (format, length) and the probe's solve rates; per site and token role the mean
normalised patching effect by layer, summarised as the strongest layer and the last layer (as a
fraction of depth) where the effect is still ≥ 0.5; the whole-stream ``before-last`` /
``last`` crossing; the strongest heads; the tracing calibration and the kind, layer and role of
the largest average indirect effect; DAS's full-patch IIA and the smallest k within tolerance,
with its controls. Steps not built yet are said to be missing, never guessed.

    python scripts/study_summary.py /work/studies/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from seqpatch import depth
from seqpatch.stages.patching import aggregate
from seqpatch.store import Store

ROLES = (
    "hop0:value+1", "hop0:value", "hop0:end", "hop1:value", "hop1:end", "hop2:value", "hop2:end",
    "question:0", "question:1", "last",
)  # fmt: skip


def patching_summary(rows, version: str) -> None:
    agg = aggregate(rows, "normalised")
    layers = agg["layers"]
    n_layers = len(layers)
    print(
        f"  patching {version}: {len(set(rows['pair_id']))} pairs, roles per k: "
        f"{ {k: len(v) for k, v in agg['labels'].items()} }"
    )
    for si, site in enumerate(agg["sites"]):
        for role in ROLES:
            cells = []
            for ki, k in enumerate(agg["divergence_indices"]):
                if role in agg["labels"][k]:
                    c = agg["labels"][k].index(role)
                    n = agg["stats"][si, ki, 2, :, c]
                    cells.append((agg["stats"][si, ki, 0, :, c], n))
            if not cells:
                continue
            counts = np.stack([n for _, n in cells])
            means = np.stack([m for m, _ in cells])
            with np.errstate(invalid="ignore"):
                pooled = np.nansum(means * counts, 0) / counts.sum(0)
            best = int(np.nanargmax(np.abs(pooled)))
            held = [li for li in range(n_layers) if pooled[li] >= 0.5]
            last_held = f"{held[-1]} ({(held[-1] + 1) / n_layers:.2f} of depth)" if held else "-"
            print(
                f"    {site:9s} {role:13s} max {pooled[best]:+.2f} at layer {layers[best]}; "
                f"≥0.5 up to layer {last_held}; pairs {int(counts.sum(0).max())}"
            )


def finished_shards(folder: Path):
    """The rows of every finished shard of a version still being built (``<v>.partial``)."""
    from datasets import Dataset, concatenate_datasets

    shards = sorted(p for p in folder.glob("shard-*") if (p / "dataset_info.json").exists())
    return concatenate_datasets([Dataset.load_from_disk(str(p)) for p in shards])


def stream_summary(store: Store, record: dict) -> None:
    means = {}
    for span in ("before-last", "last"):
        step = record["steps"].get(f"stream-{span}")
        if not step:
            print(f"  stream-{span}: not built yet")
            return
        rows = store.load("patching", step["version"]).with_format("numpy")
        means[span] = np.nanmean(np.asarray(rows["normalised"], dtype=float), axis=0)
    cross = [i for i in range(len(means["last"])) if means["last"][i] > means["before-last"][i]]
    first = cross[0] if cross else None
    print(f"  whole stream: before-last {np.round(means['before-last'], 2).tolist()}")
    print(f"                last        {np.round(means['last'], 2).tolist()}")
    print(f"  the last token carries more than the rest from layer {first}")


def heads_summary(store: Store, version: str) -> None:
    rows = store.load("patching", version)
    agg = aggregate(rows, "normalised")
    # [layers, heads]: the mean over every pair (each divergence index weighted by its pairs),
    # as seqpatch.depth.top_heads reports it
    means, counts = agg["stats"][0, :, 0], agg["stats"][0, :, 2]
    mean = (np.nan_to_num(means) * counts).sum(0) / counts.sum(0)
    order = np.argsort(-np.nan_to_num(mean, nan=-9).ravel())[:5]
    tops = [
        (
            int(agg["layers"][i // mean.shape[1]]),
            int(i % mean.shape[1]),
            round(float(mean.ravel()[i]), 3),
        )
        for i in order
    ]
    print(f"  heads {version}: top (layer, head, mean normalised) {tops}")


def tracing_summary(store: Store, version: str) -> None:
    from seqpatch.stages.tracing import aie

    ref = store.find("tracing", version)
    rows = store.load("tracing", version)
    calibration = ref.provenance["extra"].get("calibration")
    summary = aie(rows)
    by_role = summary["by_role"]  # [kinds, layers, roles]
    k, li, r = np.unravel_index(np.nanargmax(by_role), by_role.shape)
    print(
        f"  tracing {version}: {len(rows)} programs, clean {np.mean(rows['clean_prob']):.3f}, "
        f"corrupted {np.mean(rows['corrupted_prob']):.3f}, ν {rows[0]['noise_scale']}, "
        f"calibration {calibration}"
    )
    print(
        f"    largest AIE {by_role[k, li, r]:.3f}: {summary['kinds'][k]} at layer "
        f"{summary['layers'][li]}, role {summary['roles'][r]}"
    )


def das_summary(store: Store, version: str) -> None:
    ref = store.find("das", version)
    summary = json.loads((ref.path / "summary.json").read_text())
    print(f"  das {version}: {json.dumps(summary)[:1500]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument(
        "--partial-patching",
        type=Path,
        help="a patching version folder still being built (<data-dir>/patching/<v>.partial): "
        "summarise its finished shards, labelled as such",
    )
    args = parser.parse_args()
    record = depth.open_study(args.data_dir).record  # study.json and its side records
    store = Store(args.data_dir)
    steps = record["steps"]
    print(f"{record['model']}: chosen {record.get('chosen')}, probe {record.get('probe')}")
    for name, step in steps.items():
        print(
            f"  step {name}: {step['seconds']} s, {step['pairs']} pairs, "
            f"{step['pairs_per_minute']} pairs/min"
        )
    if "patching" in steps:
        version = steps["patching"]["version"]
        patching_summary(store.load("patching", version), version)
    elif args.partial_patching:
        rows = finished_shards(args.partial_patching)
        print(f"  patching: NOT FINISHED; {len(set(rows['pair_id']))} pairs of its finished shards")
        patching_summary(rows, args.partial_patching.name)
    else:
        print("  patching: not built yet")
    stream_summary(store, record)
    for name, fn in (("heads", heads_summary), ("tracing", tracing_summary), ("das", das_summary)):
        if name in steps:
            fn(store, steps[name]["version"])
        else:
            print(f"  {name}: not built yet")


if __name__ == "__main__":
    main()
