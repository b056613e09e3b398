"""The Lorsa layer: grouped QK heads, rank-1 OV heads, top-k selection; dead heads and parameters.

A Lorsa layer reconstructs a layer's attention output (``attn_out``) from that
layer's attention input (``attn_in``, the output of its pre-attention norm):

* ``n_qk_heads`` QK heads: W_Q, W_K [d, d_qk] with biases, an optional per-head RMS
  q/k norm (Qwen3 style), the target model's RoPE (its own frequencies, scaling and
  rotary fraction, see :func:`attnspace.lorsa.rope.rope_from_config`), a causal mask
  within each document and scale 1/sqrt(d_qk);
* ``n_ov_heads`` rank-1 OV heads: value vector w_v [d] with scalar bias b_v, output
  vector w_o [d]. Consecutive groups of G = n_ov / n_qk OV heads share one QK head.
  Head activation z_i[t] = sum_s A_h(i)[t, s] (x_s . w_v_i + b_v_i).

All heads are computed in one scaled-dot-product-attention call: the G scalar values
of a QK group form one value head of dimension G.

**Top-k variant (the "new" one of the two published).** Per token, heads are ranked
by ReLU(z_i) ||w_o_i|| (= ReLU(z_i ||w_o_i||)); the k best keep ReLU(z_i), the rest
are zero; output = sum over kept heads ReLU(z_i) w_o_i + b_D. So only positive
activations survive. Chosen because (a) it is what the authors' current code does
(``sparsity_include_decoder_norm`` with a ReLU-TopK activation), (b) each head then
has one sign, like an SAE feature, so the dead rule is the SAE one of this project
(never activates with a value > 0 in the window) and (c) ranking by the output norm keeps
the selection invariant to rescaling w_v up and w_o down.

**Dead heads and dead parameters** (one definition each: :func:`dead_heads`,
:func:`dead_param_fraction`): a head is dead if it is never selected with a positive
value on any kept (non-BOS/EOS) token of the evaluation window. Dead parameters are
the OV parameters of dead heads (w_v, b_v, w_o: 2d + 1 each) plus the QK parameters
(W_Q, W_K, b_Q, b_K and q/k norm weights) of QK heads whose whole group is dead, as
a fraction of all OV and QK parameters (b_D, shared by every head, is left out).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnspace.lorsa.config import LorsaConfig
from attnspace.lorsa.rope import Rope, rope_cos_sin, rotate

TOPK_VARIANT = "relu_topk_decoder_norm"
"""The top-k variant implemented here (see the module docstring); recorded in every file."""


class LorsaOutput(NamedTuple):
    output: Tensor
    """[B, T, d] reconstruction of attn_out (on the scale of the training target)."""
    values: Tensor
    """[B, T, k] kept activations ReLU(z) (0 where fewer than k heads are positive)."""
    indices: Tensor
    """[B, T, k] int64 OV-head ids of the kept heads."""
    z: Tensor
    """[B, T, n_ov] pre-activations z (before ReLU and top-k)."""


def causal_document_mask(seg: Tensor) -> Tensor:
    """bool [B, T, T] attention mask (True = attend): same segment and key at or before query.

    seg [B, T] int: document id per row slot, -1 for padding. Padding attends to
    padding (never to a document), so no query row is empty.
    """
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return (seg[:, :, None] == seg[:, None, :]) & causal


class Lorsa(nn.Module):
    """Low-rank sparse attention with rank-1 OV heads grouped under shared QK heads."""

    def __init__(self, config: LorsaConfig, d_model: int, rope: Rope | None) -> None:
        super().__init__()
        c = config
        self.config, self.d_model = c, int(d_model)
        H, e, n, d = c.n_qk_heads, c.d_qk, c.n_ov_heads, self.d_model
        self.W_Q = nn.Parameter(torch.zeros(H, d, e))  # [H, d, e]
        self.W_K = nn.Parameter(torch.zeros(H, d, e))  # [H, d, e]
        self.b_Q = nn.Parameter(torch.zeros(H, e))  # [H, e]
        self.b_K = nn.Parameter(torch.zeros(H, e))  # [H, e]
        self.W_V = nn.Parameter(torch.zeros(n, d))  # [n, d]; row i = value vector of OV head i
        self.b_V = nn.Parameter(torch.zeros(n))  # [n]
        self.W_O = nn.Parameter(torch.zeros(n, d))  # [n, d]; row i = output vector of OV head i
        self.b_D = nn.Parameter(torch.zeros(d))  # [d]
        if c.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(H, e))  # [H, e]
            self.k_norm = nn.Parameter(torch.ones(H, e))  # [H, e]
        inv_freq = rope.inv_freq if rope is not None else torch.zeros(0)
        if 2 * inv_freq.shape[0] > e:
            raise ValueError(f"RoPE rotates {2 * inv_freq.shape[0]} dims, more than d_qk={e}")
        self.register_buffer("rope_inv_freq", inv_freq.detach().float().clone())  # [r/2]
        self.rope_scaling = float(rope.attention_scaling) if rope is not None else 1.0
        self.norm_in: float | None = None
        """Mean row norm of raw attn_in (the input is scaled by sqrt(d)/norm_in); None: unscaled."""
        self.norm_out: float | None = None
        """Mean row norm of raw attn_out (the target is scaled by sqrt(d)/norm_out); None: unscaled."""

    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        """Per-head RMS norm: x [B, H, T, e], weight [H, e]."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.qk_norm_eps)
        return weight[None, :, None, :] * x32.to(x.dtype)

    def qk(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys [B, H, T, e] (normed if configured, then rotated) of x [B, T, d]."""
        B, T, d = x.shape
        H, e = self.config.n_qk_heads, self.config.d_qk
        q = (x @ self.W_Q.permute(1, 0, 2).reshape(d, H * e)).view(B, T, H, e).transpose(1, 2) + self.b_Q[:, None]
        k = (x @ self.W_K.permute(1, 0, 2).reshape(d, H * e)).view(B, T, H, e).transpose(1, 2) + self.b_K[:, None]
        if self.config.qk_norm:
            q, k = self._rms(q, self.q_norm), self._rms(k, self.k_norm)
        cos, sin = rope_cos_sin(pos, self.rope_inv_freq, self.rope_scaling)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def head_activations(self, x: Tensor, pos: Tensor, mask: Tensor | None = None) -> Tensor:
        """z [B, T, n_ov] for x [B, T, d], positions pos [B, T], mask [B, T, T] (None: causal).

        One SDPA call: QK head h attends with the G values of its OV heads as one
        value head of width G.
        """
        B, T, _ = x.shape
        H, G = self.config.n_qk_heads, self.config.group_size
        q, k = self.qk(x, pos)
        v = (x @ self.W_V.T + self.b_V).view(B, T, H, G).transpose(1, 2)  # [B, H, T, G]
        scale = 1.0 / math.sqrt(self.config.d_qk)
        if mask is None:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
        return z.transpose(1, 2).reshape(B, T, H * G)

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor | None = None, k: int | None = None) -> LorsaOutput:
        """x [B, T, d] (normalised attn_in), pos [B, T], mask [B, T, T] bool or None (causal); k: override."""
        k = self.config.k if k is None else int(k)
        z = self.head_activations(x, pos, mask)
        act = z.relu()
        top = (act * self.W_O.norm(dim=1)).topk(k, dim=-1)  # rank by ReLU(z) ||w_o||
        values = act.gather(-1, top.indices)
        dense = torch.zeros_like(z).scatter(-1, top.indices, values)
        return LorsaOutput(dense @ self.W_O + self.b_D, values, top.indices, z)

    def n_params(self) -> tuple[int, int]:
        """(parameters per OV head, parameters per QK head)."""
        return n_params_per_head(self.config, self.d_model)


def n_params_per_head(config: LorsaConfig, d_model: int) -> tuple[int, int]:
    """(per OV head: w_v, b_v, w_o = 2d + 1; per QK head: W_Q, W_K, b_Q, b_K (+ q/k norm) = 2 e (d + 1) (+ 2e))."""
    e = config.d_qk
    return 2 * d_model + 1, 2 * e * (d_model + 1) + (2 * e if config.qk_norm else 0)


def dead_heads(counts: Tensor | np.ndarray) -> np.ndarray:
    """bool [n_ov]: heads never selected with a positive value; counts [n_ov] = such selections per head."""
    return np.asarray(torch.as_tensor(counts).cpu().numpy()) == 0


def dead_param_fraction(dead: np.ndarray | Tensor, config: LorsaConfig, d_model: int) -> float:
    """Dead parameters / (all OV + QK parameters); dead [n_ov] bool from :func:`dead_heads`.

    Dead: the OV parameters of every dead head, plus the QK parameters of every QK
    head whose whole group of OV heads is dead. b_D is not counted.
    """
    dead = np.asarray(dead, dtype=bool)
    if dead.shape != (config.n_ov_heads,):
        raise ValueError(f"dead has shape {dead.shape}, expected ({config.n_ov_heads},)")
    per_ov, per_qk = n_params_per_head(config, d_model)
    dead_groups = int(dead.reshape(config.n_qk_heads, config.group_size).all(axis=1).sum())
    total = config.n_ov_heads * per_ov + config.n_qk_heads * per_qk
    return (int(dead.sum()) * per_ov + dead_groups * per_qk) / total
