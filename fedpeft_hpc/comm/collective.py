"""The one door for collectives: the ``Communicator`` interface, one class per kind, and the bytes.

The engine depends on this interface alone (never on ``torch.distributed``): an in-place sum
all-reduce under a tag, a barrier, the record of what moved, rank and world size. Kinds:
``LocalCommunicator`` (one process: nothing moves), ``TorchCommunicator`` (``torch.distributed``
with gloo or nccl) and ``MPICommunicator`` (mpi4py's ``COMM_WORLD`` on host buffers; torch wheels
have no MPI backend). They share one timing-and-accounting helper (``Communicator._timed``).

Byte accounting (per call, recorded under its tag):

* ``bytes``: bytes handed to the collective, summed over ranks. For an all-reduce of a buffer
  of ``B`` bytes on ``W`` ranks that is ``B * W``.
* ``ring_bytes``: what a ring all-reduce puts on the wire, summed over ranks. Each rank sends
  ``2 * (W - 1) / W * B`` bytes (reduce-scatter then all-gather), so the sum over ranks is
  ``2 * (W - 1) * B``. It is a model of the traffic, not a measurement: NCCL may use trees,
  gloo and MPI pick their own algorithms, and intra-node traffic may not touch a network.
* ``ms``: wall milliseconds of the call on this rank (CUDA is synchronised first and after).

With one rank no collective is called at all: records show 0 calls, 0 bytes, 0 ms.
For ``nccl`` the buffer must live on the GPU: a CPU tensor is copied to ``device``, reduced and
copied back in place. For ``gloo`` and ``mpi`` a GPU tensor is likewise copied to host and back.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["Communicator", "LocalCommunicator", "TorchCommunicator", "MPICommunicator", "CollectiveError",
           "CollectiveRecord", "make_communicator"]

MPI_SPIN_S = 0.05
MPI_POLL_SLEEP_S = 0.0005


class CollectiveError(RuntimeError):
    """A collective failed, typically because another rank died or hung."""


@dataclass
class CollectiveRecord:
    calls: int = 0
    bytes: int = 0
    ring_bytes: int = 0
    ms: float = 0.0
    backend: str = "none"

    def add(self, other: "CollectiveRecord") -> None:
        self.calls += other.calls
        self.bytes += other.bytes
        self.ring_bytes += other.ring_bytes
        self.ms += other.ms
        self.backend = other.backend

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Communicator(ABC):
    """Collectives over the ranks of one job, with per-tag accounting.

    ``last[tag]`` holds the record of the latest call under ``tag``; ``totals[tag]`` the sums
    since construction. ``failed`` keeps the first failure: the group is unusable afterwards.
    """

    backend = "none"

    def __init__(self, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None,
                 timeout_s: float = 300.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} does not fit world size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.device = device if device is not None else torch.device("cpu")
        self.timeout_s = timeout_s
        self.last: Dict[str, CollectiveRecord] = {}
        self.totals: Dict[str, CollectiveRecord] = {}
        self.failed: Optional[CollectiveError] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the interface ------------------------------------------------------------------
    def allreduce_sum_(self, buf: torch.Tensor, tag: str = "aggregate") -> torch.Tensor:
        """In-place SUM all-reduce of one contiguous tensor; one collective call. Returns ``buf``."""
        if not buf.is_contiguous():
            raise ValueError("allreduce_sum_ needs a contiguous tensor (flatten into one buffer first)")
        nbytes = buf.numel() * buf.element_size()
        w = self.world_size
        work = buf if buf.device == self._staging_device else buf.detach().to(self._staging_device)
        self._timed(tag, lambda: self._allreduce(work), nbytes * w, 2 * (w - 1) * nbytes)
        if work is not buf:
            with torch.no_grad():
                buf.copy_(work)
        return buf

    def barrier(self, tag: str = "barrier") -> None:
        """Wait until every rank arrives."""
        self._timed(tag, self._barrier, 0, 0)

    def call_count(self, tag: str) -> int:
        """Collectives actually issued under ``tag`` (0 with one rank)."""
        rec = self.totals.get(tag)
        return rec.calls if rec is not None else 0

    # -- what each kind provides ---------------------------------------------------------
    @property
    def _staging_device(self) -> torch.device:
        """Where a buffer must live for this kind's collective."""
        return torch.device("cpu")

    @abstractmethod
    def _allreduce(self, work: torch.Tensor) -> None:
        """Sum ``work`` (on ``_staging_device``) over all ranks, in place."""

    @abstractmethod
    def _barrier(self) -> None:
        """Block until every rank calls it."""

    def _sync(self) -> None:
        """Wait for queued device work (so that timings cover the collective only)."""

    # -- shared timing and accounting ----------------------------------------------------
    def _record(self, tag: str, rec: CollectiveRecord) -> None:
        self.last[tag] = rec
        self.totals.setdefault(tag, CollectiveRecord(backend=rec.backend)).add(rec)

    def _timed(self, tag: str, op: Callable[[], None], nbytes: int, ring_bytes: int) -> None:
        """Run ``op`` as one collective: synchronise, time it, turn failures into ``CollectiveError``."""
        if self.world_size <= 1:
            self._record(tag, CollectiveRecord(backend=self.backend))
            return
        self._sync()
        t0 = time.perf_counter()
        try:
            op()
            self._sync()
        except (RuntimeError, TimeoutError) as e:  # DistBackendError, gloo/nccl/MPI errors, MPI timeout
            raise self._fail(tag, e) from e
        self._record(tag, CollectiveRecord(calls=1, bytes=nbytes, ring_bytes=ring_bytes,
                                           ms=(time.perf_counter() - t0) * 1e3, backend=self.backend))

    def _fail(self, tag: str, err: BaseException) -> CollectiveError:
        error = CollectiveError(
            f"rank {self.rank} of {self.world_size}: collective '{tag}' ({self.backend}) failed: "
            f"{type(err).__name__}: {err}. Another rank probably died or hung; a collective waits "
            f"at most comm.timeout_s={self.timeout_s:g} s before failing.")
        if self.failed is None:
            self.failed = error
        return error


