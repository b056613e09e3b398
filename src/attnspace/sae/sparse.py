"""Sparse TopK encoder gather and sparse decoder, with backwards that touch only active latents.

Notation: B tokens, d = d_model, n = d_sae latents, K selected latents per token.
Weights are stored with latents on rows: ``W_enc [n, d]`` and ``W_dec [n, d]``
(row i = latent i's encoder / decoder vector).

An entry (b, j) is *active* when its value is > 0 (ReLU of a selected pre-activation).
Only active entries carry gradient, so the rows of ``W_enc``, ``b_enc`` and ``W_dec``
that a backward touches are exactly the latents active somewhere in the batch. With
``sparse_grad=True`` those gradients come back as sparse COO tensors whose indices are
these rows (what :class:`attnspace.sae.optim.SparseAdam` and ``torch.optim.SparseAdam``
read as "this latent received gradient"); otherwise dense, zero elsewhere (for Adam).

Nothing here forms the dense ``[B, n]`` latent matrix or a dense decoder product:
the forward decoder and the input gradient use ``embedding_bag`` (a gather-and-sum
of K rows per token). The weight gradients and the decoder's value gradients touch
only the U latents active in the batch, either as GEMMs against a compacted
``[tokens, U]`` matrix or as gathers / ``index_add_`` over the B K entries, whichever
is cheaper (:func:`_use_gemm`); both work through chunks of tokens, so peak extra
memory stays near ``_CHUNK_ELEMENTS`` values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 24
"""Cap on the elements of one temporary matrix in a backward."""

_GEMM_PER_GATHER = {True: 512, False: 32}
"""CPU (True) / other devices: multiply-adds of a GEMM worth one gathered element (rough, see _use_gemm)."""


def _as_grad(rows: Tensor, values: Tensor, shape: torch.Size, sparse: bool) -> Tensor:
    """Row gradients (rows [U] sorted unique, values [U, ...]) -> sparse COO or dense gradient of ``shape``."""
    if sparse:
        return torch.sparse_coo_tensor(rows[None], values, shape, is_coalesced=True, check_invariants=False)
    return values.new_zeros(shape).index_copy_(0, rows, values)


def _unique_rows(ids: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Sorted unique values [U] of ids (any shape, values in [0, n)) and each id's position among them.

    Same result as ``torch.unique(ids, sorted=True, return_inverse=True)``, in O(ids + n) without a sort.
    """
    present = torch.zeros(n, dtype=torch.bool, device=ids.device)
    present[ids] = True
    rows = present.nonzero().squeeze(1)
    position = torch.cumsum(present, 0) - 1
    return rows, position[ids]


def _use_gemm(n_tokens: int, n_rows: int, n_entries: int, device: torch.device) -> bool:
    """Pick the backward strategy: a compacted GEMM costs n_tokens x n_rows x d multiply-adds at
    matrix speed; a gather / index_add costs n_entries x d element moves at memory speed.

    The exchange rate is per device kind (GEMMs are relatively cheaper on CPUs, whose
    gathers are slow); both strategies give the same numbers up to summation order.
    """
    return n_tokens * n_rows <= _GEMM_PER_GATHER[device.type == "cpu"] * max(1, n_entries)


