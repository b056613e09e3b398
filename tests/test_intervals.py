"""Interval rules against closed forms, paired replicates against numpy on the resampled documents, and the
chosen rule's coverage of a planted population's intrinsic dimension (a small seeded version of
bench/interval_coverage.py)."""

from __future__ import annotations

from dataclasses import astuple
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from attnspace.claims import FAILS, HOLDS, INCONCLUSIVE, attention_lowest, c1
from attnspace.coverage import Setting, choose, coverage, interpolated_dimension, population_fraction
from attnspace.errors import AttnspaceError
from attnspace.intervals import METHODS, interval
from attnspace.spectrum import (METHOD, SUBSAMPLE_SHARE, fraction_interval, intrinsic_dim_frame, intrinsic_dimension,
                                paired_interval, replicate_weights, save_spectrum, spectrum_from_moments)

T = np.arange(1.0, 101.0)  # replicates 1..100: quantiles at 0.05 / 0.95 are 5.95 and 95.05 (numpy's linear rule)


def test_percentile_and_basic_closed_forms():
    assert astuple(interval(40.0, T, 0.9, "percentile")) == pytest.approx((5.95, 95.05, 40.0))
    got = interval(40.0, T, 0.9, "basic")
    assert (got.lo, got.hi, got.corrected) == pytest.approx((80 - 95.05, 80 - 5.95, 80 - 50.5))
    assert interval(40.0, T, 0.9, "basic", bounds=(0, 70)).hi == 70  # clipped


@pytest.mark.parametrize("share", [0.5, 0.25])
def test_subsampling_rescales_bias_and_spread_by_the_share(share):
    r = share / (1 - share)
    got = interval(40.0, T, 0.9, "subsampling", share=share)
    c = 40 - (50.5 - 40) * r  # the bias extrapolated from the subsamples' n to the sample's
    assert got.corrected == pytest.approx(c)
    assert (got.lo, got.hi) == pytest.approx((c - np.sqrt(r) * (95.05 - 50.5), c - np.sqrt(r) * (5.95 - 50.5)))
    if share == 0.5:  # half samples: the basic interval's form on subsample replicates
        basic = interval(40.0, T, 0.9, "basic")
        assert (got.lo, got.hi, got.corrected) == pytest.approx((basic.lo, basic.hi, basic.corrected))


def test_bca_without_bias_or_skew_is_the_percentile_interval():
    t = np.arange(1.0, 100.0)  # 99 values, median 50: z0 = 0; symmetric jackknife: acceleration 0
    got = interval(50.0, t, 0.9, "bca", jackknife=[1.0, 2.0, 3.0])
    assert (got.lo, got.hi, got.corrected) == pytest.approx((*np.quantile(t, [0.05, 0.95]), 50.0))


def test_bca_shifts_with_the_median_bias():
    # 75 of 100 replicates below the estimate: z0 = Phi^-1(0.75); with acceleration 0 the ends are the
    # replicates' quantiles at Phi(2 z0 -/+ 1.645).
    n = NormalDist()
    z0 = n.inv_cdf(0.75)
    got = interval(75.5, T, 0.9, "bca", jackknife=[1.0, 2.0, 3.0])
    q = [n.cdf(2 * z0 + n.inv_cdf(0.05)), n.cdf(2 * z0 + n.inv_cdf(0.95))]
    assert (got.lo, got.hi) == pytest.approx(tuple(np.quantile(T, q)))
    assert got.corrected == pytest.approx(np.quantile(T, n.cdf(2 * z0)))


def test_no_replicates_no_interval_and_unknown_rule_refused():
    assert np.isnan(interval(1.0, [], 0.9, "basic").lo)
    with pytest.raises(AttnspaceError) as refused:
        interval(1.0, T, 0.9, "median")
    fix = "Fix: use one of percentile, basic, bca, subsampling"
    assert refused.value.line() == f"unknown interval method 'median' {fix}"


