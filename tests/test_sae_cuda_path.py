"""The CUDA configuration of SAE training, forced on the CPU (attnspace.sae.fast.force_cuda_path):
the bf16 encoder GEMM with its mirror of W_enc, the embedding_bag decoder branch and SparseAdam's fused
row step (its arithmetic emulated without Triton), for every optimizer, with ASI and AuxK.

Two properties, each against something that does not share the code under test:

* the mirror the forward multiplies by is bf16(W_enc) of the weights at that forward, bit for bit
  (a direct cast of the current weight), at every step: no optimizer leaves it stale;
* 50 steps track the float32 CPU path on the same batches. The tolerances, and why: bf16 keeps 8
  significant bits, so a pre-activation of norm-1 rows in d 48 carries an error of about 2^-9 of its
  scale; that changes the TopK selection only where the K-th and (K+1)-th values are that close, a
  few percent of the entries (measured here: 98-99% agreement with the fp32 selection of the same
  weights at every step). The held-out loss ends within 3% of the fp32 run's (measured: under 2%).
  Weights: TopK training at this size is chaotic (a swapped latent gets a full Adam-sized step in
  another direction), so the bf16 run's distance from the fp32 run is held against a control, the
  fp32 path itself run on bf16-rounded inputs and initial encoder: at most 3x the control's distance
  per parameter (measured: 1.0-2.1x; both 10-32% of the weights' norm after 50 steps). A stale mirror
  (the failure this guards: the version-counter cache under fused Adam) gives 50-75% agreement and
  3.7x the fp32 loss on this data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnspace.sae import SAETrainConfig, fast, model
from attnspace.sae.fast import force_cuda_path
from attnspace.sae.train import SAERun

D, N, K, B = 48, 384, 8, 128
STEPS = 50


def data(n: int, seed: int) -> torch.Tensor:
    """Sparse positive combinations of 96 directions in a 12-dim subspace of R^48, plus noise."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((D, 12)))
    feats = rng.standard_normal((96, 12))
    r = np.random.default_rng(seed)
    z = (r.random((n, 96)) < 0.05) * r.exponential(1.0, (n, 96))
    return torch.from_numpy(((z @ feats) @ basis.T + 0.05 * r.standard_normal((n, D))).astype(np.float32))


def config(optimizer: str) -> SAETrainConfig:
    return SAETrainConfig(d_sae=N, k=K, init="asi", d_init=8, optimizer=optimizer, lr=3e-3, auxk=True, k_aux=32,
                          dead_threshold_tokens=4 * B, batch_size=B, train_tokens=B * STEPS, buffer_rows=4 * B,
                          asi_sample_tokens=2048, init_batch_tokens=512, checkpoint_every=0, log_every=10)


