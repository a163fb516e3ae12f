"""Privacy accounting both roles share: epsilon of a (sigma, q, steps) history, and noise calibration.

A node calibrates its noise and tracks its spending with these; the coordinator recomputes
each node's epsilon from the same figures for ``summary.json`` and ``adapter/privacy.json``,
so a reader can check the guarantee with any accountant from those figures alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from fedswarm.common.errors import InputError

ACCOUNTANTS = ("rdp", "prv")  # Opacus' Renyi-DP and privacy-loss-random-variable accountants
PRV_EPS_ERROR = 0.01  # PRV's numerical epsilon tolerance (Opacus' default)


def _check(kind: str) -> None:
    if kind not in ACCOUNTANTS:
        raise InputError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {kind!r}")


def epsilon_of(history: Sequence[Sequence[float]], delta: float, kind: str = "rdp") -> float:
    """Epsilon after the (sigma, q, steps) compositions in ``history``, by Opacus' ``kind`` accountant."""
    _check(kind)
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    accountant = create_accountant(kind)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():  # PRV's grid takes log(0) at its edges, harmlessly
        warnings.simplefilter("ignore", RuntimeWarning)
        if kind == "prv":
            return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
        return float(accountant.get_epsilon(delta))


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """Opacus' own calibration: the sigma that reaches ``epsilon`` after ``steps`` steps by ``accountant``."""
    _check(accountant)
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                accountant=accountant, epsilon_tolerance=0.01,
            )
        )  # fmt: skip