def test_subsample_weights_draw_half_the_groups_without_replacement():
    w = replicate_weights(10, 50, seed=3, method="subsampling")
    assert set(np.unique(w)) == {0.0, 1.0} and (w.sum(axis=1) == round(10 * SUBSAMPLE_SHARE)).all()
    counts = replicate_weights(10, 50, seed=3, method="basic")
    assert (counts.sum(axis=1) == 10).all() and counts.max() > 1  # with replacement


def docs_moments(x: np.ndarray) -> np.ndarray:
    """[G, d+1, d+1] moments of documents x [G, L, d], one group each (numpy, not the store pass)."""
    z = np.concatenate([x, np.ones(x.shape[:2] + (1,))], axis=2)
    return np.einsum("gni,gnj->gij", z, z)


def test_paired_replicates_are_the_same_documents_for_both_sites():
    """The replicate r of two sites of a layer weights the same documents: a pass over the drawn documents'
    rows of each site (numpy) gives both replicates' spectra."""
    rng = np.random.default_rng(4)
    a_docs = rng.standard_normal((8, 20, 6)) * np.linspace(2, 0.2, 6)
    b_docs = rng.standard_normal((8, 20, 6))
    a = spectrum_from_moments(docs_moments(a_docs), resamples=5, seed=9, method="subsampling")
    b = spectrum_from_moments(docs_moments(b_docs), resamples=5, seed=9, method="subsampling")
    assert np.array_equal(a.boot_weights, b.boot_weights)
    for r, w in enumerate(a.boot_weights):
        drawn = np.flatnonzero(w)
        for spec, docs in ((a, a_docs), (b, b_docs)):
            rows = docs[drawn].reshape(-1, 6)
            np.testing.assert_allclose(spec.boot_singular_values[r],
                                       np.linalg.svd(rows - rows.mean(0), compute_uv=False), rtol=1e-9)
    diff, got = paired_interval(a, b, 0.9)
    ka = [intrinsic_dimension(s, 0.9) / 6 for s in a.boot_singular_values]
    kb = [intrinsic_dimension(s, 0.9) / 6 for s in b.boot_singular_values]
    assert diff == intrinsic_dimension(a.singular_values, 0.9) / 6 - intrinsic_dimension(b.singular_values, 0.9) / 6
    assert got == interval(diff, np.subtract(ka, kb), 0.9, "subsampling", share=0.5, bounds=(-1, 1))
    other = spectrum_from_moments(docs_moments(b_docs), resamples=5, seed=10, method="subsampling")
    with pytest.raises(AttnspaceError, match="do not pair"):
        paired_interval(a, other, 0.9)


def planted_layer(tmp_path, attn_scale: float, seed: int = 0) -> list:
    """Spectrum files of attn_out (variance on few directions, scaled by ``attn_scale``), mlp_out and resid_post
    (spread evenly) of one layer, from the same 16 documents' groups."""
    rng = np.random.default_rng(seed)
    paths = []
    for site, scales in (("attn_out", np.r_[np.ones(3), np.full(9, attn_scale)]), ("mlp_out", np.ones(12)),
                         ("resid_post", np.ones(12))):
        spec = spectrum_from_moments(docs_moments(rng.standard_normal((16, 40, 12)) * scales), resamples=40,
                                     seed=1, key=dict(model="m", dataset="ds", layer=0, site=site))
        save_spectrum(spec, tmp_path / f"{site}.npz")
        paths.append(tmp_path / f"{site}.npz")
    return paths


