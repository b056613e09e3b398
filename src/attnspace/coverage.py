"""Coverage of the interval rules on planted populations whose intrinsic dimension is known exactly.

Population: a covariance with eigenvalues ``shape`` (descending); its intrinsic dimension at tau is
that of the eigenvalues themselves (singular values sqrt(shape)), exactly. The sample spectrum of
Gaussian rows is the same in distribution along any orthonormal basis, so the rows are drawn along
the axes. Documents: token t of a document is x_t = sqrt(shape) * z_t with
z_t = sqrt(rho) a + sqrt(1 - rho) e_t, a ~ N(0, I) once per document and e_t a stationary AR(1)
series with lag-one correlation ``phi``: every token has exactly the population's covariance, and
tokens of one document correlate (``rho`` of the variance shared by the whole document,
rho + (1 - rho) phi at lag one), as cached activations do.

A sample of ``n_docs`` documents of ``doc_len`` tokens is dealt into document groups
(:func:`attnspace.groups.document_groups`), its per-group moments formed, and every rule's
replicates and interval computed by the code the spectrum job runs
(:func:`attnspace.spectrum.spectrum_from_moments`, :func:`attnspace.intervals.interval`):
percentile, basic and bca on one set of bootstrap replicates (bca with the leave-one-group-out
spectra), subsampling on half samples. Coverage: the share of samples whose interval holds the
population's k/d, for the table's integer k and for its interpolated, continuous version
(:func:`interpolated_dimension`). :func:`choose` keeps the rule closest to nominal that never falls short of it
by more than a stated margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnspace.intervals import METHODS, interval
from attnspace.spectrum import document_groups, explained_fraction, intrinsic_dimension, spectrum_from_moments


@dataclass(frozen=True)
class Setting:
    """One planted population and sample design."""

    name: str
    shape: tuple[float, ...]
    """Population eigenvalues, descending."""
    n_docs: int
    doc_len: int
    groups: int = 64
    rho: float = 0.1
    """Share of each direction's variance common to a whole document."""
    phi: float = 0.5
    """Lag-one correlation of the rest within a document."""
    tau: float = 0.99

    @property
    def d(self) -> int:
        return len(self.shape)

    @property
    def n_tokens(self) -> int:
        return self.n_docs * self.doc_len


def sample_moments(setting: Setting, rng: np.random.Generator) -> np.ndarray:
    """Packed per-group moments [G, d+1, d+1] of one sample of documents (module docstring)."""
    n, L, d = setting.n_docs, setting.doc_len, setting.d
    e = np.empty((n, L, d))
    e[:, 0] = rng.standard_normal((n, d))
    innovation = np.sqrt(1.0 - setting.phi**2)
    for t in range(1, L):
        e[:, t] = setting.phi * e[:, t - 1] + innovation * rng.standard_normal((n, d))
    z = np.sqrt(setting.rho) * rng.standard_normal((n, 1, d)) + np.sqrt(1.0 - setting.rho) * e
    x = (z * np.sqrt(np.asarray(setting.shape, dtype=np.float64))).reshape(n * L, d)
    groups = document_groups(np.repeat(np.arange(n), L), np.ones(n * L, dtype=bool), setting.groups)
    xa = np.concatenate([x, np.ones((n * L, 1))], axis=1)
    out = np.zeros((int(groups.max()) + 1, d + 1, d + 1))
    for g in range(out.shape[0]):
        rows = xa[groups == g]
        out[g] = rows.T @ rows
    return out


def interpolated_dimension(singular_values: np.ndarray, tau: float) -> float:
    """The intrinsic dimension at tau read off the cumulative variance by linear interpolation between
    whole directions: k - 1 + (tau - F(k-1)) / (F(k) - F(k-1)) with k the integer one and F(0) = 0, so
    it lies in (k - 1, k]. A continuous version of the same statistic: at small d its integer steps
    would be coarser than the spread being measured."""
    frac = explained_fraction(singular_values)
    k = intrinsic_dimension(singular_values, tau)
    before = frac[k - 2] if k >= 2 else 0.0
    return k - 1 + (tau - before) / (frac[k - 1] - before)


