#!/usr/bin/env bash
# The GPU checks, run on a machine with an NVIDIA GPU (python3 with a CUDA torch already there): the
# whole stack with its peers on the GPU (`swarmtrain demo`, a sweep, every epoch reported with the
# device and precision), then `bench/gpu.py` (the peer's training loop ÷ a bare loop, fp32 and bf16).
# Wheels for the project's other dependencies may be handed in ./.whl (no network there).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
. scripts/device-env.sh
root=$PWD
export PYTHONPATH=$SITE:$root:$root/libs/common:$root/services/gateway:$root/services/scheduler:$root/services/projector:$root/services/peer:$root/services/cli
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
echo "== demo on the GPU"
timeout 240 python3 -m swarmtrain.cli.main demo --peers 2 --epochs 3 2>&1 | tee "$out/demo.log" | tail -40
grep -h 'cuda\|precision' /tmp/swarmtrain-demo-*/data/logs/peer-*.log 2>/dev/null | head -5 | cut -c1-300
echo "== bench/gpu.py"
timeout 300 python3 -m bench.gpu --out "$out/gpu.md" 2>&1 | tail -40
