"""Optimizers for the SAE: Adam (torch's) and SparseAdam (lazy Adam on touched rows).

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
(The authors' masked-dense variant, which decays every moment each step, is not this.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class SparseAdam(torch.optim.Optimizer):
    """Lazy Adam: params [n, ...] with sparse (row-indexed) or dense gradients."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if lr <= 0 or eps <= 0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid SparseAdam settings lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SparseAdam takes no closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                rows, g = _rows_and_values(p.grad)
                if g.numel() == 0:
                    continue
                m, v = state["exp_avg"], state["exp_avg_sq"]
                old_m = m if rows is None else m.index_select(0, rows)
                old_v = v if rows is None else v.index_select(0, rows)
                # Same operations, in the same order, as torch.optim._functional.sparse_adam.
                dm = g.sub(old_m).mul_(1 - beta1)
                dv = g.pow(2).sub_(old_v).mul_(1 - beta2)
                new_m = old_m + dm
                new_v = old_v + dv
                denom = (dv + old_v).sqrt_().add_(eps)
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                update = -step_size * (dm + old_m).div_(denom)
                if rows is None:
                    m.copy_(new_m)
                    v.copy_(new_v)
                    p.add_(update)
                else:
                    m.index_copy_(0, rows, new_m)
                    v.index_copy_(0, rows, new_v)
                    p.index_copy_(0, rows, p.index_select(0, rows) + update)


def _rows_and_values(grad: Tensor) -> tuple[Tensor | None, Tensor]:
    """Sparse COO gradient -> (unique rows [U], values [U, ...]); dense -> (None, grad)."""
    if not grad.is_sparse:
        return None, grad
    if grad.sparse_dim() != 1:
        raise ValueError("SparseAdam expects row-sparse gradients (sparse_dim 1)")
    grad = grad.coalesce()  # sums duplicate rows (e.g. a latent in both the TopK and AuxK sets)
    return grad.indices()[0], grad.values()


def make_optimizer(name: str, params, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """'adam' -> torch.optim.Adam (dense gradients); 'sparse_adam' -> :class:`SparseAdam`."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps)
    if name == "sparse_adam":
        return SparseAdam(params, lr=lr, betas=tuple(betas), eps=eps)
    raise ValueError(f"optimizer must be 'adam' or 'sparse_adam', got {name!r}")


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
        # torch Adam keeps the step as a float32 scalar tensor; SparseAdam as an int.
        state["step"] = torch.tensor(step, dtype=torch.float32) if isinstance(opt, torch.optim.Adam) else int(step)
        state["exp_avg"] = tensors[f"optim.{name}.exp_avg"].to(p.device, p.dtype).clone()
        state["exp_avg_sq"] = tensors[f"optim.{name}.exp_avg_sq"].to(p.device, p.dtype).clone()
