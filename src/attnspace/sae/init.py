"""SAE initialisations: base (Appendix E.2), Active Subspace Init (Section 5.2), random subspace.

All three share one recipe and differ only in where the decoder directions live:

1. n unit directions u_i: uniform on the sphere of R^d (``base``), or uniform on the
   unit sphere of a d_init-dimensional subspace with orthonormal basis Q [d_init, d]
   (u_i = g_i Q / ||g_i Q||, g_i ~ N(0, I)): the top d_init right singular vectors of
   the centred activations (``asi``) or a random orthonormal basis (``random_subspace``);
2. one global norm c from a grid, the one with the lowest initial NMSE on a batch;
3. W_dec = c U, W_enc = W_dec^T (stored as the same [n, d] matrix), b_enc = b_dec = 0; in the
   centred form b_dec = the training mean m instead (the encoder then reads x - m), and the
   norm search scores x - m.

Step 2 is cheap: with zero biases, pre = c U x, so the TopK selection does not depend
on c > 0 and x_hat = c^2 y with y = U^T ReLU(TopK(U x)); y is computed once and every
grid value is scored on it. (The test scores each grid value with a full forward.)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from attnspace.spectrum import Spectrum, spectrum_from_gram

INITS = ("base", "asi", "random_subspace")
"""Initialisation names."""

DEFAULT_NORM_GRID = tuple(float(c) for c in np.geomspace(0.01, 100.0, 81))
"""Candidate decoder norms c (ratio 10^(1/20), about 12%, between neighbours)."""


class InitResult(NamedTuple):
    norm: float
    """The chosen global decoder norm c."""
    grid: Tensor
    """[G] candidate norms."""
    losses: Tensor
    """[G] initial NMSE on the batch at each candidate."""


def sphere_directions(n: int, d: int, generator: torch.Generator) -> Tensor:
    """[n, d] unit vectors, uniform on the sphere (normalised Gaussians), on the CPU."""
    g = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return (g / g.norm(dim=1, keepdim=True)).float()


def subspace_directions(n: int, basis: Tensor, generator: torch.Generator) -> Tensor:
    """[n, d] unit vectors uniform on the unit sphere of span(basis); basis [d_init, d] orthonormal rows."""
    basis = basis.double().cpu()
    g = torch.randn(n, basis.shape[0], generator=generator, dtype=torch.float64) @ basis
    return (g / g.norm(dim=1, keepdim=True)).float()


def active_basis(source: Spectrum | Tensor, d_init: int) -> Tensor:
    """[d_init, d] top right singular vectors of the centred activations (rows, float64).

    source: a :class:`attnspace.spectrum.Spectrum` (its ``components``, from the
    spectrum stage) or a sample of rows x [N, d] (moments in float64, then ``eigh``).
    """
    if isinstance(source, Spectrum):
        comps = source.components
        if comps.shape[0] < d_init:
            raise ValueError(f"the spectrum keeps {comps.shape[0]} right singular vectors, d_init={d_init} needs more")
        return torch.from_numpy(np.ascontiguousarray(comps[:d_init], dtype=np.float64))
    x = source.detach().double().cpu().numpy()
    if not 0 < d_init <= x.shape[1]:
        raise ValueError(f"d_init must lie in [1, d={x.shape[1]}], got {d_init}")
    spec = spectrum_from_gram(x.T @ x, x.sum(axis=0), x.shape[0], n_vectors=d_init)
    return torch.from_numpy(spec.components)


def random_basis(d: int, d_init: int, generator: torch.Generator) -> Tensor:
    """[d_init, d] random orthonormal rows (QR of a Gaussian matrix; Haar-distributed subspace)."""
    if not 0 < d_init <= d:
        raise ValueError(f"d_init must lie in [1, d={d}], got {d_init}")
    q, r = torch.linalg.qr(torch.randn(d, d_init, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).T.contiguous()


@torch.no_grad()
def search_norm(directions: Tensor, x: Tensor, k: int, grid=DEFAULT_NORM_GRID) -> InitResult:
    """Grid search for the global norm c of tied weights W_dec = W_enc^T = c U with zero biases.

    directions U [n, d] unit rows; x [B, d] a normalised batch. Returns the grid value
    with the lowest NMSE(x, c^2 U^T ReLU(TopK(U x))) (ties: the smallest c).
    """
    grid_t = torch.as_tensor(grid, dtype=torch.float64)
    if grid_t.ndim != 1 or grid_t.numel() == 0 or bool((grid_t <= 0).any()):
        raise ValueError("the norm grid must be a non-empty list of positive numbers")
    U = directions.to(x.device, x.dtype)
    top = (x @ U.T).topk(k, dim=1)
    y = torch.nn.functional.embedding_bag(top.indices, U, per_sample_weights=top.values.relu(), mode="sum")
    # NMSE(x, s y) with s = c^2 is a quadratic in s: (|x|^2 - 2 s <x, y> + s^2 |y|^2) / sum |x - mean|^2,
    # so three float64 sums score the whole grid (the same numbers as nmse() at each s, to rounding).
    x64, y64 = x.double(), y.double()
    xx, xy, yy = (x64 * x64).sum(), (x64 * y64).sum(), (y64 * y64).sum()
    var = (x64 - x64.mean(0)).pow(2).sum()
    s = grid_t.to(x.device) ** 2
    losses = ((xx - 2 * s * xy + s * s * yy) / var).cpu()
    best = int(torch.argmin(losses))
    return InitResult(norm=float(grid_t[best]), grid=grid_t, losses=losses)


@torch.no_grad()
def initialize(
    sae,
    method: str,
    x: Tensor,
    generator: torch.Generator,
    *,
    d_init: int | None = None,
    source: Spectrum | Tensor | None = None,
    grid=DEFAULT_NORM_GRID,
    decoder_bias: Tensor | None = None,
) -> InitResult:
    """Initialise ``sae`` in place by ``method`` ('base' | 'asi' | 'random_subspace').

    x [B, d]: normalised batch for the norm search. ``asi`` takes its basis from
    ``source`` (a Spectrum, or a sample of rows; default x itself) and needs d_init;
    ``random_subspace`` needs d_init. Directions are drawn on the CPU from ``generator``,
    so the result does not depend on the device. ``decoder_bias`` [d] (the centred form: the
    training mean on the normalised scale) becomes b_dec, and the norm search scores x - b_dec.
    """
    W, bias, result = initial_weights(sae.d_sae, sae.d_model, sae.k, method, x, generator, d_init=d_init,
                                      source=source, grid=grid, decoder_bias=decoder_bias)
    sae.W_dec.copy_(W)
    sae.W_enc.copy_(W)
    sae.b_enc.zero_()
    sae.b_dec.zero_()
    if bias is not None:
        sae.b_dec.copy_(bias)
    return result


@torch.no_grad()
def initial_weights(n: int, d: int, k: int, method: str, x: Tensor, generator: torch.Generator, *,
                    d_init: int | None = None, source: Spectrum | Tensor | None = None, grid=DEFAULT_NORM_GRID,
                    decoder_bias: Tensor | None = None) -> tuple[Tensor, Tensor | None, InitResult]:
    """What :func:`initialize` writes into an SAE of n latents on d inputs with top-k k: (W [n, d] on the
    CPU, float32, the initial W_dec = W_enc; b_dec on x's device, or None for zero; the norm search).
    A feature-sharded SAE (:mod:`attnspace.sae.sharded`) keeps its rows of W, so that the number of
    shards does not change the initial directions."""
    if method == "base":
        U = sphere_directions(n, d, generator)
    elif method in ("asi", "random_subspace"):
        if d_init is None:
            raise ValueError(f"init {method!r} needs d_init")
        basis = active_basis(x if source is None else source, d_init) if method == "asi" else random_basis(d, d_init, generator)
        if basis.shape[1] != d:
            raise ValueError(f"basis width {basis.shape[1]} != d_model {d}")
        U = subspace_directions(n, basis, generator)
    else:
        raise ValueError(f"init must be one of {INITS}, got {method!r}")
    bias = None if decoder_bias is None else decoder_bias.to(x.device, x.dtype)
    result = search_norm(U, x if bias is None else x - bias, k, grid)
    return result.norm * U, bias, result
