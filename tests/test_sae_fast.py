"""The fast training path (attnspace.sae.fast, the fused SparseAdam kernel) against the reference
path and a dense float64 computation, on CPU: same loss, gradients, touched rows and updates."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_sae_sparse import B, D, K, N, clone_params, dense_forward, random_sae

from attnspace.sae import optim
from attnspace.sae.fast import lowp_mirror, lowp_weight
from attnspace.sae.losses import DeadLatentTracker
from attnspace.sae.optim import make_optimizer

NAMES = ["W_enc", "b_enc", "W_dec", "b_dec"]


def twins(seed=0, dtype=torch.float64, sparse_grad=False):
    """(reference SAE, fast SAE) with the same weights."""
    ref = random_sae(seed, dtype)
    fast = copy.deepcopy(ref)
    fast.fast = True
    ref.sparse_grad = fast.sparse_grad = sparse_grad
    return ref, fast


def batch(seed=1, dtype=torch.float64):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def step(sae, x, dead, k_aux=6):
    """One forward of ``sae`` and the backward of NMSE + AuxK / 2; the forward's output."""
    out = sae(x, dead=dead, k_aux=k_aux)
    (out.nmse + 0.5 * out.auxk_loss).backward()
    return out


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("with_aux", [False, True])
def test_fast_forward_and_gradients_match_reference_and_dense(sparse_grad, with_aux):
    ref, fast = twins(sparse_grad=sparse_grad)
    x = batch()
    dead = (torch.arange(N) % 3 == 0) if with_aux else None
    r, f = (step(sae, x, dead) for sae in (ref, fast))
    dense = clone_params(ref)
    x_hat, _, loss, aux = dense_forward(dense, x, dead, 6)
    (loss + 0.5 * aux).backward()

    assert torch.equal(f.indices, r.indices)
    torch.testing.assert_close(f.values, r.values, rtol=0, atol=0)
    torch.testing.assert_close(f.x_hat, x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.nmse, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(f.auxk_loss, aux, rtol=1e-12, atol=0)
    if with_aux:
        assert aux > 0
    for name, want in zip(NAMES, dense):
        got, other = getattr(fast, name).grad, getattr(ref, name).grad
        assert got.is_sparse == (sparse_grad and name != "b_dec")
        torch.testing.assert_close(got.to_dense(), want.grad, rtol=1e-10, atol=1e-12)
        if got.is_sparse:  # one gradient per touched row, TopK and AuxK merged: the reference's rows
            assert torch.equal(got._indices(), other.coalesce().indices())


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("with_aux", [False, True])
def test_centred_form_on_the_fast_path_matches_the_reference(sparse_grad, with_aux):
    """The centred form (x - b_dec into the encoder): b_dec's gradient has an encoder share, which
    the fast path computes as one bag of W_enc rows per token; the reference path differentiates
    x - b_dec through autograd (its forward is checked against numpy in tests/test_sae_io.py)."""
    ref, fast = twins(sparse_grad=sparse_grad)
    with torch.no_grad():
        ref.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
        fast.b_dec.copy_(ref.b_dec)
    ref.centred = fast.centred = True
    x = batch()
    dead = (torch.arange(N) % 3 == 0) if with_aux else None
    r, f = (step(sae, x, dead) for sae in (ref, fast))
    assert torch.equal(f.indices, r.indices)
    torch.testing.assert_close(f.x_hat, r.x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.auxk_loss, r.auxk_loss, rtol=1e-12, atol=0)
    for name in NAMES:
        got, want = getattr(fast, name).grad, getattr(ref, name).grad
        torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=1e-10, atol=1e-12, msg=name)
    plain = twins(sparse_grad=sparse_grad)[0]  # the encoder share is not zero: b_dec's gradient differs
    with torch.no_grad():
        plain.b_dec.copy_(ref.b_dec)
    step(plain, x, dead)
    assert not torch.allclose(plain.b_dec.grad, fast.b_dec.grad)


