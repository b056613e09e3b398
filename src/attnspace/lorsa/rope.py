"""The target model's rotary position embedding, for Lorsa's QK heads (HF rotate-half layout)."""

from __future__ import annotations

import copy
import importlib
from typing import NamedTuple

import torch
from torch import Tensor, nn


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
