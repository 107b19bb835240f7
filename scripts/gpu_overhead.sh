#!/usr/bin/env bash
# The round-overhead benchmark on a machine with an NVIDIA GPU (python3 with a CUDA torch already
# there): `bench/round_overhead.py` in both configurations (gpu: MLP [2048, 2048], two peers sharing
# cuda:0; cpu: MLP [512, 512]), on this tree's services, and, where ./.before holds an earlier tree's
# `libs` and `services`, on those too, side by side on the same machine.
# Wheels for the project's other dependencies may be handed in ./.whl (no network there).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-overhead}
mkdir -p "$out"
. scripts/device-env.sh
code_path() {  # the PYTHONPATH of the services under $1
  local r=$1
  echo "$SITE:$PWD:$r/libs/common:$r/services/gateway:$r/services/scheduler:$r/services/projector:$r/services/peer:$r/services/cli"
}
args=(--config ${CONFIGS:-gpu cpu} --rounds ${ROUNDS:-8} --local-epochs ${EPOCHS:-3})
echo "== after (this tree)"
PYTHONPATH=$(code_path "$PWD") timeout 280 python3 -m bench.round_overhead "${args[@]}" --json "$out/after.json" 2>&1 | tee "$out/after.md" | grep -v '^  [0-9]'
if [ -d .before/services ]; then
  echo "== before (.before)"
  PYTHONPATH=$(code_path "$PWD/.before") timeout 280 python3 -m bench.round_overhead "${args[@]}" --json "$out/before.json" 2>&1 | tee "$out/before.md" | grep -v '^  [0-9]'
fi
