"""The TopK SAE's training forward, fast on CUDA and on CPU: the same model, rule and gradients as the
reference path (:meth:`TopKSAE.forward` with :mod:`attnspace.sae.sparse`), with fewer bytes moved.

:class:`~attnspace.sae.model.TopKSAE` takes this path when ``sae.fast`` is set and grad mode is
on (``train_sae`` sets it unless ``SAETrainConfig.fast`` is False); evaluation and inference stay
on the reference path. The parameters, the TopK rule (ReLU of the K largest pre-activations; in the
centred form, of W_enc (x - b_dec) + b_enc), AuxK and the gradients are the reference's; ``tests/test_sae_fast.py`` checks loss,
gradients and optimizer updates against it on CPU, and ``bench/sae_gpu.py`` on the GPU.

Why, in numbers. The anchor (bench/anchor/h200.jsonl: H200, d 4096, K 50, B 4096, bf16) puts the encoder
GEMM alone at 6.0 / 25.6 / 50.1 ms per step at n = 131K / 524K / 1M latents and sparsify's
whole step at 37.5 / 113 ms. At about 4 TB/s, every pass over one [n, d] fp32 matrix costs
0.5 / 2.2 / 4.3 ms and every pass over a [U, d] block of the U latents a batch touches
(random data: U ~ 0.79n / 0.32n / 0.18n) 0.4 / 0.7 / 0.8 ms. The levers, reference -> here:

1. Encoder GEMM in ``sae.matmul_dtype`` (bf16 on CUDA, the anchor's autocast setting): pre
   [B, n] is bf16 (1 / 4 / 8 GiB instead of 2 / 8 / 16), the GEMM runs at tensor-core
   speed, and W_enc's bf16 copy is a *mirror* kept between steps (:func:`lowp_weight`):
   SparseAdam's fused kernel rewrites only the rows it updates, so the per-step cast of
   all of W_enc (6 bytes a weight: 0.8 / 3.2 / 6.4 ms) is gone. Every other optimizer step
   (Adam's fused kernel, which does not even bump W_enc's version) leaves the mirror stale,
   and the next forward recasts it: an optimizer step hook enforces this for any optimizer. Selection and the kept
   values are those of the bf16 product, as under autocast (ties at the K-th value may
   break differently from fp32); gradients and the optimizer stay fp32.
2. No second [B, n] buffer: one top-k on pre; AuxK masks pre in place (as the reference).
3. One backward plan per step (:class:`Plan`): the B(K + K_aux) entries are sorted by
   latent once; every weight gradient (W_enc, b_enc, W_dec) is a per-latent sum over the
   sorted entries, computed as one ``embedding_bag`` over the [B, d] input or output
   gradient. No [entries, d] tensor is materialised, no float atomics (deterministic),
   and the TopK and AuxK contributions land in one coalesced [U, d] gradient.
4. The decoder reads only active rows: inactive entries (value 0) point at row 0, so
   AuxK's many zero entries cost no memory traffic; the entry gradients of the decoder
   come from ``embedding_bag``'s own per-sample-weight backward (no gather of [B, K, d]).
5. The optimizer (:mod:`attnspace.sae.optim`): SparseAdam updates the touched rows of
   parameter, both moments and the bf16 mirror in one fused kernel (4 reads + 4 writes a
   weight instead of about 30 passes); Adam is torch's fused Adam.
6. Host synchronisations: a handful per step, each costing about one kernel-launch gap
   (the dead count AuxK needs, as the reference; the plan's sizes; SparseAdam's check that
   the gradient rows are sorted and unique, which spares a coalesce). The dead-latent
   tracker's update no longer synchronises (:class:`~attnspace.sae.losses.DeadLatentTracker`).

The one dense cost that stays is the encoder product. What cannot be removed with exact
optimizer semantics is the optimizer's own traffic: SparseAdam moves 2 x 7 x U x d x 4
bytes (about 24 / 39 / 43 GB, i.e. 6 / 10 / 11 ms), Adam 2 x 7 x n x d x 4 (30 / 120 GB,
7.5 / 30 ms) plus its dense gradients (zero-fill and row copy, 2.8 / 7 ms). Expected
step (an estimate from these figures, not a measurement): SparseAdam about 17 / 43 / 75 ms
(2.2x / 2.6x sparsify; 35% / 60% / 67% of the GEMM-only rate), Adam about 23 / 72 ms (about
1.6x sparsify); bench/sae_gpu.py measures it. Where Adam falls short, the next lever is an
Adam kernel that reads row-sparse gradients (no densified [n, d] gradient: 6 passes, not 9).

On CPU (float32, no mirror, torch's own optimizers) the one-plan backward alone halves a step of
sizes of the embedded default's order (d 576, B 1,024, K 32; 18,432 latents, Adam: 1.11 s -> 0.52 s,
SparseAdam 1.58 s -> 0.80 s; 2,304 latents, SparseAdam 0.32 s -> 0.16 s; one thread). There, the
decoder's entry gradients are one sampled product over the active entries (:func:`_entry_dots`, 2.2x
faster than embedding_bag's per-sample-weight backward) and Adam is fused (3.3x): a step at 4,608
latents with AuxK 160 -> 115 ms (``bench/sae_cpu_step.py``). What is left is the encoder GEMM (about
60%) and the two top-k selections (about 15%).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakTensorKeyDictionary

from attnspace.sae.losses import auxk_loss, nmse
from attnspace.sae.sparse import _as_grad


CUDA_PATH: bool | None = None
"""The CUDA configuration of the fast path: None = on CUDA devices only; True forces it on any device
(tests prove the CUDA branches on the CPU): the bf16 encoder GEMM and its mirror, the embedding_bag
decoder branch, and SparseAdam's fused row step (:mod:`attnspace.sae.optim`: the Triton kernel on CUDA,
its arithmetic emulated elsewhere)."""


def cuda_path(device: torch.device | str) -> bool:
    """Whether the fast path takes its CUDA configuration on ``device``."""
    return CUDA_PATH if CUDA_PATH is not None else torch.device(device).type == "cuda"


@contextmanager
def force_cuda_path(on: bool = True):
    """Take (or, with ``on`` False, refuse) the CUDA configuration on every device inside the block."""
    global CUDA_PATH
    before, CUDA_PATH = CUDA_PATH, on
    try:
        yield
    finally:
        CUDA_PATH = before


class _Mirror(NamedTuple):
    tensor: Tensor
    """The low-precision copy of the weight."""
    key: tuple
    """(data_ptr, version, dtype) of the weight it copies."""
    state: str
    """"current"; "stepping" while an optimizer steps the weight (a kernel that updates both may
    call :func:`mirror_synced`); "stale" once a step ended without that."""


_MIRRORS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
"""weight -> its low-precision mirror (not saved, rebuilt whenever the weight changed behind it)."""


def _key(W: Tensor, dtype: torch.dtype) -> tuple:
    return (W.data_ptr(), W._version, dtype)


def _valid(m: _Mirror | None, W: Tensor, state: str = "current") -> bool:
    return m is not None and m.state == state and m.key == _key(W, m.tensor.dtype)


def lowp_weight(W: Tensor, dtype: torch.dtype) -> Tensor:
    """W (detached) in ``dtype``, from a mirror that is recast only when W may have changed since.

    The mirror is trusted only while (a) W's version is the one it was cast from (any in-place change
    through torch's own ops bumps it) and (b) no optimizer has stepped W since, unless that step
    updated the mirror too (:func:`mirror_synced`). (b) is needed because a fused optimizer kernel
    (torch's fused Adam) rewrites W in place without bumping its version: every optimizer step
    marks the mirrors of its parameters as stepping first and stale after, unless the step synced
    them (:func:`_mark_stepping`, :func:`_mark_stepped`: global optimizer step hooks).
    """
    if dtype == W.dtype:
        return W.detach()
    m = _MIRRORS.get(W)
    if not (_valid(m, W) and m.tensor.dtype == dtype):
        m = _MIRRORS.pop(W, None)  # free the stale copy before casting the new one
        m = _Mirror(W.detach().to(dtype), _key(W, dtype), "current")
        _MIRRORS[W] = m
    return m.tensor


def lowp_mirror(W: Tensor) -> Tensor | None:
    """The mirror of W if it was current when the optimizer step now running began (for a kernel that
    updates W and its mirror together), else None."""
    m = _MIRRORS.get(W)
    return m.tensor if _valid(m, W, "stepping") or _valid(m, W, "current") else None


def mirror_synced(W: Tensor) -> None:
    """Record that W's mirror was updated together with W (after W's version was bumped)."""
    m = _MIRRORS.get(W)
    if m is not None and m.state == "stepping":
        _MIRRORS[W] = _Mirror(m.tensor, _key(W, m.tensor.dtype), "current")


def drop_mirror(W: Tensor) -> None:
    """Free W's mirror (before evaluation, which reads W itself)."""
    _MIRRORS.pop(W, None)


