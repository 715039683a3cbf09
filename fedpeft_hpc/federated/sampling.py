"""Who takes part in a round, and which rank trains whom.

Cohort sampling and dropout are pure functions of (seed, round, client) through the streams
of ``utils.streams``, never of the rank, so every rank draws the same cohort without talking.
Under client-level DP the engine hands the schedule the run's noise key (``Schedule.use_key``):
the accountant takes credit for sampling the cohort, which holds only while membership is
hidden, so with secret noise (``privacy.seeded_noise=false``) cohorts and dropout are drawn
from the secret every rank holds (still the same on every rank, still independent of the
number of ranks); with a seeded key they are exactly the seed's draws.
``assign_to_ranks`` then spreads the returning clients over the ranks deterministically.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from fedpeft_hpc.privacy.noise import NoiseKey
from fedpeft_hpc.utils.streams import COHORT, DROPOUT, POISSON_COHORT, rng

SAMPLINGS = ("fixed", "poisson")


def cohort_sampling(sampling: str, privacy_mode: str) -> str:
    """``fed.sampling`` with ``auto`` resolved: Poisson under client-level DP (what its accountant
    analyses, as in DP-FedAvg), fixed-size cohorts otherwise."""
    if sampling == "auto":
        return "poisson" if privacy_mode == "client" else "fixed"
    return sampling


def _stream(seed: int, key: Optional[NoiseKey], tag: int, *keys: int) -> np.random.Generator:
    """The stream ``(tag, *keys)``: from the seed, or from ``key`` when one is given."""
    return key.rng(tag, *keys) if key is not None else rng(seed, tag, *keys)


def sample_cohort(seed: int, round_idx: int, num_clients: int, clients_per_round: int,
                  key: Optional[NoiseKey] = None) -> np.ndarray:
    """Clients of this round: exactly ``clients_per_round``, uniform without replacement, sorted ids."""
    picked = _stream(seed, key, COHORT, round_idx).choice(num_clients, size=clients_per_round, replace=False)
    return np.sort(picked)


def poisson_cohort(seed: int, round_idx: int, num_clients: int, clients_per_round: int,
                   key: Optional[NoiseKey] = None) -> np.ndarray:
    """Clients of this round: each independently with probability ``clients_per_round / num_clients``
    (the cohort size varies, may be 0), sorted ids."""
    q = clients_per_round / num_clients
    return np.flatnonzero(_stream(seed, key, POISSON_COHORT, round_idx).random(num_clients) < q)


def dropped(seed: int, round_idx: int, client: int, p: float, key: Optional[NoiseKey] = None) -> bool:
    """Whether ``client`` fails to return its update in this round (probability ``p``)."""
    if p <= 0.0:
        return False
    return bool(_stream(seed, key, DROPOUT, round_idx, client).random() < p)


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
    """Who is sampled and who returns, round by round: a pure function of the seed, or of the
    run's noise key after ``use_key`` (client-level DP)."""

    def __init__(self, seed: int, num_clients: int, clients_per_round: int, dropout: float,
                 sampling: str = "fixed"):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling {sampling!r} is not one of {SAMPLINGS}")
        self.seed = seed
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.dropout = dropout
        self.sampling = sampling
        self.key: Optional[NoiseKey] = None

    def use_key(self, key: Optional[NoiseKey]) -> None:
        """Draw cohorts and dropout from ``key`` (a seeded key draws exactly what the seed does);
        ``None``: from the seed."""
        self.key = key

    def cohort(self, round_idx: int) -> list[int]:
        draw = poisson_cohort if self.sampling == "poisson" else sample_cohort
        return [int(c) for c in draw(self.seed, round_idx, self.num_clients, self.clients_per_round, self.key)]

    def dropped(self, round_idx: int) -> list[int]:
        return [c for c in self.cohort(round_idx) if dropped(self.seed, round_idx, c, self.dropout, self.key)]

    def returning(self, round_idx: int) -> list[int]:
        """Sampled clients that return an update (dropped clients are not trained in simulation)."""
        return [c for c in self.cohort(round_idx) if not dropped(self.seed, round_idx, c, self.dropout, self.key)]

    def participation(self, rounds: int) -> np.ndarray:
        """How many of rounds 1..rounds each client trains in."""
        counts = np.zeros(self.num_clients, dtype=np.int64)
        for r in range(1, rounds + 1):
            counts[self.returning(r)] += 1
        return counts
