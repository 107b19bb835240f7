#!/usr/bin/env bash
# P1 on a machine with an NVIDIA GPU (python3 with a CUDA torch already there): the four model
# kinds (mlp, cnn, resnet, transformer language model), the peer's `trainer.train` ÷ a bare loop,
# bf16 (then fp32 if time is left), with GPU utilisation and model FLOPs utilisation
# (`bench/p1_training.py`). Through the `device` tool, from the repository root:
#     bash scripts/gpu_p1.sh                 # $OUT/p1-bf16.json, $OUT/p1-bf16.md
# Wheels for the project's other dependencies may be handed in ./.whl (no network there), as for
# scripts/gpu_check.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-p1}
mkdir -p "$out"
. scripts/device-env.sh
r=$PWD
export PYTHONPATH=$SITE:$r:$r/libs/common:$r/libs/training:$r/libs/api:$r/services/gateway:$r/services/scheduler:$r/services/projector:$r/services/peer:$r/services/cli
for dtype in ${DTYPES:-bf16 fp32}; do
  echo "== bench/p1_training.py --device cuda --dtype $dtype"
  timeout "${LIMIT_S:-280}" python3 -m bench.p1_training --device cuda --dtype "$dtype" --out "$out/p1-$dtype.json" \
    ${MODELS:+--models $MODELS} 2>&1 | tee "$out/p1-$dtype.md" | grep -v '^  model'
done
