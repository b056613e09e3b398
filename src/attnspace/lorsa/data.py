"""Whole-document Lorsa batches from an activation store (``attn_in``, ``attn_out``), and the
dataset-wise normalisation (each site scaled by sqrt(d) / mean row norm of kept training rows)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from attnspace.lorsa.model import Lorsa
from attnspace.sae.data import mean_norm
from attnspace.store import Store


class SequenceBatch(NamedTuple):
    """Whole documents packed into padded rows (R rows of T slots)."""

    attn_in: Tensor
    """[R, T, d] float32 raw attn_in (0 in padding)."""
    attn_out: Tensor
    """[R, T, d] float32 raw attn_out (0 in padding)."""
    pos: Tensor
    """[R, T] int64 position in the document (the cached ``pos``; 0 in padding)."""
    seg: Tensor
    """[R, T] int64 document index in the store (-1 in padding)."""
    keep: Tensor
    """[R, T] bool: rows in loss and statistics (not BOS/EOS, not padding)."""
    docs: tuple[int, ...]
    """Store document indices in this batch, in the order drawn."""

    def to(self, device: str | torch.device) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in self[:5]), self.docs)


class SequenceData:
    """Documents of an activation store (sites ``attn_in`` and ``attn_out``) as whole-sequence batches.

    Rows of a store are in corpus order, documents contiguous, each starting at pos 0
    with BOS; this is checked. A batch takes consecutive documents of an order (a
    seeded shuffle per epoch for training, store order for evaluation) until the next
    would exceed ``batch_tokens`` rows (at least one), packs them first-fit-decreasing
    into rows of ``row_tokens`` (the longest document) slots, and masks attention to
    stay within each document (:func:`causal_document_mask`).
    """

    def __init__(self, store: Store, sites: tuple[str, str] = ("attn_in", "attn_out")) -> None:
        self.store, self.sites = store, sites
        doc, pos = store.meta("doc"), store.meta("pos")
        if doc.size == 0:
            raise ValueError(f"{store.path}: empty store")
        starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
        self.starts = starts  # [n_docs] first row of each document
        self.stops = np.r_[starts[1:], doc.size]  # [n_docs]
        if np.unique(doc[starts]).size != starts.size:
            raise ValueError(f"{store.path}: documents are not contiguous")
        expected = np.arange(doc.size) - np.repeat(starts, self.stops - starts)
        if not np.array_equal(pos, expected):
            raise ValueError(f"{store.path}: pos does not count 0, 1, ... within each document")
        self.keep = store.keep()
        self.row_tokens = int((self.stops - self.starts).max())

    @property
    def n_docs(self) -> int:
        return int(self.starts.size)

    def lengths(self) -> np.ndarray:
        return self.stops - self.starts

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """Document order of training epoch ``epoch``: a permutation depending only on (seed, epoch)."""
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        return torch.randperm(self.n_docs, generator=g).numpy()

    def groups(self, order: np.ndarray, batch_tokens: int) -> list[list[int]]:
        """Split a document order into batches of at most ``batch_tokens`` rows (at least one document)."""
        lengths = self.lengths()
        out, current, used = [], [], 0
        for i in order.tolist():
            if current and used + lengths[i] > batch_tokens:
                out.append(current)
                current, used = [], 0
            current.append(i)
            used += int(lengths[i])
        if current:
            out.append(current)
        return out

    def batch(self, docs: list[int]) -> SequenceBatch:
        """Read and pack documents ``docs`` (store indices)."""
        lengths = self.lengths()
        T = self.row_tokens
        rows: list[list[int]] = []
        free: list[int] = []
        for i in sorted(docs, key=lambda j: (-lengths[j], j)):  # first fit decreasing
            slot = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
            if slot is None:
                rows.append([])
                free.append(T)
                slot = len(rows) - 1
            rows[slot].append(i)
            free[slot] -= int(lengths[i])
        R, d = len(rows), self.store.width(self.sites[0])
        x = torch.zeros(R, T, d)
        y = torch.zeros(R, T, self.store.width(self.sites[1]))
        pos = torch.zeros(R, T, dtype=torch.int64)
        seg = torch.full((R, T), -1, dtype=torch.int64)
        keep = torch.zeros(R, T, dtype=torch.bool)
        for r, row in enumerate(rows):
            t = 0
            for i in row:
                a, b = int(self.starts[i]), int(self.stops[i])
                n = b - a
                x[r, t : t + n] = torch.from_numpy(self.store.rows(self.sites[0], a, b, kept_only=False))
                y[r, t : t + n] = torch.from_numpy(self.store.rows(self.sites[1], a, b, kept_only=False))
                pos[r, t : t + n] = torch.arange(n)
                seg[r, t : t + n] = i
                keep[r, t : t + n] = torch.from_numpy(self.keep[a:b])
                t += n
        return SequenceBatch(x, y, pos, seg, keep, tuple(docs))

    def epoch_batches(self, batch_tokens: int, seed: int | None, epoch: int = 0) -> Iterator[SequenceBatch]:
        """Batches of one epoch: shuffled by (seed, epoch), or in store order if seed is None."""
        order = np.arange(self.n_docs) if seed is None else self.order(seed, epoch)
        for docs in self.groups(order, batch_tokens):
            yield self.batch(docs)

    def kept_sample(self, site: str, n: int) -> Tensor:
        """float32 [<= n, width]: the first n kept rows of ``site`` in store order."""
        kept = np.flatnonzero(self.keep)[:n]
        if kept.size == 0:
            raise ValueError(f"{self.store.path}: no kept rows")
        rows = self.store.rows(site, 0, int(kept[-1]) + 1, kept_only=False)
        return torch.from_numpy(np.ascontiguousarray(rows[kept]))


def normalisation_norms(data: SequenceData, n: int) -> tuple[float, float]:
    """(mean row norm of attn_in, of attn_out) over the first n kept rows: the dataset-wise norms."""
    return (mean_norm(data.kept_sample(data.sites[0], n)), mean_norm(data.kept_sample(data.sites[1], n)))


def _scaled(lorsa: Lorsa, batch: SequenceBatch) -> tuple[Tensor, Tensor]:
    """(x, y) of a batch on the Lorsa's normalised scale."""
    d = lorsa.d_model
    f_in = math.sqrt(d) / lorsa.norm_in if lorsa.norm_in else 1.0
    f_out = math.sqrt(d) / lorsa.norm_out if lorsa.norm_out else 1.0
    return batch.attn_in * f_in, batch.attn_out * f_out