def test_fast_touches_exactly_the_fired_latents_and_skips_selected_zeros():
    _, fast = twins(seed=3, sparse_grad=True)
    with torch.no_grad():
        fast.b_enc -= 2.5  # some selected pre-activations are <= 0 (value 0, no gradient)
    dead = torch.arange(N) % 2 == 0
    out = fast(batch(4), dead=dead, k_aux=5)
    (out.nmse + out.auxk_loss).backward()
    assert (out.values == 0).any()
    fired = torch.unique(out.indices[out.values > 0])
    rows = fast.W_enc.grad._indices()[0]
    assert set(fired.tolist()) <= set(rows.tolist()) and rows.numel() < N  # plus AuxK's fired dead latents
    assert torch.equal(fast.b_enc.grad._indices(), fast.W_dec.grad._indices())


def test_nothing_fires_gives_empty_gradients():
    _, fast = twins(sparse_grad=True)
    with torch.no_grad():
        fast.b_enc.fill_(-1e3)
    out = fast(batch(), dead=torch.ones(N, dtype=torch.bool), k_aux=4)
    (out.nmse + out.auxk_loss).backward()
    assert float(out.values.detach().abs().max()) == 0.0
    assert fast.W_enc.grad._nnz() == 0 and fast.W_dec.grad._nnz() == 0


def test_fast_path_is_training_only():
    ref, fast = twins()
    x = batch()
    with torch.no_grad():
        a, b = ref(x), fast(x)  # evaluation: the reference path for both
    assert a.nmse.grad_fn is None and torch.equal(a.x_hat, b.x_hat)


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
def test_training_steps_match_the_reference_path(optimizer):
    """Eight steps, AuxK on, latents that fire, skip steps and fire again: parameters and moments agree."""
    ref, fast = twins(seed=5, dtype=torch.float32, sparse_grad=optimizer == "sparse_adam")
    opts = [make_optimizer(optimizer, [getattr(s, n) for n in NAMES], 1e-2, (0.9, 0.999), 1e-8) for s in (ref, fast)]
    dead = torch.arange(N) % 4 == 0
    g = torch.Generator().manual_seed(6)
    for step in range(8):
        x = torch.randn(B, D, generator=g)
        for sae, opt in zip((ref, fast), opts):
            out = sae(x, dead=dead, k_aux=3)
            opt.zero_grad(set_to_none=True)
            (out.nmse + out.auxk_loss / 32).backward()
            opt.step()
        for name in NAMES:
            p, q = getattr(fast, name), getattr(ref, name)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")
            torch.testing.assert_close(opts[1].state[p]["exp_avg_sq"], opts[0].state[q]["exp_avg_sq"],
                                       rtol=1e-5, atol=1e-9)


def test_bf16_gemm_selects_on_the_bf16_product():
    _, fast = twins(dtype=torch.float32)
    fast.matmul_dtype = torch.bfloat16
    x = batch(dtype=torch.float32)
    out = fast(x)
    pre = torch.nn.functional.linear(x.bfloat16(), fast.W_enc.bfloat16(), fast.b_enc.bfloat16())
    torch.testing.assert_close(out.values, pre.gather(1, out.indices).float().relu(), rtol=0, atol=0)
    assert torch.equal(out.values.sort(1).values, pre.topk(K, 1).values.float().relu().sort(1).values)
    ref = random_sae(0, torch.float32)
    assert abs(float(out.nmse.detach()) / float(ref(x).nmse.detach()) - 1) < 0.05


def test_lowp_mirror_follows_the_weight():
    w = torch.nn.Parameter(torch.randn(6, 4))
    a = lowp_weight(w, torch.bfloat16)
    assert lowp_weight(w, torch.bfloat16) is a and lowp_mirror(w) is a  # no recast while unchanged
    with torch.no_grad():
        w.add_(1.0)  # any torch in-place change bumps the version
    assert lowp_mirror(w) is None
    b = lowp_weight(w, torch.bfloat16)
    assert b is not a and torch.equal(b, w.detach().bfloat16())
    assert lowp_weight(w, torch.float32) is not b  # the weight's own dtype: the weight itself


