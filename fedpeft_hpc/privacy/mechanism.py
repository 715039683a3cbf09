"""What both DP modes share: the ``privacy.*`` settings, noise calibration and its warnings,
and the header of ``privacy.json``.

``DPMechanism`` is the base of ``SampleDP`` (DP-SGD on each client) and ``ClientDP`` (client-level
DP on the aggregate). Subclasses say which sampling rate and how many steps a noise level must
cover; calibration (``noise_multiplier`` given, zero, or derived from ``target_epsilon``) is
done here, once, for both.
"""

from __future__ import annotations

import logging

from fedpeft_hpc.config.schema import PrivacyConfig
from fedpeft_hpc.privacy.accounting import epsilon_of, noise_for
from fedpeft_hpc.privacy.base import PrivacyMechanism
from fedpeft_hpc.privacy.noise import NoiseKey

log = logging.getLogger(__name__)

EPSILON_COVERS = ("the sequence of global PEFT states the server releases (checkpoints, and test metrics "
                  "computed from them); NOT train_loss, train_acc and rejected in metrics.jsonl, which are "
                  "computed from the clients' private data without noise, and NOT the per-round counts "
                  "clients, sampled, dropped and skipped, nor the byte counts derived from them (every "
                  "bytes_* and full_ft_bytes_total field, also in summary.json), which give the cohort's size without "
                  "noise (under client-level DP with Poisson cohorts the accountant assumes it hidden)")


class DPMechanism(PrivacyMechanism):
    """Base of the DP modes: reads ``privacy.*`` and calibrates noise (no hooks of its own)."""

    #: what the clipping bounds in this mode ("per-sample clipping", "update clipping")
    clipping = ""

    def __init__(self, cfg: PrivacyConfig, seed: int):
        self.accountant = cfg.accountant
        self.delta = float(cfg.delta)
        self.max_grad_norm = float(cfg.max_grad_norm)
        self.target_epsilon = cfg.target_epsilon
        self.fixed_noise = cfg.noise_multiplier
        self.seed = int(seed)
        self.seeded_noise = bool(cfg.seeded_noise)
        self.noise_key: NoiseKey | None = None
        #: rounds charged a second time: run again on resume after their outputs were released
        self.rounds_charged_again: list[int] = []
        if self.fixed_noise is not None and float(self.fixed_noise) == 0.0:
            log.warning("privacy.noise_multiplier=0: %s only, no privacy (epsilon = inf)", self.clipping)

    def use_noise(self, key: NoiseKey) -> None:
        if key.secure == self.seeded_noise:
            raise ValueError(f"privacy.seeded_noise={self.seeded_noise} but the noise key is "
                             f"{'secret' if key.secure else 'seeded'}")
        if self.seeded_noise:
            log.warning("privacy.seeded_noise=true: DP noise derives from the seed in config.yaml; anyone holding "
                        "the run directory can regenerate and subtract it, so the reported epsilon holds only "
                        "against someone who does not know the seed. For simulation studies only.")
        self.noise_key = key

    def generator(self, tag: int, *keys: int, device=None):
        """A noise generator of this run (after ``use_noise``)."""
        if self.noise_key is None:
            raise RuntimeError("DP noise requested before use_noise() gave the mechanism a key")
        return self.noise_key.generator(tag, *keys, device=device)

    def charge_again(self, rounds, returning_of) -> None:
        """Account ``rounds`` once more (``returning_of(round)``: the clients that trained in it)."""
        for r in rounds:
            self.account(int(r), returning_of(int(r)))
        self.rounds_charged_again = sorted([*self.rounds_charged_again, *map(int, rounds)])

    def calibrate(self, sample_rate: float, steps: int, what: str) -> float:
        """The noise multiplier for ``steps`` steps at ``sample_rate``: the configured one, or the
        smallest that spends at most ``privacy.target_epsilon`` (a ``ConfigError`` if none can)."""
        if self.fixed_noise is not None:
            return float(self.fixed_noise)
        return noise_for(self.target_epsilon, self.delta, sample_rate, steps, self.accountant, what=what)

    def epsilon_of(self, history) -> float:
        return epsilon_of(history, self.delta, self.accountant)

    def report_header(self) -> dict:
        """The fields every DP report starts with."""
        return {"mode": self.mode, "accountant": self.accountant, "delta": self.delta,
                "max_grad_norm": self.max_grad_norm, "epsilon": self.epsilon(),
                "target_epsilon": self.target_epsilon, "noise_multiplier": self.fixed_noise,
                "seeded_noise": self.seeded_noise,
                "noise_source": ("derived from the seed (privacy.seeded_noise=true): regenerable by anyone who "
                                 "knows the seed" if self.seeded_noise else
                                 "keyed by a 256-bit secret drawn from the OS at start, held in memory only"),
                "rounds_charged_again": list(self.rounds_charged_again),
                "epsilon_covers": EPSILON_COVERS}
