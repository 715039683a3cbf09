#!/usr/bin/env bash
# The round-time probe behind docs/REPRODUCE.md's GPU-hours, run on a lent GPU machine (never in
# CI; about 3 minutes on one H100/H200): ViT-B/16 at 224 px, every method, without and with DP-SGD,
# then the table of every paper sweep. Writes $OUT/probe_gpu.json and $OUT/gpu_hours.md.
# Usage (device tool): bash tools/device_check_paper.sh   (carry .whl: opacus/submitit wheels)
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 420 python3 tools/gpu_hours.py probe --out "$OUT/probe_gpu.json" "$@"
python3 tools/gpu_hours.py table "$OUT/probe_gpu.json" | tee "$OUT/gpu_hours.md"
