"""Confidence intervals of one statistic from its replicates, by four rules.

Which rule the spectra use is chosen by the coverage each reaches on planted populations whose
value is known exactly (``bench/interval_coverage.py``, table in ``docs/coverage.md``). Notation:
``e`` the statistic on the whole sample, ``t_r`` its value on replicate r, ``q(p)`` the replicates'
p-quantile, coverage ``level`` = 1 - 2a.

* ``percentile``: [q(a), q(1 - a)]; no bias correction (the estimate itself is the corrected one).
* ``basic``: [2e - q(1 - a), 2e - q(a)], the replicates' spread reflected around ``e``; corrected
  estimate 2e - mean(t).
* ``bca`` (Efron 1987): the percentiles at Phi(z0 + (z0 + z) / (1 - acc (z0 + z))) for
  z = Phi^-1(a), Phi^-1(1 - a); z0 = Phi^-1(share of replicates below ``e``, ties counted half,
  kept within (1/(2R), 1 - 1/(2R))); acc from the leave-one-group-out values j_i (jackknife):
  sum (mean(j) - j_i)^3 / (6 (sum (mean(j) - j_i)^2)^1.5). Corrected estimate: the adjusted median.
* ``subsampling``: replicates are subsamples *without* replacement holding a share f of the tokens.
  For a statistic with bias b/n and spread s/sqrt(n) at n tokens, t - e has mean b (1/(fn) - 1/n)
  and variance s^2 (1/(fn) - 1/n) (the finite-population correction), so the bias of ``e`` is
  (mean(t) - e) f / (1 - f) and its spread that of t - e times r = sqrt(f / (1 - f)) (the rate
  correction). Corrected estimate c = e - (mean(t) - e) f / (1 - f); interval
  [c - r (q(1 - a) - mean(t)), c - r (q(a) - mean(t))]. Half samples (f = 1/2) make both factors 1.

Every interval and corrected estimate is clipped to ``bounds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from attnspace.errors import AttnspaceError

METHODS = ("percentile", "basic", "bca", "subsampling")
"""The interval rules, in the order the coverage table lists them."""

RESAMPLING = {"percentile": "bootstrap", "basic": "bootstrap", "bca": "bootstrap", "subsampling": "subsample"}
"""How each rule's replicates are drawn: groups with replacement (bootstrap) or half of them without."""


@dataclass(frozen=True)
class Interval:
    """An interval and the estimate its rule corrects for bias (the raw estimate where it corrects none)."""

    lo: float
    hi: float
    corrected: float


NO_INTERVAL = Interval(float("nan"), float("nan"), float("nan"))


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else one clear error."""
    if method not in METHODS:
        raise AttnspaceError(f"unknown interval method {method!r}", fix=f"use one of {', '.join(METHODS)}")
    return method


def interval(estimate: float, replicates, level: float, method: str, *, jackknife=None, share: float | None = None,
             bounds: tuple[float, float] = (-np.inf, np.inf)) -> Interval:
    """The ``level`` interval of a statistic by ``method`` (module docstring) from its ``replicates``.

    ``jackknife``: the leave-one-group-out values (``bca`` only); ``share``: the mean share of the
    tokens a subsample holds (``subsampling`` only). :data:`NO_INTERVAL` when there are no replicates.
    """
    check_method(method)
    t = np.asarray(replicates, dtype=np.float64)
    if t.size == 0:
        return NO_INTERVAL
    a = (1.0 - level) / 2.0
    if method == "percentile":
        lo, hi = np.quantile(t, [a, 1 - a])
        corrected = estimate
    elif method == "basic":
        q_lo, q_hi = np.quantile(t, [a, 1 - a])
        lo, hi, corrected = 2 * estimate - q_hi, 2 * estimate - q_lo, 2 * estimate - t.mean()
    elif method == "bca":
        lo, hi, corrected = _bca(estimate, t, a, jackknife)
    else:
        if share is None or not 0.0 < share < 1.0:
            raise ValueError(f"subsampling needs the subsamples' share of the tokens in (0, 1), got {share}")
        ratio = share / (1.0 - share)
        m = t.mean()
        q_lo, q_hi = np.quantile(t, [a, 1 - a])
        corrected = estimate - (m - estimate) * ratio
        lo, hi = corrected - np.sqrt(ratio) * (q_hi - m), corrected - np.sqrt(ratio) * (q_lo - m)
    lo, hi, corrected = np.clip([lo, hi, corrected], *bounds)
    return Interval(float(lo), float(hi), float(corrected))


def _bca(estimate: float, t: np.ndarray, a: float, jackknife) -> tuple[float, float, float]:
    if jackknife is None or len(jackknife) < 2:
        raise ValueError("bca needs the leave-one-group-out values (at least 2)")
    normal = NormalDist()
    r = t.size
    below = (np.count_nonzero(t < estimate) + 0.5 * np.count_nonzero(t == estimate)) / r
    z0 = normal.inv_cdf(float(np.clip(below, 0.5 / r, 1 - 0.5 / r)))
    j = np.asarray(jackknife, dtype=np.float64)
    dev = j.mean() - j
    scale = float((dev**2).sum())
    acc = float((dev**3).sum()) / (6.0 * scale**1.5) if scale > 0 else 0.0

    def adjusted(z: float) -> float:
        return normal.cdf(z0 + (z0 + z) / (1.0 - acc * (z0 + z)))

    lo, hi = np.quantile(t, [adjusted(normal.inv_cdf(a)), adjusted(normal.inv_cdf(1 - a))])
    return float(lo), float(hi), float(np.quantile(t, adjusted(0.0)))
