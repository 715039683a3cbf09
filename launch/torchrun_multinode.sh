#!/usr/bin/env bash
# Multi-node run with torchrun: start this script once on every node.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: launch/torchrun_multinode.sh CONFIG [key=value ...]

Run once on each node. Every node must use the same NNODES, RDZV_ENDPOINT and RDZV_ID.
Runs `torchrun --nnodes=$NNODES --node_rank=$NODE_RANK --nproc_per_node=$NPROC
          --rdzv_backend=c10d --rdzv_endpoint=$RDZV_ENDPOINT --rdzv_id=$RDZV_ID
          -m fedpeft_hpc train CONFIG [key=value ...]`

Environment knobs:
  NNODES          number of nodes (required)
  NODE_RANK       index of this node, 0..NNODES-1 (default: $SLURM_NODEID, else required)
  NPROC           processes per node (default: number of visible GPUs, or 1)
  RDZV_ENDPOINT   host:port of the rendezvous, reachable from all nodes; usually node 0
                  (required; e.g. "$(hostname):29500")
  RDZV_ID         job id shared by all nodes (default: $SLURM_JOB_ID, else "fedpeft")
  PYTHON          python interpreter (default: python)

Inside SLURM, e.g.:
  export NNODES=$SLURM_NNODES RDZV_ENDPOINT=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):29500
  srun --ntasks-per-node=1 launch/torchrun_multinode.sh configs/x.yaml
USAGE
}

if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
case "$1" in -h|--help) usage; exit 0 ;; esac

die() { echo "torchrun_multinode.sh: $*" >&2; echo "(see --help)" >&2; exit 2; }

PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-fedpeft}}"
[[ -n "$NNODES" ]] || die "set NNODES"
[[ -n "$NODE_RANK" ]] || die "set NODE_RANK (0..NNODES-1)"
[[ -n "$RDZV_ENDPOINT" ]] || die "set RDZV_ENDPOINT=host:port (a node all nodes can reach)"
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)
fi

exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --nproc_per_node="$NPROC" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" \
    --rdzv_id="$RDZV_ID" -m fedpeft_hpc train "$@"
