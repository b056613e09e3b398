"""Sites of any decoder model, found from its own module tree and proven on a probe forward.

The five families of :data:`attnspace.sites.SUPPORTED_MODEL_TYPES` keep their hand table.
Every other model is read from its structure:

* **Decoder layers**: the ``nn.ModuleList`` of ``num_hidden_layers`` blocks holding the most
  parameters (not an ``experts`` list), among those holding an attention module if any do.
* **Attention**: in each block, the outermost submodule whose class name holds ``Attention``
  (``self_attn`` first where there are several). A block with none, or whose attention module
  the forward never calls, is a layer without attention (hybrid attention/SSM stacks): it
  has no ``attn_*`` sites.
* **Output projection** (``attn_z`` -> ``attn_out``): the last ``nn.Linear`` or GPT-2
  ``Conv1D`` that the attention module calls with an output of width ``d_model``.
* **Pre-attention norm** (``attn_in``): the block's norm module whose output *is* what the
  attention module receives; where no module's output is (the norm is applied inside the
  attention module, or there is none: post-norm blocks), ``attn_in`` is the attention
  module's own input, taken by a pre-hook.
* **MLP output** (``mlp_out``): the outermost submodule named ``mlp``, ``feed_forward``,
  ``ffn``, ``block_sparse_moe``, ``moe`` (or whose class name holds ``MLP``, ``MoE``,
  ``FeedForward``) that is not inside the attention: an MoE block's output, shared experts
  included where the block adds them. A block with no such module (OPT, XGLM, BioGPT: the
  MLP's layers sit in the block itself) gives the output of the last projection of width
  ``d_model`` the block calls outside its attention (the MLP's down projection).
* ``resid_post``: the block's output hidden state.

:data:`OVERRIDES` holds what the structure cannot decide, by ``model_type``.

:func:`verify` proves the choice on a forward of random token ids: at every attention layer
``attn_out = attn_z @ W_O^T + b`` (``Conv1D`` stores ``W_O^T``: its weight is transposed),
``attn_in`` equals what the attention module receives, ``resid_post`` equals the next
block's input (the layer's output hidden state); splicing each site back in unchanged
leaves the logits unchanged, and splicing it in perturbed changes them (the site is on the
path the loss-recovered interventions replace). It also states the block's form: parallel
(attention and MLP read the same input) or sequential, and whether the residual stream
receives the sites as they are (``resid_post = resid_pre + attn_out + mlp_out``) or through
a norm or scale (Gemma's post-norms, Granite's residual multiplier).

:func:`survey` builds a tiny random model of every type in the installed transformers'
causal-LM mapping offline from its config class and verifies it, or gives the reason it
is refused (``attnspace architectures`` prints it).
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import weakref
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from attnspace.errors import AttnspaceError

OVERRIDE_KEYS = ("layers", "attention", "o_proj", "norm", "mlp")
"""Keys of an :data:`OVERRIDES` entry: dotted paths (``layers`` from the model, the rest inside a block)."""

OVERRIDES: dict[str, dict[str, str]] = {}
"""model_type -> paths the structure cannot decide (empty: every verified type is found from its structure)."""

NOT_ATTENTION: dict[str, str] = {
    "rwkv": "its RwkvSelfAttention is RWKV's time mixing, a linear recurrence without attention weights",
}
"""model_type -> why a module whose class is named Attention is not attention."""

_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "ff", "mlps")
_MLP_CLASS = re.compile(r"(MLP|Mlp|MoE|Moe|MoeBlock|MoEBlock|FeedForward|FFN|Ffn)$")
_NORM_CLASS = re.compile(r"Norm|norm")


class ArchitectureError(AttnspaceError):
    """A model whose sites cannot be found or proven."""


@dataclass(frozen=True)
class LayerSites:
    """Module paths inside one decoder block."""

    attention: str
    """The attention module."""
    o_proj: str
    """Its output projection: input ``attn_z``, output ``attn_out``."""
    norm: str | None
    """Pre-attention norm (output ``attn_in``); None: ``attn_in`` is the attention module's input."""
    mlp: str
    """MLP or MoE block (output ``mlp_out``)."""
    conv1d: bool
    """The projection is GPT-2's Conv1D (weight stored as W_O^T's transpose: [d_z, d_model])."""


