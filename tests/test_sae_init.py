"""Initialisations: base, ASI, random subspace; the norm grid search; the sample basis vs numpy SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnspace.sae.init import active_basis, initialize, random_basis, search_norm, sphere_directions
from attnspace.sae.model import TopKSAE
from attnspace.spectrum import spectrum_from_gram

D, R, N, K = 32, 6, 96, 4


def planted_rows(n=2000, seed=0):
    """x [n, D] = mean + z V^T, z [n, R] with distinct variances; V [D, R] orthonormal (returned as [R, D])."""
    rng = np.random.default_rng(seed)
    v, _ = np.linalg.qr(rng.standard_normal((D, R)))
    z = rng.standard_normal((n, R)) * np.linspace(3, 1, R)
    return torch.from_numpy(3.0 + z @ v.T).float(), v.T


def projector(basis) -> np.ndarray:
    b = np.asarray(basis, dtype=np.float64)
    return b.T @ np.linalg.pinv(b.T)


def test_sample_basis_spans_the_numpy_svd_subspace():
    x, _ = planted_rows()
    xc = x.double().numpy() - x.double().numpy().mean(axis=0)
    vt = np.linalg.svd(xc, full_matrices=False)[2]
    for d_init in (2, R):
        basis = active_basis(x, d_init).numpy()
        np.testing.assert_allclose(basis @ basis.T, np.eye(d_init), atol=1e-10)
        np.testing.assert_allclose(projector(basis), projector(vt[:d_init]), atol=1e-8)


def test_asi_directions_lie_in_the_subspace():
    x, v = planted_rows()
    sae = TopKSAE(D, N, K)
    res = initialize(sae, "asi", x[:256], torch.Generator().manual_seed(0), d_init=R, source=x)
    W = sae.W_dec.detach().double().numpy()
    outside = W - W @ projector(v)
    assert np.abs(outside).max() < 1e-5 * np.abs(W).max()
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), res.norm, rtol=1e-5)
    assert torch.equal(sae.W_enc, sae.W_dec) and not sae.b_enc.any() and not sae.b_dec.any()
    # From a Spectrum (the spectrum stage's output) the same subspace.
    xd = x.double().numpy()
    spec = spectrum_from_gram(xd.T @ xd, xd.sum(axis=0), len(xd), n_vectors=R)
    sae2 = TopKSAE(D, N, K)
    initialize(sae2, "asi", x[:256], torch.Generator().manual_seed(0), d_init=R, source=spec)
    W2 = sae2.W_dec.detach().double().numpy()
    assert np.abs(W2 - W2 @ projector(v)).max() < 1e-5 * np.abs(W2).max()


def test_random_subspace_is_orthonormal_and_directions_stay_inside():
    basis = random_basis(D, R, torch.Generator().manual_seed(2))
    torch.testing.assert_close(basis @ basis.T, torch.eye(R, dtype=torch.float64), atol=1e-12, rtol=0)
    x, _ = planted_rows()
    sae = TopKSAE(D, N, K)
    initialize(sae, "random_subspace", x[:256], torch.Generator().manual_seed(2), d_init=R)
    W = sae.W_dec.detach().double().numpy()
    # Same generator, same draws: the basis inside initialize is this one.
    assert np.abs(W - W @ projector(basis.numpy())).max() < 1e-5 * np.abs(W).max()


def test_base_directions_are_unit_and_isotropic():
    U = sphere_directions(4000, 8, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(U.norm(dim=1), torch.ones(4000, dtype=torch.float64), atol=1e-6, rtol=0)
    # Uniform on the sphere: E[U^T U] = I/d.
    torch.testing.assert_close(U.T @ U / 4000, torch.eye(8, dtype=torch.float64) / 8, atol=0.02, rtol=0)


@pytest.mark.parametrize("method", ["base", "asi"])
def test_norm_search_returns_the_grid_minimum_of_full_forwards(method):
    x, _ = planted_rows(n=512)
    x = x * (D**0.5 / x.norm(dim=1).mean())
    grid = tuple(np.geomspace(0.05, 5.0, 25))
    sae = TopKSAE(D, N, K)
    res = initialize(sae, method, x, torch.Generator().manual_seed(3), d_init=R, grid=grid)
    U = sae.W_dec.detach() / res.norm
    losses = []
    for c in grid:  # independent reference: a full forward of the tied SAE at each candidate norm
        probe = TopKSAE(D, N, K)
        with torch.no_grad():
            probe.W_enc.copy_(c * U)
            probe.W_dec.copy_(c * U)
        with torch.no_grad():
            losses.append(float(probe(x).nmse))
    losses = np.array(losses)
    assert res.norm == grid[int(np.argmin(losses))]
    np.testing.assert_allclose(res.losses.numpy(), losses, rtol=1e-4)
    assert 0 < np.argmin(losses) < len(grid) - 1, "the minimum should be interior for this test to mean something"
    # The chosen norm reconstructs better than x_hat = 0.
    assert losses.min() < float((x**2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_search_norm_rejects_bad_grids():
    U = sphere_directions(8, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        search_norm(U, torch.randn(5, 4), 2, grid=())
    with pytest.raises(ValueError):
        search_norm(U, torch.randn(5, 4), 2, grid=(1.0, -1.0))
