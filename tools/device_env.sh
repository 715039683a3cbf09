# Sourced by the device scripts (tools/device_check.sh, tools/device_bench.sh) on a lent GPU machine:
# unbuffered output, $OUT made, the carried .whl wheels (opacus, submitit: the machine cannot reach
# PyPI) installed beside the machine's own torch, the checkout on PYTHONPATH, the card named.
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
