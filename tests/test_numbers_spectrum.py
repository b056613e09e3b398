"""Published numbers of the spectrum, the W^O table and the interventions on planted inputs whose
answer is known in closed form: bootstrap intervals whose reflection leaves [1, d], the share of Z's
variance along W^O's weakest half of input directions, and the site replacement of Figure 2B
against numpy (k = 0 is mean ablation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnspace.interventions import SiteBasis, project
from attnspace.spectrum import Spectrum, bootstrap_interval, intrinsic_dimension, intrinsic_dim_rows
from attnspace.wo_decomposition import layer_tables

D = 4
ONE = np.array([1.0, 0.0, 0.0, 0.0])  # all variance on one direction: k = 1 at tau 0.9
FLAT = np.ones(D)  # variance spread evenly: 0.25, 0.5, 0.75, 1 -> k = 4 at tau 0.9


def test_planted_spectra_have_the_intrinsic_dimension_stated():
    assert intrinsic_dimension(ONE, 0.9) == 1 and intrinsic_dimension(FLAT, 0.9) == 4


@pytest.mark.parametrize("replicates, estimate, expected", [
    ([ONE] * 10, 4, (4.0, 4.0)),  # reflected: 2*4 - 1 = 7 > d, clipped to d
    ([FLAT] * 10, 1, (1.0, 1.0)),  # reflected: 2*1 - 4 = -2 < 1, clipped to 1
    ([ONE] * 5 + [FLAT] * 5, 2, (1.0, 3.0)),  # quantiles 1 and 4: [2*2 - 4, 2*2 - 1] = [0, 3] -> [1, 3]
    ([ONE] * 5 + [FLAT] * 5, 3, (2.0, 4.0)),  # [6 - 4, 6 - 1] = [2, 5] -> [2, 4]
])
def test_bootstrap_interval_is_reflected_and_clipped_to_one_and_d(replicates, estimate, expected):
    assert bootstrap_interval(np.array(replicates), 0.9, 0.9, estimate=estimate) == expected


def test_table_fractions_stay_within_zero_and_one():
    spec = Spectrum(singular_values=FLAT, mean=np.zeros(D), components=np.eye(D), n_tokens=100,
                    boot_singular_values=np.array([ONE] * 10))
    (row,) = intrinsic_dim_rows(spec, model="m", dataset="d", layer=0, site="attn_out", thresholds=(0.9,), level=0.9)
    assert (row["fraction"], row["fraction_lo"], row["fraction_hi"]) == (1.0, 1.0, 1.0)


def planted_wo(d: int, d_z: int, sv: np.ndarray, z_var: np.ndarray, seed: int = 0):
    """W^O [d_z, d] with singular values sv (descending, len min(d, d_z)) along random orthonormal input
    directions q_j of R^{d_z}, and Cov(Z) with variance z_var[j] along q_j (the null space's directions
    last). Returns (o_proj.weight [d, d_z], Cov(Z))."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d_z, d_z)))
    r, _ = np.linalg.qr(rng.standard_normal((d, d)))
    w_o = q[:, : sv.size] @ np.diag(sv) @ r[:, : sv.size].T
    return w_o.T, q @ np.diag(z_var) @ q.T


@pytest.mark.parametrize("d, d_z", [(4, 4), (4, 6), (6, 5)])
def test_z_variance_on_the_weakest_half_of_wo(d, d_z):
    r = min(d, d_z)
    sv = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])[:r]
    z_var = np.arange(1.0, d_z + 1)  # Z's variance grows towards W^O's weak directions
    w, cov_z = planted_wo(d, d_z, sv, z_var)
    o_spec = Spectrum(singular_values=np.arange(d, 0, -1.0), mean=np.zeros(d), components=np.eye(d), n_tokens=10)
    _, _, summary = layer_tables(o_spec, cov_z, w, n_heads=1, o_rel_error=0.0)
    weakest = z_var[d_z - d_z // 2 :]  # the d_z // 2 directions W^O scales least (null space counts as 0)
    assert summary["z_var_weakest_half"] == pytest.approx(weakest.sum() / z_var.sum(), rel=1e-10)
    assert summary["z_var_null"] == pytest.approx(z_var[r:].sum() / z_var.sum(), abs=1e-12)


def numpy_project(x: np.ndarray, mean: np.ndarray, components: np.ndarray, k: int) -> np.ndarray:
    """mean + (x - mean) projected onto the span of the first k rows of the orthonormal ``components``."""
    v = components[:k]
    return mean + (x - mean) @ v.T @ v


@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_project_against_numpy(k):
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    mean, x = rng.standard_normal(8) + 2.0, rng.standard_normal((2, 5, 8))
    basis = SiteBasis(torch.from_numpy(mean), torch.from_numpy(q.T.copy()))
    got = project(torch.from_numpy(x), basis, k).numpy()
    np.testing.assert_allclose(got, numpy_project(x, mean, q.T, k), rtol=1e-12, atol=1e-12)
    if k == 0:  # mean ablation: every position becomes the mean
        np.testing.assert_array_equal(got, np.broadcast_to(mean, x.shape))
    if k == 8:
        np.testing.assert_allclose(got, x, atol=1e-12)
    # float32 in, float32 out, same numbers to float32 rounding
    got32 = project(torch.from_numpy(x).float(), basis, k)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), numpy_project(x.astype(np.float32).astype(np.float64), mean, q.T, k),
                               rtol=1e-6, atol=1e-6)