@dataclass
class Layout:
    """Where a model's sites are: per layer, its LayerSites or None (a layer without attention)."""

    model_type: str
    layers_path: str
    layers: list[LayerSites | None]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.layers) if s is not None]


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_type_of(model) -> str:
    config = getattr(model, "config", model)
    return str(getattr(config, "model_type", None))


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _unknown(model_type: str, what: str, key: str) -> ArchitectureError:
    """One line naming the model type, what could not be identified, and the override key."""
    return ArchitectureError(
        f"model_type {model_type!r}: could not identify {what} from the module tree",
        fix=f"add OVERRIDES[{model_type!r}] = {{'{key}': '<dotted module path>'}} in attnspace.architectures "
            f"(keys {', '.join(OVERRIDE_KEYS)}), or use a model type that `attnspace architectures` lists as verified.")


def find_layers(model) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the decoder layers."""
    model_type = model_type_of(model)
    override = OVERRIDES.get(model_type, {}).get("layers")
    if override:
        return override, model.get_submodule(override)
    count = getattr(text_config(model), "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != count or name.split(".")[-1] == "experts":
            continue
        has_attention = any("Attention" in type(m).__name__ for m in module.modules())
        size = (has_attention, sum(p.numel() for p in module.parameters()))
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise _unknown(model_type, f"the decoder layers (a list of num_hidden_layers = {count} blocks)", "layers")
    return best[1], best[2]


def _outermost(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    names = [n for n, _ in named]
    return [(n, m) for n, m in named if not any(n != o and n.startswith(o + ".") for o in names)]


def _attention_in(block: nn.Module, model_type: str) -> str | None:
    override = OVERRIDES.get(model_type, {}).get("attention")
    if override:
        return override if _has(block, override) else None
    found = _outermost([(n, m) for n, m in block.named_modules()
                        if n and "Attention" in type(m).__name__ and not _NORM_CLASS.search(type(m).__name__)])
    if not found:
        return None
    preferred = [n for n, _ in found if n.split(".")[-1] in ("self_attn", "attention", "attn", "self_attention")]
    return (preferred or [found[0][0]])[0]


def _mlp_in(block: nn.Module, attention: str, model_type: str) -> str | None:
    override = OVERRIDES.get(model_type, {}).get("mlp")
    if override:
        return override if _has(block, override) else None
    found = _outermost([(n, m) for n, m in block.named_modules()
                        if n and not (n == attention or n.startswith(attention + "."))
                        and (n.split(".")[-1] in _MLP_NAMES or _MLP_CLASS.search(type(m).__name__))])
    return found[0][0] if len(found) == 1 else None


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def _is_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def attention_input(args, kwargs) -> torch.Tensor:
    """The hidden states an attention module receives (its first positional or ``hidden_states`` argument)."""
    if args and torch.is_tensor(args[0]):
        return args[0]
    if torch.is_tensor(kwargs.get("hidden_states")):
        return kwargs["hidden_states"]
    tensors = [v for v in kwargs.values() if torch.is_tensor(v) and v.is_floating_point() and v.dim() == 3]
    if not tensors:
        raise ArchitectureError("the attention module received no hidden-states tensor")
    return tensors[0]


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def probe_ids(model, batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    vocab = text_config(model).vocab_size
    device = next(model.parameters()).device
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def _forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False)


def discover(model) -> Layout:
    """The model's Layout: names from its module tree, the projection and the norm from one
    probe forward (which projection the attention calls last, which norm's output it reads)."""
    model_type = model_type_of(model)
    if model_type in NOT_ATTENTION:
        raise ArchitectureError(f"model_type {model_type!r} has no attention layer: {NOT_ATTENTION[model_type]}",
                                fix="attnspace measures attention outputs: use a model with attention layers.")
    d_model = text_config(model).hidden_size
    layers_path, blocks = find_layers(model)
    attn_paths = [_attention_in(b, model_type) for b in blocks]
    seen: dict[int, dict] = {i: {"leaves": [], "outside": [], "norms": {}} for i in range(len(blocks))}
    hooks = []
    overrides = OVERRIDES.get(model_type, {})

    def on_attn(i):
        def hook(module, args, kwargs):
            if "attn_in" not in seen[i]:
                seen[i]["attn_in"] = attention_input(args, kwargs)
        return hook

    def on_leaf(i, name, where="leaves"):
        def hook(module, args, output):
            seen[i][where].append((name, _first(output).shape[-1]))
        return hook

    def on_norm(i, name):
        def hook(module, args, output):
            if name not in seen[i]["norms"]:
                seen[i]["norms"][name] = _first(output)
        return hook

    for i, (block, attn) in enumerate(zip(blocks, attn_paths)):
        if attn is None:
            continue
        module = block.get_submodule(attn)
        hooks.append(module.register_forward_pre_hook(on_attn(i), with_kwargs=True))
        for name, leaf in module.named_modules():
            if _is_projection(leaf):
                hooks.append(leaf.register_forward_hook(on_leaf(i, f"{attn}.{name}")))
        for name, sub in block.named_modules():
            inside = name == attn or name.startswith(attn + ".")
            if name and not inside and _NORM_CLASS.search(type(sub).__name__):
                hooks.append(sub.register_forward_hook(on_norm(i, name)))
            if not inside and _is_projection(sub):
                hooks.append(sub.register_forward_hook(on_leaf(i, name, "outside")))
    try:
        _forward(model, probe_ids(model))
    finally:
        for h in hooks:
            h.remove()
    layers: list[LayerSites | None] = []
    for i, (block, attn) in enumerate(zip(blocks, attn_paths)):
        if attn is None or "attn_in" not in seen[i]:
            layers.append(None)
            continue
        o_proj = overrides.get("o_proj") or next(
            (n for n, width in reversed(seen[i]["leaves"]) if width == d_model), None)
        if o_proj is None:
            raise _unknown(model_type, f"the attention output projection of layer {i} "
                                       f"(a Linear or Conv1D of output width d_model = {d_model} inside {attn})",
                           "o_proj")
        received = seen[i]["attn_in"]
        norm = overrides.get("norm") or next(
            (n for n, out in seen[i]["norms"].items()
             if out.shape == received.shape and torch.equal(out, received)), None)
        mlp = _mlp_in(block, attn, model_type) or next(
            (n for n, width in reversed(seen[i]["outside"]) if width == d_model), None)
        if mlp is None:
            raise _unknown(model_type, f"the mlp of layer {i} (one module named {'/'.join(_MLP_NAMES)} "
                                       f"or of an MLP/MoE class)", "mlp")
        from transformers.pytorch_utils import Conv1D

        layers.append(LayerSites(attention=attn, o_proj=o_proj, norm=norm, mlp=mlp,
                                 conv1d=isinstance(block.get_submodule(o_proj), Conv1D)))
    if not any(layers):
        raise ArchitectureError(f"model_type {model_type!r} has no attention layer (no module of an Attention class "
                                f"that the forward calls in the decoder layers found, {layers_path})",
                                fix="attnspace measures attention outputs: use a model with attention layers.")
    return Layout(model_type, layers_path, layers)


def layout_of(model) -> Layout:
    """The model's Layout, discovered once per model object."""
    layout = _LAYOUTS.get(model)
    if layout is None:
        layout = _LAYOUTS[model] = discover(model)
    return layout


def projection_weight(module: nn.Module) -> torch.Tensor:
    """W with ``attn_out = attn_z @ W.T + b``: [d_model, d_z] (a Conv1D's weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    return module.weight.T if isinstance(module, Conv1D) else module.weight


# ---------------------------------------------------------------------------------------------
# Verification


class VerificationError(ArchitectureError):
    """An identity that should hold at a site does not."""


class SiteShapeError(VerificationError):
    """A site is not shaped [batch, seq, width]."""


class NotCausalError(VerificationError):
    """A position's logits change with a later token."""


def check_causal(model, ids: torch.Tensor) -> None:
    """Raise NotCausalError unless the logits before the last position ignore the last token."""
    changed = ids.clone()
    changed[:, -1] = 3 + (changed[:, -1] - 2) % (text_config(model).vocab_size - 3)
    before, after = _forward(model, ids).logits[:, :-1], _forward(model, changed).logits[:, :-1]
    if not torch.allclose(before, after, atol=1e-6, rtol=1e-5):
        raise NotCausalError(f"model_type {model_type_of(model)!r}: changing the last token changes the logits "
                             "of earlier positions", fix="attnspace measures causal decoders: use one.")


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        raise VerificationError(f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    err = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    if not err <= tol * max(scale, 1e-6):
        raise VerificationError(f"{what} does not hold (max error {err:.3g} at scale {scale:.3g})")


@dataclass
class Verified:
    """What :func:`verify` proved about one model."""

    layout: Layout
    parallel: bool
    """Attention and MLP read the same input."""
    additive: bool
    """resid_post = resid_pre + attn_out + mlp_out at every attention layer."""
    checks: int
    """Number of identities checked."""


def _site_hooks(model, layout: Layout, layer: int):
    """{site: (module, kind)} at one layer; kind 'out' (output), 'in' (first input), 'attn' (attention input)."""
    _, blocks = find_layers(model)
    block, s = blocks[layer], layout.layers[layer]
    points = {"resid_post": (block, "out")}
    if s is not None:
        points.update(attn_out=(block.get_submodule(s.o_proj), "out"), attn_z=(block.get_submodule(s.o_proj), "in"),
                      mlp_out=(block.get_submodule(s.mlp), "out"),
                      attn_in=(block.get_submodule(s.norm), "out") if s.norm else
                      (block.get_submodule(s.attention), "attn"))
    return points


def _splice(model, ids, layout: Layout, change, layers) -> dict[tuple[int, str], torch.Tensor]:
    """Logits with each site of ``layers`` passed through ``change(x)`` in turn: {(layer, site): logits}."""
    out = {}
    for layer in layers:
        for site, (module, kind) in _site_hooks(model, layout, layer).items():
            if kind == "out":
                def hook(m, args, output):
                    x = change(_first(output))
                    return (x, *output[1:]) if isinstance(output, tuple) else x
                handle = module.register_forward_hook(hook)
            elif kind == "in":
                handle = module.register_forward_pre_hook(lambda m, args: (change(args[0]), *args[1:]))
            else:
                def pre(m, args, kwargs):
                    if args and torch.is_tensor(args[0]):
                        return (change(args[0]), *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}
                handle = module.register_forward_pre_hook(pre, with_kwargs=True)
            try:
                out[layer, site] = _forward(model, ids).logits
            finally:
                handle.remove()
    return out


def _note_inside(inside: dict, running: set, layer: int, module, args, output) -> None:
    inside.setdefault(layer, layer in running)


def verify(model, layout: Layout | None = None, seed: int = 1, splice_layers: list[int] | None = None) -> Verified:
    """Prove ``layout`` (found by :func:`discover` when None) on a forward of random ids; raise
    VerificationError naming the identity that fails. The identities are checked at every layer,
    the splices (two forwards per site) at ``splice_layers`` (default: every layer)."""
    layout = layout or discover(model)
    _, blocks = find_layers(model)
    ids = probe_ids(model, seed=seed)
    check_causal(model, ids)
    got: dict = {}
    running: set[int] = set()  # layers whose attention module is mid-call
    inside: dict[int, bool] = {}  # layer -> its projection ran inside that call
    hooks = []

    def keep(key, index=None):
        def hook(m, args, output=None):
            got[key] = (args[0] if index == "in" else _first(output)).detach().clone()
        return hook

    def keep_received(key):
        def hook(m, args, kwargs):
            if key not in got:
                got[key] = attention_input(args, kwargs).detach().clone()
        return hook

    for L, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(keep_received((L, "resid_pre")), with_kwargs=True))
        s = layout.layers[L]
        hooks.append(block.register_forward_hook(keep((L, "resid_post"))))
        if s is None:
            continue
        proj = block.get_submodule(s.o_proj)
        hooks.append(proj.register_forward_hook(keep((L, "attn_out"))))
        hooks.append(proj.register_forward_pre_hook(keep((L, "attn_z"), "in")))
        attn = block.get_submodule(s.attention)
        hooks.append(attn.register_forward_pre_hook(keep_received((L, "received")), with_kwargs=True))
        hooks.append(attn.register_forward_pre_hook(lambda m, args, L=L: running.add(L)))
        hooks.append(attn.register_forward_hook(lambda m, args, out, L=L: running.discard(L)))
        hooks.append(proj.register_forward_hook(partial(_note_inside, inside, running, L)))
        mlp = block.get_submodule(s.mlp)
        hooks.append(mlp.register_forward_hook(keep((L, "mlp_out"))))
        hooks.append(mlp.register_forward_pre_hook(keep_received((L, "mlp_in")), with_kwargs=True))
        if s.norm:
            hooks.append(block.get_submodule(s.norm).register_forward_hook(keep((L, "attn_in"))))
    try:
        clean = _forward(model, ids).logits
    finally:
        for h in hooks:
            h.remove()
    checks, parallel, additive = 0, True, True
    for (L, site), x in got.items():
        if site in ("resid_post", "attn_out", "attn_z", "attn_in", "mlp_out") and x.shape[:2] != ids.shape:
            raise SiteShapeError(f"layer {L}: {site} has shape {tuple(x.shape)}, not [batch, seq, width] = "
                                 f"[{ids.shape[0]}, {ids.shape[1]}, ...] (a flattened MLP or MoE output)")
    for L, s in enumerate(layout.layers):
        if L + 1 < len(blocks):
            _close(got[L, "resid_post"], got[L + 1, "resid_pre"], f"layer {L}: resid_post = layer {L + 1}'s input")
            checks += 1
        if s is None:
            continue
        if not inside.get(L):
            raise VerificationError(f"layer {L}: {s.o_proj} does not run inside the attention module {s.attention}")
        proj = blocks[L].get_submodule(s.o_proj)
        w = projection_weight(proj).detach()
        bias = 0.0 if proj.bias is None else proj.bias.detach().double()
        _close(got[L, "attn_z"].double() @ w.double().T + bias, got[L, "attn_out"],
               f"layer {L}: attn_out = attn_z @ W_O^T + b ({s.o_proj}{', Conv1D' if s.conv1d else ''})")
        if s.norm:
            _close(got[L, "attn_in"], got[L, "received"], f"layer {L}: attn_in ({s.norm}) = the attention's input")
        checks += 2
        parallel &= got[L, "mlp_in"].shape == got[L, "received"].shape and torch.equal(got[L, "mlp_in"],
                                                                                       got[L, "received"])
        total = got[L, "resid_pre"] + got[L, "attn_out"] + got[L, "mlp_out"]
        scale = float(got[L, "resid_post"].abs().max())
        additive &= float((total - got[L, "resid_post"]).abs().max()) <= 1e-4 * max(scale, 1e-6)
    splice_layers = range(len(blocks)) if splice_layers is None else splice_layers
    same = _splice(model, ids, layout, lambda x: x.clone(), splice_layers)
    for (L, site), logits in same.items():
        _close(logits, clean, f"layer {L}: logits with {site} spliced back in unchanged = the clean logits", 1e-5)
    generator = torch.Generator().manual_seed(seed)

    def perturb(x):
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        return x + noise * x.detach().float().std().clamp_min(1e-3).to(x.dtype)

    for (L, site), logits in _splice(model, ids, layout, perturb, splice_layers).items():
        if torch.allclose(logits, clean, atol=1e-6, rtol=1e-5):
            raise VerificationError(f"layer {L}: perturbing {site} leaves the logits unchanged: "
                                    "the site is not on the forward's path")
    return Verified(layout, parallel=parallel, additive=additive, checks=checks + 2 * len(same))


def verify_sites(model) -> dict:
    """For a model outside the site table: its sites proven on a probe forward (identities at every
    layer, splices at its first attention layer) and ``{"attention_layers", "block_form"}``; for
    the table's families, ``{}``. Raises ArchitectureError naming what failed."""
    from attnspace.families import SUPPORTED_MODEL_TYPES

    if model_type_of(model) in SUPPORTED_MODEL_TYPES:
        return {}
    layout = layout_of(model)
    try:
        proof = verify(model, layout, splice_layers=layout.attention_layers[:1])
    except VerificationError as exc:
        raise VerificationError(f"model_type {layout.model_type!r}: {exc}",
                                fix=f"set OVERRIDES[{layout.model_type!r}] in attnspace.architectures to the "
                                    f"right module paths (keys {', '.join(OVERRIDE_KEYS)}), or use a verified "
                                    "model type (`attnspace architectures`).") from exc
    return {"attention_layers": layout.attention_layers, "block_form": describe(proof)}


# ---------------------------------------------------------------------------------------------
# Survey: a tiny random model of every causal-LM type of the installed transformers

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, first_k_dense_replace=1, n_group=1, topk_group=1,
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, rotary_dim=4,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
            mamba_d_ssm=32, mamba_n_heads=4, n_mamba_heads=4, mamba_num_heads=4, mamba_d_head=8, mamba_head_dim=8,
            mamba_headdim=8, mamba_d_state=8, ssm_state_size=8, mamba_expand=1, expand=1, mamba_dt_rank=4,
            mamba_chunk_size=8, chunk_size=8, n_groups=1, mamba_ngroups=1, use_mamba_kernels=False,
            linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
"""Sizes of a tiny model (d_model 32, 3 layers, 4 heads of 8, 4 experts of 16, latent ranks 16, SSM heads
of 8 with state 8 in chunks of 8), set where
its config has the key (and may set it), with special tokens inside the vocabulary."""

MAX_TINY_PARAMETERS = 10_000_000
"""A tiny model larger than this is refused before it is built (a config whose sizes TINY does not reach)."""

TINY_OVERRIDES: dict[str, dict] = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "zamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba"]),
}
"""model_type -> config fields a tiny model of that type needs besides TINY (hybrid stacks: an attention
layer among the three)."""

