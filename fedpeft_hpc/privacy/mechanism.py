"""What both DP modes share: the ``privacy.*`` settings, noise calibration and its warnings,
and the header of ``privacy.json``.

``DPMechanism`` is the base of ``SampleDP`` (DP-SGD on each client) and ``ClientDP`` (client-level
DP on the aggregate). Subclasses say which sampling rate and how many steps a noise level must
cover; calibration (``noise_multiplier`` given, zero, or derived from ``target_epsilon``) is
done here, once, for both.
"""

from __future__ import annotations

import logging
from abc import abstractmethod

from fedpeft_hpc.config.schema import PrivacyConfig
from fedpeft_hpc.privacy.accounting import epsilon_of, noise_for
from fedpeft_hpc.privacy.base import PrivacyMechanism
from fedpeft_hpc.privacy.noise import NoiseKey

log = logging.getLogger(__name__)

EPSILON_COVERS = ("the sequence of global PEFT states the server releases (checkpoints) and what is computed "
                  "from them alone (test metrics on the server's test set, treated as public), plus values that "
                  "follow from the public schedule; privacy.json's release section lists, field by field, what "
                  "metrics.jsonl and summary.json hold that epsilon does not cover (privacy.release=all) or what "
                  "was withheld because it does not (privacy.release=covered)")

TRUST_MODEL = ("central DP: the server (every rank of this job) is trusted; it sees each returning client's "
               "update ({what}) before noise is added to their sum; there is no secure aggregation and no local "
               "DP. Epsilon bounds what the released outputs reveal, not what the aggregator sees.")


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
        #: each charge beyond this attempt's own rounds: {"source": where the released rows are, "rounds": [...]}
        self.charges: list[dict] = []
        #: (n, unit): how many units the guarantee protects one of (set by the subclass: ``check_delta``)
        self.delta_units: tuple[int, str] | None = None
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

    def charge_again(self, rounds, returning_of, source: str = "metrics.superseded.jsonl") -> None:
        """Account ``rounds`` once more (``returning_of(round)``: the clients that trained in it); ``source``
        names the released rows that are charged (``privacy.json``'s ``charges``)."""
        rounds = [int(r) for r in rounds]
        for r in rounds:
            self.account(r, returning_of(r))
        self.rounds_charged_again = sorted([*self.rounds_charged_again, *rounds])
        if rounds:
            self.charges.append({"source": source, "rounds": rounds})

    def charged_sources(self) -> set[str]:
        """The sources already charged (kept in checkpoints: a resume does not charge them twice)."""
        return {c["source"] for c in self.charges}

    def charge_state(self) -> dict:
        """The charges' part of ``state_dict``."""
        return {"rounds_charged_again": list(self.rounds_charged_again), "charges": [dict(c) for c in self.charges]}

    def load_charge_state(self, state: dict) -> None:
        state = state or {}
        self.rounds_charged_again = [int(r) for r in state.get("rounds_charged_again", [])]
        self.charges = [{"source": str(c["source"]), "rounds": [int(r) for r in c["rounds"]]}
                        for c in state.get("charges", [])]

    def check_delta(self, n: int, unit: str) -> None:
        """Warn (and flag in ``privacy.json``) when delta >= 1/n: a mechanism that publishes each of the n
        protected units outright with probability delta meets (0, delta)-DP, so delta must be well below 1/n
        for the guarantee to mean anything."""
        self.delta_units = (int(n), unit)
        if self.delta_flagged:
            log.warning("privacy.delta=%g is at least 1/n for the n=%d %s the guarantee protects one of: "
                        "(epsilon, delta)-DP then allows publishing about delta*n=%.3g of them outright. "
                        "Use privacy.delta well below %.3g (flagged as delta_at_least_1_over_n in privacy.json)",
                        self.delta, n, unit, self.delta * n, 1.0 / max(n, 1))

    @property
    def delta_flagged(self) -> bool:
        return self.delta_units is not None and self.delta >= 1.0 / max(self.delta_units[0], 1)

    def calibrate(self, sample_rate: float, steps: int, what: str) -> float:
        """The noise multiplier for ``steps`` steps at ``sample_rate``: the configured one, or the
        smallest that spends at most ``privacy.target_epsilon`` (a ``ConfigError`` if none can)."""
        if self.fixed_noise is not None:
            return float(self.fixed_noise)
        return noise_for(self.target_epsilon, self.delta, sample_rate, steps, self.accountant, what=what)

    def epsilon_of(self, history) -> float:
        return epsilon_of(history, self.delta, self.accountant)

    @abstractmethod
    def adjacency(self) -> str:
        """The neighbouring relation the guarantee is stated for (privacy.json's ``adjacency``)."""

    @abstractmethod
    def analysis(self) -> str:
        """The accountant actually used: library, event, reference (privacy.json's ``analysis``)."""

    @abstractmethod
    def trust_model(self) -> str:
        """Who sees what before noise (privacy.json's ``trust_model``)."""

    def report_header(self) -> dict:
        """The fields every DP report starts with."""
        n, unit = self.delta_units if self.delta_units is not None else (None, None)
        return {"mode": self.mode, "accountant": self.accountant, "analysis": self.analysis(),
                "adjacency": self.adjacency(), "trust_model": self.trust_model(), "delta": self.delta,
                "delta_units": {"n": n, "unit": unit}, "delta_at_least_1_over_n": self.delta_flagged,
                "max_grad_norm": self.max_grad_norm, "epsilon": self.epsilon(),
                "target_epsilon": self.target_epsilon, "noise_multiplier": self.fixed_noise,
                "seeded_noise": self.seeded_noise,
                "noise_source": ("derived from the seed (privacy.seeded_noise=true): regenerable by anyone who "
                                 "knows the seed" if self.seeded_noise else
                                 "keyed by a 256-bit secret drawn from the OS at start, held in memory only"),
                "rounds_charged_again": list(self.rounds_charged_again), "charges": [dict(c) for c in self.charges],
                "epsilon_covers": EPSILON_COVERS}
