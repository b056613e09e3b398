"""Read any SAE in the released LlamaScope layout (or a SAELens / llamascopium folder, see
:mod:`attnspace.interop`), for inference.

A folder holds ``hyperparams.json`` and ``checkpoints/final.safetensors`` with
``encoder.weight [d_sae, d_model]``, ``encoder.bias [d_sae]``,
``decoder.weight [d_model, d_sae]`` (column i = feature i), ``decoder.bias [d_model]``.
Only JSON and safetensors are read.

Inference (He et al. 2024, the LlamaScope release), for raw activations x [B, d]:

    f_in = sqrt(d_model) / dataset_average_activation_norm["in"]      (1 without dataset-wise norm)
    x_n  = f_in * x   (minus decoder.bias if apply_decoder_bias_to_pre_encoder)
    pre  = W_enc x_n + b_enc
    score_i = pre_i * ||dec_i||  if sparsity_include_decoder_norm  else  pre_i
    jumprelu: feature i is active where score_i > jump_relu_threshold * f_in
              (the threshold is on the raw activation scale); its value is pre_i
    topk:     the top_k scores per token are kept, their values ReLU(pre_i)  (so the
              trained suite of this pipeline, which ranks on pre, reads back exactly)
    x_hat = (W_dec acts + b_dec) / f_out,   f_out from dataset_average_activation_norm["out"]

Decoder columns whose norm is not 1 are folded on load (dec_i / n_i, enc row and
bias times n_i); the per-feature threshold absorbs the factor where the rule does not
already include the decoder norm, so activations x decoder and the firing set are unchanged.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from attnspace.errors import SAE_REFETCH, LlamaScopeError  # noqa: F401  (LlamaScopeError is re-exported)
from attnspace.files import write_json, write_safetensors
from attnspace.interop import EXPORT_FORMATS, WRITERS, flag, portable, read_sae_files

ACT_FNS = ("jumprelu", "topk")
TENSORS = {"encoder.weight": ("d_sae", "d_model"), "encoder.bias": ("d_sae",),
           "decoder.weight": ("d_model", "d_sae"), "decoder.bias": ("d_model",)}



@dataclass
class LlamaScopeSAE:
    """A LlamaScope SAE with unit-norm decoder columns (folded on load)."""

    W_enc: Tensor  # [d_sae, d_model]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_model, d_sae], unit-norm columns
    b_dec: Tensor  # [d_model]
    act_fn: str
    threshold: Tensor | None  # [d_sae] on the normalised scale (jumprelu), compared with pre
    top_k: int | None
    rank_scale: Tensor | None  # [d_sae] (topk): rank features by pre * rank_scale (undoes folding where needed)
    f_in: float
    f_out: float
    apply_decoder_bias_to_pre_encoder: bool
    hyperparams: dict
    decoder_norms_folded: bool
    source: str = ""
    """Where it was loaded from (named in error messages)."""

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[0]

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [B, d_sae] (zero where inactive) of raw activations x [B, d_model]."""
        x_n = x.to(self.W_enc.dtype) * self.f_in
        if self.apply_decoder_bias_to_pre_encoder:
            x_n = x_n - self.b_dec
        pre = x_n @ self.W_enc.T + self.b_enc
        if self.act_fn == "jumprelu":
            return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))
        score = pre if self.rank_scale is None else pre * self.rank_scale
        top = score.topk(self.top_k, dim=-1).indices
        return torch.zeros_like(pre).scatter_(-1, top, pre.gather(-1, top).clamp(min=0))

    def decode(self, acts: Tensor) -> Tensor:
        """Reconstruction on the raw scale [B, d_model] of activations [B, d_sae]."""
        return (acts @ self.W_dec.T + self.b_dec) / self.f_out


