#!/usr/bin/env bash
# `fedpeft-hpc bench --device cuda`, one measurement at a time in priority order, so that what
# finished survives a short lease: rows go to a copy of BENCHMARKS.md in $OUT, each measurement's
# JSON to $OUT/bench_<name>.json. Usage (device tool, carry .whl): bash tools/device_bench.sh [SECONDS]
set -u
budget=${1:-360}
source tools/device_env.sh
t0=$(date +%s)
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
for m in clients rounds data memory; do
    left=$(( budget - ($(date +%s) - t0) ))
    [ "$left" -lt 20 ] && { echo "== $m: skipped (${left} s left)"; continue; }
    echo "== $m (${left} s left)"
    timeout "$left" python3 -m fedpeft_hpc bench --device cuda --only "$m" --json --markdown "$OUT/BENCHMARKS.md" \
        > "$OUT/bench_$m.json" 2>> "$OUT/bench_stderr.txt"
    echo "exit $?"
    grep -v "it/s\|measurement/s\|s/measurement" "$OUT/bench_stderr.txt" | grep -i "error\|Traceback" | tail -3
    python3 -c "import json,sys; d=json.load(open('$OUT/bench_$m.json')); print({k: v for k, v in d.items() if isinstance(v, (int, float))})" 2>/dev/null | cut -c1-600
done
echo "total $(( $(date +%s) - t0 )) s"
