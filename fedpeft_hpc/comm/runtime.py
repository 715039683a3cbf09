"""Process-level set-up of a run: world, device, threads, process group, communicator.

    with Runtime.start(cfg.comm, threads=cfg.run.threads) as rt:
        rt.comm.allreduce_sum_(flat_fp64_update)

One process: no process group, backend ``"none"``. Several processes with backend gloo or
nccl: ``init_process_group(init_method="env://")`` after ``ensure_rendezvous``. Backend mpi:
every collective goes through ``mpi4py`` (no torch process group); the processes must have
been started by an MPI launcher (``mpiexec``, ``srun --mpi=...``).

Under an MPI launcher (where mpi4py got imported), an exception leaving the ``with`` block, or
``close()`` after a failed collective, prints the error and calls ``MPI_Abort``: MPICH's
finalize at exit would otherwise wait forever for a rank that hangs.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from typing import Any, Mapping, Optional

import torch

from fedpeft_hpc.comm.collective import CollectiveError, Communicator, make_communicator
from fedpeft_hpc.comm.rendezvous import ensure_rendezvous
from fedpeft_hpc.comm.world import WorldInfo, detect_world
from fedpeft_hpc.config.schema import CommConfig
from fedpeft_hpc.errors import ConfigError, UserError

__all__ = ["Runtime", "choose_device", "choose_backend", "check_ranks_per_gpu", "default_threads"]


def choose_device(cfg: CommConfig, world: WorldInfo) -> torch.device:
    """``cuda:<local_rank mod visible GPUs>`` when CUDA is wanted and present, else CPU.

    The modulo keeps ``srun --gpus-per-task=1`` (one visible GPU per task) working.
    """
    if cfg.device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        check_ranks_per_gpu(world, torch.cuda.device_count())
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    if cfg.device == "cuda":
        raise ConfigError("comm.device", "'cuda' was asked for but torch sees no CUDA GPU "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
                          "use comm.device=cpu or auto")
    return torch.device("cpu")


def check_ranks_per_gpu(world: WorldInfo, visible: int) -> None:
    """Refuse more ranks on this node than GPUs it sees: two ranks would share a GPU (NCCL fails at start
    with its own message, or a collective hangs). One visible GPU per rank under a SLURM or MPI launcher is
    the per-task binding (``srun --gpus-per-task=1``): each rank sees its own GPU as device 0."""
    per_task = visible == 1 and world.launcher != "torchrun"
    if world.local_world_size <= visible or per_task:
        return
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise ConfigError("comm.device", f"{world.local_world_size} ranks on this node ({world.launcher}) but "
                      f"{visible} visible GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown else "") +
                      ": two ranks would share a GPU. Start at most one rank per GPU (torchrun "
                      f"--nproc_per_node={visible}, srun --ntasks-per-node={visible} or --gpus-per-task=1), "
                      "or run on CPUs with comm.device=cpu")


def choose_backend(cfg: CommConfig, device: torch.device) -> str:
    """The configured backend, with ``auto`` resolved and impossible combinations refused."""
    if cfg.backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if cfg.backend == "nccl" and device.type != "cuda":
        raise ConfigError("comm.backend", "'nccl' needs CUDA GPUs but this process runs on "
                          f"{device}; use comm.backend=gloo or auto (or comm.device=cuda on a GPU node)")
    return cfg.backend


def slurm_cpus_per_task(env: Optional[Mapping[str, str]] = None) -> int | None:
    """The cores SLURM gave each task (``SLURM_CPUS_PER_TASK``: srun, sbatch and submitit jobs alike)."""
    text = (os.environ if env is None else env).get("SLURM_CPUS_PER_TASK", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def default_threads(world: WorldInfo, env: Optional[Mapping[str, str]] = None) -> int:
    """``run.threads=0``: the cores SLURM gave this task, else this node's cores shared by its ranks."""
    return slurm_cpus_per_task(env) or max(1, (os.cpu_count() or 1) // max(1, world.local_world_size))


class Runtime:
    """This process's place in the job and its communication handles. Use ``Runtime.start``."""

    def __init__(self, world: WorldInfo, device: torch.device, backend: str, comm: Communicator,
                 owns_process_group: bool = False):
        self.world = world
        self.device = device
        self.backend = backend
        self.comm = comm
        self._owns_pg = owns_process_group
        self._closed = False

    @classmethod
    def start(cls, cfg: CommConfig, threads: int = 0, env: Optional[Mapping[str, str]] = None) -> "Runtime":
        """Detect the world, pick device and backend, set threads, join the process group.

        ``env`` (default ``os.environ``) is where the launcher's variables are read; the
        rendezvous always writes ``os.environ`` since that is what torch reads.
        """
        world = detect_world(os.environ if env is None else env)
        device = choose_device(cfg, world)
        backend = choose_backend(cfg, device)
        if threads < 0:
            raise ConfigError("run.threads", f"must be >= 0, got {threads}")
        torch.set_num_threads(threads if threads > 0 else default_threads(world, env))
        if device.type == "cuda":
            torch.cuda.set_device(device)

        if world.world_size <= 1:
            return cls(world, device, "none", make_communicator(0, 1, "none", device, cfg.timeout_s))
        try:
            return cls._start_group(cfg, world, device, backend)
        except BaseException as e:
            if _mpi_running(world):  # a rank stuck in the rendezvous would keep MPI_Finalize waiting
                _mpi_abort(world, e)
            raise

    @classmethod
    def _start_group(cls, cfg: CommConfig, world: WorldInfo, device: torch.device, backend: str) -> "Runtime":
        if backend == "mpi":
            _check_mpi(world)
            return cls(world, device, "mpi",
                       make_communicator(world.rank, world.world_size, "mpi", device, cfg.timeout_s))

        import torch.distributed as dist

        if not dist.is_available():
            raise ConfigError("comm.backend", f"this torch build has no torch.distributed; "
                              f"cannot run {world.world_size} ranks with {backend}")
        if dist.is_initialized():
            raise RuntimeError("a torch.distributed process group already exists in this process")
        ensure_rendezvous(world)
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(backend, init_method="env://", rank=world.rank,
                                world_size=world.world_size,
                                timeout=timedelta(seconds=float(cfg.timeout_s)), **kwargs)
        return cls(world, device, backend,
                   make_communicator(world.rank, world.world_size, backend, device, cfg.timeout_s),
                   owns_process_group=True)

    def close(self, exc: Optional[BaseException] = None) -> None:
        """Leave the process group (if this runtime made one). Safe to call twice.

        Under an MPI launcher, if ``exc`` is given or a collective has failed, the MPI job is
        aborted instead (see ``_mpi_abort``): this call then does not return.
        """
        if self._closed:
            return
        self._closed = True
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            exc = None  # a clean sys.exit() inside the block is no failure
        failure = exc if exc is not None else self.comm.failed
        if failure is not None and _mpi_running(self.world):
            _mpi_abort(self.world, failure)
        if self._owns_pg:
            import torch.distributed as dist

            if dist.is_initialized():
                if failure is None or getattr(failure, "raised_by_all_ranks", False):
                    # Ranks leave at different times (rank 0 still writes the summary); tearing gloo
                    # down while a peer is mid-shutdown aborted a rank now and then ("terminate called
                    # without an active exception"). Leave together: after a clean run, and after an
                    # error that every rank raised at the same point (no peer waits in a collective).
                    try:
                        self.comm.barrier(tag="teardown")
                    except CollectiveError:
                        pass
                dist.destroy_process_group()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Any) -> None:
        self.close(exc)

    def __repr__(self) -> str:
        w = self.world
        return (f"Runtime(rank={w.rank}/{w.world_size}, local={w.local_rank}/{w.local_world_size}, "
                f"launcher={w.launcher}, device={self.device}, backend={self.backend})")


