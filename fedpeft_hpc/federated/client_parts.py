"""A client's own view of the shared model: its local parts and its LoRA rank.

The engine's global state holds the SENT tensors only. Before a client trains, ``ClientParts``
loads the client's local parts (``peft.local``, from the client-state store) into the model and
restricts every LoRA layer to the client's rank (``peft.lora_ranks``), zeroing the global
entries outside it; after training it stores the local parts back and turns the update into
``pad(local) - global`` (see ``peft.ranks``). For evaluation of the global model it puts the
local parts back at their seeded initialisation and the full rank: the global model is what
every client shares plus what a client that never trained would hold.

Client-batched training (``federated.batched``) holds every trained tensor of a client, sent and
local, in one slot row in ``FlatLayout(params)`` order (``full_layout``); ``sent_index`` and
``local_index`` map the sent and the local tensors into that row. ``slot_start`` and
``slot_finish`` are ``start`` and ``finish`` for a slot row (the same truncation and update
math); the slot's rank mask is the trainer's (``ClientJob.rank``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.peft import FlatLayout
from fedpeft_hpc.peft.lora import set_active_rank
from fedpeft_hpc.peft.parts import StateParts, select, state_parts
from fedpeft_hpc.peft.ranks import rank_bytes, rank_mask, truncate_
from fedpeft_hpc.runs.client_state import ClientStateStore, StoreRounds, open_recovered

STORE_DIR = "client_state"


class ClientParts(StoreRounds):
    def __init__(self, cfg: Config, model: nn.Module, params: Mapping[str, nn.Parameter],
                 lora_ranks: np.ndarray | None, run_dir: Path, device: torch.device):
        self.parts: StateParts = state_parts(model, cfg.peft)
        self.peft = cfg.peft
        self.model = model
        self.sent = select(params, self.parts.sent)
        self.local = select(params, self.parts.local)
        self.local_layout = FlatLayout(self.local) if self.local else None
        self.full_layout = FlatLayout(params)  # a batched slot's row: sent and local tensors by name
        self.sent_index = _index_into(self.full_layout, self.parts.sent).to(device)
        self.local_index = _index_into(self.full_layout, self.parts.local).to(device)
        self.init_local = ({n: p.detach().clone() for n, p in self.local.items()} if self.local else {})
        self.lora_ranks = lora_ranks
        self.num_clients = cfg.fed.num_clients
        self.store_dir = Path(run_dir) / STORE_DIR
        self.store: ClientStateStore | None = None
        self.device = device
        self._masks: dict[int, torch.Tensor] = {}  # rank -> flat mask over the sent layout (on device)
        self._bytes: dict[int, int] = {}

    @property
    def per_client(self) -> bool:
        """A client's start or update differs from the shared one (local parts, LoRA ranks)."""
        return bool(self.local or self.lora_ranks is not None)

    @property
    def active(self) -> bool:
        """Something differs per client (local parts, ranks) or is frozen (a log line says so)."""
        return bool(self.parts.split or self.lora_ranks is not None)

    def why(self) -> str:
        """The settings that make clients differ, as the log names them."""
        p = self.peft
        said = [f"peft.{k}={v}" for k, v in (("local", p.local), ("frozen", p.frozen), ("lora_ranks", p.lora_ranks))
                if v]
        return ", ".join(said)

    # -- the store ----------------------------------------------------------------------------
    def open_store(self, is_main: bool, resume_round: int | None) -> None:
        """Rank 0 (before the ranks agree on the start): the store as of the checkpoint (none: fresh)."""
        if self.local and is_main:
            open_recovered(self.store_dir, self.init_local, self.num_clients, resume_round)

    def attach_store(self) -> None:
        """Every rank, after rank 0's ``open_store`` (the ranks' agreement check lies between)."""
        if self.local:
            self.store = ClientStateStore(self.store_dir, self.init_local, self.num_clients)

    # -- a client -----------------------------------------------------------------------------
    def rank_of(self, client: int) -> int | None:
        return int(self.lora_ranks[client]) if self.lora_ranks is not None else None

    def mask(self, rank: int) -> torch.Tensor:
        if rank not in self._masks:
            self._masks[rank] = rank_mask(self.sent, rank).to(self.device)
        return self._masks[rank]

    def start(self, client: int, global_vec: torch.Tensor) -> torch.Tensor:
        """Load ``client``'s local parts and rank; the sent state it starts from (its truncation)."""
        self._load_local(client)
        set_active_rank(self.model, self.rank_of(client))
        return self._sent_start(client, global_vec)

    def finish(self, client: int, delta: torch.Tensor, global_vec: torch.Tensor) -> torch.Tensor:
        """Store ``client``'s local parts; its update against the full global state (``pad(local) - global``)."""
        if self.store is not None:
            self.store.put(client, self.local)
        set_active_rank(self.model, None)
        return self._padded_update(client, delta, global_vec)

    def slot_start(self, client: int, global_vec: torch.Tensor) -> torch.Tensor:
        """``client``'s slot row (``full_layout``): the sent state it starts from and its local parts."""
        row = torch.empty(self.full_layout.size, dtype=torch.float32, device=global_vec.device)
        row[self.sent_index] = self._sent_start(client, global_vec)
        if self.local:
            row[self.local_index] = self._local_vec(client).to(row.device)
        return row

    def slot_finish(self, client: int, row: torch.Tensor, start: torch.Tensor, global_vec: torch.Tensor
                    ) -> torch.Tensor:
        """Store the local parts of ``client``'s final slot ``row`` (started from ``start``); its update."""
        if self.store is not None:
            self.store.put_vec(client, row[self.local_index])
        return self._padded_update(client, (row - start)[self.sent_index], global_vec)

    def _sent_start(self, client: int, global_vec: torch.Tensor) -> torch.Tensor:
        """The global state truncated to ``client``'s rank."""
        rank = self.rank_of(client)
        return global_vec if rank is None else global_vec * self.mask(rank)

    def _padded_update(self, client: int, delta: torch.Tensor, global_vec: torch.Tensor) -> torch.Tensor:
        rank = self.rank_of(client)
        if rank is None:
            return delta
        # outside its rank the client's padded state is zero (also where DP-SGD noise touched it)
        return torch.where(self.mask(rank), delta, -global_vec)

    def as_global(self) -> None:
        """The model as the global one: local parts at their initialisation, the full rank."""
        self._copy_local(self.init_local)
        set_active_rank(self.model, None)

    def as_client(self, client: int) -> None:
        """The model as ``client``'s personalized one (the sent tensors must hold the global state)."""
        self._load_local(client)
        rank = self.rank_of(client)
        set_active_rank(self.model, rank)
        if rank is not None:
            truncate_(self.sent, rank)

    def _load_local(self, client: int) -> None:
        if self.store is not None:
            self._copy_local(self.store.get(client))
        elif self.local:
            self._copy_local(self.init_local)

    def _local_vec(self, client: int) -> torch.Tensor:
        """``client``'s local parts, flat (the local names' order)."""
        if self.store is not None:
            return self.store.get_vec(client)
        return self.local_layout.flatten(self.init_local, torch.float32)

    @torch.no_grad()
    def _copy_local(self, values: Mapping[str, torch.Tensor]) -> None:
        for n, p in self.local.items():
            p.copy_(values[n])

    def client_bytes(self, client: int, per_transfer: int) -> int:
        """Bytes one transfer of ``client``'s own sent tensors takes."""
        rank = self.rank_of(client)
        if rank is None:
            return per_transfer
        if rank not in self._bytes:
            self._bytes[rank] = rank_bytes(self.sent, rank)
        return self._bytes[rank]


def _index_into(layout: FlatLayout, names) -> torch.Tensor:
    """Positions of the tensors ``names`` (in that order) in ``layout``'s flat vector."""
    at, offsets = 0, {}
    for name, n in zip(layout.names, layout.numels):
        offsets[name] = (at, at + n)
        at += n
    spans = [torch.arange(*offsets[n]) for n in names]
    return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.int64)
