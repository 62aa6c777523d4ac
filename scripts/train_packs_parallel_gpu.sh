#!/usr/bin/env bash
# Train six candidate packs side by side on one CUDA GPU, each for the same time budget:
# ultrasound (PSFHS) and polyp (Kvasir-SEG + CVC-ClinicDB), each as
#   *-medium  MSLAU-Net dims 48-96-192-384, depths 2-2-2-2 (4.4 M parameters), from scratch
#   *-small   MSLAU-Net dims 32-64-128-256, depths 1-1-2-1 (1.3 M parameters, the shipped size)
#   *-click   the click-guided pack, continued from the shipped one
# (polyp-small continues the installed colon-polyp pack: 1.x, of the small size, when RESULTS.md's runs were
# made; from a pack of another size only the tensors of matching shape are copied.)
# Small networks leave most of a large GPU idle, so the six runs share it (and its CPU cores for the
# data loaders and the click simulation). A run that fails in its first minutes is started once more
# without mixed precision and without loader workers.
#
# Usage, from the repository root (python3 must hold torch, numpy, scipy, scikit-image, pillow, safetensors):
#   scripts/train_packs_parallel_gpu.sh DATA_ROOT OUTDIR [MINUTES]
# DATA_ROOT holds psfhs/ and polyp/ as in the shared data folder (only their train and val rows are read).
# Each run writes OUTDIR/runs/<run>/pack (with val_report.md beside it) and OUTDIR/runs/<run>.log;
# OUTDIR/summary.txt lists what finished. Compare the packs on the full validation splits with
# `python benchmarks/accuracy.py` / `python benchmarks/interactive.py` before shipping any of them.
set -uo pipefail
DATA=${1:?usage: $0 DATA_ROOT OUTDIR [MINUTES]}
OUTDIR=${2:?usage: $0 DATA_ROOT OUTDIR [MINUTES]}
MINUTES=${3:-7}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
W="$OUTDIR/runs"
mkdir -p "$W"
MEDIUM='{"dims": [48, 96, 192, 384], "depths": [2, 2, 2, 2]}'
SMALL='{"dims": [32, 64, 128, 256], "depths": [1, 1, 2, 1]}'
T0=$(date +%s)

declare -A ARGS PIDS
ARGS[us-medium]="--dataset psfhs --arch-overrides MEDIUM --batch-size 16 --workers 2 --val-limit 40 --pack-id ultrasound-fhps"
ARGS[us-small]="--dataset psfhs --arch-overrides SMALL --batch-size 16 --workers 2 --val-limit 40 --pack-id ultrasound-fhps"
ARGS[us-click]="--dataset psfhs --interactive disks --init-from ultrasound-fhps-click --arch-overrides SMALL --batch-size 16 --workers 1 --lr 0.0002 --warmup 0.02 --val-limit 12 --pack-id ultrasound-fhps-click"
ARGS[polyp-medium]="--dataset polyp --arch-overrides MEDIUM --batch-size 16 --workers 2 --val-limit 40 --pack-id colon-polyp"
ARGS[polyp-small]="--dataset polyp --init-from colon-polyp --arch-overrides SMALL --batch-size 16 --workers 2 --lr 0.0005 --val-limit 40 --pack-id colon-polyp"
ARGS[polyp-click]="--dataset polyp --interactive disks --init-from colon-polyp-click --arch-overrides SMALL --batch-size 16 --workers 1 --lr 0.0002 --warmup 0.02 --val-limit 12 --pack-id colon-polyp-click"

launch() {  # run minutes [extra flags...]
  local run=$1 minutes=$2
  shift 2
  local a=()
  for w in ${ARGS[$run]}; do
    case $w in MEDIUM) a+=("$MEDIUM") ;; SMALL) a+=("$SMALL") ;; *) a+=("$w") ;; esac
  done
  $PY -m medseg.cli train --data-root "$DATA" --arch mslaunet --config small --device "$DEVICE" --minutes "$minutes" \
    --workdir "$W" --run "$run" --fresh "${a[@]}" "$@" >> "$W/$run.log" 2>&1 &
  PIDS[$run]=$!
}

for run in "${!ARGS[@]}"; do launch "$run" "$MINUTES"; done
sleep 100
for run in "${!ARGS[@]}"; do
  if ! kill -0 "${PIDS[$run]}" 2>/dev/null && [ ! -f "$W/$run/pack/manifest.json" ]; then
    left=$(awk -v m="$MINUTES" -v e="$(( $(date +%s) - T0 ))" 'BEGIN { printf "%.2f", m - e / 60 }')
    echo "== $run stopped early: once more without mixed precision or loader workers, $left minutes" >> "$W/$run.log"
    launch "$run" "$left" --no-amp --workers 0
  fi
done
nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1 || true
wait
{
  echo "wall $(( $(date +%s) - T0 )) s, budget $MINUTES min per run, device $DEVICE"
  for run in $(printf '%s\n' "${!ARGS[@]}" | sort); do
    if [ -f "$W/$run/pack/manifest.json" ]; then echo "$run: $(grep -h -E '^trained|^pack written' "$W/$run.log" | tr '\n' ' ')"
    else echo "$run: FAILED (see $run.log)"; fi
  done
} > "$OUTDIR/summary.txt"
cat "$OUTDIR/summary.txt"