def _row_grads(
    weights: Tensor, indices: Tensor, active: Tensor, vectors: Tensor, n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum ``weights[b, j] * vectors[b]`` into row ``indices[b, j]`` over active entries.

    weights, indices, active: [B, K]; vectors: [B, d]; n: number of latents.
    Returns rows [U] (sorted unique latents with an active entry), sums [U, d], and
    the per-row weight sums [U] (the bias gradient).
    """
    rows, inverse = _unique_rows(indices[active], n)  # [U], [M]
    U, d = rows.shape[0], vectors.shape[1]
    sums = vectors.new_zeros(U, d)
    if _use_gemm(indices.shape[0], U, inverse.shape[0], vectors.device):
        # G^T vectors per chunk of tokens, G [tokens, U] the compacted weights; a token's K
        # latents are distinct, so G has no collisions.
        w = weights * active  # [B, K], zero on inactive entries
        column = torch.full_like(indices, U)  # inactive entries go to a spare column U, dropped below
        column[active] = inverse
        step = max(1, _CHUNK_ELEMENTS // (U + 1))
        for s in range(0, indices.shape[0], step):
            sl = slice(s, s + step)
            G = w.new_zeros(w[sl].shape[0], U + 1).scatter_(1, column[sl], w[sl])  # [tokens, U + 1]
            sums += G[:, :U].T @ vectors[sl]
    else:
        b = active.nonzero(as_tuple=True)[0]  # [M] token of each active entry
        w = weights[active]  # [M]
        step = max(1, _CHUNK_ELEMENTS // d)
        for s in range(0, b.shape[0], step):
            sl = slice(s, s + step)
            sums.index_add_(0, inverse[sl], w[sl, None] * vectors[b[sl]])
    bias = weights.new_zeros(U).index_add_(0, inverse, weights[active])
    return rows, sums, bias


def _entry_dots(grad_out: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """[B, K] of <grad_out[b], W[indices[b, j]]>."""
    out = grad_out.new_empty(indices.shape)
    rows, inverse = _unique_rows(indices, W.shape[0])  # [U], [B, K]
    if _use_gemm(indices.shape[0], rows.shape[0], indices.numel(), W.device):
        W_rows = W[rows]  # [U, d]: one GEMM per chunk of tokens against the touched rows
        step = max(1, _CHUNK_ELEMENTS // rows.shape[0])
        for s in range(0, indices.shape[0], step):
            sl = slice(s, s + step)
            out[sl] = (grad_out[sl] @ W_rows.T).gather(1, inverse[sl])
    else:
        step = max(1, _CHUNK_ELEMENTS // indices[0].numel() // W.shape[1])
        for s in range(0, indices.shape[0], step):
            sl = slice(s, s + step)
            out[sl] = torch.einsum("bkd,bd->bk", W[indices[sl]], grad_out[sl])
    return out


class EncodeGather(torch.autograd.Function):
    """values [B, K] = ReLU(pre[b, indices[b, j]]) with pre = x W_enc^T + b_enc.

    ``pre`` [B, n] is computed by the caller without grad (it also drives the
    selection); gradients flow to x, W_enc and b_enc only through active entries.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, indices: Tensor, sparse_grad: bool):
        values = pre.gather(1, indices).relu_()  # [B, K]
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.sparse_grad = sparse_grad
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, W_enc, values, indices = ctx.saved_tensors
        active = values > 0
        g = grad_values * active  # ReLU: inactive entries pass no gradient
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=g, mode="sum")  # [B, d]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            rows, sums, bias = _row_grads(g, indices, active, x, W_enc.shape[0])
            grad_W = _as_grad(rows, sums, W_enc.shape, ctx.sparse_grad)
            grad_b = _as_grad(rows, bias, W_enc.shape[:1], ctx.sparse_grad)
        return grad_x, grad_W, grad_b, None, None, None


class SparseDecode(torch.autograd.Function):
    """x_hat [B, d] = sum_j values[b, j] W_dec[indices[b, j]] (no bias)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, sparse_grad: bool):
        ctx.save_for_backward(values, indices, W_dec)
        ctx.sparse_grad = sparse_grad
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = _entry_dots(grad_out, indices, W_dec)  # [B, K]
        if ctx.needs_input_grad[2]:
            rows, sums, _ = _row_grads(values, indices, values > 0, grad_out, W_dec.shape[0])
            grad_W = _as_grad(rows, sums, W_dec.shape, ctx.sparse_grad)
        return grad_values, None, grad_W, None


def encode_gather(x: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, indices: Tensor, sparse_grad: bool) -> Tensor:
    """values [B, K] = ReLU((x W_enc^T + b_enc)[b, indices[b, j]]); ``pre`` is that product, precomputed."""
    return EncodeGather.apply(x, W_enc, b_enc, pre, indices, sparse_grad)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, sparse_grad: bool) -> Tensor:
    """x_hat [B, d] = sum_j values[b, j] W_dec[indices[b, j]] (no decoder bias)."""
    return SparseDecode.apply(values, indices, W_dec, sparse_grad)
