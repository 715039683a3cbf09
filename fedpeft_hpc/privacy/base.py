"""The interface through which privacy shapes a round, and plain FedAvg (``NoPrivacy``).

The engine calls, per run: ``use_noise`` and ``wrap_model`` once (and reads ``secret_cohorts``
and ``applies_every_round``); per client: ``wrap_optimizer`` (or, when clients are trained
batched, ``client_noise``), ``batch_generator`` and ``client_batches``, then (after local
training) ``client_update``; per round, on every rank, after the one all-reduce: ``finalize``
and ``account``; for released rows its accountant does not hold yet (a resume re-running rounds, an
earlier attempt set aside), ``charge_again`` (``charged_sources``: those already held); and ``epsilon``/``report``
for the logs, ``state_dict``/``load_state_dict`` for checkpoints. A mechanism may shape only
what these hooks hand it, so everything a guarantee rests on is visible here. (Modelled on pfl-research's
postprocessors: ``postprocess_one_user`` ~ ``client_update``, ``postprocess_server`` ~ ``finalize``.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fedpeft_hpc.data.loader import iterate_batches
from fedpeft_hpc.privacy.dpsgd import ClientNoise
from fedpeft_hpc.privacy.noise import NoiseKey
from fedpeft_hpc.utils.streams import CLIENT_DATA, torch_generator


class PrivacyMechanism(ABC):
    """The hooks the engine calls; one subclass per privacy mode (``mode`` names it)."""

    mode: str
    # the mechanism's analysis takes credit for sampling the cohort: who is sampled (and who drops out)
    # must then be drawn from the noise key, not from the public seed
    secret_cohorts: bool = False
    # every round's update is released, whatever the cohort returned (skipping a round for too few
    # updates would release the cohort's size unnoised)
    applies_every_round: bool = False

    @abstractmethod
    def use_noise(self, key: NoiseKey) -> None:
        """Where this run's noise comes from (a secret shared by all ranks, or the seed)."""

    @abstractmethod
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module that local training runs (e.g. with per-sample gradient hooks). Called once."""

    @abstractmethod
    def batch_generator(self, seed: int, round_idx: int, client: int) -> torch.Generator:
        """The generator that draws client ``client``'s batches in ``round_idx`` (``client_batches``)."""

    @abstractmethod
    def client_batches(self, dataset, indices: np.ndarray, batch_size: int, epochs: int,
                       generator: torch.Generator, num_workers: int = 0) -> Iterable:
        """The ``(x, y)`` batches of one client's local training, drawn with ``generator`` only."""

    @abstractmethod
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, client: int, round_idx: int,
                       num_samples: int) -> torch.optim.Optimizer:
        """The optimizer that client ``client`` steps with in round ``round_idx``."""

    @abstractmethod
    def client_noise(self, client: int, round_idx: int, num_samples: int) -> ClientNoise | None:
        """The client's per-step DP-SGD parameters and noise source, for code that computes per-sample
        gradients itself (client-batched training); ``None``: local training adds no noise."""

    @abstractmethod
    def client_update(self, delta: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, float]:
        """The vector a client contributes to the sum (e.g. clipped) and its aggregation weight."""

    @abstractmethod
    def finalize(self, update_sum: torch.Tensor, weight_sum: float, round_idx: int) -> torch.Tensor:
        """The server's pseudo-gradient from the all-reduced weighted sum (e.g. plus noise, divided)."""

    @abstractmethod
    def account(self, round_idx: int, returning: Sequence[int]) -> None:
        """Record the privacy cost of round ``round_idx`` in which ``returning`` clients trained."""

    #: every charge beyond the run's own rounds: ``{"source": the released rows, "rounds": [...]}``
    charges: list[dict]

    @abstractmethod
    def charge_again(self, rounds: Sequence[int], returning_of, source: str) -> None:
        """Account ``rounds`` once more: their outputs were released before (``source`` names where: rows a
        resume runs again with noise that cannot be redrawn, or an earlier attempt's rows);
        ``returning_of(round)``: the clients that trained."""

    @abstractmethod
    def charged_sources(self) -> set[str]:
        """The ``source`` of every charge the accountant holds (restored from checkpoints)."""

    @abstractmethod
    def epsilon(self) -> float | None:
        """Epsilon spent so far at the configured delta (``None`` without DP, ``inf`` without noise)."""

    @abstractmethod
    def report(self) -> dict:
        """Everything needed to recompute the reported epsilon (written to ``privacy.json``)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """The accountant's state (JSON-able), saved in every checkpoint."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` on resume."""


class PlainLocalTraining:
    """The local-training hooks of a mechanism that leaves local training alone: the model as it
    is, ``epochs`` shuffled passes over the client's data, the optimizer as it is."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def batch_generator(self, seed: int, round_idx: int, client: int) -> torch.Generator:
        """From the seed: the data order of plain local training is no part of any DP guarantee
        (client-level DP clips and noises the whole update, whatever the order)."""
        return torch_generator(seed, CLIENT_DATA, round_idx, client)

    def client_batches(self, dataset, indices: np.ndarray, batch_size: int, epochs: int,
                       generator: torch.Generator, num_workers: int = 0) -> Iterable:
        return iterate_batches(dataset, indices, batch_size, generator, shuffle=True, num_workers=num_workers,
                               epochs=epochs)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, client: int, round_idx: int,
                       num_samples: int) -> torch.optim.Optimizer:
        return optimizer

    def client_noise(self, client: int, round_idx: int, num_samples: int) -> ClientNoise | None:
        return None


class SampleWeightedMean:
    """The aggregation hooks of FedAvg: each update as it is, weighted by its exact sample count;
    the server takes the weighted mean."""

    def client_update(self, delta: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, float]:
        return delta, float(num_samples)

    def finalize(self, update_sum: torch.Tensor, weight_sum: float, round_idx: int) -> torch.Tensor:
        return update_sum / weight_sum


class NoPrivacy(PlainLocalTraining, SampleWeightedMean, PrivacyMechanism):
    """FedAvg without DP: shuffled batches, clients weighted by their exact sample counts."""

    mode = "none"
    charges: list[dict] = []

    def use_noise(self, key: NoiseKey) -> None:
        pass

    def account(self, round_idx: int, returning: Sequence[int]) -> None:
        pass

    def charge_again(self, rounds: Sequence[int], returning_of, source: str = "") -> None:
        pass  # nothing private is released: nothing to charge

    def charged_sources(self) -> set[str]:
        return set()

    def epsilon(self) -> float | None:
        return None

    def report(self) -> dict:
        return {"mode": self.mode}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
