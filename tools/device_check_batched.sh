#!/usr/bin/env bash
# The GPU check of client batching (issue 8), run on a lent GPU machine (never in CI): the CUDA
# equivalence tests, an end-to-end run with fed.client_batch=auto, and `fedpeft-hpc bench --device
# cuda` (ViT-B/16 224 px, bf16, client batch 16, 32 clients per rank) whose rows go to
# $OUT/BENCHMARKS.md (the repository's file plus the new rows), with torch.profiler's top operators in $OUT/bench_profile.txt.
# Usage (device tool, about 6 minutes on an H100): bash tools/device_check_batched.sh
set -u
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== pytest: batched == sequential on CUDA"
timeout 240 python3 -m pytest -q -x tests/test_batched.py -k cuda -p no:cacheprovider 2>&1 | tail -4
echo "== train, lora, fed.client_batch=auto, bf16, on cuda"
timeout 120 python3 -m fedpeft_hpc train configs/quickstart.yaml run.dir=/tmp/r_auto peft.method=lora \
    model.pretrained=false fed.rounds=2 fed.local_epochs=1 run.progress=false comm.device=cuda \
    fed.client_batch=auto model.precision=bf16 2>&1 | grep -E "client_batch|final_acc" | cut -c1-400
echo "== bench --device cuda"
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"  # the rows are appended to the repository's table
timeout 420 python3 -m fedpeft_hpc bench --device cuda --json --profile --markdown "$OUT/BENCHMARKS.md" \
    > "$OUT/bench.json" 2> "$OUT/bench_stderr.txt"
echo "bench exit $?"
grep -v "it/s\|measurement/s" "$OUT/bench_stderr.txt" | grep -v "^\s*$" | head -40
sed -n '/== batched/,$p' "$OUT/bench_stderr.txt" > "$OUT/bench_profile.txt"
python3 -c "import json; d = json.load(open('$OUT/bench.json')); print({k: d[k] for k in ('batched_speedup', 'batching_bound', 'fl_efficiency', 'aggregation_share', 'memory_per_client_ratio', 'two_rank_speedup')})"