def weights(run: SAERun) -> dict[str, torch.Tensor]:
    return {p: getattr(run.sae, p).detach().clone() for p in ("W_enc", "b_enc", "W_dec", "b_dec")}


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam", "masked_adam"])
def test_forced_cuda_path_keeps_the_mirror_current_and_tracks_fp32(tmp_path, monkeypatch, optimizer):
    sample, batches = data(2048, 1), [data(B, 100 + s) for s in range(STEPS)]
    ref = SAERun(config(optimizer), tmp_path / "fp32")
    ref.setup(sample, resume=False)
    control = SAERun(config(optimizer), tmp_path / "control")  # fp32, on inputs at bf16 precision
    control.setup(sample, resume=False)
    with torch.no_grad():
        control.sae.W_enc.copy_(control.sae.W_enc.bfloat16().float())
    with force_cuda_path():
        run = SAERun(config(optimizer), tmp_path / "cuda")
        run.setup(sample, resume=False)
    assert run.sae.matmul_dtype == torch.bfloat16 and ref.sae.matmul_dtype is None
    assert torch.equal(run.sae.W_enc, ref.sae.W_enc)  # the same init

    seen = dict(mirror_checks=0, agree=[], decoder_branch=[])
    real_lowp, real_forward, real_embedding_bag = fast.lowp_weight, model.fast_forward, F.embedding_bag

    def checked_lowp(W, dtype):
        out = real_lowp(W, dtype)
        if dtype == torch.bfloat16:  # the mirror is bf16 of the weight as it is now, bit for bit
            assert torch.equal(out, W.detach().to(torch.bfloat16)), "stale encoder mirror"
            seen["mirror_checks"] += 1
        return out

    def recorded_forward(sae, x, dead, k_aux):
        with torch.no_grad():  # the fp32 selection by the same weights
            want = F.linear(sae.encoder_input(x), sae.W_enc, sae.b_enc).topk(K, dim=1).indices
        out = real_forward(sae, x, dead, k_aux)
        if sae.matmul_dtype is not None:
            got = out[2]
            same = (got.sort(1).values[:, :, None] == want[:, None, :]).any(2).float().mean()
            seen["agree"].append(float(same))
        return out

    def watched_embedding_bag(*args, **kw):
        seen["decoder_branch"].append(torch.is_grad_enabled())
        return real_embedding_bag(*args, **kw)

    monkeypatch.setattr(fast, "lowp_weight", checked_lowp)
    monkeypatch.setattr(model, "fast_forward", recorded_forward)
    monkeypatch.setattr(fast.F, "embedding_bag", watched_embedding_bag)
    for step, x in enumerate(batches, 1):
        with force_cuda_path():
            run.step(x, step)
        with force_cuda_path(False):
            ref.step(x, step)
            control.step(x.bfloat16().float(), step)
    assert run.failure is None and ref.failure is None
    assert seen["mirror_checks"] == STEPS
    assert any(seen["decoder_branch"]), "the CUDA decoder branch (embedding_bag's own backward) never ran"
    assert min(seen["agree"]) > 0.9 and np.mean(seen["agree"]) > 0.95, seen["agree"]

    with torch.no_grad():
        test = data(1024, 7) * ref.sae.norm_factor
        losses = [float(model.TopKSAE.forward(r.sae, test).nmse) for r in (ref, run)]
    assert abs(losses[1] / losses[0] - 1) < 0.03, losses
    for name, w in weights(ref).items():
        ours, noise = (float((weights(r)[name] - w).norm()) for r in (run, control))
        assert ours <= 3 * noise, (name, ours, noise)


def test_fused_adam_step_marks_the_mirror_stale():
    """torch's fused Adam rewrites W in place without bumping its version; the mirror still follows."""
    W = torch.nn.Parameter(torch.randn(16, 8))
    opt = torch.optim.Adam([W], lr=0.1, fused=True)
    first = fast.lowp_weight(W, torch.bfloat16)
    version = W._version
    W.grad = torch.randn(16, 8)
    opt.step()
    assert W._version == version  # the kernel does not bump it: the version alone cannot tell
    assert fast.lowp_mirror(W) is None
    again = fast.lowp_weight(W, torch.bfloat16)
    assert again is not first and torch.equal(again, W.detach().bfloat16())


def test_emulated_fused_row_step_is_sparse_adam_to_the_bit():
    """The fused step's emulation (the kernel's arithmetic without Triton) against torch.optim.SparseAdam."""
    from attnspace.sae.optim import SparseAdam

    torch.manual_seed(0)
    n, d = 40, 24
    ours = torch.nn.Parameter(torch.randn(n, d))
    theirs = torch.nn.Parameter(ours.detach().clone())
    o_ours, o_theirs = SparseAdam([ours], lr=1e-2), torch.optim.SparseAdam([theirs], lr=1e-2)
    mirror = fast.lowp_weight(ours, torch.bfloat16)
    for _ in range(6):
        rows = torch.randperm(n)[:15].sort().values
        vals = torch.randn(15, d)
        ours.grad = torch.sparse_coo_tensor(rows[None], vals.clone(), (n, d))
        theirs.grad = torch.sparse_coo_tensor(rows[None], vals.clone(), (n, d))
        with force_cuda_path():
            o_ours.step()
        o_theirs.step()
        assert torch.equal(ours, theirs)
        assert fast.lowp_mirror(ours) is mirror  # updated with the rows, not recast
        assert torch.equal(mirror, ours.detach().bfloat16())