def test_k_at_recovery_reaching_the_target_exactly_at_the_last_point():
    from attnspace.interventions import k_at_recovery

    k = np.array([0, 10, 20])
    assert k_at_recovery(k, np.array([0.0, 0.25, 0.5]), 0.5) == 20.0  # reached, not crossed: still found
    assert k_at_recovery(k, np.array([0.0, 0.5, 0.95])) == 20.0  # the paper's 95% by default
    assert k_at_recovery(k, np.array([0.0, 0.5, 0.9]), 0.7) == pytest.approx(15.0)  # 10 + 0.2 x 10 / 0.4


def test_project_with_a_float32_basis_works_in_float64():
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    mean, x = rng.standard_normal(6).astype(np.float32), rng.standard_normal((4, 6))
    basis32 = SiteBasis(torch.from_numpy(mean), torch.from_numpy(q.T.astype(np.float32)))
    exact = numpy_project(x, mean.astype(np.float64), q.T.astype(np.float32).astype(np.float64), 3)
    np.testing.assert_allclose(project(torch.from_numpy(x), basis32, 3).numpy(), exact, rtol=1e-12, atol=1e-12)


def test_spectrum_from_gram_edge_cases_and_sign_convention():
    from attnspace.spectrum import n_above_fraction_of_max, spectrum_from_gram

    row = np.array([[1.0, -2.0, 3.0]])
    one = spectrum_from_gram(row.T @ row, row.sum(0), 1)  # one kept row: no variance, the row is the mean
    np.testing.assert_allclose(one.singular_values, 0.0, atol=1e-7)
    np.testing.assert_array_equal(one.mean, row[0])
    with pytest.raises(ValueError, match="no kept rows"):
        spectrum_from_gram(np.zeros((3, 3)), np.zeros(3), 0)
    # each component signed so that its largest-magnitude entry is positive (deterministic across runs)
    x = np.random.default_rng(5).standard_normal((40, 5)) @ np.diag([5.0, 4.0, 3.0, 2.0, 1.0])
    spec = spectrum_from_gram(x.T @ x, x.sum(0), 40)
    comps = spec.components
    assert (comps[np.arange(5), np.abs(comps).argmax(axis=1)] > 0).all()
    np.testing.assert_allclose(spec.singular_values, np.linalg.svd(x - x.mean(0), compute_uv=False), rtol=1e-10)
    assert n_above_fraction_of_max(np.array([])) == 0 and n_above_fraction_of_max(np.array([1.0, 0.05, 0.06])) == 2


def test_bootstrap_interval_without_replicates_or_estimate():
    assert all(np.isnan(bootstrap_interval(None, 0.9, 0.9)))
    assert all(np.isnan(bootstrap_interval(np.empty((0, D)), 0.9, 0.9)))
    assert bootstrap_interval(np.array([FLAT]), 0.9, 0.9, estimate=4) == (4.0, 4.0)  # one replicate
    # no estimate: the replicates' median (k 1, 1, 4 -> 1) stands in: [2 - 3.7, 2 - 1] -> [1, 1]
    assert bootstrap_interval(np.array([ONE, ONE, FLAT]), 0.9, 0.9) == (1.0, 1.0)


def test_explained_fraction_and_intrinsic_dimension_refuse_what_has_no_answer():
    from attnspace.intervals import interval
    from attnspace.spectrum import explained_fraction

    np.testing.assert_array_equal(explained_fraction(np.array([2.0])), [1.0])
    np.testing.assert_array_equal(explained_fraction(np.array([2.0, 1.0, 1.0])), [4 / 6, 5 / 6, 1.0])
    for empty in (np.array([]), np.zeros(3)):
        with pytest.raises(ValueError, match="no variance to explain"):
            explained_fraction(empty)
    with pytest.raises(ValueError, match="tau must lie in"):
        intrinsic_dimension(FLAT, 1.0)
    for share in (None, 0.0, 1.0, 1.5):  # a subsample holds a share strictly between none and all of the tokens
        with pytest.raises(ValueError, match="share of the tokens in"):
            interval(2.0, [1.0, 2.0, 3.0], 0.9, "subsampling", share=share)
