#!/usr/bin/env bash
# One prepared GPU run: train the three shipped packs with the full configs of the paper networks,
# each for a fixed time budget, and keep each run's pack and validation report under work/gpu/.
# Usage (on a machine with a CUDA GPU, from the repository root, after `make setup`):
#   scripts/train_packs_gpu.sh [MINUTES_PER_RUN] [ARCHS]
# e.g. scripts/train_packs_gpu.sh 3 "mslaunet dcaunet"
# Then compare work/gpu/*/val_report.md, copy the winners to resources/packs/<id>/ and rerun
# `python benchmarks/accuracy.py`.
set -euo pipefail
MINUTES=${1:-3}
ARCHS=${2:-"mslaunet dcaunet medformer tcsaformer"}
BIN=${BIN:-.venv/bin}
mkdir -p work/gpu
for task in "psfhs ultrasound-fhps" "polyp colon-polyp" "glomeruli kidney-glomeruli"; do
  set -- $task
  for arch in $ARCHS; do
    run="gpu-$2-$arch-full"
    $BIN/medseg train --dataset "$1" --arch "$arch" --config full --device cuda --minutes "$MINUTES" \
      --workers 8 --run "$run" --pack-id "$2" --workdir work/gpu --fresh > "work/gpu/$run.log" 2>&1 \
      || echo "$run failed: see work/gpu/$run.log"
  done
done
grep -H "Dice" work/gpu/*/val_report.md | head -50
