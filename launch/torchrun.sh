#!/usr/bin/env bash
# Single-node run with torchrun: one process per GPU (or NPROC CPU processes).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: launch/torchrun.sh CONFIG [key=value ...]

Starts `torchrun --standalone --nproc_per_node=$NPROC -m fedpeft_hpc train CONFIG [key=value ...]`
on this node. torchrun picks a free rendezvous port itself.

Environment knobs:
  NPROC    processes on this node (default: number of visible GPUs, or 1 without GPUs)
  PYTHON   python interpreter whose torch is used (default: python)

Examples:
  launch/torchrun.sh configs/cifar100_lora.yaml fed.rounds=5
  NPROC=2 launch/torchrun.sh configs/digits.yaml comm.device=cpu
USAGE
}

if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
case "$1" in -h|--help) usage; exit 0 ;; esac

PYTHON="${PYTHON:-python}"
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)
fi

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m fedpeft_hpc train "$@"
