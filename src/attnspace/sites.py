"""Activation sites of a HuggingFace causal LM, and one forward pass that captures them.

A *site* names one activation of decoder layer ``L`` (shapes ``[batch, seq, width]``):

``attn_in``
    The attention block's input after its norm: output of ``input_layernorm``.
    Width ``d_model``.
``attn_z``
    The concatenated head outputs entering the attention output projection: input of
    ``self_attn.o_proj`` (GPT-NeoX: ``attention.dense``). Width ``n_heads * head_dim``,
    which need not equal ``d_model`` (Gemma 3 270M: 4 x 256 = 1024 against 640).
``attn_out``
    Output of that projection, so that ``attn_out = attn_z @ W_O.T (+ bias)`` holds
    exactly. Width ``d_model``. GPT-NeoX's ``dense`` carries a bias, included here.
    Gemma 2/3 apply ``post_attention_layernorm`` *after* ``o_proj``; this site is taken
    before that norm, so what the residual stream receives is
    ``post_attention_layernorm(attn_out)``, not ``attn_out``.
``mlp_out``
    Output of the MLP module. Gemma 2/3: before ``post_feedforward_layernorm``.
``resid_post``
    The decoder layer's output hidden state (the residual stream after layer ``L``).

These match LlamaScope's hook points for attn_out, mlp_out and resid_post.
"""

from __future__ import annotations

from numbers import Integral
from typing import NamedTuple

import torch

from attnspace import SITES

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "qwen3": "qwen3",
    "gpt_neox": "gpt_neox",
}
"""HF ``config.model_type`` -> family name."""


class _Paths(NamedTuple):
    """Submodule paths inside one decoder layer."""

    norm: str
    """Pre-attention norm; its output is ``attn_in``."""
    o_proj: str
    """Attention output projection; input ``attn_z``, output ``attn_out``."""
    mlp: str
    """MLP module; its output is ``mlp_out``."""


_LLAMA_LIKE = _Paths(norm="input_layernorm", o_proj="self_attn.o_proj", mlp="mlp")
_PATHS: dict[str, _Paths] = {
    "llama": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt_neox": _Paths(norm="input_layernorm", o_proj="attention.dense", mlp="mlp"),
}


class UnsupportedModelError(ValueError):
    """The model's architecture has no site table here."""


class StopForward(Exception):
    """Raised by a hook of :func:`hooked_forward` to end the forward pass there (not an error)."""


def family_of(config_or_model) -> str:
    """Family name ('llama', 'gemma2', 'gemma3', 'qwen3', 'gpt_neox') of a config or model."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    return SUPPORTED_MODEL_TYPES[model_type]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM, its base model, or a Gemma 3 multimodal wrapper."""
    family_of(model)
    base = model.base_model
    base = getattr(base, "language_model", base)  # Gemma 3 multimodal: text model inside
    return base.layers


def n_layers(model) -> int:
    """Number of decoder layers."""
    return len(decoder_layers(model))


def site_module(model, layer: int, site: str) -> torch.nn.Module:
    """The module whose output (input, for attn_z) is ``site`` at ``layer``: the table above."""
    block = decoder_layers(model)[layer]
    paths = _PATHS[family_of(model)]
    name = {
        "attn_in": paths.norm,
        "attn_z": paths.o_proj,
        "attn_out": paths.o_proj,
        "mlp_out": paths.mlp,
        "resid_post": "",
    }[site]
    return block.get_submodule(name)


def site_width(model, site: str) -> int:
    """Last-axis width of ``site``: ``n_heads * head_dim`` for attn_z, else ``d_model``."""
    _check_sites([site])
    if site == "attn_z":
        return site_module(model, 0, "attn_z").in_features
    return model.config.get_text_config().hidden_size


def _check_sites(sites) -> None:
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise ValueError(f"unknown or no sites {unknown}; known sites: {list(SITES)}")


def _check_layers(model, layers) -> None:
    count = n_layers(model)
    bad = [L for L in layers if not isinstance(L, Integral) or not 0 <= L < count]
    if bad or not layers:
        raise ValueError(
            f"layers {list(layers)} invalid: need at least one int in [0, {count}) "
            f"(model has {count} layers; negative indices are not accepted)"
        )


def first_tensor(output) -> torch.Tensor:
    """A module's output tensor; decoder layers of older transformers return tuples."""
    return output[0] if isinstance(output, tuple) else output


def hooked_forward(model, hooks, **inputs) -> None:
    """One no-grad forward of ``model(**inputs, use_cache=False)`` with ``hooks`` registered
    and removed afterwards, whatever happens. Each hook is ``(module, fn, kind)`` with kind
    ``"forward"`` (fn(module, args, output)), ``"pre"`` (fn(module, args)) or ``"pre_kwargs"``
    (fn(module, args, kwargs)). A hook that raises :class:`StopForward` ends the pass there."""
    register = {
        "forward": lambda m, fn: m.register_forward_hook(fn),
        "pre": lambda m, fn: m.register_forward_pre_hook(fn),
        "pre_kwargs": lambda m, fn: m.register_forward_pre_hook(fn, with_kwargs=True),
    }
    handles = []
    try:
        for module, fn, kind in hooks:
            handles.append(register[kind](module, fn))
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def capture(
    model,
    input_ids: torch.LongTensor,
    layers: list[int],
    sites: list[str],
    attention_mask: torch.Tensor | None = None,
) -> dict[tuple[int, str], torch.Tensor]:
    """Capture ``sites`` at ``layers`` in one forward pass, stopped after the deepest layer.

    ``input_ids``: ``[batch, seq]``; ``attention_mask``: ``[batch, seq]`` or None.
    Returns ``{(layer, site): tensor [batch, seq, site_width(model, site)]}``, detached
    copies in the model's dtype and device. The final norm and ``lm_head`` never run.
    The model's train/eval mode is left as is: call ``model.eval()`` first so that
    dropout is off. Padding should be on the right (position ids are not derived
    from the mask).
    """
    _check_sites(sites)
    _check_layers(model, layers)
    layers = [int(L) for L in layers]  # numpy integers are fine; keys are plain ints
    blocks = decoder_layers(model)
    deepest = max(layers)
    found: dict[tuple[int, str], torch.Tensor] = {}

    def save_output(key):
        def hook(module, args, output):
            found[key] = first_tensor(output).detach().clone()

        return hook

    def save_input(key):
        def hook(module, args):
            found[key] = args[0].detach().clone()

        return hook

    def stop(module, args, output):
        raise StopForward

    hooks = []
    for layer in sorted(set(layers)):
        for site in dict.fromkeys(sites):
            module = site_module(model, layer, site)
            if site == "attn_z":
                hooks.append((module, save_input((layer, site)), "pre"))
            else:
                hooks.append((module, save_output((layer, site)), "forward"))
    # Registered last on the deepest layer, so it fires after that layer's resid_post hook.
    hooks.append((blocks[deepest], stop, "forward"))
    hooked_forward(model, hooks, input_ids=input_ids, attention_mask=attention_mask)
    missing = [(L, s) for L in layers for s in sites if (L, s) not in found]
    if missing:
        raise RuntimeError(f"forward pass did not reach sites {missing}")
    return found
