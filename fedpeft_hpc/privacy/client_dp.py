"""``privacy.mode=client``: client-level DP, DP-FedAvg (McMahan et al., ICLR 2018).

Each returning client's whole update is clipped to L2 norm C = ``privacy.max_grad_norm``;
the server sums the clipped updates (the engine's one all-reduce), adds Gaussian noise
with std ``noise_multiplier * C`` once, and divides by the FIXED expected cohort size
m = ``fed.clients_per_round`` (not by how many returned), so one client changes the
average by at most C / m whatever happens in the round.

Weights: every update counts 1.0. FedAvg's sample-count weights are replaced on purpose:
they would make a client's influence (the sensitivity) depend on its data size, which is
private and unbounded.

Noise is drawn once per round in fp64 on CPU from a generator keyed by (noise key, round)
(``privacy.noise``: a secret shared by all ranks by default, the seed with
``privacy.seeded_noise``), so every rank adds exactly the same noise and all ranks keep the
same global state without a broadcast.

Accounting, by ``fed.sampling`` (``federated.sampling.cohort_sampling``):

* ``poisson`` (the default here): every client joins a round independently with probability
  q = m / num_clients. Neighbouring datasets differ by one client's presence (add/remove), the
  sum's sensitivity is C, and each round is exactly one step of the Poisson-subsampled Gaussian
  mechanism with noise multiplier sigma that Opacus' accountant analyses.
* ``fixed``: cohorts of exactly m without replacement. The neighbouring relation is then
  replace-one (N public), under which one client can move the sum by up to 2C. Accounted (and
  calibrated) with Google's ``dp-accounting``: its RDP accountant's analysis of sampling without
  replacement under replace-one (``privacy.wor_accounting``; Wang, Balle, Kasiviswanathan 2019),
  a proven bound. ``privacy.accountant=prv`` (Opacus, Poisson only) is refused for it.

Every round counts as a step, whoever was sampled. Every round is applied: the engine adds
the noised sum divided by m to the state whether many, few or no updates arrived (noise alone
for an empty cohort), as DP-FedAvg does; skipping a round for too few updates would release,
without noise, whether the cohort was small (``fed.min_clients`` must be 1 in this mode, a
``ConfigError`` otherwise). Cohorts (and dropout) are drawn from the run's noise key
(``federated.sampling.Schedule.use_key``): the subsampling the accountant credits needs them
hidden. Client dropout is not credited.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from fedpeft_hpc.config.schema import FedConfig, PrivacyConfig
from fedpeft_hpc.privacy.accounting import merge_history, opacus_analysis
from fedpeft_hpc.privacy.base import PlainLocalTraining
from fedpeft_hpc.privacy.mechanism import TRUST_MODEL, DPMechanism
from fedpeft_hpc.privacy.noise import gaussian
from fedpeft_hpc.privacy.wor_accounting import wor_analysis, wor_epsilon, wor_noise_for
from fedpeft_hpc.utils.streams import CENTRAL_NOISE

log = logging.getLogger(__name__)

SAMPLING_NOTES = {
    "poisson": ("Poisson cohorts: each client joins a round independently with probability q = "
                "clients_per_round / num_clients; add/remove adjacency, sensitivity C; accounted exactly as the "
                "Poisson-subsampled Gaussian mechanism with noise multiplier sigma"),
    "fixed": ("fixed-size cohorts of clients_per_round without replacement; replace-one adjacency, sensitivity 2C: "
              "accounted with noise multiplier sigma / 2 by dp-accounting's RDP analysis of sampling without "
              "replacement (a proven bound; see analysis)"),
}

ADJACENCY = {
    "poisson": "client level, add/remove: the two datasets differ by all the records of one client (its presence "
               "or absence); num_clients is not protected beyond that",
    "fixed": "client level, replace-one: the two datasets differ in the data of one client (num_clients public)",
}


def clip_update(delta: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``delta`` scaled by ``min(1, max_norm / ||delta||_2)`` (norm computed in fp64)."""
    norm = float(torch.linalg.vector_norm(delta.double()))
    if norm > max_norm:
        return delta * (max_norm / norm)
    return delta


