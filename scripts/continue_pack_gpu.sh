#!/usr/bin/env bash
# Continue a medium MSLAU-Net pack on one CUDA GPU from its weights, at a lower peak learning rate (a second
# short warm-up and cosine), with most CPU cores as data-loader workers.
# Usage, from the repository root (python3 must hold torch, numpy, scipy, scikit-image, pillow, safetensors):
#   scripts/continue_pack_gpu.sh DATA_ROOT OUTDIR MINUTES DATASET PACK PACK_ID [LR] [WORKERS]
# e.g. scripts/continue_pack_gpu.sh ../shared/data work/gpu2 4.5 polyp work/gpu1/runs/polyp-medium/pack colon-polyp 0.0003 12
# Compare the pack with the one it started from on the full validation split before shipping it.
set -uo pipefail
DATA=${1:?usage: $0 DATA_ROOT OUTDIR MINUTES DATASET PACK PACK_ID [LR] [WORKERS]}
OUTDIR=${2:?}; MINUTES=${3:?}; DATASET=${4:?}; PACK=${5:?}; PACK_ID=${6:?}; LR=${7:-0.0003}; WORKERS=${8:-12}
PY=${PY:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
MEDIUM='{"dims": [48, 96, 192, 384], "depths": [2, 2, 2, 2]}'
mkdir -p "$OUTDIR"
$PY -m medseg.cli train --data-root "$DATA" --dataset "$DATASET" --arch mslaunet --config small --arch-overrides "$MEDIUM" \
  --device "${DEVICE:-cuda}" --minutes "$MINUTES" --batch-size 16 --warmup 0.02 --val-limit 40 --init-from "$PACK" --lr "$LR" \
  --workers "$WORKERS" --workdir "$OUTDIR" --run "$DATASET-cont" --pack-id "$PACK_ID" --fresh 2>&1 | tr '\r' '\n' | grep -v '^\s*$' > "$OUTDIR/$DATASET-cont.log"
tail -n 20 "$OUTDIR/$DATASET-cont.log"