def _mark(optimizer: torch.optim.Optimizer, before: str, after: str) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            m = _MIRRORS.get(p)
            if m is not None and m.state == before:
                _MIRRORS[p] = m._replace(state=after)


def _mark_stepping(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Before any optimizer's step: its parameters' current mirrors are stepping."""
    _mark(optimizer, "current", "stepping")


def _mark_stepped(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimizer's step: a mirror the step did not sync is stale (recast at the next use)."""
    _mark(optimizer, "stepping", "stale")


register_optimizer_step_pre_hook(_mark_stepping)
register_optimizer_step_post_hook(_mark_stepped)


class Plan(NamedTuple):
    """The step's entries: B tokens x K' selected latents (K TopK, then K' - K AuxK), flat e = b K' + j.

    Active entries (value > 0) are sorted by latent (then by e); a latent's entries are one
    contiguous segment ("bag"), so a per-latent sum is one ``embedding_bag`` call.
    """

    gather_ids: Tensor
    """[B, K'] latent read by the decoder: the entry's latent, or row 0 for an inactive entry (weight 0)."""
    active: Tensor
    """[B, K'] bool: value > 0."""
    out_offsets: Tensor
    """[B G] start of each output bag in the flat entries (G = 1, or 2 with AuxK: token b's TopK bag, then its AuxK bag)."""
    rows: Tensor
    """[U] sorted latents with an active entry (the rows a backward touches)."""
    row_offsets: Tensor
    """[U] start of each latent's segment among the sorted active entries."""
    entries: Tensor
    """[M] flat entry id of each sorted active entry."""
    tokens: Tensor
    """[M] token of each sorted active entry (row of x)."""
    out_bags: Tensor
    """[M] output bag of each sorted active entry (row of the stacked decoder output gradient)."""


def make_plan(indices: Tensor, active: Tensor, k_main: int, n: int) -> Plan:
    """indices, active: [B, K']; the first ``k_main`` columns are the TopK entries, the rest AuxK."""
    B, Kp = indices.shape
    groups = 1 if Kp == k_main else 2
    flat_act = active.reshape(-1)
    keys = torch.where(flat_act, indices.reshape(-1), n)  # [B K'], inactive entries sort last
    counts = torch.bincount(keys, minlength=n + 1)  # [n + 1]
    present = counts[:n] > 0
    M = int(flat_act.sum())  # host syncs: the active entries, then (nonzero) the touched latents
    rows = present.nonzero().squeeze(1)  # [U]
    entries = torch.sort(keys, stable=True).indices[:M]  # [M]
    c = counts[rows]
    row_offsets = torch.cumsum(c, 0) - c
    tokens = entries // Kp
    starts = torch.arange(B, device=indices.device) * Kp
    if groups == 1:
        out_offsets, out_bags = starts, tokens
    else:
        out_offsets = torch.stack([starts, starts + k_main], 1).reshape(-1)
        out_bags = tokens * 2 + (entries % Kp >= k_main)
    gather_ids = torch.where(active, indices, 0)
    return Plan(gather_ids, active, out_offsets, rows, row_offsets, entries, tokens, out_bags)


def _row_sums(plan: Plan, weights: Tensor, vectors: Tensor, by_token: bool) -> Tensor:
    """[U, d]: for each touched latent, the sum of weights[e] vectors[v(e)] over its active entries e.

    weights: [B, K'] per entry; vectors: [B, d] with v(e) = e's token (by_token), or the
    stacked output gradient [B G, d] with v(e) = e's output bag.
    """
    if plan.rows.numel() == 0:  # nothing fired (no kernel launch over zero bags)
        return vectors.new_zeros(0, vectors.shape[1])
    w = weights.reshape(-1)[plan.entries]  # [M]
    by = plan.tokens if by_token else plan.out_bags
    return F.embedding_bag(by, vectors.contiguous(), plan.row_offsets, mode="sum", per_sample_weights=w)


def _entry_dots(plan: Plan, W_dec: Tensor, grad_out: Tensor) -> Tensor:
    """[B K'] flat: <grad_out[bag(e)], W_dec[latent(e)]> for each active entry e, 0 for the others.

    One sampled dense-dense product (torch.sparse.sampled_addmm) over the plan's sorted entries: a
    CSR matrix [U, B G] whose row u holds latent rows[u]'s output bags (each at most once). Only the
    active entries are computed: inactive ones (AuxK's many zeros) get no gradient through the ReLU
    anyway. On CPU about 2.4x faster than embedding_bag's per-sample-weight backward, which computes
    every entry (d 576, 4,608 latents, B 1,024, K 32 + K_aux 512).
    """
    B, Kp = plan.gather_ids.shape
    out = grad_out.new_zeros(B * Kp)
    M = plan.entries.numel()
    if M == 0:
        return out
    crow = torch.cat([plan.row_offsets, plan.row_offsets.new_tensor([M])])
    with warnings.catch_warnings():  # "CSR support is in beta": the layout is built here, its invariants hold
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, plan.out_bags, grad_out.new_zeros(M),
                                          size=(plan.rows.numel(), grad_out.shape[0]), check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, W_dec.index_select(0, plan.rows), grad_out.T, beta=0.0)
    out[plan.entries] = dots.values()
    return out


