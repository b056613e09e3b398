"""The training step's loss is NMSE + auxk_alpha x AuxK: the gradients one step of SAERun hands its
optimizer equal those of that loss written out densely in float64 (TopK, the dead latents' top
k_aux, both NMSEs), with latents planted dead; the AuxK term alone moves the dead latents' decoder
rows, by a gradient proportional to auxk_alpha. The evaluation NMSE summed over batches equals numpy's
on the whole set; a latent is dead after exactly the threshold's idle tokens, counted exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnspace.sae import SAETrainConfig
from attnspace.sae.train import SAERun

D, N, K, K_AUX, B = 16, 64, 4, 8, 96
NAMES = ["W_enc", "b_enc", "W_dec", "b_dec"]
DEAD = torch.arange(N) % 2 == 1  # the odd latents, planted dead


class Recorder:
    """Stands in for the optimizer: keeps the gradients it is asked to step with."""

    def __init__(self, params):
        self.params, self.grads = params, None

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = [p.grad.to_dense().double() if p.grad.is_sparse else p.grad.double() for p in self.params]


def dense_loss(params, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """NMSE + alpha AuxK of a TopK SAE, in float64 with dense tensors, from the definitions
    (Gao et al. 2024): z = ReLU of the K largest pre-activations; AuxK: the K_AUX dead latents with
    the largest pre-activations reconstruct the detached residual without the decoder bias."""
    w_enc, b_enc, w_dec, b_dec = params
    pre = x @ w_enc.T + b_enc

    def sparse_code(pre_select, k):
        idx = pre_select.topk(k, dim=1).indices
        return torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())

    def nmse(target, rec):
        return (target - rec).pow(2).sum() / (target - target.mean(0)).pow(2).sum()

    x_hat = sparse_code(pre.detach(), K) @ w_dec + b_dec
    residual = (x - x_hat).detach()
    aux = sparse_code(pre.detach().masked_fill(~DEAD, -math.inf), K_AUX) @ w_dec
    return nmse(x, x_hat) + alpha * nmse(residual, aux)


def step_gradients(tmp_path, optimizer: str, alpha: float, auxk: bool = True):
    """(gradients one SAERun step hands its optimizer, the normalised batch, the SAE's weights before it)."""
    config = SAETrainConfig(d_sae=N, k=K, lr=1e-3, batch_size=B, train_tokens=B * 4, buffer_rows=2 * B,
                            asi_sample_tokens=256, init_batch_tokens=256, optimizer=optimizer, auxk=auxk,
                            auxk_alpha=alpha, k_aux=K_AUX, dead_threshold_tokens=10_000, log_every=0)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(512, D, generator=g) * torch.linspace(0.2, 2.0, D) + 0.3
    run = SAERun(config, tmp_path / f"{optimizer}-{alpha}")
    run.setup(sample, resume=False)
    run.tracker.tokens_since_fired[DEAD] = config.dead_threshold_tokens  # planted: not fired for the threshold
    params = [getattr(run.sae, n) for n in NAMES]
    before = [p.detach().double().clone() for p in params]
    run.opt = Recorder(params)
    x = sample[:B]
    run.step(x, 1)
    return run.opt.grads, (x * run.sae.norm_factor).double(), before


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
@pytest.mark.parametrize("alpha", [1 / 32, 0.5])
def test_step_gradient_is_that_of_nmse_plus_alpha_auxk(tmp_path, optimizer, alpha):
    grads, x, before = step_gradients(tmp_path, optimizer, alpha)
    params = [p.clone().requires_grad_(True) for p in before]
    dense_loss(params, x, alpha).backward()
    for name, got, p in zip(NAMES, grads, params):
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(got, p.grad, rtol=1e-3, atol=1e-5 * scale, msg=name)
    # the AuxK term is far beyond the tolerance: the test sets alpha apart from 0 (and from 1)
    plain = [p.clone().requires_grad_(True) for p in before]
    dense_loss(plain, x, 0.0).backward()
    aux_part = (params[2].grad - plain[2].grad)[DEAD]  # the dead latents' decoder rows
    assert float(aux_part.abs().max()) > 100 * 1e-5 * float(params[2].grad.abs().max())


def test_without_auxk_the_dead_latents_get_no_auxk_gradient(tmp_path):
    grads, x, before = step_gradients(tmp_path, "adam", 1 / 32, auxk=False)
    params = [p.clone().requires_grad_(True) for p in before]
    dense_loss(params, x, 0.0).backward()
    for name, got, p in zip(NAMES, grads, params):
        torch.testing.assert_close(got, p.grad, rtol=1e-3, atol=1e-5 * float(p.grad.abs().max()), msg=name)


def test_reconstruction_stats_over_batches_equal_numpy_on_the_whole_set():
    from attnspace.sae.losses import ReconstructionStats, nmse

    rng = np.random.default_rng(0)
    x = 0.1 * rng.standard_normal((50, 6)) + 0.05  # small variance: an offset in any sum would show
    x_hat = x + 0.02 * rng.standard_normal((50, 6))
    stats = ReconstructionStats()
    for lo, hi in ((0, 7), (7, 30), (30, 50)):
        stats.add(torch.from_numpy(x[lo:hi]).float(), torch.from_numpy(x_hat[lo:hi]).float())
    x32, h32 = x.astype(np.float32).astype(np.float64), x_hat.astype(np.float32).astype(np.float64)
    expected = ((x32 - h32) ** 2).sum() / ((x32 - x32.mean(0)) ** 2).sum()
    assert stats.n == 50 and stats.nmse == pytest.approx(expected, rel=1e-10)
    one = nmse(torch.from_numpy(x32), torch.from_numpy(h32))
    assert float(one) == pytest.approx(expected, rel=1e-12)  # one batch: the training loss, the same number


def test_dead_latents_after_exactly_the_threshold_counted_past_float32_integers():
    from attnspace.sae.losses import DeadLatentTracker

    tracker = DeadLatentTracker(3, threshold_tokens=5)
    fires = (torch.tensor([[1.0], [0.0]]), torch.tensor([[0], [1]]))  # 2 tokens: latent 0 fires, 1 has value 0
    tracker.update(*fires)
    tracker.update(*fires)
    assert tracker.dead().tolist() == [False, False, False]  # 4 tokens idle
    tracker.update(*fires)
    assert tracker.dead().tolist() == [False, True, True]  # 6 >= 5
    big = DeadLatentTracker(2, threshold_tokens=2**24 + 2)  # long windows need exact counts
    big.tokens_since_fired += 2**24
    for _ in range(3):  # one token at a time: float32 would lose each (2^24 + 1 rounds back to 2^24)
        big.update(torch.tensor([[1.0]]), torch.tensor([[0]]))
    assert big.dead().tolist() == [False, True]  # 2^24 + 3 >= 2^24 + 2