class LocalCommunicator(Communicator):
    """One process: every collective is the identity and moves nothing."""

    def __init__(self, device: Optional[torch.device] = None, timeout_s: float = 300.0):
        super().__init__(0, 1, device, timeout_s)

    @property
    def _staging_device(self) -> torch.device:
        return self.device

    def _allreduce(self, work: torch.Tensor) -> None:  # pragma: no cover - never called with one rank
        pass

    def _barrier(self) -> None:  # pragma: no cover - never called with one rank
        pass


class TorchCommunicator(Communicator):
    """``torch.distributed``'s default process group (gloo on host buffers, nccl on the GPU)."""

    def __init__(self, rank: int, world_size: int, backend: str, device: Optional[torch.device] = None,
                 timeout_s: float = 300.0):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"TorchCommunicator takes gloo or nccl, not {backend!r}")
        super().__init__(rank, world_size, device, timeout_s)
        self.backend = backend

    @property
    def _staging_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def _sync(self) -> None:
        if self.backend == "nccl" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)

    def _allreduce(self, work: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(work, op=dist.ReduceOp.SUM)

    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()


class MPICommunicator(Communicator):
    """mpi4py's ``COMM_WORLD``; collectives are issued non-blocking and polled so that
    ``timeout_s`` holds for them too (a blocking MPI call would wait forever for a hung rank)."""

    backend = "mpi"

    @property
    def _comm(self) -> Any:
        from mpi4py import MPI  # only this kind touches mpi4py

        return MPI.COMM_WORLD

    def _wait(self, req: Any) -> None:
        """Wait for a non-blocking MPI request, at most ``timeout_s``.

        The first ``MPI_SPIN_S`` are spent spinning (as a blocking MPICH call would), then the
        loop sleeps briefly between polls so a waiting rank leaves the cores to peers still
        computing. On timeout the request is left pending: the job must end (``Runtime`` aborts
        the MPI job when a ``CollectiveError`` leaves its ``with`` block).
        """
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        while not req.Test():
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"no completion within {self.timeout_s:g} s")
            if now - t0 > MPI_SPIN_S:
                time.sleep(MPI_POLL_SLEEP_S)

    def _allreduce(self, work: torch.Tensor) -> None:
        from mpi4py import MPI

        self._wait(self._comm.Iallreduce(MPI.IN_PLACE, work.detach().numpy(), op=MPI.SUM))

    def _barrier(self) -> None:
        self._wait(self._comm.Ibarrier())


def make_communicator(rank: int, world_size: int, backend: str, device: torch.device,
                      timeout_s: float) -> Communicator:
    """The communicator of ``backend`` (``none`` for one process, ``gloo``, ``nccl``, ``mpi``)."""
    if backend == "none":
        if world_size > 1:
            raise ValueError("backend 'none' is for one process only")
        return LocalCommunicator(device, timeout_s)
    if backend == "mpi":
        return MPICommunicator(rank, world_size, device, timeout_s)
    return TorchCommunicator(rank, world_size, backend, device, timeout_s)
