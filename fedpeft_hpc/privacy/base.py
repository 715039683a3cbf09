"""The hooks through which privacy shapes a round. ``NoPrivacy`` is plain FedAvg.

The engine calls, per client: ``wrap_optimizer`` (or, batched, ``client_noise``), ``client_batches``,
``client_update``;
per round, on every rank: ``finalize`` (after the one all-reduce) and ``account``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fedpeft_hpc.data.loader import iterate_batches


class NoPrivacy:
    mode = "none"

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def client_batches(self, dataset, indices: np.ndarray, batch_size: int, epochs: int,
                       generator: torch.Generator, num_workers: int = 0) -> Iterable:
        return iterate_batches(dataset, indices, batch_size, generator, shuffle=True, num_workers=num_workers,
                               epochs=epochs)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, client: int, round_idx: int,
                       num_samples: int) -> torch.optim.Optimizer:
        return optimizer

    def client_noise(self, client: int, round_idx: int, num_samples: int):
        """The client's per-step DP-SGD noise (``privacy.dpsgd.ClientNoise``) for code that computes
        per-sample gradients itself (client batching); ``None``: local training adds no noise."""
        return None

    def client_update(self, delta: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, float]:
        """The vector a client contributes and its aggregation weight (FedAvg: exact sample count)."""
        return delta, float(num_samples)

    def finalize(self, update_sum: torch.Tensor, weight_sum: float, round_idx: int) -> torch.Tensor:
        return update_sum / weight_sum

    def account(self, round_idx: int, trained: Sequence[int]) -> None:
        pass

    def epsilon(self) -> float | None:
        return None

    def report(self) -> dict:
        return {"mode": self.mode}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DPHooks(NoPrivacy):
    """What both DP modes read from ``privacy.*``: accountant, delta, clipping norm, target, seed."""

    def __init__(self, cfg, seed: int):
        pv = cfg.privacy
        self.accountant = pv.accountant
        self.delta = float(pv.delta)
        self.max_grad_norm = float(pv.max_grad_norm)
        self.target_epsilon = pv.target_epsilon
        self.seed = int(seed)
