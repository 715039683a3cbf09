"""Accounting for fixed-size cohorts: sampling WITHOUT replacement, from Google's ``dp-accounting``.

Under ``fed.sampling=fixed`` each round samples exactly m of the N clients without replacement.
The neighbouring relation is then replace-one (N is public; one client's data is swapped for
another's), under which one client moves the sum of clipped updates by up to 2C. Opacus has no
analysis of this sampling; ``dp-accounting`` does: its ``RdpAccountant`` under
``NeighboringRelation.REPLACE_ONE`` composes ``SampledWithoutReplacementDpEvent(N, m,
GaussianDpEvent(sigma / 2))`` with the RDP bound of Theorem 27 of Wang, Balle and Kasiviswanathan,
"Subsampled Renyi Differential Privacy and Analytical Moments Accountant" (AISTATS 2019), a
proven upper bound. ``GaussianDpEvent`` takes noise std over the L2 sensitivity, hence sigma / 2
for noise std sigma * C and sensitivity 2C. No formula is re-derived here; the noise is
calibrated with ``dp_accounting.calibrate_dp_mechanism`` over that same accountant.

``dp-accounting``'s PLD accountant has no event for sampling without replacement (0.6), so no
tighter proven bound is used; ``privacy.accountant=prv`` (Opacus, Poisson only) is refused for
fixed cohorts at config load.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

from fedpeft_hpc.errors import ConfigError

#: what privacy.json names as the analysis of fixed cohorts
WOR_ANALYSIS = ("dp-accounting {version} RdpAccountant (default orders), NeighboringRelation.REPLACE_ONE, "
                "one SampledWithoutReplacementDpEvent(source_dataset_size=num_clients, sample_size="
                "clients_per_round, event=GaussianDpEvent(noise_multiplier / 2)) per round: Theorem 27 of Wang, "
                "Balle, Kasiviswanathan, 'Subsampled Renyi Differential Privacy and Analytical Moments "
                "Accountant', AISTATS 2019 (arXiv 1808.00087)")

_TOL = 1e-4  # calibration tolerance on the noise multiplier


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dp-accounting")
    except PackageNotFoundError:  # pragma: no cover - a declared dependency
        return "?"


def wor_analysis() -> str:
    return WOR_ANALYSIS.format(version=library_version())


def _event(accounted_sigma: float, num_clients: int, cohort_size: int, steps: int):
    import dp_accounting as dpa

    one = dpa.SampledWithoutReplacementDpEvent(source_dataset_size=int(num_clients), sample_size=int(cohort_size),
                                               event=dpa.GaussianDpEvent(float(accounted_sigma)))
    return dpa.SelfComposedDpEvent(one, int(steps))


def _fresh():
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)


def wor_epsilon(history: Iterable[Sequence], num_clients: int, cohort_size: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``history`` (``(accounted_sigma, q, steps)`` entries, accounted sigma =
    noise std / (2C)), each step one round of ``cohort_size`` of ``num_clients`` without replacement.

    0 for an empty history, ``inf`` if a step had no noise."""
    hist = tuple((float(s), int(n)) for s, _, n in history if int(n) > 0)
    if not hist:
        return 0.0
    if any(s <= 0.0 for s, _ in hist):
        return math.inf
    return _wor_epsilon(hist, int(num_clients), int(cohort_size), float(delta))


@functools.lru_cache(maxsize=4096)
def _wor_epsilon(hist: tuple, num_clients: int, cohort_size: int, delta: float) -> float:
    acc = _fresh()
    for sigma, steps in hist:
        acc.compose(_event(sigma, num_clients, cohort_size, steps))
    return max(0.0, float(acc.get_epsilon(delta)))


def wor_noise_for(target_epsilon: float, delta: float, num_clients: int, cohort_size: int, steps: int,
                  what: str = "") -> float:
    """The smallest accounted noise multiplier (noise std / 2C, within 1e-4, from above) with which ``steps``
    rounds of ``cohort_size`` of ``num_clients`` spend at most ``target_epsilon`` at ``delta``:
    ``dp_accounting.calibrate_dp_mechanism`` over the accountant of ``wor_epsilon``."""
    if steps <= 0:
        return 0.0
    return _wor_noise_for(float(target_epsilon), float(delta), int(num_clients), int(cohort_size), int(steps), what)


@functools.lru_cache(maxsize=256)
def _wor_noise_for(target_epsilon: float, delta: float, num_clients: int, cohort_size: int, steps: int,
                   what: str) -> float:
    import dp_accounting as dpa

    try:
        sigma = float(dpa.calibrate_dp_mechanism(
            _fresh, lambda s: _event(s, num_clients, cohort_size, steps), target_epsilon, delta,
            dpa.LowerEndpointAndGuess(0.01, 1.0), tol=_TOL))
    except dpa.NoBracketIntervalFoundError:
        who = f" for {what}" if what else ""
        raise ConfigError("privacy.target_epsilon",
                          f"epsilon={target_epsilon:g} at delta={delta:g} cannot be reached{who}: dp-accounting's "
                          f"RDP analysis of {steps} rounds of {cohort_size} of {num_clients} clients without "
                          "replacement spends more whatever the noise. Try a larger privacy.target_epsilon or "
                          "privacy.delta, fewer fed.rounds, or set privacy.noise_multiplier directly.") from None
    # the search lands within tol of the exact solution, possibly below it: step up until the target holds
    while _wor_epsilon(((sigma, steps),), num_clients, cohort_size, delta) > target_epsilon:
        sigma += _TOL
    return sigma
