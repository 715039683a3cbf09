"""Who am I in the job? Rank and size detection from launcher environment variables.

``detect_world`` is a pure function of an environment mapping: it reads, never writes.
Launchers are checked from the innermost to the outermost, because an inner launcher
inherits the variables of the outer one (``torchrun`` or ``mpiexec`` inside an ``sbatch``
allocation still see ``SLURM_*``):

1. torchrun / torch elastic, or anything exporting the ``env://`` variables
   (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; e.g. submitit's ``TorchDistributedEnvironment``)
2. OpenMPI ``mpirun``: ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE``
3. MPICH / Intel MPI hydra: ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``
   (``srun --mpi=pmi2`` also sets ``PMI_RANK/PMI_SIZE`` but not ``MPI_LOCALRANKID``; such a
   process is left to the SLURM rule)
4. submitit's local executor: ``SUBMITIT_LOCAL_GLOBALID``, ``SUBMITIT_LOCAL_NTASKS``, ...
   (its tasks inherit ``SLURM_*`` when submitted from inside an allocation, hence before 5)
5. a SLURM step started by ``srun``: ``SLURM_PROCID`` and ``SLURM_STEP_NUM_TASKS``. A batch
   script without ``srun`` has ``SLURM_NTASKS`` (the allocation) but no
   ``SLURM_STEP_NUM_TASKS``: it is one process and counts as ``single``.
6. otherwise a single process.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from fedpeft_hpc.errors import UserError

__all__ = ["WorldInfo", "detect_world", "LAUNCHERS"]

LAUNCHERS = ("single", "torchrun", "slurm", "openmpi", "mpich", "submitit")


@dataclass(frozen=True)
class WorldInfo:
    """Position of this process in the job.

    ``node_rank`` is the index of this node where the launcher says it (torchrun's
    ``GROUP_RANK``, ``SLURM_NODEID``, submitit), else ``None`` (MPI launchers do not export it).
    """

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    launcher: str
    node_rank: Optional[int] = None

    @property
    def single_node(self) -> bool:
        """All ranks share this node (as far as the launcher tells)."""
        return self.local_world_size >= self.world_size


SINGLE = WorldInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, launcher="single", node_rank=0)


def _int(env: Mapping[str, str], key: str) -> int:
    raw = env[key]
    try:
        return int(str(raw).strip())
    except ValueError:
        raise UserError(f"environment variable {key}={raw!r} is not an integer") from None


def _opt_int(env: Mapping[str, str], key: str) -> Optional[int]:
    return _int(env, key) if env.get(key, "").strip() else None


def _has(env: Mapping[str, str], *keys: str) -> bool:
    return all(env.get(k, "").strip() != "" for k in keys)


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's compressed per-node task counts: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if m is None:
            raise UserError(f"cannot parse SLURM tasks-per-node list {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _slurm_local_size(env: Mapping[str, str], node_rank: Optional[int], world_size: int) -> int:
    if env.get("SLURM_STEP_TASKS_PER_NODE", "").strip():
        counts = parse_tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
        if counts:
            return counts[node_rank] if node_rank is not None and node_rank < len(counts) else counts[0]
    if env.get("SLURM_NTASKS_PER_NODE", "").strip():
        return _int(env, "SLURM_NTASKS_PER_NODE")
    if env.get("SLURM_TASKS_PER_NODE", "").strip():
        counts = parse_tasks_per_node(env["SLURM_TASKS_PER_NODE"])
        if counts:
            return counts[node_rank] if node_rank is not None and node_rank < len(counts) else counts[0]
    return world_size if _opt_int(env, "SLURM_STEP_NUM_NODES") in (None, 1) else 1


def _checked(info: WorldInfo, source: str) -> WorldInfo:
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise UserError(f"{source}: rank {info.rank} does not fit world size {info.world_size}")
    if info.local_world_size < 1 or not 0 <= info.local_rank < info.local_world_size:
        raise UserError(f"{source}: local rank {info.local_rank} does not fit local size "
                        f"{info.local_world_size}")
    return info


def _mpi_world(env: Mapping[str, str], launcher: str, rank: str, size: str, local_rank: str,
               local_size: str) -> WorldInfo:
    """An MPI launcher's world: MPI launchers export no node index."""
    world_size = _int(env, size)
    return _checked(WorldInfo(rank=_int(env, rank), local_rank=_opt_int(env, local_rank) or 0,
                              world_size=world_size, local_world_size=_opt_int(env, local_size) or world_size,
                              launcher=launcher, node_rank=None),
                    f"{launcher} ({rank}/{size})")


def detect_world(env: Optional[Mapping[str, str]] = None) -> WorldInfo:
    """Rank, local rank and sizes of this process, read from ``env`` (default ``os.environ``).

    Raises ``UserError`` when the variables of the detected launcher are malformed.
    """
    if env is None:
        env = os.environ

    if _has(env, "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        world_size = _int(env, "WORLD_SIZE")
        lws = _opt_int(env, "LOCAL_WORLD_SIZE")
        return _checked(WorldInfo(rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK"),
                                  world_size=world_size,
                                  # without LOCAL_WORLD_SIZE assume one node (only sizes threads)
                                  local_world_size=lws if lws is not None else world_size,
                                  launcher="torchrun", node_rank=_opt_int(env, "GROUP_RANK")),
                        "torchrun (RANK/WORLD_SIZE/LOCAL_RANK)")

    if _has(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        return _mpi_world(env, "openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                          "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")

    under_srun = _has(env, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
    if _has(env, "PMI_RANK", "PMI_SIZE") and (_has(env, "MPI_LOCALRANKID") or not under_srun):
        return _mpi_world(env, "mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")

    if _has(env, "SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS"):
        world_size = _int(env, "SUBMITIT_LOCAL_NTASKS")
        nodes = _opt_int(env, "SUBMITIT_LOCAL_JOB_NUM_NODES") or 1
        return _checked(WorldInfo(rank=_int(env, "SUBMITIT_LOCAL_GLOBALID"),
                                  local_rank=_opt_int(env, "SUBMITIT_LOCAL_LOCALID") or 0,
                                  world_size=world_size, local_world_size=max(1, world_size // nodes),
                                  launcher="submitit", node_rank=_opt_int(env, "SUBMITIT_LOCAL_NODEID")),
                        "submitit local (SUBMITIT_LOCAL_*)")

    if under_srun:
        world_size = _int(env, "SLURM_STEP_NUM_TASKS")
        node_rank = _opt_int(env, "SLURM_NODEID")
        return _checked(WorldInfo(rank=_int(env, "SLURM_PROCID"),
                                  local_rank=_opt_int(env, "SLURM_LOCALID") or 0,
                                  world_size=world_size,
                                  local_world_size=_slurm_local_size(env, node_rank, world_size),
                                  launcher="slurm", node_rank=node_rank),
                        "SLURM (SLURM_PROCID/SLURM_STEP_NUM_TASKS)")

    return SINGLE