def load_llamascope(folder: Path | str, d_model: int | None = None, dtype=torch.float32) -> LlamaScopeSAE:
    """Load and check a LlamaScope folder; ``d_model`` (if given) must match the activations."""
    folder = Path(folder)
    files = read_sae_files(folder)  # LlamaScope, SAELens or llamascopium layout (detected), in LlamaScope terms
    hyper, tensors, hyper_path, weights_path = files.hyper, files.tensors, files.hyper_path, files.weights_path
    act_fn = hyper.get("act_fn")
    if act_fn not in ACT_FNS:
        raise LlamaScopeError(f"{hyper_path}: act_fn {act_fn!r} is not supported; expected one of {ACT_FNS}.",
                              _REFETCH)
    for key in ("d_model", "d_sae"):
        if not isinstance(hyper.get(key), int) or isinstance(hyper[key], bool) or hyper[key] < 1:
            raise LlamaScopeError(f"{hyper_path}: {key} is missing or not a positive integer.", _REFETCH)
    dims = {"d_model": hyper["d_model"], "d_sae": hyper["d_sae"]}
    if d_model is not None and d_model != dims["d_model"]:
        raise LlamaScopeError(f"{folder}: the SAE has d_model={dims['d_model']} but the activations have "
                              f"width {d_model}. Fix: pair it with the site and model it was trained on.")
    for name, shape_names in TENSORS.items():
        if name not in tensors:
            raise LlamaScopeError(f"{weights_path}: tensor {name!r} is missing (has {sorted(tensors)}).", _REFETCH)
        want = tuple(dims[s] for s in shape_names)
        if tuple(tensors[name].shape) != want:
            raise LlamaScopeError(f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, "
                                  f"expected {want} ({', '.join(shape_names)}).")
    for name in (*TENSORS, "threshold"):
        if name in tensors and not tensors[name].dtype.is_floating_point:
            dtype_name = str(tensors[name].dtype).removeprefix("torch.")
            raise LlamaScopeError(f"{weights_path}: {name} has dtype {dtype_name}; SAE weights are floating point "
                                  "(float32, float16 or bfloat16).", _REFETCH)
    for name in TENSORS:
        bad = int((~torch.isfinite(tensors[name].float())).sum())
        if bad:
            raise LlamaScopeError(f"{weights_path}: {name} holds {bad} non-finite values (NaN or inf).", _REFETCH)
    W_enc, b_enc, W_dec, b_dec = (tensors[n].to(dtype) for n in TENSORS)

    norms_cfg = hyper.get("dataset_average_activation_norm") or {}
    dataset_wise = hyper.get("norm_activation") == "dataset-wise"
    if dataset_wise and not (isinstance(norms_cfg, dict) and {"in", "out"} <= set(norms_cfg)):
        raise LlamaScopeError(f"{hyper_path}: norm_activation is dataset-wise but "
                              "dataset_average_activation_norm lacks 'in'/'out'.", _REFETCH)
    if dataset_wise:
        for side in ("in", "out"):
            _positive(norms_cfg[side], f"{hyper_path}: dataset_average_activation_norm.{side}")
    f_in = math.sqrt(dims["d_model"]) / norms_cfg["in"] if dataset_wise else 1.0
    f_out = math.sqrt(dims["d_model"]) / norms_cfg["out"] if dataset_wise else 1.0
    include_norm = flag(hyper, "sparsity_include_decoder_norm", True, hyper_path)

    n = W_dec.norm(dim=0)  # [d_sae]
    folded = not torch.allclose(n, torch.ones_like(n), atol=1e-4)
    if folded:
        if (n == 0).any():
            raise LlamaScopeError(f"{weights_path}: {int((n == 0).sum())} decoder columns are zero.", _REFETCH)
        W_dec, W_enc, b_enc = W_dec / n, W_enc * n[:, None], b_enc * n
    threshold, top_k, rank_scale = None, None, None
    if act_fn == "jumprelu":
        if "threshold" in tensors:  # per feature, on the normalised scale (SAELens, llamascopium)
            base = tensors["threshold"].to(dtype)
            # zero is a plain ReLU (how a SAELens or llamascopium ReLU SAE is read)
            if not bool(torch.isfinite(base).all()) or bool((base < 0).any()):
                raise LlamaScopeError(f"{weights_path}: the per-feature JumpReLU thresholds are not all finite "
                                      "and non-negative.", _REFETCH)
        elif "jump_relu_threshold" not in hyper:
            raise LlamaScopeError(f"{hyper_path}: act_fn jumprelu needs jump_relu_threshold.", _REFETCH)
        else:
            _positive(hyper["jump_relu_threshold"], f"{hyper_path}: jump_relu_threshold")
            base = torch.full((dims["d_sae"],), float(hyper["jump_relu_threshold"]) * f_in, dtype=dtype)
        # After folding, pre' = pre * n. Rule with decoder norm: pre * n > theta f_in -> pre' > theta f_in.
        # Rule without: pre > theta f_in -> pre' > theta f_in * n.
        threshold = base * n if (folded and not include_norm) else base
    else:
        top_k = hyper.get("top_k")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= dims["d_sae"]:
            raise LlamaScopeError(f"{hyper_path}: act_fn topk needs an integer top_k from 1 to d_sae.", _REFETCH)
        # Ranking on pre (without the decoder norm) after folding: pre = pre' / n.
        rank_scale = 1.0 / n if (folded and not include_norm) else None
    pre_bias = flag(hyper, "apply_decoder_bias_to_pre_encoder", False, hyper_path)
    sae = LlamaScopeSAE(W_enc.contiguous(), b_enc, W_dec.contiguous(), b_dec, act_fn, threshold, top_k, rank_scale,
                        f_in, f_out, pre_bias, hyper, folded, str(folder))
    return check_sae(sae, folder)