@pytest.mark.parametrize("attn_scale, verdict", [(0.05, HOLDS), (1.0, INCONCLUSIVE)])
def test_c1_decides_on_the_paired_differences(tmp_path, attn_scale, verdict):
    idim = intrinsic_dim_frame(planted_layer(tmp_path, attn_scale), thresholds=(0.9,))
    rows = idim.set_index("site")
    assert np.isnan(rows.loc["attn_out", "attn_minus_site"])
    for site in ("mlp_out", "resid_post"):
        assert rows.loc[site, "attn_minus_site"] == pytest.approx(rows.loc["attn_out", "fraction"]
                                                                  - rows.loc[site, "fraction"])
        assert rows.loc[site, "attn_minus_site_lo"] <= rows.loc[site, "attn_minus_site_hi"]
    case = attention_lowest(idim, 0.9)
    assert bool(case["paired"].iloc[0]) and case["case"].iloc[0] == verdict
    assert c1(idim, 0.9)[0]["verdict"] == verdict and "paired intervals" in c1(idim, 0.9)[0]["measured"]


def test_c1_paired_interval_above_zero_fails():
    row = dict(model="m", dataset="ds", layer=0, threshold=0.99, level=0.9, fraction_lo=0.0, fraction_hi=1.0)
    idim = pd.DataFrame([dict(row, site="attn_out", fraction=0.5),
                         dict(row, site="mlp_out", fraction=0.6, attn_minus_site=-0.1, attn_minus_site_lo=-0.2,
                              attn_minus_site_hi=-0.05),
                         dict(row, site="resid_post", fraction=0.4, attn_minus_site=0.1, attn_minus_site_lo=0.05,
                              attn_minus_site_hi=0.2)])
    assert c1(idim)[0]["verdict"] == FAILS  # separate intervals [0, 1] overlap: only the pairing decides


def test_small_coverage_simulation_chosen_rule():
    """A seeded, small version of bench/interval_coverage.py: 100 samples of 24 documents at d = 24 with
    within-document correlation, 40 replicates each. The chosen rule covers the planted population's exact
    value in at least 80% of them (nominal 90%, less the 0.05 shortfall docs/coverage.md measured, less two
    binomial standard errors at 100 samples); the percentile interval, which ignores the bias, in at most 40%."""
    shape = tuple(np.r_[20.0, np.geomspace(1.0, 0.01, 23)])  # one dominant direction, then a decaying body
    setting = Setting("small", shape, n_docs=24, doc_len=24, groups=24)
    truth = population_fraction(setting, "interpolated")
    assert truth == pytest.approx(interpolated_dimension(np.sqrt(np.array(shape)), 0.99) / 24)
    rows = coverage(setting, reps=100, resamples=40, seed=0)
    cov = {r["method"]: r["coverage"] for r in rows if r["statistic"] == "interpolated"}
    assert set(cov) == set(METHODS)
    assert cov[METHOD] >= 0.8, cov
    assert cov["percentile"] <= 0.4, cov
    assert choose(rows, 0.9, margin=0.1) == (METHOD, True)


def test_interpolated_dimension_lies_in_the_last_whole_step():
    s = np.sqrt(np.array([4.0, 3.0, 2.0, 1.0]))  # cumulative variance 0.4, 0.7, 0.9, 1.0
    assert interpolated_dimension(s, 0.8) == pytest.approx(2.5) and intrinsic_dimension(s, 0.8) == 3
    assert interpolated_dimension(s, 0.9) == pytest.approx(3.0)
    assert interpolated_dimension(s, 0.2) == pytest.approx(0.5)


def test_fraction_interval_of_a_spectrum_uses_its_rule(tmp_path):
    rng = np.random.default_rng(2)
    m = docs_moments(rng.standard_normal((12, 30, 8)) * np.linspace(3, 0.1, 8))
    spec = spectrum_from_moments(m, resamples=30, seed=0, method="bca")
    assert spec.jack_singular_values.shape == (12, 8)
    k = intrinsic_dimension(spec.singular_values, 0.9) / 8
    reps = [intrinsic_dimension(s, 0.9) / 8 for s in spec.boot_singular_values]
    jack = [intrinsic_dimension(s, 0.9) / 8 for s in spec.jack_singular_values]
    assert fraction_interval(spec, 0.9, 0.9) == interval(k, reps, 0.9, "bca", jackknife=jack, bounds=(1 / 8, 1))
