"""The one door for collectives: every cross-rank operation of the project goes through
``Communicator``, which also counts what moved.

Byte accounting (per call, recorded under a tag):

* ``bytes``: bytes handed to the collective, summed over ranks. For an all-reduce of a buffer
  of ``B`` bytes on ``W`` ranks that is ``B * W``.
* ``ring_bytes``: what a ring all-reduce puts on the wire, summed over ranks. Each rank sends
  ``2 * (W - 1) / W * B`` bytes (reduce-scatter then all-gather), so the sum over ranks is
  ``2 * (W - 1) * B``. It is a model of the traffic, not a measurement: NCCL may use trees,
  gloo and MPI pick their own algorithms, and intra-node traffic may not touch a network.
  For object broadcasts, ``bytes`` is the pickled size times ``W`` and ``ring_bytes`` the
  pickled size times ``W - 1`` (one copy to every other rank); for object all-gathers,
  ``bytes`` is the sum of every rank's pickled size and ``ring_bytes`` that times ``W - 1``.
* ``ms``: wall milliseconds of the call on this rank (CUDA is synchronised first and after).

With one rank no collective is called at all: records show 0 calls, 0 bytes, 0 ms.

Backends: ``"none"`` (one process), ``"gloo"``/``"nccl"`` (``torch.distributed`` default group),
``"mpi"`` (``mpi4py``'s ``COMM_WORLD`` on host buffers; torch wheels have no MPI backend).
MPI collectives are issued non-blocking and polled so that ``timeout_s`` holds for them too
(a blocking MPI call would wait forever for a hung rank).
For ``nccl`` the buffer must live on the GPU: a CPU tensor is copied to ``device``, reduced and
copied back in place. For ``gloo`` and ``mpi`` a GPU tensor is likewise copied to host and back.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch

__all__ = ["Communicator", "CollectiveError", "CollectiveRecord"]

BACKENDS = ("none", "gloo", "nccl", "mpi")
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


class Communicator:
    """Collectives over the ranks of one job, with per-tag accounting.

    ``last[tag]`` holds the record of the latest call under ``tag``; ``totals[tag]`` the sums
    since construction (or ``reset_stats``).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, backend: str = "none",
                 device: Optional[torch.device] = None, timeout_s: float = 300.0):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if world_size > 1 and backend == "none":
            raise ValueError("backend 'none' is for one process only")
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.device = device if device is not None else torch.device("cpu")
        self.timeout_s = timeout_s
        self.last: Dict[str, CollectiveRecord] = {}
        self.totals: Dict[str, CollectiveRecord] = {}
        #: the first collective failure: the group is unusable afterwards
        self.failed: Optional[CollectiveError] = None

    # -- accounting ---------------------------------------------------------------------
    def call_count(self, tag: str) -> int:
        """Collectives actually issued under ``tag`` (0 with one rank)."""
        rec = self.totals.get(tag)
        return rec.calls if rec is not None else 0

    def reset_stats(self) -> None:
        self.last.clear()
        self.totals.clear()

    def _record(self, tag: str, rec: CollectiveRecord) -> None:
        self.last[tag] = rec
        self.totals.setdefault(tag, CollectiveRecord(backend=rec.backend)).add(rec)

    def _sync(self) -> None:
        if self.backend == "nccl" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)

    def _fail(self, tag: str, err: BaseException) -> CollectiveError:
        error = CollectiveError(
            f"rank {self.rank} of {self.world_size}: collective '{tag}' ({self.backend}) failed: "
            f"{type(err).__name__}: {err}. Another rank probably died or hung; a collective waits "
            f"at most comm.timeout_s={self.timeout_s:g} s before failing.")
        if self.failed is None:
            self.failed = error
        return error

    @property
    def _mpi_comm(self) -> Any:
        from mpi4py import MPI  # lazy: only the 'mpi' backend touches it

        return MPI.COMM_WORLD

    def _mpi_wait(self, req: Any, tag: str) -> None:
        """Wait for a non-blocking MPI request, at most ``timeout_s``.

        Blocking MPI collectives never time out; polling ``Test`` keeps comm.timeout_s
        meaningful. The first ``MPI_SPIN_S`` are spent spinning (as a blocking MPICH call would),
        then the loop sleeps briefly between polls so a waiting rank leaves the cores to peers
        still computing. On timeout the request is left pending: the job must end (``Runtime``
        aborts the MPI job when a ``CollectiveError`` leaves its ``with`` block).
        """
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        while not req.Test():
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"no completion within {self.timeout_s:g} s")
            if now - t0 > MPI_SPIN_S:
                time.sleep(MPI_POLL_SLEEP_S)

    def _mpi_bcast_bytes(self, payload: Optional[bytes], src: int, tag: str) -> bytes:
        import numpy as np

        comm = self._mpi_comm
        n = np.array([len(payload) if payload is not None else 0], dtype=np.int64)
        self._mpi_wait(comm.Ibcast(n, root=src), tag)
        buf = (np.frombuffer(payload, dtype=np.uint8).copy() if payload is not None
               else np.empty(int(n[0]), dtype=np.uint8))
        self._mpi_wait(comm.Ibcast(buf, root=src), tag)
        return buf.tobytes()

    def _mpi_allgather_bytes(self, payload: bytes, tag: str) -> List[bytes]:
        import numpy as np

        comm = self._mpi_comm
        mine = np.array([len(payload)], dtype=np.int64)
        sizes = np.zeros(self.world_size, dtype=np.int64)
        self._mpi_wait(comm.Iallgather(mine, sizes), tag)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        send = np.frombuffer(payload, dtype=np.uint8).copy()
        out = np.empty(int(sizes.sum()), dtype=np.uint8)
        self._mpi_wait(comm.Iallgatherv(send, [out, (sizes, offsets)]), tag)
        return [out[o:o + s].tobytes() for o, s in zip(offsets.tolist(), sizes.tolist())]

    # -- collectives --------------------------------------------------------------------
    def allreduce_sum_(self, buf: torch.Tensor, tag: str = "aggregate") -> torch.Tensor:
        """In-place SUM all-reduce of a contiguous tensor (fp64 expected); one collective call.

        Returns ``buf``. With one rank: no call, ``buf`` unchanged.
        """
        if not buf.is_contiguous():
            raise ValueError("allreduce_sum_ needs a contiguous tensor (flatten into one buffer first)")
        if self.world_size <= 1:
            self._record(tag, CollectiveRecord(backend=self.backend))
            return buf
        nbytes = buf.numel() * buf.element_size()
        target = self.device if self.backend == "nccl" else torch.device("cpu")
        work = buf if buf.device == target else buf.detach().to(target)
        self._sync()
        t0 = time.perf_counter()
        try:
            if self.backend == "mpi":
                from mpi4py import MPI

                self._mpi_wait(self._mpi_comm.Iallreduce(MPI.IN_PLACE, work.detach().numpy(), op=MPI.SUM),
                               tag)
            else:
                import torch.distributed as dist

                dist.all_reduce(work, op=dist.ReduceOp.SUM)
            self._sync()
        except (RuntimeError, TimeoutError) as e:  # DistBackendError, gloo/nccl/MPI errors, MPI timeout
            raise self._fail(tag, e) from e
        ms = (time.perf_counter() - t0) * 1e3
        if work is not buf:
            with torch.no_grad():
                buf.copy_(work)
        w = self.world_size
        self._record(tag, CollectiveRecord(calls=1, bytes=nbytes * w, ring_bytes=2 * (w - 1) * nbytes,
                                           ms=ms, backend=self.backend))
        return buf

    def broadcast_object(self, obj: Any, src: int = 0, tag: str = "broadcast") -> Any:
        """``obj`` of rank ``src`` on every rank (picklable objects; small helpers, not tensors)."""
        if self.world_size <= 1:
            self._record(tag, CollectiveRecord(backend=self.backend))
            return obj
        t0 = time.perf_counter()
        try:
            if self.backend == "mpi":
                data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == src else None
                out = pickle.loads(self._mpi_bcast_bytes(data, src, tag))
            else:
                import torch.distributed as dist

                box: List[Any] = [obj if self.rank == src else None]
                dist.broadcast_object_list(box, src=src,
                                           device=self.device if self.backend == "nccl" else None)
                out = box[0]
            self._sync()
        except (RuntimeError, TimeoutError) as e:
            raise self._fail(tag, e) from e
        ms = (time.perf_counter() - t0) * 1e3
        size = len(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
        w = self.world_size
        self._record(tag, CollectiveRecord(calls=1, bytes=size * w, ring_bytes=size * (w - 1), ms=ms,
                                           backend=self.backend))
        return out

    def allgather_object(self, obj: Any, tag: str = "allgather") -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size <= 1:
            self._record(tag, CollectiveRecord(backend=self.backend))
            return [obj]
        t0 = time.perf_counter()
        try:
            if self.backend == "mpi":
                parts = self._mpi_allgather_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), tag)
                out = [pickle.loads(p) for p in parts]
            else:
                import torch.distributed as dist

                out = [None] * self.world_size
                dist.all_gather_object(out, obj)
            self._sync()
        except (RuntimeError, TimeoutError) as e:
            raise self._fail(tag, e) from e
        ms = (time.perf_counter() - t0) * 1e3
        sizes = sum(len(pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)) for o in out)
        w = self.world_size
        self._record(tag, CollectiveRecord(calls=1, bytes=sizes, ring_bytes=sizes * (w - 1), ms=ms,
                                           backend=self.backend))
        return out

    def barrier(self, tag: str = "barrier") -> None:
        """Wait until every rank arrives."""
        if self.world_size <= 1:
            self._record(tag, CollectiveRecord(backend=self.backend))
            return
        t0 = time.perf_counter()
        try:
            if self.backend == "mpi":
                self._mpi_wait(self._mpi_comm.Ibarrier(), tag)
            else:
                import torch.distributed as dist

                if self.backend == "nccl":
                    dist.barrier(device_ids=[self.device.index or 0])
                else:
                    dist.barrier()
            self._sync()
        except (RuntimeError, TimeoutError) as e:
            raise self._fail(tag, e) from e
        self._record(tag, CollectiveRecord(calls=1, ms=(time.perf_counter() - t0) * 1e3,
                                           backend=self.backend))
