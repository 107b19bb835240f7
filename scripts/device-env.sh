# Sourced by the device scripts (gpu_check.sh, gpu_overhead.sh) on a machine with an NVIDIA GPU and
# no network: installs the wheels handed in ./.whl (the project's dependencies other than torch)
# into /tmp/site, puts their commands on PATH and names the GPU. Sets SITE (empty without wheels).
SITE=
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  SITE=/tmp/site
fi
export PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi -L
