"""Evaluation of a TopK SAE on held-out tokens: NMSE, explained variance, L0, dead fraction.

Downstream LM loss needs a forward pass with the site replaced by
:func:`attnspace.sae.model.reconstruct`; that lives with the interventions and is
passed in as ``lm_eval`` (None: the LM-loss fields are None).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from attnspace.sae.losses import ReconstructionStats, dead_fraction
from attnspace.sae.model import TopKSAE, eval_rows

LMEval = Callable[[Callable[[Tensor], Tensor]], dict]
"""Takes reconstruct(x_raw) -> x_hat_raw; returns at least {'delta_lm_loss': float} (plus e.g. loss_recovered)."""


class EvalResult(NamedTuple):
    nmse: float
    """sum ||x - x_hat||^2 / sum ||x - mean||^2 over the whole window."""
    explained_variance: float
    """1 - nmse."""
    l0: float
    """Mean number of latents with value > 0 per token."""
    dead_fraction: float
    """Fraction of latents that never had value > 0 in the window."""
    dead_window_tokens: int
    """N: tokens in the window."""
    n_dead: int
    """Latents that never fired in the window."""
    dead_fraction_quarter_window: float
    """Fraction of latents that never fired in the window's first N // 4 tokens (the same pass)."""
    dead_fraction_half_window: float
    """Fraction of latents that never fired in its first N // 2 tokens."""


@torch.no_grad()
def evaluate(sae: TopKSAE, batches: Iterable[Tensor]) -> EvalResult:
    """Evaluate on raw held-out activation batches [b, d] (normalised here with the SAE's factor).

    NMSE is scale-free, so it is the same on the raw and the normalised scale.
    """
    device = sae.W_enc.device
    stats = ReconstructionStats()
    never = torch.iinfo(torch.int64).max
    first = torch.full((sae.d_sae,), never, dtype=torch.int64, device=device)  # [n] token of each latent's first firing
    active = 0
    for batch in batches:
        for x in batch.split(eval_rows(sae)):  # [tokens, d_sae] pre-activations at most EVAL_BLOCK_BYTES
            x = x.to(device, sae.W_enc.dtype) * sae.norm_factor
            seen = stats.n
            out = sae(x)
            stats.add(x, out.x_hat)
            on = out.values > 0
            token = seen + torch.arange(on.shape[0], device=device)[:, None].expand_as(on)
            first.scatter_reduce_(0, out.indices[on], token[on], reduce="amin")
            active += int(on.sum())
            del out
    if stats.n == 0:
        raise ValueError("no held-out tokens to evaluate on")
    fired = first != never
    n_dead = int((~fired).sum())
    return EvalResult(
        nmse=stats.nmse,
        explained_variance=1.0 - stats.nmse,
        l0=active / stats.n,
        dead_fraction=dead_fraction(fired),
        dead_window_tokens=stats.n,
        n_dead=n_dead,
        dead_fraction_quarter_window=dead_fraction(first < stats.n // 4),
        dead_fraction_half_window=dead_fraction(first < stats.n // 2),
    )
