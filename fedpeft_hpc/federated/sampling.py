"""Every random stream of a run, derived from (seed, round, client) and never from rank.

Cohort sampling, dropout and each client's data order are pure functions of these
keys, so any number of processes draws exactly the same values.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Stream tags: one per use, so that two uses never share random numbers.
COHORT, DROPOUT, CLIENT_DATA, CENTRAL_NOISE, CLIENT_NOISE, CLIENT_AUGMENT = 11, 12, 13, 14, 15, 16


def rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *map(int, keys)])


def torch_generator(seed: int, *keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(rng(seed, *keys).integers(0, 2**63 - 1)))
    return g


def sample_cohort(seed: int, round_idx: int, num_clients: int, clients_per_round: int) -> np.ndarray:
    """Clients of this round: uniform without replacement, sorted ids."""
    picked = rng(seed, COHORT, round_idx).choice(num_clients, size=clients_per_round, replace=False)
    return np.sort(picked)


def dropped(seed: int, round_idx: int, client: int, p: float) -> bool:
    """Whether ``client`` fails to return its update in this round (probability ``p``)."""
    if p <= 0.0:
        return False
    return bool(rng(seed, DROPOUT, round_idx, client).random() < p)


def assign_to_ranks(clients: Sequence[int], sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Balance clients over ranks by sample count (longest-processing-time first).

    Deterministic: ties broken by client id and then by rank index. Each rank's list is
    sorted by client id.
    """
    loads = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    order = sorted(clients, key=lambda c: (-int(sizes[c]), int(c)))
    for c in order:
        r = min(range(world_size), key=lambda i: (loads[i], i))
        out[r].append(int(c))
        loads[r] += int(sizes[c])
    return [sorted(x) for x in out]


class Schedule:
    """Who is sampled and who returns, round by round: a pure function of the seed."""

    def __init__(self, seed: int, num_clients: int, clients_per_round: int, dropout: float):
        self.seed = seed
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.dropout = dropout

    def cohort(self, round_idx: int) -> list[int]:
        return [int(c) for c in sample_cohort(self.seed, round_idx, self.num_clients, self.clients_per_round)]

    def dropped(self, round_idx: int) -> list[int]:
        return [c for c in self.cohort(round_idx) if dropped(self.seed, round_idx, c, self.dropout)]

    def trained(self, round_idx: int) -> list[int]:
        """Sampled clients that return an update (dropped clients are not trained in simulation)."""
        return [c for c in self.cohort(round_idx) if not dropped(self.seed, round_idx, c, self.dropout)]

    def participation(self, rounds: int) -> np.ndarray:
        """How many of rounds 1..rounds each client trains in."""
        counts = np.zeros(self.num_clients, dtype=np.int64)
        for r in range(1, rounds + 1):
            counts[self.trained(r)] += 1
        return counts
