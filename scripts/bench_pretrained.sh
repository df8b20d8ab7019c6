#!/usr/bin/env bash
# The three-model benchmark of the README's "Real pretrained models" section: builtin,
# SmolLM2-135M-Instruct and Gemma-3-270M on binding and arithmetic, lengths 1-10, 100 programs
# per (model, family, length), then `seqpatch choose` and the accuracy charts. Gemma-3 is not in
# CI (253 MB, minutes to convert); this script reproduces its numbers (about 30 min on one core).
#
#   bash scripts/bench_pretrained.sh [DATA_PREFIX]     # data dirs DATA_PREFIX-binding, -arithmetic
set -euo pipefail
prefix="${1:-study}"
export OMP_NUM_THREADS=1 SEQPATCH_THREADS=1
seqpatch models install smollm2-135m-instruct
seqpatch models install gemma3-270m
for fam in binding arithmetic; do
  dir="$prefix-$fam"
  seqpatch build programs --family "$fam" --seq-lens 1-10 --n-per-len 100 --seed 0 --data-dir "$dir"
  seqpatch build benchmark --models builtin,smollm2-135m-instruct,gemma3-270m --data-dir "$dir"
  seqpatch choose --min-accuracy 0.8 --min-seq-len 6 --data-dir "$dir" || true  # exit 2: none qualifies
  seqpatch plot accuracy --data-dir "$dir"
done
