"""TopK SAE forward and backward: the sparse encoder gather and sparse decoder against a dense computation."""

from __future__ import annotations

import pytest
import torch

from attnspace.sae.model import TopKSAE, reconstruct

D, N, K, B = 12, 40, 4, 24


def random_sae(seed=0, dtype=torch.float64) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(D, N, K).to(dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    return sae


def dense_forward(params, x, dead=None, k_aux=0):
    """Reference: pre [B, N] dense, z dense with zeros, x_hat = z W_dec + b_dec, plain autograd."""
    W_enc, b_enc, W_dec, b_dec = params
    pre = x @ W_enc.T + b_enc
    idx = pre.detach().topk(K, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    x_hat = z @ W_dec + b_dec
    loss = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    aux = torch.zeros((), dtype=x.dtype)
    if dead is not None:
        aux_idx = pre.detach().masked_fill(~dead, -torch.inf).topk(min(k_aux, int(dead.sum())), dim=1).indices
        z_aux = torch.zeros_like(pre).scatter(1, aux_idx, pre.gather(1, aux_idx).relu())
        e = (x - x_hat).detach()
        aux = ((e - z_aux @ W_dec) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    return x_hat, z, loss, aux


def clone_params(sae):
    return [p.detach().clone().requires_grad_(True) for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]


@pytest.mark.parametrize("strategy", ["gemm", "gather"])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("with_aux", [False, True])
def test_forward_and_gradients_match_dense(sparse_grad, with_aux, strategy, monkeypatch):
    from attnspace.sae import sparse

    rate = 10**9 if strategy == "gemm" else 0  # force one backward strategy
    monkeypatch.setattr(sparse, "_GEMM_PER_GATHER", {True: rate, False: rate})
    sae = random_sae()
    sae.sparse_grad = sparse_grad
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).requires_grad_(True)
    dead = (torch.arange(N) % 3 == 0) if with_aux else None

    out = sae(x, dead=dead, k_aux=6)
    (out.nmse + 0.5 * out.auxk_loss).backward()

    ref = clone_params(sae)
    xr = x.detach().clone().requires_grad_(True)
    x_hat, z, loss, aux = dense_forward(ref, xr, dead, 6)
    (loss + 0.5 * aux).backward()

    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.nmse, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.auxk_loss, aux, rtol=1e-12, atol=0)
    if with_aux:
        assert aux > 0
    # The record's values and indices are the dense latent's non-zeros.
    z_sparse = torch.zeros(B, N, dtype=torch.float64).scatter(1, out.indices, out.values)
    torch.testing.assert_close(z_sparse, z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for p, r in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), ref):
        assert p.grad.is_sparse == (sparse_grad and p is not sae.b_dec)
        torch.testing.assert_close(p.grad.to_dense(), r.grad, rtol=1e-10, atol=1e-12)


def test_sparse_gradients_touch_exactly_the_fired_latents():
    sae = random_sae(seed=3)
    sae.sparse_grad = True
    with torch.no_grad():
        sae.b_enc -= 2.5  # some tokens then have fewer than K positive pre-activations
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = sae(x)
    out.nmse.backward()
    fired = torch.unique(out.indices[out.values > 0])
    assert 0 < fired.numel() < N
    assert (out.values == 0).any(), "the test wants some selected-but-zero entries (ReLU) too"
    for p in (sae.W_enc, sae.b_enc, sae.W_dec):
        assert torch.equal(p.grad.coalesce().indices()[0], fired)


def test_no_dead_latents_means_zero_aux_loss():
    sae = random_sae()
    x = torch.randn(B, D, dtype=torch.float64)
    out = sae(x, dead=torch.zeros(N, dtype=torch.bool), k_aux=8)
    assert float(out.auxk_loss) == 0.0


@pytest.mark.parametrize("rate", [0, 10**9])
def test_chunked_backward_matches_unchunked(monkeypatch, rate):
    from attnspace.sae import sparse

    monkeypatch.setattr(sparse, "_GEMM_PER_GATHER", {True: rate, False: rate})
    sae = random_sae(seed=5)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    dead = torch.arange(N) % 2 == 0
    out = sae(x, dead=dead, k_aux=5)
    (out.nmse + out.auxk_loss).backward()
    full = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad(set_to_none=True)
    monkeypatch.setattr(sparse, "_CHUNK_ELEMENTS", 7)  # forces one token / entry per chunk
    out = sae(x, dead=dead, k_aux=5)
    (out.nmse + out.auxk_loss).backward()
    for a, p in zip(full, sae.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-12, atol=1e-14)


def test_reconstruct_works_on_the_raw_scale():
    sae = random_sae(dtype=torch.float32)
    sae.dataset_norm = 7.0
    x = torch.randn(2, 5, D) * 3
    f = D**0.5 / 7.0
    out = sae(x.reshape(-1, D) * f)
    x_hat = reconstruct(sae, x)
    assert x_hat.shape == x.shape
    torch.testing.assert_close(x_hat, (out.x_hat / f).reshape(x.shape))


def test_unique_rows_matches_torch_unique():
    from attnspace.sae.sparse import _unique_rows

    ids = torch.randint(0, 50, (30, 7), generator=torch.Generator().manual_seed(0))
    rows, pos = _unique_rows(ids, 50)
    want_rows, want_pos = torch.unique(ids, sorted=True, return_inverse=True)
    assert torch.equal(rows, want_rows) and torch.equal(pos, want_pos)
