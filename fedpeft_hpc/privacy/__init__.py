"""Differential privacy: DP-SGD on each client (Opacus) and client-level DP, with accountants."""

from __future__ import annotations


def build_privacy(cfg, *, client_sizes, schedule, seed: int, device):
    """The privacy hooks for ``cfg`` (a full Config); see ``privacy.base.NoPrivacy``."""
    mode = cfg.privacy.mode
    if mode == "none":
        from fedpeft_hpc.privacy.base import NoPrivacy

        return NoPrivacy()
    if mode == "sample":
        from fedpeft_hpc.privacy.sample_dp import SampleDP

        return SampleDP(cfg, client_sizes=client_sizes, schedule=schedule, seed=seed, device=device)
    from fedpeft_hpc.privacy.client_dp import ClientDP

    return ClientDP(cfg, client_sizes=client_sizes, schedule=schedule, seed=seed, device=device)
