"""Optimizers for the SAE: Adam (torch's), SparseAdam (lazy Adam on touched rows) and
MaskedAdam (the authors' masked dense rule).

:class:`SparseAdam` has the semantics of ``torch.optim.SparseAdam``: for a sparse COO
gradient, only the rows in its indices (the latents that fired in the batch, see
``attnspace.sae.sparse``) have their parameters and both moments updated; all other
rows, and their moments, stay exactly as they were. The step count used for bias
correction is per parameter tensor and advances on every step the tensor has a
gradient, as in torch. A dense gradient (the decoder bias) counts as touching every row.

Unlike torch's implementation it updates the touched rows in place with gather /
scatter (no sparse-mask round trips), and it also accepts dense gradients, so one
optimizer holds every parameter of the SAE. The arithmetic follows torch's line by
line; ``tests/test_sae_optim.py`` compares the two on the same sparse gradients.
(The authors' masked-dense variant, which decays every moment each step, is not this:
it is :class:`MaskedAdam`.)

On CUDA (with Triton), a row-sparse gradient of a 2-D parameter is applied by one fused
kernel (:func:`_fused_row_step`): per touched weight it reads parameter, both moments and
gradient once and writes parameter, moments and, where the parameter has one, its bf16
mirror (:func:`attnspace.sae.fast.lowp_weight`), with the same operations in the same order
(IEEE division and square root, no fused multiply-add). The eager path above it moves
about 30 [U, d] tensors through memory for the same result; see :mod:`attnspace.sae.fast`.
:func:`make_optimizer` gives torch's fused Adam on CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
from torch import Tensor

from attnspace.sae import fast
from attnspace.sae.fast import lowp_mirror, mirror_synced

FUSED: bool | None = None
"""Fused row step for SparseAdam: None = on CUDA when Triton is importable, and wherever
:data:`attnspace.sae.fast.CUDA_PATH` forces the CUDA configuration; True/False forces it (tests).
Without CUDA and Triton the step's arithmetic is emulated (:func:`_emulated_row_step`)."""


