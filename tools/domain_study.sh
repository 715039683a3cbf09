#!/usr/bin/env bash
# Regenerates docs/results/domain_gap/ (FedPEFT's capability analysis at laptop scale,
# docs/results/domain_gap/README.md): runs the sweep configs/sweeps/domain_study.yaml with the local
# executor (144 runs, the non-DP half first; runs already finished in OUT are skipped), writes its
# report with one plot panel per domain, partition and privacy mode, copies the table and plots, and writes summary.md
# (methods x partition x DP per domain, mean ± std over the seeds) and gap.md / probe_gap.png (full
# fine-tuning minus the linear probe, per domain). Needs scikit-image (pip install -e ".[images]").
#   bash tools/domain_study.sh              # OUT=runs/domain_study MAX_PARALLEL=2 PYTHON=python3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/domain_study}
DOCS=docs/results/domain_gap
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's fedpeft_hpc, also in the job processes
"$PY" -m fedpeft_hpc sweep configs/sweeps/domain_study.yaml --executor local --max-parallel "${MAX_PARALLEL:-2}" --out "$OUT"
"$PY" -m fedpeft_hpc report "$OUT" --panels data.name,data.partition,privacy.mode >/dev/null
mkdir -p "$DOCS"
cp "$OUT/results.md" "$OUT/results.csv" "$OUT/accuracy_vs_bytes.png" "$OUT/accuracy_vs_round.png" "$DOCS/"
"$PY" tools/pivot_results.py "$OUT/results.csv" --rows data.name,peft.method --cols data.partition,privacy.mode \
    --value final_acc --value best_acc --value mb_sent --value epsilon > "$DOCS/summary.md"
"$PY" tools/probe_gap.py "$OUT/results.csv" --markdown "$DOCS/gap.md" --plot "$DOCS/probe_gap.png"
"$PY" tools/patch_tasks_figure.py "$DOCS/patch_tasks.png"
echo "$DOCS/: results.md, results.csv, summary.md, gap.md, accuracy_vs_bytes.png, accuracy_vs_round.png, probe_gap.png, patch_tasks.png (from $OUT)"
