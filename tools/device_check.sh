#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (never in CI), sized for one ~9-minute call:
#   1. the CUDA tests (single-process CUDA run vs CPU, batched == sequential on CUDA, the data store on the GPU)
#   2. `fedpeft-hpc bench --device cuda` (ViT-B/16 224 px, bf16, client batch 16, 32 clients per rank; the
#      data-path row included), rows appended to a copy of BENCHMARKS.md in $OUT
#   3. the round-time probe behind docs/REPRODUCE.md's GPU-hours, if time is left
# NCCL across processes needs 2 GPUs; the lent machines have one, so that test skips (and says so).
# Usage (device tool; carry .whl with the opacus and submitit wheels): bash tools/device_check.sh
set -u
source tools/device_env.sh
t0=$(date +%s)
python3 -c "import torch, timm, opacus; print('torch', torch.__version__, 'timm', timm.__version__, 'opacus', opacus.__version__, torch.cuda.get_device_name())"
echo "== 1. CUDA tests"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_batched.py tests/test_data_store.py \
    -k "gpu or cuda" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -6
echo "== 2. bench --device cuda ($(( $(date +%s) - t0 )) s so far)"
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
timeout 330 python3 -m fedpeft_hpc bench --device cuda --json --markdown "$OUT/BENCHMARKS.md" \
    > "$OUT/bench.json" 2> "$OUT/bench_stderr.txt"
echo "bench exit $?"
grep -v "it/s\|measurement/s\|s/measurement" "$OUT/bench_stderr.txt" | grep -v "^\s*$" | tail -30
python3 -c "import json; d = json.load(open('$OUT/bench.json')); print({k: d.get(k) for k in ('batched_speedup', 'batching_bound', 'fl_efficiency', 'aggregation_share', 'memory_per_client_ratio', 'two_rank_speedup')})" 2>&1 | tail -2
left=$(( 520 - ($(date +%s) - t0) ))
echo "== 3. GPU-hours probe (${left} s left)"
if [ "$left" -gt 60 ]; then
    timeout $(( left - 10 )) python3 tools/gpu_hours.py probe --out "$OUT/probe_gpu.json" 2>&1 | tail -5
    [ -f "$OUT/probe_gpu.json" ] && python3 tools/gpu_hours.py table "$OUT/probe_gpu.json" > "$OUT/gpu_hours.md" 2>&1
fi
echo "total $(( $(date +%s) - t0 )) s"
