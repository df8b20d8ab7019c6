"""Attribution patching against exact patching on the organism: agreement per site and speed.

Builds (or reuses) a pairs stage of the organism, then for every site sweeps the same pairs
twice — exactly (``interventions.sweep``, its fastest path: compute floor + skipped no-op cells)
and by attribution (``interventions.attribution.attribution_sweep``: per batch of pairs a
capture-only base run of the sources, a base run of the targets up to the lowest swept layer, one
differentiable restart of the targets from there and one backward, on the restart core) — and compares the estimated change of the logit difference
LD = logit(A) − logit(B) cell by cell (``attribution.compare_methods``): Spearman over all cells
and over the cells that move, top-20 recall of each pair's exact top cells, top-20 recall on the
heatmap (mean over pairs per divergence index, layer and position), and the time ratio. A second
table lists each site's strongest exact heatmap cells beside their estimates — where AtP misses —
and a third value: the exact patch rerun with every layer's attention pattern frozen to the
target's. Where that frozen value is close to the exact one, the cell's effect does not travel
through a change of attention pattern, and AtP*'s QK fix (Kramár et al. 2024: recompute the
attention softmax exactly for query/key contributions) cannot close the gap.

    python scripts/bench_attribution.py                      # 300 pairs, ~1-2 minutes
    python scripts/bench_attribution.py --pairs 300 --append

``--append`` adds the tables, and the command that made them, to the end of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from seqpatch import metrics
from seqpatch.interventions import candidate_logits, sweep
from seqpatch.interventions.attribution import attribution_sweep, compare_methods

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Attribution patching vs exact"


def build_pairs(data_dir: Path, model: str, n_pairs: int, seq_len: int, divergence: str):
    from seqpatch.executor import execute
    from seqpatch.pipeline import pairs_config
    from seqpatch.stages.base import ModelCache
    from seqpatch.store import Store

    store, models = Store(data_dir), ModelCache()
    cfg, parents = pairs_config(model, seq_len=seq_len, divergence=divergence, n_pairs=n_pairs)
    ref = execute("pairs", cfg, parents, store=store, models=models, progress=False)
    return store.load("pairs", ref.version), models.get(model)


def rows_for(pairs, site: str, logits: torch.Tensor, width: int) -> list[dict]:
    """Patching-stage-like rows (the keys ``compare_methods`` reads) of one readout."""
    out = []
    ld = metrics.logit_diff(
        logits, np.asarray(pairs["answer_index_a"]), np.asarray(pairs["answer_index_b"])
    ).numpy()
    for i, pid in enumerate(pairs["pair_id"]):
        grid = np.full((ld.shape[1], width), np.nan)
        grid[:, : ld.shape[2]] = ld[i]
        out.append(
            {
                "pair_id": pid,
                "site": site,
                "divergence_index": pairs["divergence_index"][i],
                "logit_diff": grid,
                "baseline_logits_b": pairs["_base_b"][i],
                "answer_index_a": pairs["answer_index_a"][i],
                "answer_index_b": pairs["answer_index_b"][i],
            }
        )
    return out


class FrozenAttention:
    """Eager attention whose probabilities can be recorded from one run and reused in another.

    Registered as an attention implementation of the model for the block; ``record`` keeps each
    layer's pattern ``[B, heads, T, T]``, ``freeze`` replaces the computed pattern by the kept one
    (values still come from the current run).
    """

    NAME = "seqpatch_frozen_bench"

    def __init__(self, handle) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(self.NAME, self._attention)
        AttentionMaskInterface.register(self.NAME, eager_mask)  # else no causal mask is built
        self.handle, self.mode, self.patterns = handle, "off", {}

    def _attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv

        out, weights = eager_attention_forward(
            module, query, key, value, attention_mask, scaling, dropout, **kw
        )
        if self.mode == "record":
            self.patterns[module.layer_idx] = weights.detach()
        elif self.mode == "freeze":
            weights = self.patterns[module.layer_idx]
            values = repeat_kv(value, module.num_key_value_groups)
            out = torch.matmul(weights, values).transpose(1, 2).contiguous()
        return out, weights

    def ld(self, src, tgt, site, layer, pos, cand, ans_a, ans_b) -> np.ndarray:
        """LD of targets with (site, layer, pos) from the sources, patterns frozen to the targets'."""
        from seqpatch.interventions.sites import capture_sites, hooked

        config = self.handle.hf_model.config
        before, config._attn_implementation = config._attn_implementation, self.NAME
        try:
            donated = capture_sites(self.handle, src, [site], [layer])[0][(site, layer)][:, pos]
            self.mode = "record"
            with torch.no_grad():
                self.handle.hf_model(input_ids=tgt)

            def put(x):
                x = x.clone()
                x[:, pos] = donated
                return x

            self.mode = "freeze"
            with torch.no_grad(), hooked(self.handle, {(site, layer): put}):
                logits = self.handle.hf_model(input_ids=tgt).logits[:, -1]
        finally:
            self.mode, config._attn_implementation = "off", before
        picked = logits.gather(-1, cand).numpy()
        rows = np.arange(len(picked))
        return picked[rows, ans_a] - picked[rows, ans_b]


