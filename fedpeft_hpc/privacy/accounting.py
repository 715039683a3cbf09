"""Thin helpers over Opacus's accountants (no privacy formula is re-derived here).

A *history* is Opacus's own format: a list of ``(noise_multiplier, sample_rate, steps)``
entries, each one ``steps`` compositions of the Poisson-subsampled Gaussian mechanism.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Iterable, Sequence

from fedpeft_hpc.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv")

Entry = tuple[float, float, int]


def make_accountant(name: str):
    """A fresh ``opacus.accountants.RDPAccountant`` (``rdp``) or ``PRVAccountant`` (``prv``)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ConfigError("privacy.accountant", f"{name!r} is not one of: {', '.join(ACCOUNTANTS)}")


def opacus_analysis(accountant: str) -> str:
    """What privacy.json names as the analysis behind ``privacy.accountant`` for Poisson sampling."""
    from importlib.metadata import version

    ref = {"rdp": "RDPAccountant: RDP of the Poisson-subsampled Gaussian mechanism (Mironov, Talwar, Zhang, "
                  "'Renyi Differential Privacy of the Sampled Gaussian Mechanism', 2019), converted to (epsilon, "
                  "delta) as Balle et al. 2020",
           "prv": "PRVAccountant: privacy random variables of the Poisson-subsampled Gaussian mechanism (Gopi, "
                  "Lee, Wutschitz, 'Numerical Composition of Differential Privacy', NeurIPS 2021)"}[accountant]
    return f"Opacus {version('opacus')} {ref}; add/remove adjacency"


def merge_history(history: Iterable[Sequence]) -> list[Entry]:
    """Consecutive entries with the same noise and sampling rate joined (as ``Accountant.step`` does).

    Composition is the same either way; fewer entries make the accountant much faster.
    Entries with zero steps are dropped.
    """
    out: list[Entry] = []
    for sigma, q, steps in history:
        sigma, q, steps = float(sigma), float(q), int(steps)
        if steps <= 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def epsilon_of(history: Iterable[Sequence], delta: float, accountant: str) -> float:
    """Epsilon spent by ``history`` at ``delta``, from a fresh Opacus accountant.

    0 for an empty history; ``inf`` if any step ran without noise (no guarantee at all).
    """
    hist = merge_history(history)
    if not hist:
        return 0.0
    if any(sigma <= 0.0 for sigma, _, _ in hist):
        return math.inf
    try:
        return _epsilon(tuple(hist), float(delta), str(accountant))
    except RuntimeError as e:  # PRV: "Cannot compute epsilon" (e.g. delta close to 1)
        raise _accountant_failed(delta, accountant, e) from None


def _accountant_failed(delta: float, accountant: str, e: Exception) -> ConfigError:
    return ConfigError("privacy.delta", f"the Opacus {accountant} accountant cannot compute epsilon at "
                                        f"delta={delta:g} ({e}); use a smaller privacy.delta (typically below "
                                        "1/number of samples) or another privacy.accountant")


@functools.lru_cache(maxsize=65536)
def _epsilon(hist: tuple, delta: float, accountant: str) -> float:
    """Memoised: every round asks again for the histories that did not change.

    Never below 0: at a large delta the accountant's conversion can return a negative epsilon;
    (0, delta)-DP is implied by it and is what is reported."""
    acc = make_accountant(accountant)
    acc.history = list(hist)
    with warnings.catch_warnings():
        # numpy overflow inside PRV's domain search; RDP's "optimal order is the largest alpha"
        # (the bound is then looser than it could be, never optimistic)
        warnings.simplefilter("ignore")
        return max(0.0, float(acc.get_epsilon(delta=delta)))


def noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
              what: str = "") -> float:
    """The noise multiplier with which ``steps`` steps at ``sample_rate`` spend at most ``target_epsilon``.

    Wraps ``opacus.accountants.utils.get_noise_multiplier`` (binary search to within 0.01 of
    the target, from below; about a second per call, so results are memoised). Raises
    ``ConfigError("privacy.target_epsilon", ...)`` when the accountant cannot reach the
    target with any noise.
    """
    from opacus.accountants.utils import MAX_SIGMA

    if steps <= 0:
        return 0.0
    try:
        return _noise_for(float(target_epsilon), float(delta), float(sample_rate), int(steps), str(accountant))
    except RuntimeError as e:  # PRV: "Cannot compute epsilon" (e.g. delta close to 1)
        raise _accountant_failed(delta, accountant, e) from None
    except ValueError as e:
        who = f" for {what}" if what else ""
        floor = rdp_floor(delta) if accountant == "rdp" else None
        hint = ""
        if floor is not None and floor >= target_epsilon:
            hint = (f" The RDP accountant cannot report less than epsilon={floor:.3g} at this delta whatever "
                    f"the noise (its conversion to (epsilon, delta) over orders up to {max(_rdp_orders()):g}); "
                    "privacy.accountant=prv goes lower.")
        raise ConfigError(
            "privacy.target_epsilon",
            f"epsilon={target_epsilon:g} at delta={delta:g} cannot be reached{who}: {int(steps)} DP steps at "
            f"sampling rate {sample_rate:.4g} still spend more with noise multiplier {MAX_SIGMA:g} "
            f"(Opacus {accountant} accountant: {e}).{hint} Try a larger privacy.target_epsilon or "
            "privacy.delta, fewer fed.rounds or fed.local_epochs, or set privacy.noise_multiplier directly."
        ) from None


@functools.lru_cache(maxsize=4096)
def _noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))


def _rdp_orders() -> list:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


def rdp_floor(delta: float) -> float:
    """The smallest epsilon Opacus's RDP accountant can report at ``delta`` (zero Renyi divergence)."""
    import numpy as np
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = _rdp_orders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=orders, rdp=np.zeros(len(orders)), delta=delta)
    return float(eps)
