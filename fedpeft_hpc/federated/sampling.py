"""Who takes part in a round, and which rank trains whom.

Cohort sampling and dropout are pure functions of (seed, round, client) through the streams
of ``utils.streams``, never of the rank, so every rank draws the same cohort without talking.
``assign_to_ranks`` then spreads the returning clients over the ranks deterministically.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedpeft_hpc.utils.streams import COHORT, DROPOUT, POISSON_COHORT, rng

SAMPLINGS = ("fixed", "poisson")


def cohort_sampling(sampling: str, privacy_mode: str) -> str:
    """``fed.sampling`` with ``auto`` resolved: Poisson under client-level DP (what its accountant
    analyses, as in DP-FedAvg), fixed-size cohorts otherwise."""
    if sampling == "auto":
        return "poisson" if privacy_mode == "client" else "fixed"
    return sampling


def sample_cohort(seed: int, round_idx: int, num_clients: int, clients_per_round: int) -> np.ndarray:
    """Clients of this round: exactly ``clients_per_round``, uniform without replacement, sorted ids."""
    picked = rng(seed, COHORT, round_idx).choice(num_clients, size=clients_per_round, replace=False)
    return np.sort(picked)


def poisson_cohort(seed: int, round_idx: int, num_clients: int, clients_per_round: int) -> np.ndarray:
    """Clients of this round: each independently with probability ``clients_per_round / num_clients``
    (the cohort size varies, may be 0), sorted ids."""
    q = clients_per_round / num_clients
    return np.flatnonzero(rng(seed, POISSON_COHORT, round_idx).random(num_clients) < q)


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

    def __init__(self, seed: int, num_clients: int, clients_per_round: int, dropout: float,
                 sampling: str = "fixed"):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling {sampling!r} is not one of {SAMPLINGS}")
        self.seed = seed
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.dropout = dropout
        self.sampling = sampling

    def cohort(self, round_idx: int) -> list[int]:
        draw = poisson_cohort if self.sampling == "poisson" else sample_cohort
        return [int(c) for c in draw(self.seed, round_idx, self.num_clients, self.clients_per_round)]

    def dropped(self, round_idx: int) -> list[int]:
        return [c for c in self.cohort(round_idx) if dropped(self.seed, round_idx, c, self.dropout)]

    def returning(self, round_idx: int) -> list[int]:
        """Sampled clients that return an update (dropped clients are not trained in simulation)."""
        return [c for c in self.cohort(round_idx) if not dropped(self.seed, round_idx, c, self.dropout)]

    def participation(self, rounds: int) -> np.ndarray:
        """How many of rounds 1..rounds each client trains in."""
        counts = np.zeros(self.num_clients, dtype=np.int64)
        for r in range(1, rounds + 1):
            counts[self.returning(r)] += 1
        return counts
