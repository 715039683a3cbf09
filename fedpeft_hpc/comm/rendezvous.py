"""Export the ``env://`` variables torch.distributed needs, whatever started the processes.

``ensure_rendezvous`` is the only function of the package that writes ``os.environ``, and only
when called. It sets ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
(and ``LOCAL_WORLD_SIZE``):

* torchrun: already set, nothing to do.
* OpenMPI / MPICH: rank 0 picks its address and a free port (bind to port 0), and sends
  both to every rank with ``mpi4py``'s ``COMM_WORLD.bcast``. ``MASTER_ADDR``/``MASTER_PORT``
  given in rank 0's environment are used instead of the picked ones. There is a short window
  between rank 0 releasing the probe socket and torch's store binding the port again.
* SLURM (srun): ``MASTER_ADDR`` (if unset) is the first host of the step's node list
  (``scontrol show hostnames``), ``MASTER_PORT`` (if unset) is derived from the job and step ids
  so that every task computes the same port without talking: ``20000 + crc32("JOB.STEP") % 20000``.
* submitit (local executor): ``submitit.helpers.TorchDistributedEnvironment().export()``, with
  ``overwrite=True`` (an inherited ``MASTER_PORT`` is still honoured by submitit) and without
  narrowing ``CUDA_VISIBLE_DEVICES`` (the runtime picks ``cuda:<local_rank>`` itself). Jobs of
  submitit's SLURM executor run under ``srun`` and take the SLURM path.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import zlib
from typing import Mapping, MutableMapping, Optional, Tuple

from fedpeft_hpc.comm.world import WorldInfo
from fedpeft_hpc.errors import UserError

__all__ = ["ensure_rendezvous", "free_port", "slurm_master_addr", "slurm_master_port"]

SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


def free_port(host: str = "") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr == "::1"


def local_address(single_node: bool) -> str:
    """The address other ranks should use to reach this host.

    On one node: the loopback address. Across nodes: this host's name if it resolves to a
    routable address, else the host name anyway (then give rank 0 a ``MASTER_ADDR``).
    """
    if single_node:
        return "127.0.0.1"
    host = socket.gethostname()
    try:
        if not _is_loopback(socket.gethostbyname(host)):
            return host
    except OSError:
        pass
    return host  # resolves to loopback here: set MASTER_ADDR on rank 0 to a routable address


def slurm_master_addr(env: Mapping[str, str]) -> str:
    """First host of the SLURM step (or job) node list."""
    nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                or env.get("SLURM_NODELIST") or "").strip()
    if not nodelist:
        raise UserError("SLURM rendezvous: no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST; "
                        "set MASTER_ADDR (and MASTER_PORT) yourself")
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=60).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError) as e:
            if not _single_host(nodelist):
                raise UserError(f"SLURM rendezvous: `scontrol show hostnames {nodelist}` failed ({e}); "
                                "set MASTER_ADDR yourself") from None
    if _single_host(nodelist):
        return nodelist
    raise UserError(f"SLURM rendezvous: cannot expand node list {nodelist!r} without scontrol; "
                    "set MASTER_ADDR to the first node's name")


def _single_host(nodelist: str) -> bool:
    return not any(c in nodelist for c in ",[]")


def slurm_master_port(env: Mapping[str, str]) -> int:
    """A port every task of the step derives alike from SLURM_JOB_ID and SLURM_STEP_ID."""
    job = (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "").strip()
    if not job:
        raise UserError("SLURM rendezvous: SLURM_JOB_ID is not set; set MASTER_PORT yourself")
    step = (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "0").strip()
    return SLURM_PORT_BASE + zlib.crc32(f"{job}.{step}".encode()) % SLURM_PORT_SPAN


def _mpi_master(world: WorldInfo, env: Mapping[str, str]) -> Tuple[str, int]:
    try:
        from mpi4py import MPI  # lazy: importing it initialises MPI
    except ImportError:
        raise UserError(f"started by {world.launcher} with {world.world_size} ranks: the rendezvous "
                        "needs mpi4py (pip install mpi4py), or set MASTER_ADDR and MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != world.world_size:
        raise UserError(f"mpi4py sees {comm.Get_size()} ranks but the launcher says {world.world_size}: "
                        "mpi4py is probably built against another MPI than the mpiexec in use "
                        "(call the mpiexec next to your python)")
    payload: Optional[Tuple[str, int]] = None
    if comm.Get_rank() == 0:
        addr = env.get("MASTER_ADDR") or local_address(world.single_node)
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else free_port()
        payload = (addr, port)
    addr, port = comm.bcast(payload, root=0)
    return addr, int(port)


def ensure_rendezvous(world: WorldInfo, env: Optional[MutableMapping[str, str]] = None) -> None:
    """Make ``init_process_group(init_method="env://")`` work for ``world``.

    ``env`` defaults to ``os.environ`` (the mapping torch reads); another mapping is only useful
    in tests. With one process nothing is written.
    """
    if env is None:
        env = os.environ
    if world.world_size <= 1:
        return
    if world.launcher == "torchrun":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise UserError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not: "
                            "start with torchrun or export MASTER_ADDR and MASTER_PORT")
        return
    if world.launcher == "submitit":
        try:
            from submitit.helpers import TorchDistributedEnvironment
        except ImportError:
            TorchDistributedEnvironment = None  # type: ignore[assignment,misc]
        if TorchDistributedEnvironment is not None and env is os.environ:
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            return
        # no submitit (or a test mapping): a local submitit job runs on this host only
        addr, port = env.get("MASTER_ADDR") or "127.0.0.1", env.get("MASTER_PORT")
        if not port:
            raise UserError("submitit job without submitit.helpers: set MASTER_PORT")
    elif world.launcher in ("openmpi", "mpich"):
        addr, iport = _mpi_master(world, env)
        port = str(iport)
    elif world.launcher == "slurm":
        addr = env.get("MASTER_ADDR") or slurm_master_addr(env)
        port = env.get("MASTER_PORT") or str(slurm_master_port(env))
    else:
        raise UserError(f"no rendezvous for launcher {world.launcher!r} with {world.world_size} ranks")
    env["MASTER_ADDR"] = addr
    env["MASTER_PORT"] = str(port)
    env["RANK"] = str(world.rank)
    env["WORLD_SIZE"] = str(world.world_size)
    env["LOCAL_RANK"] = str(world.local_rank)
    env["LOCAL_WORLD_SIZE"] = str(world.local_world_size)
