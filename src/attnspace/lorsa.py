"""Lorsa: low-rank sparse attention (He et al. 2025), and the paper's Table 1 comparison.

A Lorsa layer reconstructs a layer's attention output (``attn_out``) from that
layer's attention input (``attn_in``, the output of its pre-attention norm):

* ``n_qk_heads`` QK heads: W_Q, W_K [d, d_qk] with biases, an optional per-head RMS
  q/k norm (Qwen3 style), the target model's RoPE (its own frequencies, scaling and
  rotary fraction, see :func:`rope_from_config`), a causal mask within each document
  and scale 1/sqrt(d_qk);
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
(DESIGN.md: "never activates, value > 0") and (c) ranking by the output norm keeps
the selection invariant to rescaling w_v up and w_o down.

**Dead heads and dead parameters** (one definition each: :func:`dead_heads`,
:func:`dead_param_fraction`): a head is dead if it is never selected with a positive
value on any kept (non-BOS/EOS) token of the evaluation window. Dead parameters are
the OV parameters of dead heads (w_v, b_v, w_o: 2d + 1 each) plus the QK parameters
(W_Q, W_K, b_Q, b_K and q/k norm weights) of QK heads whose whole group is dead, as
a fraction of all OV and QK parameters (b_D, shared by every head, is left out).

**Training** (:func:`train_lorsa`): MSE of the reconstruction on dataset-wise
normalised activations (input and target each scaled by sqrt(d) / mean row norm,
separate factors, from kept training rows), BOS/EOS rows excluded from the loss but
kept as context, Adam, batches of whole documents rebuilt from the activation cache
(rows of a store are in corpus order with ``doc``/``pos``/``keep``), optional linear
k annealing. Inits (:func:`initialize`): ``vanilla`` (the authors' code: Xavier-
uniform W_Q, W_K; uniform W_V in +-1/sqrt(n_ov), W_O in +-1/sqrt(d); zero biases)
and ``asi``, identical except that each W_O row is redrawn, with the same norm,
uniformly on the unit sphere of the span of the top d_init right singular vectors of
attn_out. Both inits draw every other tensor from the same seed, and the data order
depends only on the seed, so the two runs of Table 1 differ only in W_O.

Files (:func:`save_lorsa`): a folder with ``lorsa.safetensors`` (contiguous tensors)
and ``lorsa.json`` (config, width, normalisation norms, RoPE scaling, provenance).
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnspace.files import write_json
from attnspace.sae.data import mean_norm
from attnspace.sae.init import active_basis, subspace_directions
from attnspace.files import read_safetensors, write_safetensors
from attnspace.sae.losses import ReconstructionStats
from attnspace.spectrum import Spectrum
from attnspace.store import Store

log = logging.getLogger("attnspace.lorsa")

FORMAT = "attnspace-lorsa/1"
"""Tag in lorsa.json."""

INITS = ("vanilla", "asi")
"""Initialisation names (Table 1's two columns)."""

TOPK_VARIANT = "relu_topk_decoder_norm"
"""The top-k variant implemented here (see the module docstring); recorded in every file."""

TABLE1_COLUMNS = ("model", "dataset", "layer", "init", "n_ov_heads", "n_qk_heads", "k", "dead_heads",
                  "dead_param_fraction", "nmse", "n_eval_tokens")
"""Columns of results/tables/table1_lorsa.csv, in order."""


# ----------------------------------------------------------------------------- config

@dataclass
class LorsaConfig:
    """Lorsa size and training settings.

    Defaults are sized for SmolLM2-135M layer 15 (d = 576) on 2 CPU cores: 4d OV heads
    in 36 QK groups of 64 (the authors' Pythia-160M layer 6 setting has 8d heads in
    groups of 128 and k = 64). Four epochs over the embedded cache (16k tokens, 167
    steps of 512 tokens) took 165-170 s per run on 2 cores shared with other jobs
    (about 400 tokens/s, forward, backward and Adam).
    """

    n_ov_heads: int = 2304
    """Rank-1 OV heads (4 x d for d = 576)."""
    n_qk_heads: int = 36
    """QK heads; each is shared by n_ov_heads / n_qk_heads consecutive OV heads."""
    d_qk: int = 64
    """Width of each QK head (the target model's head_dim, so its RoPE applies unchanged)."""
    k: int = 32
    """OV heads kept per token (after annealing)."""
    k_start: int | None = None
    """If set, k starts here and falls linearly to ``k`` (None: no annealing)."""
    k_anneal_fraction: float = 0.5
    """Fraction of all steps over which k anneals from k_start to k."""
    qk_norm: bool = False
    """Per-head RMS norm of q and k before RoPE (Qwen3-style models)."""
    qk_norm_eps: float = 1e-6
    """Epsilon of that RMS norm."""
    b_D_at_mean: bool = True
    """Start b_D at the mean of the normalised target (the authors start at 0; a short run cannot learn it first)."""
    d_init: int = 128
    """ASI: W_O rows lie in the top d_init right singular vectors of attn_out (22% of d=576)."""
    lr: float = 1e-3
    """Adam learning rate (authors: 2e-4 to 4e-4 over far more steps; a run here has ~170)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    n_epochs: int = 4
    """Passes over the training documents (reshuffled each epoch)."""
    batch_tokens: int = 512
    """Token budget per batch: consecutive shuffled documents up to this many rows (at least one document)."""
    norm_sample_tokens: int = 65536
    """Kept training rows (the first ones) used for the dataset-wise norms."""
    eval_tokens: int | None = None
    """Cap on kept held-out rows evaluated (None: the whole held-out store; whole documents are read)."""
    log_every: int = 10
    """Steps between progress lines (0: silent)."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if self.n_ov_heads < 1 or self.n_qk_heads < 1 or self.n_ov_heads % self.n_qk_heads:
            raise ValueError(f"n_ov_heads ({self.n_ov_heads}) must be a positive multiple of n_qk_heads "
                             f"({self.n_qk_heads})")
        if not 0 < self.k <= self.n_ov_heads:
            raise ValueError(f"k must lie in [1, n_ov_heads={self.n_ov_heads}], got {self.k}")
        if self.k_start is not None and not self.k <= self.k_start <= self.n_ov_heads:
            raise ValueError(f"k_start must lie in [k={self.k}, n_ov_heads], got {self.k_start}")
        if self.d_qk < 2 or self.d_qk % 2:
            raise ValueError(f"d_qk must be even and >= 2, got {self.d_qk}")
        if not 0.0 < self.k_anneal_fraction <= 1.0:
            raise ValueError(f"k_anneal_fraction must lie in (0, 1], got {self.k_anneal_fraction}")

    @property
    def group_size(self) -> int:
        """G: OV heads per QK head."""
        return self.n_ov_heads // self.n_qk_heads

    def k_at(self, step: int, n_steps: int) -> int:
        """k used at training step ``step`` (0-based) of ``n_steps``."""
        if self.k_start is None:
            return self.k
        span = max(1, int(round(self.k_anneal_fraction * n_steps)))
        t = min(1.0, step / span)
        return int(round(self.k_start + t * (self.k - self.k_start)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LorsaConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown LorsaConfig fields {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------- RoPE

class Rope(NamedTuple):
    """Rotary position embedding of a target model, for heads of width d_qk."""

    inv_freq: Tensor
    """[r/2] float32 inverse frequencies; the first r dims of each head rotate (r <= d_qk)."""
    attention_scaling: float
    """Factor on cos and sin (1 except for YaRN-style scaling)."""


_DYNAMIC_ROPE = ("dynamic", "longrope")


def _rotary_class(config):
    """The target model's own rotary-embedding class (e.g. LlamaRotaryEmbedding), from its model_type."""
    from attnspace.sites import family_of

    family = family_of(config)
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    found = [getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding") and n[0].isupper()
             and isinstance(getattr(module, n), type) and issubclass(getattr(module, n), nn.Module)]
    exact = [c for c in found if c.__module__ == module.__name__]
    if not exact:
        raise ValueError(f"no rotary embedding class in {module.__name__}")
    return exact[0]


def rope_from_config(config, d_qk: int, layer: int | None = None) -> Rope:
    """RoPE of the target model (an HF config), for heads of width ``d_qk``.

    Instantiates the model's own rotary class on a copy of its text config with
    ``head_dim = d_qk``, so theta, scaling type (linear, llama3, yarn, ...) and the
    rotary fraction (GPT-NeoX's partial rotary) are the model's. Models with one RoPE
    per layer type (Gemma 3: sliding vs full attention) use ``layer``'s type.
    Length-dependent types (dynamic NTK, longrope) are refused: a cached sequence
    does not carry the length those need.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cfg = copy.deepcopy(text)
    cfg.head_dim = int(d_qk)
    module = _rotary_class(cfg)(config=cfg)
    params = cfg.rope_parameters
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and isinstance(params, dict) and set(layer_types) <= set(params):
        if layer is None:
            raise ValueError("this model has one RoPE per layer type: pass layer")
        kind = layer_types[layer]
        rope_type = params[kind]["rope_type"]
        inv_freq, scaling = getattr(module, f"{kind}_inv_freq"), getattr(module, f"{kind}_attention_scaling")
    else:
        rope_type = params["rope_type"]
        inv_freq, scaling = module.inv_freq, module.attention_scaling
    if rope_type in _DYNAMIC_ROPE:
        raise ValueError(f"RoPE type {rope_type!r} depends on the sequence length; not supported for Lorsa")
    return Rope(inv_freq.detach().float().clone(), float(scaling))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(pos: Tensor, inv_freq: Tensor, attention_scaling: float) -> tuple[Tensor, Tensor]:
    """(cos, sin) [B, 1, T, r] float32 at positions pos [B, T] (HF layout: frequencies repeated twice)."""
    angles = pos[:, None, :, None].float() * inv_freq.float()  # [B, 1, T, r/2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first r dims of x [B, H, T, e] by (cos, sin) [B, 1, T, r] (HF's rotate-half convention)."""
    r = cos.shape[-1]
    if r == 0:
        return x
    x_rot = x[..., :r]
    rotated = x_rot * cos.to(x.dtype) + _rotate_half(x_rot) * sin.to(x.dtype)
    return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)


def apply_rope(x: Tensor, pos: Tensor, inv_freq: Tensor, attention_scaling: float) -> Tensor:
    """Rotate x [B, H, T, e] at positions pos [B, T]."""
    return rotate(x, *rope_cos_sin(pos, inv_freq, attention_scaling))


# ----------------------------------------------------------------------------- model

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


# ----------------------------------------------------------------------------- dead heads

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


# ----------------------------------------------------------------------------- init

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


# ----------------------------------------------------------------------------- data

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


# ----------------------------------------------------------------------------- evaluation

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


# ----------------------------------------------------------------------------- training

StepCallback = Callable[[int, SequenceBatch, float], None]
"""on_step(step, batch, loss): called after every optimiser step."""


def train_lorsa(
    config: LorsaConfig,
    train_store: Store,
    heldout_store: Store,
    spectrum: Spectrum | None,
    init: str,
    seed: int,
    *,
    model_config,
    out_dir: Path | None = None,
    on_step: StepCallback | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train one Lorsa on ``train_store`` and evaluate it on ``heldout_store``; return its metrics.

    model_config: the target model's HF config (for RoPE). spectrum: of attn_out at this
    layer (needed by 'asi'). The data order depends only on ``seed``. Returns a dict with
    the :data:`TABLE1_COLUMNS` plus training details; with ``out_dir`` the Lorsa is saved
    there (:func:`save_lorsa`) with the metrics.
    """
    t0 = time.perf_counter()
    if train_store.layer != heldout_store.layer:
        raise ValueError(f"train layer {train_store.layer} != held-out layer {heldout_store.layer}")
    train, heldout = SequenceData(train_store), SequenceData(heldout_store)
    d = train_store.width("attn_in")
    lorsa = Lorsa(config, d, rope_from_config(model_config, config.d_qk, train_store.layer))
    initialize(lorsa, init, seed, spectrum)
    lorsa.norm_in, lorsa.norm_out = normalisation_norms(train, config.norm_sample_tokens)
    if config.b_D_at_mean:
        sample = train.kept_sample("attn_out", config.norm_sample_tokens).double()
        with torch.no_grad():
            lorsa.b_D.copy_(sample.mean(0) * math.sqrt(d) / lorsa.norm_out)
    lorsa.to(device)
    opt = torch.optim.Adam(lorsa.parameters(), lr=config.lr, betas=config.betas, eps=config.eps, fused=True)

    plans = [train.groups(train.order(seed, ep), config.batch_tokens) for ep in range(config.n_epochs)]
    n_steps = sum(len(p) for p in plans)
    step, train_tokens = 0, 0
    for plan in plans:
        for docs in plan:
            batch = train.batch(docs).to(device)
            x, y = _scaled(lorsa, batch)
            out = lorsa(x, batch.pos, causal_document_mask(batch.seg), k=config.k_at(step, n_steps))
            loss = F.mse_loss(out.output[batch.keep], y[batch.keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_tokens += int(batch.keep.sum())
            if on_step is not None:
                on_step(step, batch, float(loss.detach()))
            if config.log_every and step % config.log_every == 0:
                log.info("step %d/%d  loss %.4f  k %d", step, n_steps, float(loss.detach()), config.k_at(step, n_steps))
            step += 1
    train_s = time.perf_counter() - t0

    batches = (b.to(device) for b in heldout.epoch_batches(config.batch_tokens, seed=None))
    result = evaluate(lorsa, batches, config.eval_tokens)
    lorsa.cpu()
    dead = dead_heads(result.counts)
    metrics = dict(
        model=train_store.model, dataset=train_store.dataset, layer=train_store.layer, init=init,
        n_ov_heads=config.n_ov_heads, n_qk_heads=config.n_qk_heads, k=config.k,
        dead_heads=int(dead.sum()), dead_param_fraction=dead_param_fraction(dead, config, d),
        nmse=result.nmse, n_eval_tokens=result.n_tokens,
        dead_qk_heads=int(dead.reshape(config.n_qk_heads, -1).all(axis=1).sum()),
        d_init=config.d_init if init == "asi" else None, seed=int(seed), n_steps=n_steps,
        train_tokens=train_tokens, train_seconds=round(train_s, 2),
        wall_seconds=round(time.perf_counter() - t0, 2), topk_variant=TOPK_VARIANT,
    )
    if out_dir is not None:
        save_lorsa(lorsa, out_dir, metrics=metrics, model=train_store.model, dataset=train_store.dataset,
                   layer=train_store.layer, init=init, seed=int(seed))
    return metrics


# ----------------------------------------------------------------------------- files

WEIGHTS_FILE = "lorsa.safetensors"
META_FILE = "lorsa.json"


def _tensors(lorsa: Lorsa) -> dict[str, Tensor]:
    names = ["W_Q", "W_K", "b_Q", "b_K", "W_V", "b_V", "W_O", "b_D"]
    if lorsa.config.qk_norm:
        names += ["q_norm", "k_norm"]
    out = {n: getattr(lorsa, n) for n in names}
    out["rope_inv_freq"] = lorsa.rope_inv_freq
    return out


def save_lorsa(lorsa: Lorsa, folder: Path, *, metrics: dict | None = None, **info) -> Path:
    """Write ``folder/lorsa.safetensors`` (contiguous copies) and ``folder/lorsa.json``; metrics.json if given."""
    folder = Path(folder)
    write_safetensors(_tensors(lorsa), folder / WEIGHTS_FILE)
    meta = dict(format=FORMAT, topk_variant=TOPK_VARIANT, config=lorsa.config.to_dict(), d_model=lorsa.d_model,
                rope_attention_scaling=lorsa.rope_scaling,
                dataset_average_activation_norm={"in": lorsa.norm_in, "out": lorsa.norm_out}, **info)
    write_json(meta, folder / META_FILE)
    if metrics is not None:
        write_json(metrics, folder / "metrics.json")
    return folder


def load_lorsa(folder: Path) -> Lorsa:
    """Read a Lorsa written by :func:`save_lorsa` (CPU)."""
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("topk_variant") != TOPK_VARIANT:
        raise ValueError(f"{folder}: top-k variant {meta.get('topk_variant')!r}, this code runs {TOPK_VARIANT!r}")
    tensors, _ = read_safetensors(folder / WEIGHTS_FILE)
    config = LorsaConfig.from_dict(meta["config"])
    lorsa = Lorsa(config, int(meta["d_model"]), Rope(tensors.pop("rope_inv_freq"), meta["rope_attention_scaling"]))
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(lorsa, name).copy_(value)
    norms = meta["dataset_average_activation_norm"]
    lorsa.norm_in, lorsa.norm_out = norms["in"], norms["out"]
    return lorsa


# ----------------------------------------------------------------------------- table 1

def table1_frame(rows: list[dict]) -> pd.DataFrame:
    """Table 1 rows (metrics dicts of :func:`train_lorsa`) -> DataFrame with :data:`TABLE1_COLUMNS`."""
    return pd.DataFrame([{c: r[c] for c in TABLE1_COLUMNS} for r in rows], columns=list(TABLE1_COLUMNS))


def table1_markdown(frame: pd.DataFrame) -> str:
    """The paper's layout: one column per init, rows dead parameters (%), dead heads and NMSE, per site."""
    lines = []
    for (model, dataset, layer), part in frame.groupby(["model", "dataset", "layer"], sort=True):
        part = part.set_index("init")
        inits = [i for i in INITS if i in part.index] + [i for i in part.index if i not in INITS]
        first = part.iloc[0]
        lines += [f"### {model} / {dataset} / layer {layer}", "",
                  (f"{first.n_ov_heads} OV heads, {first.n_qk_heads} QK heads, k = {first.k}; "
                   f"evaluated on {first.n_eval_tokens} held-out tokens."), "",
                  "| | " + " | ".join(inits) + " |", "|---|" + "---|" * len(inits),
                  "| Dead parameters (%) | " + " | ".join(f"{100 * part.loc[i, 'dead_param_fraction']:.1f}"
                                                       for i in inits) + " |",
                  "| Dead heads | " + " | ".join(f"{int(part.loc[i, 'dead_heads'])}" for i in inits) + " |",
                  "| Normalized MSE | " + " | ".join(f"{part.loc[i, 'nmse']:.3f}" for i in inits) + " |", ""]
    return "\n".join(lines)
