"""Differential privacy: DP-SGD on each client (Opacus) and client-level DP, with accountants.

``build_privacy`` picks the mechanism for ``privacy.mode``; the engine sees only the
``PrivacyMechanism`` interface (``privacy.base``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedpeft_hpc.config.schema import Config
from fedpeft_hpc.privacy.base import NoPrivacy, PrivacyMechanism
from fedpeft_hpc.privacy.client_dp import ClientDP
from fedpeft_hpc.privacy.noise import NoiseKey
from fedpeft_hpc.privacy.sample_dp import SampleDP


def build_privacy(cfg: Config, *, client_sizes: Sequence[int], schedule, device: torch.device) -> PrivacyMechanism:
    """The mechanism of ``cfg.privacy.mode`` (``none``, ``sample``, ``client``)."""
    mode = cfg.privacy.mode
    if mode == "none":
        return NoPrivacy()
    if mode == "sample":
        return SampleDP(cfg.privacy, cfg.fed, cfg.data, client_sizes=client_sizes, schedule=schedule,
                        seed=cfg.seed, device=device)
    return ClientDP(cfg.privacy, cfg.fed, seed=cfg.seed, sampling=schedule.sampling)


__all__ = ["build_privacy", "PrivacyMechanism", "NoPrivacy", "NoiseKey", "SampleDP", "ClientDP"]
