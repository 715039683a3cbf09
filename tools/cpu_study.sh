#!/usr/bin/env bash
# Regenerates docs/results/ (the CPU-scale FedPEFT study, docs/results/README.md): runs the sweep
# configs/sweeps/cpu_study.yaml with the local executor (48 runs, about 25 minutes on 2 cores; runs
# already finished in OUT are skipped), writes its report, copies the table and plots, and writes
# summary.md (methods x partition x DP, mean ± std over the seeds).
#   bash tools/cpu_study.sh                 # OUT=runs/cpu_study MAX_PARALLEL=2 PYTHON=python3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/cpu_study}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's fedpeft_hpc, also in the job processes
"$PY" -m fedpeft_hpc sweep configs/sweeps/cpu_study.yaml --executor local --max-parallel "${MAX_PARALLEL:-2}" --out "$OUT"
"$PY" -m fedpeft_hpc report "$OUT" --panels data.partition,privacy.mode >/dev/null
mkdir -p docs/results
cp "$OUT/results.md" "$OUT/results.csv" "$OUT/accuracy_vs_bytes.png" "$OUT/accuracy_vs_round.png" docs/results/
"$PY" tools/pivot_results.py "$OUT/results.csv" --rows peft.method --cols data.partition,privacy.mode \
    --value final_acc --value best_acc --value mb_sent --value epsilon > docs/results/summary.md
echo "docs/results/: results.md, results.csv, summary.md, accuracy_vs_bytes.png, accuracy_vs_round.png (from $OUT)"
