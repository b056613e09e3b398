"""SparseAdam against torch.optim.SparseAdam on the SAE's own sparse gradients; checkpoint tensors."""

from __future__ import annotations

import pytest
import torch

from attnspace.sae.model import TopKSAE
from attnspace.sae.optim import SparseAdam, load_optimizer_tensors, make_optimizer, optimizer_tensors

D, N, K, B = 10, 48, 3, 6
NAMES = ["W_enc", "b_enc", "W_dec", "b_dec"]


def small_sae(seed=0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(D, N, K)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    sae.sparse_grad = True
    return sae


def as_torch_sparse(grad: torch.Tensor) -> torch.Tensor:
    """A dense gradient (b_dec) as a sparse one with every row present (what SparseAdam treats it as)."""
    if grad.is_sparse:
        return grad.clone()
    rows = torch.arange(grad.shape[0])
    return torch.sparse_coo_tensor(rows[None], grad.clone(), grad.shape, check_invariants=False)


@pytest.fixture(params=[None, 3], ids=["whole", "chunks-of-3-rows"])
def chunk_rows(request, monkeypatch):
    """The eager row rules on all touched rows at once, and in chunks of 3 rows (what bounds their
    temporaries at large sizes): the results must be the same to the bit."""
    from attnspace.sae import optim

    if request.param is not None:
        monkeypatch.setattr(optim, "CHUNK_ROWS", request.param)
    return request.param


def test_sparse_adam_matches_torch_sparse_adam_on_intermittent_features(chunk_rows):
    sae = small_sae()
    params = [getattr(sae, n) for n in NAMES]
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    ours = SparseAdam(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    theirs = torch.optim.SparseAdam(ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    fired_per_step = []
    dead = torch.arange(N) % 4 == 0  # some latents also get gradient through AuxK only
    for step in range(8):
        x = torch.randn(B, D, generator=g)
        before = [p.detach().clone() for p in params]
        moments_before = [(ours.state[p]["exp_avg"].clone(), ours.state[p]["exp_avg_sq"].clone()) if ours.state[p]
                          else None for p in params]
        out = sae(x, dead=dead, k_aux=2)
        ours.zero_grad(set_to_none=True)
        (out.nmse + out.auxk_loss / 32).backward()
        touched = sae.W_enc.grad.coalesce().indices()[0]
        fired_per_step.append(set(touched.tolist()))
        for r, p in zip(ref, params):
            r.grad = as_torch_sparse(p.grad)
        ours.step()
        theirs.step()
        for name, p, r in zip(NAMES, params, ref):
            torch.testing.assert_close(p, r, rtol=0, atol=0, msg=f"step {step} {name}")
            st, rt = ours.state[p], theirs.state[r]
            assert st["step"] == rt["step"] == step + 1
            torch.testing.assert_close(st["exp_avg"], rt["exp_avg"], rtol=0, atol=0)
            torch.testing.assert_close(st["exp_avg_sq"], rt["exp_avg_sq"], rtol=0, atol=0)
        # Latents with no gradient this step: parameters and moments exactly unchanged.
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[touched] = False
        assert untouched.any()
        for i, p in enumerate(params[:3]):
            assert torch.equal(p.detach()[untouched], before[i][untouched])
            if moments_before[i] is not None:
                assert torch.equal(ours.state[p]["exp_avg"][untouched], moments_before[i][0][untouched])
                assert torch.equal(ours.state[p]["exp_avg_sq"][untouched], moments_before[i][1][untouched])
    # The scenario the test is for: a latent that fires, then skips steps, then fires again.
    assert any(i in fired_per_step[0] and i not in fired_per_step[1] and any(i in s for s in fired_per_step[2:])
               for i in range(N))


def test_dense_gradient_gives_plain_sparse_adam_on_all_rows():
    p = torch.nn.Parameter(torch.randn(5))
    r = p.detach().clone().requires_grad_(True)
    ours, theirs = SparseAdam([p], lr=0.1), torch.optim.SparseAdam([r], lr=0.1)
    for _ in range(3):
        grad = torch.randn(5)
        p.grad, r.grad = grad.clone(), as_torch_sparse(grad)
        ours.step()
        theirs.step()
    torch.testing.assert_close(p, r, rtol=0, atol=0)


def test_optimizer_tensors_round_trip():
    for name in ("adam", "sparse_adam"):
        sae = small_sae()
        sae.sparse_grad = name == "sparse_adam"
        params = [getattr(sae, n) for n in NAMES]
        opt = make_optimizer(name, params, 1e-2, (0.9, 0.999), 1e-8)
        x = torch.randn(B, D)
        for _ in range(2):
            opt.zero_grad()
            sae(x).nmse.backward()
            opt.step()
        saved = {k: v.clone() for k, v in optimizer_tensors(opt, NAMES).items()}
        twin = small_sae()
        with torch.no_grad():
            for a, b in zip(twin.parameters(), sae.parameters()):
                a.copy_(b)
        twin.sparse_grad = sae.sparse_grad
        opt2 = make_optimizer(name, [getattr(twin, n) for n in NAMES], 1e-2, (0.9, 0.999), 1e-8)
        load_optimizer_tensors(opt2, NAMES, saved)
        for model, o in ((sae, opt), (twin, opt2)):
            o.zero_grad()
            model(x).nmse.backward()
            o.step()
        for a, b in zip(twin.parameters(), sae.parameters()):
            assert torch.equal(a, b), name


# ---- MaskedAdam: the authors' masked dense rule ------------------------------------------------------------------


def masked_adam_reference(p0, grads, lr, betas, eps):
    """The masked rule written out densely in float64 numpy: every moment decays every step, entries with a
    non-zero gradient take it and move; a step whose gradient is all zero is skipped (step count included)."""
    import numpy as np

    b1, b2 = betas
    p, m, v, t = p0.astype(np.float64), np.zeros(p0.shape), np.zeros(p0.shape), 0
    for g in grads:
        if not g.any():
            continue
        t += 1
        mask = g != 0
        m = b1 * m + np.where(mask, (1 - b1) * g, 0.0)
        v = b2 * v + np.where(mask, (1 - b2) * g * g, 0.0)
        step_size = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - np.where(mask, step_size * m / (np.sqrt(v) + eps), 0.0)
    return p, m, v, t


def row_sparse(dense: torch.Tensor) -> torch.Tensor:
    """The rows of ``dense`` with a non-zero entry, as a sparse COO gradient (sorted, unique rows)."""
    rows = dense.abs().sum(1).nonzero().flatten()
    return torch.sparse_coo_tensor(rows[None], dense[rows], dense.shape, check_invariants=False)


def test_masked_adam_matches_a_dense_reference_with_sparse_and_dense_gradients(chunk_rows):
    import numpy as np

    from attnspace.sae.optim import MaskedAdam

    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(12, 5, generator=g)
    grads = []
    for step in range(60):
        active = torch.rand(12, generator=g) < (0.8 if step < 20 else 0.15)  # rows go quiet, some come back
        grad = torch.randn(12, 5, generator=g) * active[:, None]
        grad[0, 2] = 0.0  # an exact zero inside a touched row: masked element by element
        grads.append(torch.zeros(12, 5) if step in (30, 31) else grad)  # two steps with no gradient at all
    lr, betas, eps = 1e-2, (0.9, 0.999), 1e-8
    ref_p, ref_m, ref_v, ref_t = masked_adam_reference(p0.numpy(), [x.numpy() for x in grads], lr, betas, eps)
    results = []
    for sparse in (True, False):
        p = p0.clone().requires_grad_(True)
        opt = MaskedAdam([p], lr=lr, betas=betas, eps=eps)
        for grad in grads:
            p.grad = row_sparse(grad) if sparse else grad.clone()
            opt.step()
        st = opt.state[p]
        assert st["step"] == ref_t <= 58  # steps without any gradient did not count
        np.testing.assert_allclose(p.detach().numpy(), ref_p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(st["exp_avg"].numpy(), ref_m, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(st["exp_avg_sq"].numpy(), ref_v, rtol=1e-5, atol=1e-12)
        results.append((p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone()))
    for a, b in zip(*results):  # the row-sparse path is the dense rule exactly, bit for bit
        assert torch.equal(a, b)


def returning_update(optimizer: str, active: int = 3000, idle: int = 10000) -> float:
    """A feature fires (gradient 1) for ``active`` steps, is idle for ``idle`` while another feature of the
    same tensor keeps firing, then fires again: its first update on return, in units of lr."""
    p = torch.zeros(2, 1, requires_grad=True)
    opt = make_optimizer(optimizer, [p], 1e-3, (0.9, 0.999), 1e-8)
    for step in range(active + idle + 1):
        rows = [0, 1] if step < active or step == active + idle else [0]
        p.grad = torch.sparse_coo_tensor(torch.tensor([rows]), torch.ones(len(rows), 1), (2, 1),
                                         check_invariants=False)
        before = float(p.detach()[1, 0])
        opt.step()
    return (before - float(p.detach()[1, 0])) / 1e-3


def test_returning_feature_first_update_masked_vs_sparse_adam():
    # Closed forms (constant gradient 1, beta1 0.9, beta2 0.999, bias corrections ~1 after 13,001 steps):
    # SparseAdam: v = 1 - 0.999^3000 frozen while idle, update 1/sqrt(0.9503 + 0.001 * 0.0497) = 1.026;
    # masked: m -> 0.1, v -> 0.9503 * 0.999^10000 + 0.001 = 0.00104, update 0.1 / sqrt(0.00104) = 3.10.
    assert returning_update("sparse_adam") == pytest.approx(1.026, abs=0.002)
    assert returning_update("masked_adam") == pytest.approx(3.10, abs=0.01)
