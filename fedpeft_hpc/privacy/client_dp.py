"""``privacy.mode=client``: client-level DP, DP-FedAvg (McMahan et al., ICLR 2018).

Each returning client's whole update is clipped to L2 norm C = ``privacy.max_grad_norm``;
the server sums the clipped updates (the engine's one all-reduce), adds Gaussian noise
with std ``noise_multiplier * C`` once, and divides by the FIXED expected cohort size
m = ``fed.clients_per_round`` (not by how many returned), so one client changes the
average by at most C / m whatever happens in the round.

Weights: every update counts 1.0. FedAvg's sample-count weights are replaced on purpose:
they would make a client's influence (the sensitivity) depend on its data size, which is
private and unbounded.

Noise is drawn on CPU in fp64 from ``torch_generator(seed, CENTRAL_NOISE, round)``, so
every rank and every world size adds exactly the same noise and all ranks keep the same
global state without a broadcast.

Accounting: one step of the sampled Gaussian mechanism per round, sampling rate
q = m / num_clients, with Opacus's accountant. The cohort is in fact drawn as a fixed-size
sample without replacement (``federated.sampling``); applying the Poisson-subsampling
analysis to it is the usual approximation (as in TF Privacy and pfl-research) and is
stated in ``report()``. Every round counts as a step, whoever was sampled and whether or
not the round was applied (rounds skipped for too few updates release nothing, so this
is conservative). Client dropout is not credited.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from fedpeft_hpc.config.schema import FedConfig, PrivacyConfig
from fedpeft_hpc.privacy.accounting import merge_history
from fedpeft_hpc.privacy.base import PlainLocalTraining
from fedpeft_hpc.privacy.mechanism import DPMechanism
from fedpeft_hpc.utils.streams import CENTRAL_NOISE, torch_generator

log = logging.getLogger(__name__)

SAMPLING_NOTE = ("cohorts are fixed-size samples without replacement (m = fed.clients_per_round of "
                 "fed.num_clients); the accountant's Poisson-subsampling analysis with q = m / num_clients is "
                 "applied to them, the usual approximation (TF Privacy, pfl-research)")


def clip_update(delta: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``delta`` scaled by ``min(1, max_norm / ||delta||_2)`` (norm computed in fp64)."""
    norm = float(torch.linalg.vector_norm(delta.double()))
    if norm > max_norm:
        return delta * (max_norm / norm)
    return delta


class ClientDP(PlainLocalTraining, DPMechanism):
    mode = "client"
    clipping = "update clipping"

    def __init__(self, privacy: PrivacyConfig, fed: FedConfig, seed: int):
        super().__init__(privacy, seed)
        self.num_clients = int(fed.num_clients)
        self.cohort_size = int(fed.clients_per_round)
        self.rounds_planned = int(fed.rounds)
        self.sample_rate = self.cohort_size / self.num_clients
        what = (f"client-level DP ({self.cohort_size} of {self.num_clients} clients per round, "
                f"{self.rounds_planned} rounds)")
        self.noise_multiplier = self.calibrate(self.sample_rate, self.rounds_planned, what)
        if self.fixed_noise is None:
            log.info("client-level DP: target epsilon %g (delta %g, %s): noise multiplier %.4f",
                     self.target_epsilon, self.delta, self.accountant, self.noise_multiplier)
        self.history: list[tuple[float, float, int]] = []

    # -- hooks ---------------------------------------------------------------------------
    def client_update(self, delta: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, float]:
        return clip_update(delta, self.max_grad_norm), 1.0

    def noise(self, numel: int, round_idx: int) -> torch.Tensor:
        """The round's noise vector: fp64 on CPU, a pure function of (seed, round)."""
        std = self.noise_multiplier * self.max_grad_norm
        if std == 0.0:
            return torch.zeros(numel, dtype=torch.float64)
        gen = torch_generator(self.seed, CENTRAL_NOISE, round_idx)
        return torch.normal(0.0, std, size=(numel,), generator=gen, dtype=torch.float64)

    def finalize(self, update_sum: torch.Tensor, weight_sum: float, round_idx: int) -> torch.Tensor:
        noise = self.noise(update_sum.numel(), round_idx).view_as(update_sum)
        noised = update_sum.double() + noise.to(update_sum.device)
        return noised / float(self.cohort_size)

    # -- accounting ----------------------------------------------------------------------
    def account(self, round_idx: int, returning: Sequence[int]) -> None:
        self.history = merge_history([*self.history, (self.noise_multiplier, self.sample_rate, 1)])

    def epsilon(self) -> float | None:
        return self.epsilon_of(self.history)

    def report(self) -> dict:
        return {**self.report_header(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": int(sum(s for _, _, s in self.history)),
                "history": [list(e) for e in self.history],
                "clients_per_round": self.cohort_size, "num_clients": self.num_clients,
                "aggregation": "sum of clipped updates + N(0, (noise_multiplier * max_grad_norm)^2) once, "
                               "divided by clients_per_round; every update weighs 1",
                "sampling": SAMPLING_NOTE}

    def state_dict(self) -> dict:
        return {"history": [list(e) for e in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = merge_history((state or {}).get("history", []))