_REFETCH = SAE_REFETCH
HOOK_POINT = re.compile(r"^blocks\.(?P<layer>\d+)\.hook_(?P<site>\w+)$")
"""LlamaScope / TransformerLens hook names, e.g. blocks.15.hook_attn_out."""


def _positive(value, what: str) -> None:
    """Refuse a setting that must be a finite number above zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LlamaScopeError(f"{what} = {value!r} is not a finite number above zero.", _REFETCH)


def check_sae(sae: LlamaScopeSAE, folder: Path | str, *, site: str | None = None, layer: int | None = None,
              d_model: int | None = None) -> LlamaScopeSAE:
    """Refuse an SAE, however it was loaded, whose numbers cannot be right or that reads another site.

    Finite weights; positive finite norm factors and JumpReLU thresholds; top_k within
    d_sae; and, where the hyperparameters name a hook point (``blocks.L.hook_<site>``),
    the same layer and site as the activations it is paired with. Returns ``sae``.
    """
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        bad = int((~torch.isfinite(getattr(sae, name))).sum())
        if bad:
            raise LlamaScopeError(f"{folder}: {name} holds {bad} non-finite values (NaN or inf).", _REFETCH)
    for name in ("f_in", "f_out"):
        value = getattr(sae, name)
        if not math.isfinite(value) or value <= 0:
            raise LlamaScopeError(f"{folder}: the dataset-wise norm factor {name} = {value!r} is not a finite "
                                  "number above zero.", _REFETCH)
    if sae.act_fn == "jumprelu":
        # a released folder's jump_relu_threshold must be above zero (checked on load); a per-feature
        # threshold of zero is a plain ReLU, which is how a SAELens or llamascopium ReLU SAE is read
        if sae.threshold is None or not bool(torch.isfinite(sae.threshold).all()) or bool((sae.threshold < 0).any()):
            raise LlamaScopeError(f"{folder}: the JumpReLU thresholds are not all finite and non-negative.", _REFETCH)
    elif sae.top_k is None or not 1 <= sae.top_k <= sae.d_sae:
        raise LlamaScopeError(f"{folder}: top_k = {sae.top_k!r} is outside 1..d_sae = {sae.d_sae}.", _REFETCH)
    if d_model is not None and d_model != sae.d_model:
        raise LlamaScopeError(f"{folder}: the SAE has d_model={sae.d_model} but the activations have width "
                              f"{d_model}. Fix: pair it with the site and model it was trained on.")
    hook = sae.hyperparams.get("hook_point_in")
    m = HOOK_POINT.match(hook) if isinstance(hook, str) else None
    if m and ((site is not None and m["site"] != site) or (layer is not None and int(m["layer"]) != layer)):
        raise LlamaScopeError(
            f"{folder}: hook_point_in = {hook!r} reads layer {m['layer']} site {m['site']}, but the activations "
            f"are layer {layer} site {site}. Fix: pair the SAE with the store of its own layer and site.")
    return sae


def fetch_llamascope(repo: str, folder: str, out_dir: Path, revision: str | None = None) -> Path:
    """Download ``folder`` (hyperparams.json, checkpoints/final.safetensors) of a hub repo into ``out_dir``."""
    import shutil
    import tempfile

    from huggingface_hub import snapshot_download

    from attnspace.files import atomic_dir

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        snapshot_download(repo_id=repo, revision=revision, local_dir=tmp,
                          allow_patterns=[f"{folder}/hyperparams.json", f"{folder}/checkpoints/final.safetensors"])
        load_llamascope(Path(tmp) / folder)  # refuse anything that is not a valid SAE folder
        with atomic_dir(out_dir) as staged:
            staged.rmdir()
            shutil.move(str(Path(tmp) / folder), str(staged))
    return out_dir


def export_sae(sae_dir: Path | str, to: str, out_dir: Path | str) -> Path:
    """Write the SAE in ``sae_dir`` (any readable layout) as a ``to`` folder ('saelens' or 'llamascopium').

    The folder is built beside ``out_dir`` and renamed into place; ``out_dir`` must not exist yet.
    """
    if to not in WRITERS:
        raise ValueError(f"--to must be one of {EXPORT_FORMATS}, got {to!r}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists. Fix: remove it or choose another output folder.")
    load_llamascope(sae_dir)  # every check of the reader applies to the source
    files_of, cfg_name, weights_name = WRITERS[to]
    cfg, tensors = files_of(portable(read_sae_files(sae_dir)))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_safetensors({k: v.to(torch.float32) for k, v in tensors.items()}, tmp / weights_name)
        write_json(cfg, tmp / cfg_name)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