TIME_LIMIT_S = 60
"""A tiny model whose checks take longer than this is refused (an unshrunk size somewhere)."""

REASONS = {
    "encoder_decoder": "an encoder-decoder (its causal-LM class is the decoder half, with cross-attention)",
    "no_attention": "no attention layer",
    "remote_code": "a remote-code model (trust_remote_code: its modules are not in transformers)",
    "build": "no tiny model could be built offline from its config class",
    "identify": "a site could not be identified from the module tree",
    "identity": "an identity that does not hold",
    "shape": "a site is not shaped [batch, seq, width] (the MLP or MoE block works on flattened tokens)",
    "not_causal": "not causal: a position's logits depend on later tokens (an encoder's bidirectional attention)",
    "forward": "the tiny model's forward fails",
}
"""Refusal reasons, by key."""


@dataclass
class Status:
    """One model type's line in the survey."""

    model_type: str
    status: str
    """'verified' or 'refused'."""
    reason: str = ""
    """A key of REASONS (refused)."""
    detail: str = ""
    form: str = ""
    """Verified: the block's form (sequential/parallel, additive or not, layers without attention)."""


def tiny_model(model_type: str, seed: int = 0):
    """A tiny random causal LM of ``model_type``, in eval mode, built offline from its config class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoConfig.for_model(model_type)
    text = _text(base)
    fields = {k: v for k, v in TINY.items() if hasattr(text, k) and _settable(text, k)}
    fields.update(_per_layer_tails(text, TINY["num_hidden_layers"]))
    if hasattr(text, "kv_lora_rank"):  # multi-head latent attention: one key per query head
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    fields.update(TINY_OVERRIDES.get(model_type, {}))
    config = AutoConfig.for_model(model_type, **_nest(base, fields))
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_TINY_PARAMETERS:
        raise ArchitectureError(f"the tiny config of {model_type!r} still has {size:,} parameters "
                                f"(sizes outside {sorted(TINY)} kept their defaults)",
                                fix=f"add TINY_OVERRIDES[{model_type!r}] with the fields that shrink it")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _per_layer_tails(config, n: int) -> dict:
    """The last ``n`` entries of each per-layer list of ``config`` (layer types, sparsity patterns):
    a layer pattern ends on a full-attention layer, so its tail keeps one."""
    count = getattr(config, "num_hidden_layers", None)
    return {k: v[-n:] for k, v in config.to_dict().items()
            if isinstance(v, list) and count and len(v) == count and _settable(config, k)}


def _settable(config, key: str) -> bool:
    """False for a read-only property (Falcon's head_dim is derived)."""
    attr = getattr(type(config), key, None)
    return not (isinstance(attr, property) and attr.fset is None)


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _nest(config, fields: dict) -> dict:
    """``fields`` at the level of the text config: top-level, or under ``text_config``."""
    if _text(config) is config:
        return fields
    return {"text_config": {**_text(config).to_dict(), **fields}}


def check_type(model_type: str) -> Status:
    """Build, discover and verify a tiny model of ``model_type``; the outcome as a Status."""
    from transformers import AutoConfig

    def refused(reason, detail):
        return Status(model_type, "refused", reason, " ".join(str(detail).split())[:300])

    try:
        base = AutoConfig.for_model(model_type)
    except Exception as exc:  # noqa: BLE001 - any failure is this type's refusal, named
        return refused("build", exc)
    if getattr(base, "is_encoder_decoder", False):
        return refused("encoder_decoder", f"{type(base).__name__}.is_encoder_decoder = True")
    text_type = getattr(_text(base), "model_type", model_type)
    if text_type != model_type and text_type in causal_lm_types():
        inner = check_type(text_type)  # a multimodal wrapper: its sites are its text model's
        return Status(model_type, inner.status, inner.reason, inner.detail,
                      inner.form and f"{inner.form} (its text model {text_type!r})")
    with _time_limit(TIME_LIMIT_S):
        return _check_built(model_type, refused)


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise TimeoutError in the main thread after ``seconds`` (no limit elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"longer than {seconds} s on a tiny model")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _check_built(model_type: str, refused) -> Status:
    try:
        model = tiny_model(model_type)
    except Exception as exc:  # noqa: BLE001
        return refused("build", f"{type(exc).__name__}: {exc}")
    try:
        check_causal(model, probe_ids(model))
        layout = discover(model)
    except NotCausalError as exc:
        return refused("not_causal", exc)
    except VerificationError as exc:
        return refused("identity", exc)
    except ArchitectureError as exc:
        return refused("no_attention" if "no attention layer" in str(exc) else "identify", exc)
    except Exception as exc:  # noqa: BLE001
        return refused("forward", f"{type(exc).__name__}: {exc}")
    try:
        proof = verify(model, layout)
    except NotCausalError as exc:
        return refused("not_causal", exc)
    except SiteShapeError as exc:
        return refused("shape", exc)
    except VerificationError as exc:
        return refused("identity", exc)
    except Exception as exc:  # noqa: BLE001
        return refused("forward", f"{type(exc).__name__}: {exc}")
    return Status(model_type, "verified", form=describe(proof))


def describe(proof: Verified) -> str:
    """The block's form in words."""
    layout = proof.layout
    words = ["parallel" if proof.parallel else "sequential",
             "additive" if proof.additive else "norm or scale between the sites and the residual"]
    if any(s is not None and s.conv1d for s in layout.layers):
        words.append("Conv1D")
    if any(s is not None and s.norm is None for s in layout.layers):
        words.append("attn_in = the attention's input")
    skipped = [i for i, s in enumerate(layout.layers) if s is None]
    if skipped:
        words.append(f"no attention at layers {skipped} of {len(layout.layers)}")
    return ", ".join(words)


def causal_lm_types() -> list[str]:
    """Every model type in the installed transformers' causal-LM mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def survey(types: list[str] | None = None) -> list[Status]:
    """check_type of every causal-LM type (or of ``types``)."""
    return [check_type(t) for t in (types or causal_lm_types())]
