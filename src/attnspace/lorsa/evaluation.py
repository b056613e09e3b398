"""Held-out evaluation of a Lorsa: NMSE and per-head selection counts over kept rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from attnspace.lorsa.data import SequenceBatch, _scaled
from attnspace.lorsa.model import Lorsa, causal_document_mask
from attnspace.sae.losses import ReconstructionStats


class LorsaEval(NamedTuple):
    nmse: float
    """sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over the kept rows of the window (scale-free)."""
    counts: Tensor
    """[n_ov] int64: kept rows on which each head was selected with a positive value."""
    n_tokens: int
    """Kept rows in the window (N)."""


@torch.no_grad()
def evaluate(lorsa: Lorsa, batches: Iterator[SequenceBatch], max_tokens: int | None = None) -> LorsaEval:
    """NMSE and per-head selection counts over the kept rows of ``batches`` (whole documents;
    stops after the batch that reaches ``max_tokens`` kept rows)."""
    stats = ReconstructionStats()
    counts = torch.zeros(lorsa.config.n_ov_heads, dtype=torch.int64, device=lorsa.W_O.device)
    for batch in batches:
        x, y = _scaled(lorsa, batch)
        out = lorsa(x, batch.pos, causal_document_mask(batch.seg))
        keep = batch.keep
        stats.add(y[keep], out.output[keep])
        idx, val = out.indices[keep], out.values[keep]  # [N, k]
        counts += torch.bincount(idx[val > 0], minlength=counts.shape[0])
        if max_tokens is not None and stats.n >= max_tokens:
            break
    if stats.n == 0:
        raise ValueError("no kept rows to evaluate on")
    return LorsaEval(stats.nmse, counts.cpu(), stats.n)
