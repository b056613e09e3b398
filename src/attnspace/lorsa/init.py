"""Lorsa initialisations: ``vanilla`` (the authors' code) and ``asi`` (W_O in the active subspace).

``vanilla``: Xavier-uniform W_Q, W_K; uniform W_V in +-1/sqrt(n_ov), W_O in
+-1/sqrt(d); zero biases. ``asi``: identical except that each W_O row is redrawn, with
the same norm, uniformly on the unit sphere of the span of the top d_init right
singular vectors of attn_out. Both draw every other tensor from the same seed, so the
two runs of Table 1 differ only in W_O.
"""

from __future__ import annotations

import math

import torch

from attnspace.lorsa.model import Lorsa
from attnspace.sae.init import active_basis, subspace_directions
from attnspace.spectrum import Spectrum

INITS = ("vanilla", "asi")
"""Initialisation names (Table 1's two columns)."""


@torch.no_grad()
def initialize(lorsa: Lorsa, init: str, seed: int, spectrum: Spectrum | None = None) -> None:
    """Initialise ``lorsa`` in place: 'vanilla' or 'asi' (needs the attn_out ``spectrum``).

    Every tensor is drawn from ``seed`` in the same order for both; 'asi' then
    redraws each W_O row direction in span(spectrum.components[:d_init]), keeping the
    row's norm, from a second generator seeded from ``seed``.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    c, d = lorsa.config, lorsa.d_model
    g = torch.Generator().manual_seed(int(seed))

    def uniform(shape, bound):
        return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound

    # Xavier-uniform as torch computes it for a [H, d, e] tensor: fan_in = d e, fan_out = H e.
    H, e = c.n_qk_heads, c.d_qk
    xavier = math.sqrt(6.0 / (d * e + H * e))
    W_Q, W_K = uniform((H, d, e), xavier), uniform((H, d, e), xavier)
    W_V = uniform((c.n_ov_heads, d), 1.0 / math.sqrt(c.n_ov_heads))
    W_O = uniform((c.n_ov_heads, d), 1.0 / math.sqrt(d))
    if init == "asi":
        if spectrum is None:
            raise ValueError("init 'asi' needs the attn_out spectrum")
        basis = active_basis(spectrum, c.d_init)  # [d_init, d] float64
        if basis.shape[1] != d:
            raise ValueError(f"spectrum width {basis.shape[1]} != d_model {d}")
        g_asi = torch.Generator().manual_seed(int(seed) + 1)
        W_O = subspace_directions(c.n_ov_heads, basis, g_asi).double() * W_O.norm(dim=1, keepdim=True)
    for name, value in (("W_Q", W_Q), ("W_K", W_K), ("W_V", W_V), ("W_O", W_O)):
        getattr(lorsa, name).copy_(value)
    for name in ("b_Q", "b_K", "b_V", "b_D"):
        getattr(lorsa, name).zero_()
    if c.qk_norm:
        lorsa.q_norm.fill_(1.0)
        lorsa.k_norm.fill_(1.0)