def _mpi_running(world: WorldInfo) -> bool:
    """mpi4py was imported by this process (rendezvous or backend mpi), MPI is still up and
    its COMM_WORLD is this job (not a singleton MPI inside a torchrun worker)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return False
    return world.world_size > 1 and mpi.COMM_WORLD.Get_size() == world.world_size


def _mpi_abort(world: WorldInfo, exc: BaseException) -> None:
    """Report ``exc`` and end the whole MPI job.

    Leaving normally would run MPI_Finalize at interpreter exit, and MPICH's finalize waits for
    every rank (a PMI barrier): with a peer that hangs, or that still waits in a collective for
    this rank, the job would never end. MPI_Abort makes the launcher kill all ranks instead.
    Exit status 2 for user errors (as the CLI does), the code of a ``sys.exit(code)``, else 1.
    """
    from mpi4py import MPI

    code = 2 if isinstance(exc, UserError) else 1
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else 1
        msg = f"exit {exc.code}\n"
    elif isinstance(exc, (UserError, CollectiveError, KeyboardInterrupt)):
        msg = f"{type(exc).__name__}: {exc}\n"
    else:
        msg = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"[rank {world.rank}/{world.world_size}] {msg}"
                     f"[rank {world.rank}/{world.world_size}] aborting the MPI job (MPI_Abort)\n")
    sys.stderr.flush()
    sys.stdout.flush()
    MPI.COMM_WORLD.Abort(code)


def _check_mpi(world: WorldInfo) -> None:
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError("comm.backend", "'mpi' needs mpi4py (pip install mpi4py)") from None
    size = MPI.COMM_WORLD.Get_size()
    if size != world.world_size or MPI.COMM_WORLD.Get_rank() != world.rank:
        raise ConfigError("comm.backend",
                          f"'mpi' needs processes started by an MPI launcher, but mpi4py sees rank "
                          f"{MPI.COMM_WORLD.Get_rank()} of {size} while {world.launcher} says rank "
                          f"{world.rank} of {world.world_size}; use comm.backend=gloo/nccl/auto, or "
                          "start with the mpiexec that matches mpi4py")
