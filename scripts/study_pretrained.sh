#!/usr/bin/env bash
# Start (or resume) the chain study of one pretrained model in the background, niced, logging
# to $STUDIES/<model>.log; its stages live in $STUDIES/<model>/ (outside the repository).
# The first start snapshots this checkout's seqpatch package into $STUDIES/code/ and every run
# imports that snapshot, so edits to the checkout never change a study halfway; rerunning the
# same command after a kill continues from the finished versions and shards.
#   scripts/study_pretrained.sh smollm2-135m-instruct [extra args for study_pretrained.py]
set -euo pipefail
model="$1"; shift
studies="${STUDIES:-/work/studies}"
here="$(cd "$(dirname "$0")" && pwd)"
code="$studies/code"
if [ ! -d "$code" ]; then
    mkdir -p "$code.tmp"
    cp -r "$here/../seqpatch" "$here/study_pretrained.py" "$code.tmp/"
    git -C "$here/.." rev-parse HEAD > "$code.tmp/COMMIT"
    mv "$code.tmp" "$code"
fi
mkdir -p "$studies"
echo "[$(date -u +%FT%TZ)] start: $model (code $(cat "$code/COMMIT"))" >> "$studies/$model.log"
python="${PYTHON:-$here/../.venv/bin/python}"  # the checkout's environment, the snapshot's code
PYTHONPATH="$code" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" nohup nice -n 15 \
    "$python" "$code/study_pretrained.py" "$model" --data-dir "$studies/$model" "$@" \
    >> "$studies/$model.log" 2>&1 &
echo "$!" > "$studies/$model.pid"
echo "study of $model: pid $!, log $studies/$model.log"