class EncodeFast(torch.autograd.Function):
    """values [B, K'] = ReLU(raw) with raw the gathered pre-activations (W_enc x + b_enc)[b, latent];
    gradients to W_enc and b_enc through the active entries only. x is the encoder's input: the data
    (no gradient), or x - b_dec in the centred form, whose gradient sum_j g[b, j] W_enc[latent] then
    carries the encoder's share of b_dec's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, raw: Tensor, plan: Plan, sparse_grad: bool):
        ctx.save_for_backward(x, W_enc)
        ctx.plan, ctx.sparse_grad, ctx.shapes = plan, sparse_grad, (W_enc.shape, b_enc.shape)
        return raw.relu()

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, W_enc = ctx.saved_tensors
        plan = ctx.plan
        g = grad_values * plan.active  # [B, K'], ReLU
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:  # one bag per token over its entries (inactive: row 0, weight 0)
            B, Kp = g.shape
            offsets = torch.arange(B, device=g.device) * Kp
            grad_x = F.embedding_bag(plan.gather_ids.reshape(-1), W_enc.detach(), offsets, mode="sum",
                                     per_sample_weights=g.reshape(-1).to(W_enc.dtype))
        if ctx.needs_input_grad[1]:
            grad_W = _as_grad(plan.rows, _row_sums(plan, g, x, True), ctx.shapes[0], ctx.sparse_grad)
        if ctx.needs_input_grad[2]:
            bias = _row_sums(plan, g, x.new_ones(x.shape[0], 1), True).squeeze(1)  # [U]
            grad_b = _as_grad(plan.rows, bias, ctx.shapes[1], ctx.sparse_grad)
        return grad_x, grad_W, grad_b, None, None, None


class DecodeFast(torch.autograd.Function):
    """out [B G, d]: bag (b, group) = sum of values[b, j] W_dec[latent] over the group's entries (no bias)."""

    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, plan: Plan, sparse_grad: bool):
        # The entry gradients <grad_out, W_dec[latent]>: on CPU a sampled product over the active
        # entries (_entry_dots); elsewhere embedding_bag's own per-sample-weight backward, through
        # this small graph kept for the backward.
        on_cpu = not cuda_path(W_dec.device)
        with torch.set_grad_enabled(not on_cpu):
            v = values.detach().reshape(-1).requires_grad_(not on_cpu)
            out = F.embedding_bag(plan.gather_ids.reshape(-1), W_dec.detach(), plan.out_offsets, mode="sum",
                                  per_sample_weights=v)
        ctx.graph = None if on_cpu else (v, out)
        ctx.save_for_backward(values, W_dec)
        ctx.plan, ctx.sparse_grad, ctx.W_shape = plan, sparse_grad, W_dec.shape
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, W_dec = ctx.saved_tensors
        graph, ctx.graph = ctx.graph, None
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            if graph is None:
                grad_values = _entry_dots(ctx.plan, W_dec.detach(), grad_out).view(values.shape)
            else:
                (grad_values,) = torch.autograd.grad(graph[1], graph[0], grad_out)
                grad_values = grad_values.view(values.shape)
        if ctx.needs_input_grad[1]:
            grad_W = _as_grad(ctx.plan.rows, _row_sums(ctx.plan, values, grad_out, False), ctx.W_shape, ctx.sparse_grad)
        return grad_values, grad_W, None, None


