"""Heterogeneous LoRA ranks (``peft.lora_ranks``, HetLoRA): who has which rank, what each exchanges.

Clients are dealt to the rank tiers in equal shares by a permutation drawn from the seed alone
(the same for any number of ranks, saved in ``partition.json``). A rank-``r`` client holds the
first ``r`` rows of every A and the first ``r`` columns of every B of the global (largest-rank)
state: it trains those, sends those, and the server sums the updates zero-padded to the largest
rank. The client's update is ``pad(local) - global``: outside its rank the padded state is zero,
so the server's average of states is HetLoRA's zero-padding aggregation (with server learning
rate 1 under FedAvg) and every client's truncation takes part in it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from fedpeft_hpc.peft.lora import truncated_shape, truncation_mask
from fedpeft_hpc.utils.streams import LORA_TIERS, rng


def assign_ranks(ranks: Sequence[int], num_clients: int, seed: int) -> np.ndarray:
    """Each client's LoRA rank: client ``perm[i]`` gets tier ``i * T // num_clients`` of ``ranks``."""
    perm = rng(seed, LORA_TIERS).permutation(num_clients)
    out = np.empty(num_clients, dtype=np.int64)
    out[perm] = np.asarray(ranks, dtype=np.int64)[np.arange(num_clients) * len(ranks) // num_clients]
    return out


def rank_mask(tensors: Mapping[str, torch.Tensor], rank: int) -> torch.Tensor:
    """Flat boolean mask (the names' order) of the entries a rank-``rank`` client holds."""
    parts = []
    for name, t in tensors.items():
        m = truncation_mask(name, tuple(t.shape), rank)
        parts.append(torch.ones(t.numel(), dtype=torch.bool) if m is None else m.reshape(-1))
    return torch.cat(parts)


@torch.no_grad()
def truncate_(tensors: Mapping[str, torch.Tensor], rank: int) -> None:
    """Zero, in place, the entries of ``tensors`` that a rank-``rank`` client does not hold."""
    for name, t in tensors.items():
        m = truncation_mask(name, tuple(t.shape), rank)
        if m is not None:
            t.mul_(m.to(device=t.device, dtype=t.dtype))


def rank_bytes(tensors: Mapping[str, torch.Tensor], rank: int) -> int:
    """Bytes of one transfer of ``tensors`` truncated to ``rank``, in their own dtypes."""
    return sum(int(np.prod(truncated_shape(n, tuple(t.shape), rank))) * t.element_size()
               for n, t in tensors.items())
