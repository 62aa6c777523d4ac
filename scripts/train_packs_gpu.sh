#!/usr/bin/env bash
# One prepared GPU run: train the three shipped packs with the full configs of the paper networks (and DMAF-Net),
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
# DMAF-Net (full config) and the zero-filled U-Net baseline on MyoPS, the same step schedule for both (issue 9).
MS_STEPS=${MS_STEPS:-6000}
for arch in dmafnet unet; do
  run="gpu-myops-$arch-full"
  id=$([ "$arch" = dmafnet ] && echo cardiac-myops || echo cardiac-myops-unet-baseline)
  $BIN/python -m medseg.train.multiseq --arch "$arch" --config full --device cuda --steps "$MS_STEPS" --batch-size 16 --lr 1e-3 \
    --minutes "$MINUTES" --workdir work/gpu --run "$run" --pack-id "$id" --fresh > "work/gpu/$run.log" 2>&1 \
    || echo "$run stopped or failed: see work/gpu/$run.log (a run stopped at --minutes continues with --resume)"
done
grep -H "Dice" work/gpu/*/val_report.md | head -50
tail -n 30 work/gpu/gpu-myops-*-full.log
