"""SparseAdam against torch.optim.SparseAdam on the SAE's own sparse gradients; checkpoint tensors."""

from __future__ import annotations

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


def test_sparse_adam_matches_torch_sparse_adam_on_intermittent_features():
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