def test_dead_tracker_update_matches_boolean_indexing():
    t = DeadLatentTracker(N, threshold_tokens=10)
    t.tokens_since_fired.fill_(7)
    idx = torch.randint(0, N, (B, K), generator=torch.Generator().manual_seed(0))
    vals = torch.rand(B, K, generator=torch.Generator().manual_seed(1)) - 0.3
    want = t.tokens_since_fired + B
    want[idx[vals > 0]] = 0
    t.update(vals, idx)
    assert torch.equal(t.tokens_since_fired, want)


def test_sparse_adam_skips_coalescing_sorted_unique_rows(monkeypatch):
    _, fast = twins(dtype=torch.float32, sparse_grad=True)
    opt = make_optimizer("sparse_adam", [getattr(fast, n) for n in NAMES], 1e-2, (0.9, 0.999), 1e-8)
    out = fast(batch(dtype=torch.float32), dead=torch.arange(N) % 2 == 0, k_aux=4)
    (out.nmse + out.auxk_loss).backward()
    assert not fast.W_enc.grad.is_coalesced()  # autograd drops the flag

    def no_coalesce(self):
        raise AssertionError("coalesced a gradient whose rows were already sorted and unique")

    monkeypatch.setattr(torch.Tensor, "coalesce", no_coalesce)
    opt.step()


FUSED_SCRIPT = textwrap.dedent("""
    import torch
    from attnspace.sae import optim
    from attnspace.sae.fast import lowp_mirror, lowp_weight
    from attnspace.sae.optim import SparseAdam

    torch.manual_seed(0)
    n, d = 40, 48
    eager = torch.nn.Parameter(torch.randn(n, d))
    fused = torch.nn.Parameter(eager.detach().clone())
    o_eager, o_fused = SparseAdam([eager], lr=1e-2), SparseAdam([fused], lr=1e-2)
    mirror = lowp_weight(fused, torch.bfloat16)
    for step in range(5):
        rows = torch.randperm(n)[:15].sort().values
        vals = torch.randn(15, d)
        eager.grad = torch.sparse_coo_tensor(rows[None], vals.clone(), (n, d))
        fused.grad = torch.sparse_coo_tensor(rows[None], vals.clone(), (n, d))
        before = fused.detach().clone()
        optim.FUSED = False
        o_eager.step()
        optim.FUSED = True
        o_fused.step()
        torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(o_fused.state[fused][key], o_eager.state[eager][key], rtol=1e-6, atol=1e-9)
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(fused.detach()[untouched], before[untouched])
        assert lowp_mirror(fused) is mirror  # updated with the rows, not recast
        ulp = fused.detach().abs() * 2.0**-7  # the interpreter rounds bf16 by truncation
        assert ((mirror.float() - fused.detach()).abs() <= ulp).all()
    print("fused ok")
""")


def test_fused_sparse_adam_kernel_in_the_triton_interpreter(tmp_path):
    """The CUDA kernel's arithmetic, run by Triton's CPU interpreter (skipped without Triton)."""
    pytest.importorskip("triton")
    script = tmp_path / "fused.py"
    script.write_text(FUSED_SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(script)], check=False, env=env, capture_output=True, text=True, cwd=root, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fused ok" in res.stdout


def test_fused_kernel_is_used_only_where_it_can_run():
    p = torch.zeros(4, 3)
    assert optim.FUSED is None
    assert not optim._use_fused(p, p)  # CPU: the eager path


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
def test_train_sae_with_the_fast_path_gives_the_reference_weights(tmp_path, optimizer):
    """train_sae takes the fast path unless config.fast is False (the reference path); on CPU both agree."""
    from test_sae_train import PoisonedStream, small_config

    from attnspace.sae import load_sae, train_sae

    saes = []
    for fast in (False, True):
        config = small_config(optimizer=optimizer, fast=fast, auxk=True, dead_threshold_tokens=256, k_aux=16,
                              train_tokens=128 * 4, checkpoint_every=0)
        m = train_sae(config, PoisonedStream(poison_at=99), None, tmp_path / f"fast{fast}")
        assert m["status"] == "ok"
        saes.append(load_sae(tmp_path / f"fast{fast}"))
    assert small_config(fast=True).result_fields() == small_config(fast=False).result_fields()  # resumable across
    for name in NAMES:
        torch.testing.assert_close(getattr(saes[1], name), getattr(saes[0], name), rtol=1e-4, atol=1e-5)