def fast_forward(sae, x: Tensor, dead: Tensor | None, k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:meth:`TopKSAE.forward`'s result (x_hat, values, indices, nmse, auxk_loss) by the fast path."""
    K, n = sae.k, sae.d_sae
    dtype = sae.matmul_dtype or sae.W_enc.dtype
    x_in = sae.encoder_input(x)  # x, or x - b_dec in the centred form (a graph to b_dec)
    with torch.no_grad():
        W = lowp_weight(sae.W_enc, dtype)
        pre = F.linear(x_in.detach().to(dtype), W, sae.b_enc.detach().to(dtype))  # [B, n]
        indices = pre.topk(K, dim=1, sorted=False).indices  # [B, K]
        raw = pre.gather(1, indices)  # [B, K]
        n_dead = 0 if dead is None or k_aux <= 0 else int(dead.sum())
        all_indices = indices
        if n_dead:
            # In place, as the reference: the TopK values are gathered, AuxK reads only dead entries.
            pre_dead = pre.masked_fill_(~dead, -math.inf)
            aux_idx = pre_dead.topk(min(k_aux, n_dead), dim=1, sorted=False).indices  # [B, K_aux]
            all_indices = torch.cat([indices, aux_idx], 1)  # [B, K']
            raw = torch.cat([raw, pre_dead.gather(1, aux_idx)], 1)
        del pre
        raw = raw.to(x.dtype)
        plan = make_plan(all_indices, raw > 0, K, n)
    values = EncodeFast.apply(x_in, sae.W_enc, sae.b_enc, raw, plan, sae.sparse_grad)  # [B, K']
    out = DecodeFast.apply(values, sae.W_dec, plan, sae.sparse_grad)  # [B G, d]
    if n_dead:
        out = out.view(x.shape[0], 2, -1)
        x_hat = out[:, 0] + sae.b_dec
        aux = auxk_loss(x - x_hat, out[:, 1])
    else:
        x_hat = out + sae.b_dec
        aux = x_hat.new_zeros(())
    return x_hat, values[:, :K], indices, nmse(x, x_hat), aux