class ClientDP(PlainLocalTraining, DPMechanism):
    mode = "client"
    clipping = "update clipping"
    secret_cohorts = True  # the accountant amplifies by the cohort sampling rate q = m/N
    applies_every_round = True  # DP-FedAvg: the noised, divided sum, noise alone for an empty cohort

    def __init__(self, privacy: PrivacyConfig, fed: FedConfig, seed: int, sampling: str):
        super().__init__(privacy, seed)
        if sampling not in SAMPLING_NOTES:
            raise ValueError(f"client-level DP: unknown cohort sampling {sampling!r}")
        self.sampling = sampling
        self.num_clients = int(fed.num_clients)
        self.cohort_size = int(fed.clients_per_round)
        self.rounds_planned = int(fed.rounds)
        self.sample_rate = self.cohort_size / self.num_clients
        #: the sum's sensitivity in units of C: one client joins/leaves (1) or replaces another (2)
        self.sensitivity = 1.0 if sampling == "poisson" else 2.0
        if self.fixed_noise is not None:
            self.noise_multiplier = float(self.fixed_noise)
        else:
            what = (f"client-level DP ({self.cohort_size} of {self.num_clients} clients per round, "
                    f"{self.rounds_planned} rounds, {sampling} cohorts)")
            if sampling == "fixed":  # without replacement: dp-accounting, whatever privacy.accountant says
                accounted = wor_noise_for(self.target_epsilon, self.delta, self.num_clients, self.cohort_size,
                                          self.rounds_planned, what)
            else:
                accounted = self.calibrate(self.sample_rate, self.rounds_planned, what)
            self.noise_multiplier = accounted * self.sensitivity
            log.info("client-level DP: target epsilon %g (delta %g, %s, %s cohorts): noise multiplier %.4f",
                     self.target_epsilon, self.delta, self.accountant, sampling, self.noise_multiplier)
        self.history: list[tuple[float, float, int]] = []
        self.check_delta(self.num_clients, "clients")

    @property
    def accounted_noise_multiplier(self) -> float:
        """Noise std over the sum's sensitivity: what the accountant analyses."""
        return self.noise_multiplier / self.sensitivity

    # -- hooks (local training is FedAvg's: PlainLocalTraining) ---------------------------
    def client_update(self, delta: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, float]:
        return clip_update(delta, self.max_grad_norm), 1.0

    def noise(self, numel: int, round_idx: int) -> torch.Tensor:
        """The round's noise vector: fp64 on CPU, a function of (noise key, round)."""
        std = self.noise_multiplier * self.max_grad_norm
        return gaussian(std, numel, self.generator(CENTRAL_NOISE, round_idx), secure=not self.seeded_noise)

    def finalize(self, update_sum: torch.Tensor, weight_sum: float, round_idx: int) -> torch.Tensor:
        noise = self.noise(update_sum.numel(), round_idx).view_as(update_sum)
        noised = update_sum.double() + noise.to(update_sum.device)
        return noised / float(self.cohort_size)

    # -- accounting ----------------------------------------------------------------------
    def account(self, round_idx: int, returning: Sequence[int]) -> None:
        self.history = merge_history([*self.history, (self.accounted_noise_multiplier, self.sample_rate, 1)])

    def epsilon(self) -> float | None:
        if self.sampling == "fixed":
            return wor_epsilon(self.history, self.num_clients, self.cohort_size, self.delta)
        return self.epsilon_of(self.history)

    def adjacency(self) -> str:
        return ADJACENCY[self.sampling]

    def analysis(self) -> str:
        return wor_analysis() if self.sampling == "fixed" else opacus_analysis(self.accountant)

    def trust_model(self) -> str:
        return TRUST_MODEL.format(what="clipped to max_grad_norm")

    def report(self) -> dict:
        return {**self.report_header(), "noise_multiplier": self.noise_multiplier,
                "accounted_noise_multiplier": self.accounted_noise_multiplier,
                "sensitivity": "C" if self.sensitivity == 1.0 else "2C",
                "sample_rate": self.sample_rate, "steps": int(sum(s for _, _, s in self.history)),
                "history": [list(e) for e in self.history],
                "clients_per_round": self.cohort_size, "num_clients": self.num_clients,
                "cohort_sampling": self.sampling,
                "aggregation": "sum of clipped updates + N(0, (noise_multiplier * max_grad_norm)^2) once, "
                               "divided by clients_per_round; every update weighs 1",
                "sampling": SAMPLING_NOTES[self.sampling]}

    def state_dict(self) -> dict:
        return {"history": [list(e) for e in self.history], **self.charge_state()}

    def load_state_dict(self, state: dict) -> None:
        self.history = merge_history((state or {}).get("history", []))
        self.load_charge_state(state)
