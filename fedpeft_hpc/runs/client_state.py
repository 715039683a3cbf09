"""The client-state store: each client's local parts (``peft.local``), kept across rounds on disk.

A population can be far larger than what a rank ever trains, so nothing here grows with it:

- ``state.f32``: one row of ``P`` float32 values per client (``P`` = the local parts, flat, in
  the names' sorted order), a sparse file of ``num_clients x P x 4`` bytes: rows never written
  take no disk and are never read; ``written.u8``: one byte per client, 1 once its row holds a
  state. A client whose row was never written has the seeded initial state (``init``): 100,000
  clients cost nothing until they train.
- ``journal/r<round>.rank<rank>.safetensors``: what one rank's clients of one round wrote
  (``end_round``), atomically. Reads look at the newest journal of a client first, then at its
  row. A rank reads and writes only the clients it trains (and, for ``personal_acc``, those it
  evaluates), never the whole population.

Durability follows the run's checkpoints. A journal reaches ``state.f32`` only after the
checkpoint of its round is written (``compact``; each rank writes the rows of its own clients
whose newest version it holds, so ranks never write one row twice). On a start, ``recover``
applies (again: it is idempotent, in round order) the journals up to the checkpoint's round and
drops the later ones, which belong to rounds that are run again: the store then holds exactly
what it held when that checkpoint was written, whatever the number of ranks before or after.
Rows are read and written with ``pread``/``pwrite`` (no shared memory maps), so ranks on
several nodes can share the file on a cluster file system.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from fedpeft_hpc.utils.files import atomic_write, fsync_dir

_JOURNAL = re.compile(r"^r(\d{8})\.rank(\d{5})\.safetensors$")


class ClientStateStore:
    """``get(client) -> {name: tensor}``, ``put(client, tensors)``; ``end_round`` / ``index_round`` /
    ``compact`` / ``recover`` tie it to the rounds and checkpoints (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, init: Mapping[str, torch.Tensor], num_clients: int,
                 read_only: bool = False, upto_round: int | None = None):
        self.root = Path(root)
        self.names = list(init)
        self.shapes = [tuple(t.shape) for t in init.values()]
        self.numels = [t.numel() for t in init.values()]
        self.size = sum(self.numels)
        self.num_clients = num_clients
        self.init_vec = torch.cat([t.detach().reshape(-1).to(torch.float32).cpu() for t in init.values()])
        self.read_only = read_only
        self.row_bytes = 4 * self.size
        self._pending: dict[int, torch.Tensor] = {}  # this rank's puts of the current round
        self._newest: dict[int, tuple[int, Path]] = {}  # client -> (round, journal) not yet in state.f32
        self.journal_dir = self.root / "journal"
        if read_only:
            self._state_fd = _open(self.root / "state.f32", os.O_RDONLY)
            self._flag_fd = _open(self.root / "written.u8", os.O_RDONLY)
            for rnd, path in self._journals():
                if upto_round is None or rnd <= upto_round:
                    self._index_file(rnd, path)
            return
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self._state_fd = _sized(self.root / "state.f32", num_clients * self.row_bytes)
        self._flag_fd = _sized(self.root / "written.u8", num_clients)

    # -- clients ----------------------------------------------------------------------------
    def get_vec(self, client: int) -> torch.Tensor:
        """Client ``client``'s local state, flat fp32 on the CPU (a copy)."""
        self._check(client)
        if client in self._pending:
            return self._pending[client].clone()
        if client in self._newest:
            return _journal_row(self._newest[client][1], client)
        if self._flag_fd is not None and os.pread(self._flag_fd, 1, client) == b"\x01":
            data = os.pread(self._state_fd, self.row_bytes, client * self.row_bytes)
            return torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy())
        return self.init_vec.clone()

    def get(self, client: int) -> dict[str, torch.Tensor]:
        """Client ``client``'s local parts by name (CPU fp32 copies)."""
        vec = self.get_vec(client)
        return {n: c.reshape(s) for n, c, s in zip(self.names, torch.split(vec, self.numels), self.shapes)}

    def put_vec(self, client: int, vec: torch.Tensor) -> None:
        """Keep ``vec`` (flat, the names' order) as client ``client``'s state from now on (this rank)."""
        self._check(client)
        if self.read_only:
            raise RuntimeError("a read-only client-state store cannot be written")
        if vec.numel() != self.size:
            raise ValueError(f"a client state of {vec.numel()} values for a store of {self.size}")
        self._pending[client] = vec.detach().reshape(-1).to(device="cpu", dtype=torch.float32).clone()

    def put(self, client: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self.put_vec(client, torch.cat([tensors[n].detach().reshape(-1).to("cpu", torch.float32)
                                        for n in self.names]))

    def written(self, client: int) -> bool:
        """Whether ``client`` ever stored a state (else it has the initial one)."""
        return (client in self._pending or client in self._newest
                or (self._flag_fd is not None and os.pread(self._flag_fd, 1, client) == b"\x01"))

    # -- rounds and checkpoints ----------------------------------------------------------------
    def end_round(self, round_idx: int, rank: int) -> None:
        """Write this rank's puts of ``round_idx`` to its journal (atomically); call before the round's
        all-reduce, so that every rank's journal exists once it returns."""
        if not self._pending:
            return
        clients = sorted(self._pending)
        rows = torch.stack([self._pending[c] for c in clients])
        path = self.journal_dir / f"r{round_idx:08d}.rank{rank:05d}.safetensors"
        from safetensors.torch import save_file

        meta = {"clients": json.dumps(clients), "round": str(round_idx)}
        atomic_write(path, lambda tmp: save_file({"rows": rows.contiguous()}, tmp, metadata=meta))
        self._pending.clear()
        self._index_file(round_idx, path)

    def index_round(self, round_idx: int) -> None:
        """Learn which clients every rank wrote in ``round_idx`` (after the round's all-reduce)."""
        for rnd, path in self._journals():
            if rnd == round_idx:
                self._index_file(rnd, path)

    def compact(self, upto_round: int, rank: int) -> None:
        """After the checkpoint of ``upto_round`` is written (and every rank knows it): this rank's journals
        of rounds <= ``upto_round`` go into ``state.f32`` (only the newest version of each client, so no
        row is written by two ranks), are made durable, then deleted."""
        mine = [(r, p) for r, p in self._journals() if r <= upto_round and _rank_of(p) == rank]
        for rnd, path in mine:
            clients, rows = _read_journal(path)
            for client, row in zip(clients, rows):
                if self._newest.get(client, (None, None))[1] == path:
                    self._write_row(client, row)
        if mine:
            os.fsync(self._state_fd)
            os.fsync(self._flag_fd)
        for _, path in mine:
            path.unlink()
        if mine:
            fsync_dir(self.journal_dir)
        self._newest = {c: v for c, v in self._newest.items() if v[0] > upto_round}

    def recover(self, checkpoint_round: int) -> None:
        """At a start (one rank, before the others open the store): make the store what it was when the
        checkpoint of ``checkpoint_round`` was written (0: none, the initial states)."""
        journals = self._journals()
        for rnd, path in journals:
            if rnd <= checkpoint_round:
                clients, rows = _read_journal(path)
                for client, row in zip(clients, rows):
                    self._write_row(client, row)
        os.fsync(self._state_fd)
        os.fsync(self._flag_fd)
        for _, path in journals:
            path.unlink()
        fsync_dir(self.journal_dir)
        self._newest.clear()
        self._pending.clear()

    def close(self) -> None:
        for fd in (self._state_fd, self._flag_fd):
            if fd is not None:
                os.close(fd)
        self._state_fd = self._flag_fd = None

    # -- inside ------------------------------------------------------------------------------
    def _check(self, client: int) -> None:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} outside 0..{self.num_clients - 1}")

    def _write_row(self, client: int, row: torch.Tensor) -> None:
        os.pwrite(self._state_fd, row.numpy().astype(np.float32, copy=False).tobytes(), client * self.row_bytes)
        os.pwrite(self._flag_fd, b"\x01", client)

    def _journals(self) -> list[tuple[int, Path]]:
        """Every journal file, in (round, rank) order."""
        if not self.journal_dir.is_dir():
            return []
        found = []
        for p in self.journal_dir.iterdir():
            m = _JOURNAL.match(p.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), p))
        return [(r, p) for r, _, p in sorted(found)]

    def _index_file(self, round_idx: int, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            clients = json.loads((f.metadata() or {})["clients"])
        for c in clients:
            if c not in self._newest or self._newest[c][0] <= round_idx:
                self._newest[c] = (round_idx, path)


class StoreRounds:
    """The round and checkpoint hooks of an owner of a ``ClientStateStore | None`` (``self.store``), for the
    engine to call: each does nothing without a store."""

    store: ClientStateStore | None = None

    def end_round(self, round_idx: int, rank: int) -> None:
        if self.store is not None:
            self.store.end_round(round_idx, rank)

    def after_aggregate(self, round_idx: int) -> None:
        if self.store is not None:
            self.store.index_round(round_idx)

    def after_checkpoint(self, round_idx: int, rank: int) -> None:
        if self.store is not None:
            self.store.compact(round_idx, rank)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def open_recovered(root: str | os.PathLike, init: Mapping[str, torch.Tensor], num_clients: int,
                   resume_round: int | None) -> None:
    """At a start (rank 0, before the other ranks open it): the store at ``root`` as of the checkpoint of
    ``resume_round`` (``None``: a fresh start, whatever an earlier start left there is removed)."""
    if resume_round is None:
        remove_store(root)
    store = ClientStateStore(root, init, num_clients)
    store.recover(resume_round or 0)
    store.close()


def remove_store(root: str | os.PathLike) -> None:
    """Delete a store (a fresh start into a directory whose earlier start wrote no checkpoint)."""
    shutil.rmtree(root, ignore_errors=True)


def _rank_of(path: Path) -> int:
    return int(_JOURNAL.match(path.name).group(2))


def _read_journal(path: Path) -> tuple[Sequence[int], torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        clients = json.loads((f.metadata() or {})["clients"])
        rows = f.get_tensor("rows").clone()
    return clients, rows


def _journal_row(path: Path, client: int) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        clients = json.loads((f.metadata() or {})["clients"])
        return f.get_slice("rows")[clients.index(client)].clone()


def _open(path: Path, flags: int) -> int | None:
    try:
        return os.open(str(path), flags)
    except FileNotFoundError:
        return None


def _sized(path: Path, nbytes: int) -> int:
    """Open (create) ``path`` read-write with exactly ``nbytes`` (sparse where it grows)."""
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o666)
    if os.fstat(fd).st_size != nbytes:
        os.ftruncate(fd, nbytes)
    return fd