def frozen_mean(frozen, pairs, src, tgt, cand, site, k, layer, pos) -> float:
    """Mean over the pairs diverging at ``k`` (and longer than ``pos``) of the frozen-pattern
    patch's change of LD; pairs of one token length run as one batch."""
    by_length: dict[int, list[int]] = {}
    for i, d in enumerate(pairs["divergence_index"]):
        if d == k and len(tgt[i]) > pos:
            by_length.setdefault(len(tgt[i]), []).append(i)
    changes = []
    for members in by_length.values():
        ans_a = np.asarray(pairs["answer_index_a"])[members]
        ans_b = np.asarray(pairs["answer_index_b"])[members]
        ld = frozen.ld(
            torch.stack([src[i] for i in members]),
            torch.stack([tgt[i] for i in members]),
            site,
            layer,
            pos,
            cand[members],
            ans_a,
            ans_b,
        )
        base = pairs["_base_b"][members]
        rows = np.arange(len(members))
        changes.append(ld - (base[rows, ans_a] - base[rows, ans_b]))
    return float(np.mean(np.concatenate(changes)))


def _answers(pairs) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(pairs["answer_index_a"][:1]), np.asarray(pairs["answer_index_b"][:1])


def misses(exact_rows, attr_rows, labels, top: int) -> list[tuple]:
    """The ``top`` heatmap cells of largest |mean exact change| and their mean estimate."""
    from seqpatch.interventions.attribution import ld_change

    by_k: dict[int, tuple[list, list]] = {}
    for ex, at in zip(exact_rows, attr_rows, strict=True):
        lists = by_k.setdefault(ex["divergence_index"], ([], []))
        lists[0].append(ld_change(ex))
        lists[1].append(ld_change(at))
    cells = []
    for k, (ex, at) in by_k.items():
        mean_ex, mean_at = np.nanmean(ex, 0), np.nanmean(at, 0)
        for layer, pos in np.ndindex(mean_ex.shape):
            if not np.isnan(mean_ex[layer, pos]):
                cells.append((abs(mean_ex[layer, pos]), k, layer, pos, mean_ex, mean_at))
    cells.sort(key=lambda c: -c[0])
    return [
        (k, layer, labels[k][pos], pos, float(ex[layer, pos]), float(at[layer, pos]))
        for _, k, layer, pos, ex, at in cells[:top]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=8, help="the main job's pairs length")
    parser.add_argument("--divergence", default="1,4,7", help="the main job's divergence indices")
    parser.add_argument("--sites", default="resid_pre,attn_out,mlp_out")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temporary one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=4, help="exact top heatmap cells listed")
    parser.add_argument("--append", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-atp-"))
    pairs, handle = build_pairs(data_dir, args.model, args.pairs, args.seq_len, args.divergence)
    pairs = pairs.to_dict()
    src = [torch.tensor(ids) for ids in pairs["input_ids_a"]]
    tgt = [torch.tensor(ids) for ids in pairs["input_ids_b"]]
    cand = torch.tensor(pairs["candidate_ids"])
    pairs["_base_b"] = candidate_logits(handle, tgt, cand).logits.numpy()
    width = max(pairs["n_tokens"])
    labels: dict[int, list[str]] = {}  # per divergence index, from its longest pair
    for i, k in enumerate(pairs["divergence_index"]):
        diff = set(pairs["diff_positions"][i])
        if len(pairs["tokens"][i]) > len(labels.get(k, [])):
            labels[k] = [t + ("*" if j in diff else "") for j, t in enumerate(pairs["tokens"][i])]

    table, miss_rows = [], []
    frozen = FrozenAttention(handle)
    noop = frozen.ld(tgt[0][None], tgt[0][None], "resid_pre", 0, 0, cand[:1], *_answers(pairs))
    clean = pairs["_base_b"][0]
    ld_clean = clean[pairs["answer_index_a"][0]] - clean[pairs["answer_index_b"][0]]
    if abs(float(noop[0]) - float(ld_clean)) > 1e-4:  # frozen patterns must reproduce the run
        raise SystemExit(f"frozen attention changed an unpatched run: {noop[0]} vs {ld_clean}")
    for site in args.sites.split(","):
        start = time.perf_counter()
        exact = sweep(handle, src, tgt, site, cand)
        t_exact = time.perf_counter() - start
        start = time.perf_counter()
        attr = attribution_sweep(
            handle, src, tgt, site, cand, pairs["answer_index_a"], pairs["answer_index_b"]
        )
        t_attr = time.perf_counter() - start
        ex_rows = rows_for(pairs, site, exact.logits, width)
        at_rows = rows_for(pairs, site, attr.logits, width)
        report = compare_methods(ex_rows, at_rows)[site]
        table.append((site, report, t_exact, t_attr))
        for k, layer, label, pos, ex, at in misses(ex_rows, at_rows, labels, args.top):
            fz = frozen_mean(frozen, pairs, src, tgt, cand, site, k, layer, pos)
            miss_rows.append((site, k, layer, label, pos, ex, at, fz))
        print(site, report, f"exact {t_exact:.2f}s attribution {t_attr:.2f}s", flush=True)

    n_cells = int(table[0][1]["cells"])
    lines = [
        f"`{shlex.join(['python', 'scripts/bench_attribution.py', *sys.argv[1:]])}` "
        f"({time.strftime('%Y-%m-%d')}, torch threads {args.threads}, {platform.machine()}, "
        f"torch {torch.__version__}):",
        "",
        f"Model `{args.model}` ({handle.n_layers} layers, d={handle.d_model}); {args.pairs} pairs "
        f"of the binding task (seq_len {args.seq_len}, divergence indices {args.divergence}); "
        f"{n_cells:,} cells per site (pairs × layers × positions). Compared: each cell's change "
        "of LD = logit(A) − logit(B) (changes below 1e-4 count as 0).",
        "",
        "| site | Spearman (all cells) | Spearman (moved cells) | top-20 recall per pair "
        "| top-20 recall, heatmap | exact (s) | attribution (s) | exact / attribution |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for site, r, t_exact, t_attr in table:
        lines.append(
            f"| `{site}` | {r['spearman']:.3f} | {r['spearman_moved']:.3f} | "
            f"{r['recall_pairs']:.3f} | {r['recall_mean']:.3f} | {t_exact:.2f} | {t_attr:.2f} | "
            f"{t_exact / t_attr:.1f}× |"
        )
    lines += [
        "",
        f"The {args.top} strongest cells of each site's exact heatmap (mean over the pairs of one "
        "divergence index k; * marks the changed token) beside the attribution estimate:",
        "",
        "| site | k | layer | token (position) | exact mean ΔLD | attribution mean ΔLD "
        "| exact, attention patterns frozen |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for site, k, layer, label, pos, ex, at, fz in miss_rows:
        lines.append(
            f"| `{site}` | {k} | {layer} | `{label}` ({pos}) | {ex:+.2f} | {at:+.2f} | {fz:+.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.append:
        with DOCS.open("a") as f:
            f.write(f"\n{SECTION}\n\n{text}\n")
        print(f"appended to {DOCS}")


if __name__ == "__main__":
    main()
