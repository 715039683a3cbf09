#!/usr/bin/env bash
# Issue 16's GPU check, ONE call of at most 8 minutes on a lent GPU machine (never in CI):
#   1. the CUDA tests of the batched step (no sync under set_sync_debug_mode("error"), fused attention
#      equal to sequential, batched == sequential on CUDA)                                     ~100 s
#   2. tools/step_ab.py: ViT-B/16 224 px, BitFit, 32 clients x batch 16, 3 steps: bf16 fused vs bf16 plain
#      attention vs bf16 compiled vs fp32, each against centralized training at K*B (same precision),
#      peak memory per slot, host syncs and operators per step                                    ~200 s
#   3. fedpeft-hpc bench --device cuda --method bias: clients (batched_speedup, batching_bound,
#      ops_per_step, host_syncs_per_step), rounds (fl_efficiency), data (data share); rows appended to
#      a copy of BENCHMARKS.md in $OUT                                                             ~170 s
# Usage (device tool; carry .whl with the opacus and submitit wheels): bash tools/device_step.sh [SECONDS]
set -u
budget=${1:-470}
source tools/device_env.sh
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
echo "== 1. CUDA tests of the batched step"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_batched_step.py tests/test_batched.py -k "cuda" \
    2>&1 | tee "$OUT/gpu_tests.txt" | tail -8
echo "== 2. step variants ($(left) s left)"
timeout $(( $(left) > 210 ? 200 : $(left) - 10 )) python3 tools/step_ab.py --device cuda --steps 3 --repeats 2 \
    --json "$OUT/step_ab.json" > "$OUT/step_ab.txt" 2>&1
echo "exit $?"; grep -v "^ \|^{\|^}" "$OUT/step_ab.txt" | tail -8
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
for m in clients rounds data; do
    l=$(left)
    [ "$l" -lt 25 ] && { echo "== bench $m: skipped (${l} s left)"; continue; }
    echo "== 3. bench $m (${l} s left)"
    timeout $(( l - 5 )) python3 -m fedpeft_hpc bench --device cuda --method bias --only "$m" --json \
        --markdown "$OUT/BENCHMARKS.md" > "$OUT/bench_$m.json" 2>> "$OUT/bench_stderr.txt"
    echo "exit $?"
    python3 -c "import json; d=json.load(open('$OUT/bench_$m.json')); print({k: v for k, v in d.items() if isinstance(v, (int, float))})" 2>/dev/null | cut -c1-600
done
grep -i "error\|Traceback" "$OUT/bench_stderr.txt" | tail -3
echo "total $(( $(date +%s) - t0 )) s"