STATISTICS = {"integer": intrinsic_dimension, "interpolated": interpolated_dimension}
"""The statistic whose coverage is measured: the table's k, or its continuous version."""


def population_fraction(setting: Setting, statistic: str = "integer") -> float:
    """The population's intrinsic dimension at tau over d (exact: from its eigenvalues)."""
    return STATISTICS[statistic](np.sqrt(np.asarray(setting.shape, dtype=np.float64)), setting.tau) / setting.d


def coverage(setting: Setting, reps: int, resamples: int = 100, level: float = 0.9, seed: int = 0,
             methods=METHODS) -> list[dict]:
    """One row per (statistic, rule): the share of ``reps`` samples whose ``level`` interval holds the
    population's fraction, the shares wholly below and above it, the mean interval ends and width, and
    the mean raw and corrected estimates. Every rule is the spectrum job's own
    (:func:`attnspace.intervals.interval` on the replicates of :func:`attnspace.spectrum.spectrum_from_moments`)."""
    d, tau = setting.d, setting.tau
    got = {(st, m): [] for st in STATISTICS for m in methods}
    raw = {st: [] for st in STATISTICS}
    rng = np.random.default_rng(seed)
    for rep in range(reps):
        moments = sample_moments(setting, rng)
        boot = spectrum_from_moments(moments, resamples=resamples, seed=seed * 100003 + rep, method="bca")
        sub = spectrum_from_moments(moments, resamples=resamples, seed=seed * 100003 + rep, method="subsampling")
        share = float(np.mean(sub.boot_weights @ sub.group_tokens) / sub.group_tokens.sum())
        for st, f in STATISTICS.items():
            estimate = f(boot.singular_values, tau) / d
            raw[st].append(estimate)
            reps_boot = np.array([f(s, tau) for s in boot.boot_singular_values]) / d
            jack = np.array([f(s, tau) for s in boot.jack_singular_values]) / d
            reps_sub = np.array([f(s, tau) for s in sub.boot_singular_values]) / d
            for m in methods:
                t = reps_sub if m == "subsampling" else reps_boot
                got[st, m].append(interval(estimate, t, level, m, jackknife=jack, share=share, bounds=(1 / d, 1.0)))
    rows = []
    for (st, m), ints in got.items():
        truth = population_fraction(setting, st)
        lo, hi = np.array([i.lo for i in ints]), np.array([i.hi for i in ints])
        rows.append(dict(setting=setting.name, d=d, n_tokens=setting.n_tokens, n_docs=setting.n_docs, reps=reps,
                         statistic=st, method=m, truth=truth,
                         coverage=float(np.mean((lo <= truth) & (truth <= hi))),
                         below=float(np.mean(hi < truth)), above=float(np.mean(lo > truth)),
                         mean_lo=float(lo.mean()), mean_hi=float(hi.mean()), width=float((hi - lo).mean()),
                         estimate=float(np.mean(raw[st])), corrected=float(np.mean([i.corrected for i in ints]))))
    return rows


def choose(rows: list[dict], level: float, margin: float, statistic: str = "interpolated") -> tuple[str, bool]:
    """(rule, within margin): the rule whose coverage of ``statistic`` is closest to ``level`` in its worst
    setting among those never under it by more than ``margin``; when every rule falls short by more
    somewhere, the one whose worst shortfall is smallest, with False."""
    worst = {}
    for r in (r for r in rows if r["statistic"] == statistic):
        under, off = level - r["coverage"], abs(r["coverage"] - level)
        u, o = worst.get(r["method"], (-np.inf, -np.inf))
        worst[r["method"]] = (max(u, under), max(o, off))
    fit = [(o, m) for m, (u, o) in worst.items() if u <= margin]
    if fit:
        return min(fit)[1], True
    return min((u, m) for m, (u, o) in worst.items())[1], False