class _RowAdam(torch.optim.Optimizer):
    """Adam over params [n, ...] with sparse (row-indexed) or dense gradients: the settings,
    the per-tensor step count and moments, and the bias-corrected step size. A subclass says
    which steps count (:meth:`_counts`) and how the touched rows move (:meth:`_update`)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if lr <= 0 or eps <= 0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid {type(self).__name__} settings lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    def _counts(self, g: Tensor) -> bool:
        """Whether a step with these gradient values counts (state created, step advanced)."""
        return True

    def _update(self, p, m, v, rows, g, beta1, beta2, eps, step_size) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__} takes no closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, g = _rows_and_values(p.grad)
                if not self._counts(g):
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                if g.numel() == 0:
                    continue
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                self._update(p, state["exp_avg"], state["exp_avg_sq"], rows, g, beta1, beta2, group["eps"], step_size)


CHUNK_ROWS = 4096
"""Touched rows updated at a time by the eager row rules: their temporaries are [CHUNK_ROWS, d], not
[U, d] (at 1M latents with AuxK, U reaches n: eight [n, d] float32 temporaries would be 128 GiB). The
arithmetic is elementwise, so the result does not depend on the chunking."""


def _chunks(rows: Tensor | None, g: Tensor):
    """(rows, values) in chunks of :data:`CHUNK_ROWS` touched rows; a dense gradient (rows None) whole."""
    if rows is None:
        yield None, g
        return
    for s in range(0, rows.numel(), CHUNK_ROWS):
        yield rows[s : s + CHUNK_ROWS], g[s : s + CHUNK_ROWS]


def _write_rows(p: Tensor, m: Tensor, v: Tensor, rows: Tensor | None, new_m: Tensor, new_v: Tensor,
                update: Tensor) -> None:
    """Store the new moments of the touched rows (all rows when ``rows`` is None) and add ``update``."""
    if rows is None:
        m.copy_(new_m)
        v.copy_(new_v)
        p.add_(update)
    else:
        m.index_copy_(0, rows, new_m)
        v.index_copy_(0, rows, new_v)
        p.index_copy_(0, rows, p.index_select(0, rows) + update)


class SparseAdam(_RowAdam):
    """Lazy Adam (``torch.optim.SparseAdam``): only the rows that fired update their moments."""

    def _update(self, p, m, v, rows, g, beta1, beta2, eps, step_size) -> None:
        if rows is not None and _use_fused(p, g):
            _fused_row_step(p, m, v, rows, g, beta1, beta2, eps, step_size)
            return
        for r, g in _chunks(rows, g):
            old_m = m if r is None else m.index_select(0, r)
            old_v = v if r is None else v.index_select(0, r)
            # Same operations, in the same order, as torch.optim._functional.sparse_adam.
            dm = g.sub(old_m).mul_(1 - beta1)
            dv = g.pow(2).sub_(old_v).mul_(1 - beta2)
            denom = (dv + old_v).sqrt_().add_(eps)
            update = -step_size * (dm + old_m).div_(denom)
            _write_rows(p, m, v, r, old_m + dm, old_v + dv, update)


class MaskedAdam(_RowAdam):
    """The sparse Adam of the authors' library (llamascopium's ``SparseAdam``): a masked dense rule.

    On every step, both moments of every entry decay (m <- beta1 m, v <- beta2 v); where the
    gradient is non-zero they also take it (m += (1 - beta1) g, v += (1 - beta2) g^2), and only
    there does the parameter move, by lr sqrt(1 - beta2^t) / (1 - beta1^t) m / (sqrt(v) + eps).
    t is per tensor and counts the steps on which its gradient had a non-zero entry (a tensor
    whose gradient is all zero is skipped, moments included, as there).

    :class:`SparseAdam` (``torch.optim.SparseAdam``, what the paper's text names) instead freezes
    the moments of rows that did not fire. After a long idle spell the masked rule's second
    moment has decayed by beta2^T and its first only partly, so a returning feature's first
    update is several lr instead of about one (docs/interop.md gives the measured numbers).

    Gradients: sparse COO with row indices (rows not listed are zero) or dense. The arithmetic
    is llamascopium's, operation for operation, on the touched rows; untouched rows only decay.
    """

    def _counts(self, g: Tensor) -> bool:
        return g.numel() > 0 and bool(g.any())  # an all-zero gradient is skipped, moments included

    def _update(self, p, m, v, rows, g, beta1, beta2, eps, step_size) -> None:
        m.mul_(beta1)
        v.mul_(beta2)
        for r, g in _chunks(rows, g):
            old_m = m if r is None else m.index_select(0, r)
            old_v = v if r is None else v.index_select(0, r)
            mask = g != 0
            # llamascopium's expressions, in its order: (1 - beta2) * g * g is ((1 - beta2) g) g.
            new_m = torch.where(mask, old_m + (1 - beta1) * g, old_m)
            new_v = torch.where(mask, old_v + (1 - beta2) * g * g, old_v)
            update = torch.where(mask, step_size * new_m / new_v.sqrt().add_(eps), torch.zeros_like(new_m))
            _write_rows(p, m, v, r, new_m, new_v, -update)


def _rows_and_values(grad: Tensor) -> tuple[Tensor | None, Tensor]:
    """Sparse COO gradient -> (unique rows [U], values [U, ...]); dense -> (None, grad)."""
    if not grad.is_sparse:
        return None, grad
    if grad.sparse_dim() != 1:
        raise ValueError("SparseAdam expects row-sparse gradients (sparse_dim 1)")
    rows = grad._indices()[0]
    # Autograd drops the coalesced flag of the gradients the SAE builds (sorted, unique rows);
    # checking the order is one pass over U ids, coalescing a copy of all [U, d] values.
    if grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all()):
        return rows, grad._values()
    grad = grad.coalesce()  # sums duplicate rows (e.g. a latent in both the TopK and AuxK sets)
    return grad.indices()[0], grad.values()


def _use_fused(p: Tensor, g: Tensor) -> bool:
    if FUSED is not None:
        return FUSED and p.dim() == 2
    if fast.CUDA_PATH:
        return p.dim() == 2
    return p.is_cuda and p.dim() == 2 and p.is_contiguous() and _triton_kernel() is not None


@functools.cache
def _triton_kernel():
    """The fused row kernel, or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def row_adam(P, M, V, G, ROWS, LOWP, D, c1, c2, eps, neg_step_size, HAS_LOWP: tl.constexpr,
                 BLOCK: tl.constexpr):
        i = tl.program_id(0)  # touched row i of U
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        dst = tl.load(ROWS + i).to(tl.int64) * D + cols  # int64: n d exceeds 2^31 at 1M latents
        g = tl.load(G + i.to(tl.int64) * D + cols, mask=mask)
        m = tl.load(M + dst, mask=mask)
        v = tl.load(V + dst, mask=mask)
        p = tl.load(P + dst, mask=mask)
        dm = (g - m) * c1  # the operations of torch.optim._functional.sparse_adam, in its order
        dv = (g * g - v) * c2
        m_new = m + dm
        v_new = v + dv
        denom = tl.sqrt_rn(dv + v) + eps
        p_new = p + neg_step_size * tl.div_rn(dm + m, denom)
        tl.store(M + dst, m_new, mask=mask)
        tl.store(V + dst, v_new, mask=mask)
        tl.store(P + dst, p_new, mask=mask)
        if HAS_LOWP:
            tl.store(LOWP + dst, p_new.to(LOWP.dtype.element_ty), mask=mask)

    return triton, row_adam


def _fused_row_step(p: Tensor, m: Tensor, v: Tensor, rows: Tensor, g: Tensor, beta1: float, beta2: float,
                    eps: float, step_size: float) -> None:
    """SparseAdam's update of rows [U] of p, m, v [n, D] from values g [U, D], in one kernel (its
    emulation where the kernel cannot run: no Triton, or a CPU tensor outside Triton's interpreter)."""
    U, D = g.shape
    if U == 0:
        return
    lowp = lowp_mirror(p)
    kernel = _triton_kernel()
    if kernel is None or not (p.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        _emulated_row_step(p, m, v, rows, g, beta1, beta2, eps, step_size, lowp)
        return
    triton, kernel = kernel
    block = min(1024, triton.next_power_of_2(D))
    with launch_device(p):
        kernel[(U, triton.cdiv(D, block))](
            p, m, v, g.contiguous(), rows, lowp if lowp is not None else p, D, 1 - beta1, 1 - beta2, eps, -step_size,
            HAS_LOWP=lowp is not None, BLOCK=block, enable_fp_fusion=False)
    torch.autograd.graph.increment_version(p)  # p changed in place, outside torch's ops
    if lowp is not None:
        mirror_synced(p)


def launch_device(p: Tensor):
    """The context a kernel for ``p`` launches in: Triton launches on the current device, so make it p's
    (an SAE on cuda:1 while cuda:0 is current); nothing on the CPU."""
    return torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext()


def _emulated_row_step(p: Tensor, m: Tensor, v: Tensor, rows: Tensor, g: Tensor, beta1: float, beta2: float,
                       eps: float, step_size: float, lowp: Tensor | None, chunk_rows: int = 4096) -> None:
    """The fused kernel's step in torch operations: its arithmetic, in its order, per weight (the
    results are those of the eager :class:`SparseAdam` to the last bit), its mirror rows written as
    bf16 of the new weight, and in row chunks, so that, like the kernel, it holds no [U, D] temporary."""
    c1, c2 = 1 - beta1, 1 - beta2
    for s in range(0, rows.numel(), chunk_rows):
        r, gi = rows[s : s + chunk_rows], g[s : s + chunk_rows]
        mi, vi, pi = m.index_select(0, r), v.index_select(0, r), p.index_select(0, r)
        dm = (gi - mi) * c1
        dv = (gi * gi - vi) * c2
        p_new = pi + (-step_size) * ((dm + mi) / ((dv + vi).sqrt() + eps))
        m.index_copy_(0, r, mi + dm)
        v.index_copy_(0, r, vi + dv)
        p.index_copy_(0, r, p_new)
        if lowp is not None:
            lowp.index_copy_(0, r, p_new.to(lowp.dtype))
    if lowp is not None:
        mirror_synced(p)


def make_optimizer(name: str, params, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """'adam' -> torch.optim.Adam (dense gradients; torch's fused kernel); 'sparse_adam' -> :class:`SparseAdam`;
    'masked_adam' -> :class:`MaskedAdam`.

    Adam is fused on CUDA and on CPU alike: one pass over parameter, gradient and both moments
    (on CPU 9x faster than the per-tensor loop: 30 -> 3.4 ms a step at 4,608 x 576, one thread).
    """
    if name == "adam":
        return torch.optim.Adam(list(params), lr=lr, betas=tuple(betas), eps=eps, fused=True)
    if name == "sparse_adam":
        return SparseAdam(params, lr=lr, betas=tuple(betas), eps=eps)
    if name == "masked_adam":
        return MaskedAdam(params, lr=lr, betas=tuple(betas), eps=eps)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


OPTIMIZERS = ("adam", "sparse_adam", "masked_adam")
"""Optimizer names: torch's Adam, SparseAdam (torch.optim.SparseAdam's lazy rule), MaskedAdam (the authors' rule)."""


def optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, Tensor]:
    """Moments and step counts as flat tensors ``optim.<name>.{exp_avg,exp_avg_sq,step}`` (for a checkpoint)."""
    out = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, p in zip(names, params, strict=True):
        state = opt.state.get(p)
        if not state:
            continue
        out[f"optim.{name}.exp_avg"] = state["exp_avg"]
        out[f"optim.{name}.exp_avg_sq"] = state["exp_avg_sq"]
        out[f"optim.{name}.step"] = torch.as_tensor(state["step"], dtype=torch.float64).reshape(1).cpu()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, Tensor]) -> None:
    """Inverse of :func:`optimizer_tensors`; moments are copied onto each parameter's device."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, p in zip(names, params, strict=True):
        if f"optim.{name}.step" not in tensors:
            continue
        step = float(tensors[f"optim.{name}.step"][0])
        state = opt.state[p]
        # torch Adam keeps the step as a float32 scalar tensor (on the parameter's device when fused); SparseAdam as an int.
        if isinstance(opt, torch.optim.Adam):
            fused = any(g.get("fused") for g in opt.param_groups)
            state["step"] = torch.tensor(step, dtype=torch.float32, device=p.device if fused else "cpu")
        else:
            state["step"] = int(step)
        state["exp_avg"] = tensors[f"optim.{name}.exp_avg"].to(p.device, p.dtype).clone()
        state["exp_avg_sq"] = tensors[f"optim.{name}.exp_avg_sq"].to(p.device, p.dtype).clone()
