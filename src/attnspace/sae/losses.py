"""The loss definitions: NMSE, its streaming form, AuxK, and the dead-latent rules."""

from __future__ import annotations

import torch
from torch import Tensor


def nmse(x: Tensor, x_hat: Tensor) -> Tensor:
    """NMSE (= FVU) = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the rows of x [B, d]; a scalar.

    The training loss, and (through :class:`ReconstructionStats`) the evaluation metric.
    """
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


class ReconstructionStats:
    """:func:`nmse` over many batches, with the mean taken over the whole set (float64 sums).

    sum ||x - mean||^2 = sum ||x||^2 - ||sum x||^2 / n, so three running sums suffice.
    """

    def __init__(self) -> None:
        self.sq_err = 0.0
        self.sum_sq = 0.0
        self.sum_x: Tensor | None = None  # [d] float64
        self.n = 0

    def add(self, x: Tensor, x_hat: Tensor) -> None:
        """x, x_hat: [B, d]."""
        x64 = x.detach().double()
        self.sq_err += float((x64 - x_hat.detach().double()).pow(2).sum())
        self.sum_sq += float(x64.pow(2).sum())
        s = x64.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.n += x.shape[0]

    @property
    def nmse(self) -> float:
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        return self.sq_err / total_var


def auxk_loss(residual: Tensor, aux_reconstruction: Tensor) -> Tensor:
    """AuxK loss (Gao et al. 2024): NMSE of the dead latents' reconstruction of the detached residual.

    residual: e = x - x_hat, detached [B, d]; aux_reconstruction: W_dec^T z_aux without
    decoder bias [B, d], z_aux = the k_aux most active dead latents (see
    :meth:`TopKSAE.forward`). Weighted by alpha (1/32) in the total loss.
    """
    return nmse(residual.detach(), aux_reconstruction)


class DeadLatentTracker:
    """Tokens since each latent last fired (value > 0), for AuxK during training.

    A latent is dead once it has not fired for ``threshold_tokens`` tokens (paper: 10M).
    Counters start at 0, so no latent is dead before ``threshold_tokens`` tokens have passed.
    """

    def __init__(self, d_sae: int, threshold_tokens: int, device: torch.device | str = "cpu") -> None:
        self.threshold_tokens = int(threshold_tokens)
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)  # [n]

    def update(self, values: Tensor, indices: Tensor) -> None:
        """values, indices: [B, K] of one training batch of B tokens."""
        self.tokens_since_fired += values.shape[0]
        # Without boolean indexing (a host sync): inactive entries mark a spare slot n.
        n = self.tokens_since_fired.shape[0]
        fired = torch.zeros(n + 1, dtype=torch.bool, device=indices.device)
        fired.index_fill_(0, torch.where(values > 0, indices, n).reshape(-1), True)
        self.tokens_since_fired.masked_fill_(fired[:n], 0)

    def dead(self) -> Tensor:
        """bool [n]: latents that have not fired for ``threshold_tokens`` tokens."""
        return self.tokens_since_fired >= self.threshold_tokens


def dead_fraction(fired: Tensor) -> float:
    """Evaluation rule for dead features: the fraction of latents that never fired (value > 0).

    fired: bool [n], accumulated over an evaluation window of N held-out tokens (report N with it).
    """
    return float((~fired).float().mean())
