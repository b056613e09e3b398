"""The TopK sparse autoencoder (Gao et al. 2024), in the paper's form (Section 3.2).

Variant, stated once:

* pre = W_enc x + b_enc (no decoder bias subtracted before the encoder, as in the paper
  and LlamaScope's ``apply_decoder_bias_to_pre_encoder: false``); in the *centred* form
  (``centred = True``, ``apply_decoder_bias_to_pre_encoder: true``, the usual practice of
  sparsify and others) pre = W_enc (x - b_dec) + b_enc, with b_dec initialised at the
  training mean, so the encoder sees centred inputs;
* z = ReLU on the K largest entries of pre, zero elsewhere (selection on the raw
  pre-activations; LlamaScope's ``sparsity_include_decoder_norm: false``);
* x_hat = W_dec^T z + b_dec.
* Decoder norms are free: neither constrained to 1 nor folded. Initialisation sets
  one global norm for every direction (Appendix E.2); training may change it.

Training takes :mod:`attnspace.sae.fast` (``fast = True``, set by train_sae unless told otherwise):
the same model, rule and gradients with fewer bytes moved; everything else (evaluation, inference)
runs here.

The SAE works on dataset-wise normalised activations (mean norm sqrt(d)); the raw
mean norm is kept in ``dataset_norm`` and :func:`reconstruct` maps raw to raw.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnspace.sae.fast import fast_forward
from attnspace.sae.losses import auxk_loss, nmse
from attnspace.sae.sparse import encode_gather, sparse_decode


class EncoderOutput(NamedTuple):
    values: Tensor
    """[B, k] kept activations, >= 0 (ReLU of the selected pre-activations)."""
    indices: Tensor
    """[B, k] int64 latent ids."""
    pre: Tensor
    """[B, n] pre-activations W_enc x + b_enc, without grad (drives the selection; forward() then reuses it for AuxK)."""


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    """[B, d] reconstruction (normalised scale)."""
    values: Tensor
    """[B, k] kept activations."""
    indices: Tensor
    """[B, k] latent ids."""
    nmse: Tensor
    """Scalar NMSE of x_hat against x (:func:`attnspace.sae.losses.nmse`)."""
    auxk_loss: Tensor
    """Scalar AuxK loss; 0 when no dead mask is given or no latent is dead."""


class TopKSAE(nn.Module):
    """TopK SAE with n = d_sae latents on d = d_model inputs."""

    def __init__(self, d_model: int, d_sae: int, k: int, dataset_norm: float | None = None) -> None:
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"k must lie in [1, d_sae={d_sae}], got {k}")
        self.d_model, self.d_sae, self.k = int(d_model), int(d_sae), int(k)
        self.W_enc = nn.Parameter(torch.zeros(d_sae, d_model))  # [n, d]
        self.b_enc = nn.Parameter(torch.zeros(d_sae))  # [n]
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_model))  # [n, d]; row i = latent i's direction
        self.b_dec = nn.Parameter(torch.zeros(d_model))  # [d]
        self.dataset_norm = dataset_norm
        """Mean L2 norm of the raw activations (None: inputs are used as given)."""
        self.sparse_grad = False
        """Return sparse COO gradients for W_enc, b_enc, W_dec (SparseAdam) instead of dense (Adam)."""
        self.fast = False
        """Training forward (grad mode on) through :mod:`attnspace.sae.fast`; set by train_sae."""
        self.matmul_dtype: torch.dtype | None = None
        """dtype of the fast path's encoder GEMM (None: the weights' dtype; train_sae: bf16 on CUDA)."""
        self.centred = False
        """Subtract b_dec from the input before the encoder (LlamaScope's apply_decoder_bias_to_pre_encoder)."""

    @property
    def norm_factor(self) -> float:
        """f = sqrt(d) / dataset_norm: raw activations times f have mean norm sqrt(d)."""
        return 1.0 if self.dataset_norm is None else math.sqrt(self.d_model) / self.dataset_norm

    def encoder_input(self, x: Tensor) -> Tensor:
        """What the encoder reads: x [B, d], less b_dec in the centred form (gradients reach b_dec)."""
        return x - self.b_dec if self.centred else x

    def encode(self, x: Tensor) -> EncoderOutput:
        """x [B, d] (normalised) -> top-k activations."""
        x = self.encoder_input(x)
        with torch.no_grad():
            pre = F.linear(x, self.W_enc, self.b_enc)  # [B, n]
            indices = pre.topk(self.k, dim=1, sorted=False).indices  # [B, k]
        values = encode_gather(x, self.W_enc, self.b_enc, pre, indices, self.sparse_grad)
        return EncoderOutput(values, indices, pre)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """[B, k] activations at [B, k] latents -> x_hat [B, d]."""
        return sparse_decode(values, indices, self.W_dec, self.sparse_grad) + self.b_dec

    def forward(self, x: Tensor, dead: Tensor | None = None, k_aux: int = 0) -> ForwardOutput:
        """x [B, d] normalised. With ``dead`` (bool [n]) and k_aux > 0, also the AuxK loss:
        the min(k_aux, #dead) dead latents with the largest pre-activations reconstruct
        the detached residual, without decoder bias."""
        if self.fast and torch.is_grad_enabled():
            return ForwardOutput(*fast_forward(self, x, dead, k_aux))
        enc = self.encode(x)
        x_hat = self.decode(enc.values, enc.indices)
        aux = x_hat.new_zeros(())
        n_dead = 0 if dead is None else int(dead.sum())
        if n_dead and k_aux > 0:
            with torch.no_grad():
                # In place (no second [B, n] copy): the main values are already gathered, and the
                # dead entries the AuxK gather reads are left untouched.
                pre_dead = enc.pre.masked_fill_(~dead, -math.inf)
                aux_idx = pre_dead.topk(min(k_aux, n_dead), dim=1, sorted=False).indices
            aux_vals = encode_gather(self.encoder_input(x), self.W_enc, self.b_enc, pre_dead, aux_idx,
                                     self.sparse_grad)
            aux = auxk_loss(x - x_hat, sparse_decode(aux_vals, aux_idx, self.W_dec, self.sparse_grad))
        return ForwardOutput(x_hat, enc.values, enc.indices, nmse(x, x_hat), aux)


EVAL_BLOCK_BYTES = 2**31
"""The largest float32 [tokens, d_sae] pre-activation block that evaluation allocates at once (2 GiB:
512 tokens at 1M latents; a whole batch at the embedded default's sizes)."""


def eval_rows(sae: TopKSAE) -> int:
    """Tokens per evaluation block (:data:`EVAL_BLOCK_BYTES`)."""
    return max(1, EVAL_BLOCK_BYTES // (4 * sae.d_sae))


@torch.no_grad()
def reconstruct(sae: TopKSAE, x: Tensor) -> Tensor:
    """Raw activations [..., d] -> raw reconstruction [..., d] (normalise, encode, decode, un-normalise).

    For splicing into a forward pass (downstream LM loss); keeps x's dtype and device (x is moved to
    the SAE's device and back). Tokens go through in blocks of :func:`eval_rows`.
    """
    shape, dtype, device = x.shape, x.dtype, x.device
    f = sae.norm_factor
    flat = x.reshape(-1, shape[-1]).to(sae.W_enc.device, sae.W_enc.dtype) * f
    parts = []
    for block in flat.split(eval_rows(sae)):
        enc = sae.encode(block)
        parts.append(sae.decode(enc.values, enc.indices))
        del enc
    return (torch.cat(parts) / f).to(device, dtype).reshape(shape)
