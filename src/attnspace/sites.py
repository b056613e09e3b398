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

The five families below keep this hand table. Any other decoder model's sites are found
from its module tree and proven on a probe forward by :mod:`attnspace.architectures`
(GPT-2's ``Conv1D`` projection stores ``W_O`` transposed: :func:`output_projection` gives
``W`` with ``attn_out = attn_z @ W.T + b`` either way). Where such a model has no
pre-attention norm module, ``attn_in`` is the attention module's own input (a pre-hook);
layers without attention (hybrid stacks) have ``resid_post`` only.
"""

from __future__ import annotations

from numbers import Integral
from typing import NamedTuple

import torch

from attnspace import SITES
from attnspace.families import SUPPORTED_MODEL_TYPES  # noqa: F401  (re-exported)


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
    """The model's architecture is not a causal LM this transformers ships."""


class StopForward(Exception):
    """Raised by a hook of :func:`hooked_forward` to end the forward pass there (not an error)."""


def family_of(config_or_model) -> str:
    """Family name of a config or model: the table's ('llama', 'gemma2', 'gemma3', 'qwen3',
    'gpt_neox'), else the model_type of any causal LM the installed transformers ships."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES:
        return SUPPORTED_MODEL_TYPES[model_type]
    loaded = isinstance(config_or_model, torch.nn.Module)  # e.g. Emu3's causal LM holds a text sub-config
    if not loaded and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}: not a causal LM of the installed transformers "
            f"(table families {sorted(SUPPORTED_MODEL_TYPES)}; `attnspace architectures` lists the rest)"
        )
    return model_type


def _in_table(model) -> bool:
    return family_of(model) in _PATHS


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM, its base model, or a Gemma 3 multimodal wrapper."""
    if not _in_table(model):
        from attnspace.architectures import layout_of

        return model.get_submodule(layout_of(model).layers_path)
    base = model.base_model
    base = getattr(base, "language_model", base)  # Gemma 3 multimodal: text model inside
    return base.layers


def n_layers(model) -> int:
    """Number of decoder layers."""
    return len(decoder_layers(model))


def _layer_paths(model, layer: int) -> _Paths:
    """The table's paths, or those :mod:`attnspace.architectures` found (norm None: attn_in is
    the attention module's input)."""
    if _in_table(model):
        return _PATHS[family_of(model)]
    from attnspace.architectures import ArchitectureError, layout_of

    found = layout_of(model).layers[layer]
    if found is None:
        raise ArchitectureError(
            f"layer {layer} of this {family_of(model)!r} model has no attention, so no attn_* or mlp_out sites "
            f"(attention layers: {layout_of(model).attention_layers})",
            fix="pick layers with attention (models.<name>.layers), or cache resid_post alone there.")
    return _Paths(norm=found.norm, o_proj=found.o_proj, mlp=found.mlp)


def site_point(model, layer: int, site: str) -> tuple[torch.nn.Module, str]:
    """(module, kind) where ``site`` is read at ``layer``: kind ``"output"`` (the module's output),
    ``"input"`` (its first positional input: attn_z) or ``"attention_input"`` (the hidden states
    the attention module receives: attn_in of a model without a pre-attention norm module)."""
    block = decoder_layers(model)[layer]
    if site == "resid_post":
        return block, "output"
    paths = _layer_paths(model, layer)
    if site == "attn_in" and paths.norm is None:
        from attnspace.architectures import layout_of

        return block.get_submodule(layout_of(model).layers[layer].attention), "attention_input"
    name = {"attn_in": paths.norm, "attn_z": paths.o_proj, "attn_out": paths.o_proj, "mlp_out": paths.mlp}[site]
    return block.get_submodule(name), "input" if site == "attn_z" else "output"


def site_module(model, layer: int, site: str) -> torch.nn.Module:
    """The module whose output (input, for attn_z) is ``site`` at ``layer``: the table above."""
    module, kind = site_point(model, layer, site)
    if kind == "attention_input":
        raise ValueError(f"{site} of this model is the attention module's input, not a module's output: "
                         "read it with site_point")
    return module


def output_projection(model, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W [d_model, d_z], bias [d_model] or None) with ``attn_out = attn_z @ W.T + bias`` at
    ``layer`` (a GPT-2 Conv1D's weight, [d_z, d_model], transposed)."""
    from attnspace.architectures import projection_weight

    proj = site_module(model, layer, "attn_out")
    return projection_weight(proj), proj.bias


def site_width(model, site: str) -> int:
    """Last-axis width of ``site``: ``n_heads * head_dim`` for attn_z, else ``d_model``."""
    _check_sites([site])
    if site == "attn_z":
        layer = 0 if _in_table(model) else _first_attention_layer(model)
        return output_projection(model, layer)[0].shape[1]
    return model.config.get_text_config().hidden_size


def _first_attention_layer(model) -> int:
    from attnspace.architectures import layout_of

    return layout_of(model).attention_layers[0]


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

    def save_received(key):
        def hook(module, args, kwargs):
            from attnspace.architectures import attention_input

            if key not in found:  # a shared attention module may run again later
                found[key] = attention_input(args, kwargs).detach().clone()

        return hook

    hooks = []
    for layer in sorted(set(layers)):
        for site in dict.fromkeys(sites):
            module, kind = site_point(model, layer, site)
            if kind == "input":
                hooks.append((module, save_input((layer, site)), "pre"))
            elif kind == "attention_input":
                hooks.append((module, save_received((layer, site)), "pre_kwargs"))
            else:
                hooks.append((module, save_output((layer, site)), "forward"))
    # Registered last on the deepest layer, so it fires after that layer's resid_post hook.
    hooks.append((blocks[deepest], stop, "forward"))
    hooked_forward(model, hooks, input_ids=input_ids, attention_mask=attention_mask)
    missing = [(L, s) for L in layers for s in sites if (L, s) not in found]
    if missing:
        raise RuntimeError(f"forward pass did not reach sites {missing}")
    return found
