"""SAE folders of other libraries: read SAELens and llamascopium folders, export to them.

Three layouts, told apart by the file that names the configuration:

=============  ==========================================  ===========================================
layout         files                                       tensors
=============  ==========================================  ===========================================
LlamaScope     hyperparams.json,                           encoder.weight [n, d], encoder.bias [n],
(this          checkpoints/final.safetensors               decoder.weight [d, n], decoder.bias [d]
pipeline)
SAELens        cfg.json, sae_weights.safetensors           W_enc [d, n], b_enc [n], W_dec [n, d],
                                                           b_dec [d], threshold [n] (JumpReLU)
llamascopium   config.json (``sae_type``),                 W_E [d, n], b_E [n], W_D [n, d], b_D [d],
               sae_weights.safetensors (or                 dataset_average_activation_norm.<hook>
               checkpoints/final.safetensors)              [], activation_function.log_jumprelu_threshold [n]
=============  ==========================================  ===========================================

Reading (:func:`read_sae_files`) turns any of them into LlamaScope terms (hyperparams keys
and tensor names), so :func:`attnspace.llamascope.load_llamascope` checks and loads every
layout the same way. A per-feature JumpReLU threshold, which the LlamaScope hyperparams
cannot hold (one scalar there), travels as the extra tensor ``threshold`` [n], on the
normalised scale and compared with the same score as the library compares it.

Writing (:func:`attnspace.llamascope.export_sae`, through :data:`WRITERS`) goes the other way. The arithmetic of each target, and so what
the export has to change (see docs/interop.md):

* SAELens computes pre = x W_enc + b_enc on the raw activations (a dataset-wise norm is
  folded only for SAEs of its registry), ranks TopK on pre (``rescale_acts_by_decoder_norm``
  off) and keeps relu(pre) * (pre > threshold) for JumpReLU, which has no decoder-norm rule.
  The export folds the dataset norm: W_enc times f_in, decoder weight and bias over f_out.
  Where the rule includes the decoder norm, decoder norms are folded too (unit decoder rows,
  encoder row and bias times the norm), so activations are pre x ||dec_i||, as
  ``load_llamascope`` reports them.
* llamascopium keeps the dataset norm per hook point and normalises inside
  ``normalize_activations``; its rule includes the decoder norm when
  ``sparsity_include_decoder_norm`` is set, and its JumpReLU threshold is compared on the
  normalised scale. The export keeps the weights as they are.

In both, a decoder bias applied before the encoder (LlamaScope's
``apply_decoder_bias_to_pre_encoder``) is folded into the encoder bias.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from attnspace.errors import LlamaScopeError
from attnspace.files import read_safetensors

FORMATS = ("llamascope", "saelens", "llamascopium")
EXPORT_FORMATS = ("saelens", "llamascopium")
CONFIG_FILES = {"llamascope": "hyperparams.json", "saelens": "cfg.json", "llamascopium": "config.json"}
LLAMASCOPIUM_WEIGHTS = ("sae_weights.safetensors", "checkpoints/final.safetensors")
SAELENS_ARCHITECTURES = ("standard", "topk", "jumprelu")
SAELENS_DTYPES = ("float32", "float16", "bfloat16", "float64")
"""The dtypes a SAELens cfg.json may name (with or without torch.)."""
SAELENS_CFG_VERSION = "6.0.0"
"""The SAELens cfg.json format written (metadata block, architecture names)."""
LLAMASCOPIUM_ACT_FNS = ("relu", "topk", "jumprelu")
LAYOUTS = ("hyperparams.json + checkpoints/final.safetensors (LlamaScope, this pipeline), "
           "cfg.json + sae_weights.safetensors (SAELens), or config.json + sae_weights.safetensors (llamascopium)")


@dataclass
class SAEFiles:
    """An SAE folder's content in LlamaScope terms."""

    format: str
    """'llamascope', 'saelens' or 'llamascopium'."""
    hyper: dict
    """LlamaScope hyperparams (d_model, d_sae, act_fn, top_k, norm_activation, ...)."""
    tensors: dict[str, Tensor]
    """encoder.weight [n, d], encoder.bias [n], decoder.weight [d, n], decoder.bias [d]; ``threshold`` [n] when
    the folder has per-feature JumpReLU thresholds (normalised scale)."""
    hyper_path: Path
    """The configuration file read."""
    weights_path: Path
    """The weights file read."""


def detect_format(folder: Path | str) -> str:
    """The layout of an SAE folder, from its configuration file; a LlamaScopeError names the three."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LlamaScopeError(f"{folder} is not a folder. Fix: pass the folder of one SAE: {LAYOUTS}.")
    for fmt in FORMATS:
        if (folder / CONFIG_FILES[fmt]).is_file():
            return fmt
    if (folder / "checkpoints" / "final.safetensors").is_file():
        raise LlamaScopeError(f"{folder} is not a LlamaScope SAE: hyperparams.json is missing.")
    if (folder / "sae_weights.safetensors").is_file():
        raise LlamaScopeError(f"{folder} has sae_weights.safetensors but no configuration: cfg.json (SAELens) "
                              "or config.json (llamascopium) is missing.")
    raise LlamaScopeError(f"{folder} is not an SAE folder: it has none of hyperparams.json, cfg.json, config.json. "
                          f"Expected {LAYOUTS}.")


def read_sae_files(folder: Path | str) -> SAEFiles:
    """Read a LlamaScope, SAELens or llamascopium folder (detected) into LlamaScope terms, unchecked."""
    folder = Path(folder)
    fmt = detect_format(folder)
    return {"llamascope": _read_llamascope, "saelens": _read_saelens, "llamascopium": _read_llamascopium}[fmt](folder)


def flag(record: dict, key: str, default: bool, path: Path) -> bool:
    """A true/false setting of an SAE configuration file: JSON true or false, or absent (``default``).
    A string such as "false" is refused (Python's bool("false") is True)."""
    value = record.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise LlamaScopeError(f"{path}: {key} is {value!r} ({type(value).__name__}), not true or false.",
                              f"write true or false without quotes as {key}.")
    return value


def _json(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LlamaScopeError(f"{path} is not readable JSON ({err}). Fix: restore the file from its source.") from None
    if not isinstance(record, dict):
        raise LlamaScopeError(f"{path} holds {type(record).__name__}, not a JSON object.")
    return record


def _weights(path: Path, folder: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise LlamaScopeError(f"{folder} is not a complete SAE folder: {path.relative_to(folder)} is missing.")
    try:
        tensors, _ = read_safetensors(path)
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise LlamaScopeError(f"{path} is not a readable safetensors file ({err}). "
                              "Fix: restore the file from its source.") from None
    return tensors


def _need(tensors: dict, name: str, shape: tuple[int, ...], path: Path, what: str) -> Tensor:
    if name not in tensors:
        raise LlamaScopeError(f"{path}: tensor {name!r} is missing (has {sorted(tensors)}).")
    if tuple(tensors[name].shape) != shape:
        raise LlamaScopeError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} ({what}).")
    return tensors[name]


def _int(record: dict, key: str, path: Path) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LlamaScopeError(f"{path}: {key} is missing or not a positive integer (got {value!r}).")
    return value


def _read_llamascope(folder: Path) -> SAEFiles:
    hyper_path, weights_path = folder / "hyperparams.json", folder / "checkpoints" / "final.safetensors"
    if not weights_path.is_file():
        raise LlamaScopeError(f"{folder} is not a LlamaScope SAE: {weights_path.relative_to(folder)} is missing.")
    return SAEFiles("llamascope", _json(hyper_path), _weights(weights_path, folder), hyper_path, weights_path)


def _read_saelens(folder: Path) -> SAEFiles:
    cfg_path, weights_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    cfg = _json(cfg_path)
    arch = cfg.get("architecture", "standard")
    if arch not in SAELENS_ARCHITECTURES:
        raise LlamaScopeError(f"{cfg_path}: SAELens architecture {arch!r} is not supported; "
                              f"expected one of {SAELENS_ARCHITECTURES}.")
    for key, want in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, want) != want:
            raise LlamaScopeError(
                f"{cfg_path}: {key} is {cfg[key]!r}; only 'none' is read, since the folder does not hold the "
                "scaling a local SAELens folder would need. Fix: fold it into the weights in SAELens "
                "(e.g. sae.fold_activation_norm_scaling_factor(f)) and save again.")
    dtype = cfg.get("dtype", "float32")
    if not (isinstance(dtype, str) and dtype.removeprefix("torch.") in SAELENS_DTYPES):
        raise LlamaScopeError(f"{cfg_path}: dtype is {dtype!r}; SAELens SAEs run in one of {SAELENS_DTYPES}.",
                              "write the dtype the weights were saved in, e.g. \"float32\".")
    d, n = _int(cfg, "d_in", cfg_path), _int(cfg, "d_sae", cfg_path)
    tensors = _weights(weights_path, folder)
    W_enc = _need(tensors, "W_enc", (d, n), weights_path, "d_in, d_sae")
    b_enc = _need(tensors, "b_enc", (n,), weights_path, "d_sae")
    W_dec = _need(tensors, "W_dec", (n, d), weights_path, "d_sae, d_in")
    b_dec = _need(tensors, "b_dec", (d,), weights_path, "d_in")
    metadata = cfg.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise LlamaScopeError(f"{cfg_path}: metadata is a {type(metadata).__name__}, not a mapping of keys.",
                              "write metadata as a JSON object ({\"hook_name\": ...}), as SAELens saves it.")
    hook = metadata.get("hook_name") or cfg.get("hook_name")
    if hook is not None and not isinstance(hook, str):
        raise LlamaScopeError(f"{cfg_path}: hook_name is {hook!r}, not a string.", "write the hook's name, e.g. "
                              "blocks.15.hook_attn_out.")
    hyper = dict(d_model=d, d_sae=n, hook_point_in=hook, hook_point_out=hook, norm_activation="none",
                 apply_decoder_bias_to_pre_encoder=flag(cfg, "apply_b_dec_to_input", True, cfg_path),
                 use_decoder_bias=True, source_format="saelens", saelens_architecture=arch)
    out = {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "decoder.weight": W_dec.T, "decoder.bias": b_dec}
    if arch == "topk":
        hyper.update(act_fn="topk", top_k=_int(cfg, "k", cfg_path),
                     sparsity_include_decoder_norm=flag(cfg, "rescale_acts_by_decoder_norm", False, cfg_path))
    else:  # relu(pre) * (pre > threshold); 'standard' is threshold 0
        if arch == "jumprelu":
            if "threshold" not in tensors and "log_threshold" in tensors:
                tensors["threshold"] = tensors["log_threshold"].exp()  # older SAELens checkpoints
            threshold = _need(tensors, "threshold", (n,), weights_path, "d_sae")
        else:
            threshold = torch.zeros(n, dtype=W_enc.dtype)
        if bool((threshold < 0).any()):
            raise LlamaScopeError(f"{weights_path}: {int((threshold < 0).sum())} JumpReLU thresholds are negative; "
                                  "SAELens keeps relu(pre) there, which this reader does not model.")
        hyper.update(act_fn="jumprelu", sparsity_include_decoder_norm=False)
        out["threshold"] = threshold
    return SAEFiles("saelens", hyper, out, cfg_path, weights_path)


def _read_llamascopium(folder: Path) -> SAEFiles:
    cfg_path = folder / "config.json"
    cfg = _json(cfg_path)
    if cfg.get("sae_type") != "sae":
        raise LlamaScopeError(f"{cfg_path}: sae_type {cfg.get('sae_type')!r} is not read; only plain SAEs "
                              "(sae_type 'sae') are, not crosscoders, transcoders across layers or Lorsa.")
    if flag(cfg, "use_glu_encoder", False, cfg_path):
        raise LlamaScopeError(f"{cfg_path}: use_glu_encoder is true; only the linear encoder is read.")
    act_fn = str(cfg.get("act_fn", "relu")).lower()
    if act_fn not in LLAMASCOPIUM_ACT_FNS:
        raise LlamaScopeError(f"{cfg_path}: act_fn {act_fn!r} is not read; expected one of {LLAMASCOPIUM_ACT_FNS} "
                              "(batch TopK depends on the batch; save it for inference as JumpReLU).")
    d = _int(cfg, "d_model", cfg_path)
    factor = cfg.get("expansion_factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise LlamaScopeError(f"{cfg_path}: expansion_factor is missing or not a positive number (got {factor!r}).")
    n = int(d * factor)  # llamascopium's own rule for d_sae
    hook_in, hook_out = cfg.get("hook_point_in"), cfg.get("hook_point_out")
    if not (isinstance(hook_in, str) and isinstance(hook_out, str)):
        raise LlamaScopeError(f"{cfg_path}: hook_point_in and hook_point_out must be strings.")
    weights_path = next((folder / p for p in LLAMASCOPIUM_WEIGHTS if (folder / p).is_file()),
                        folder / LLAMASCOPIUM_WEIGHTS[0])
    if not weights_path.is_file() and (any(folder.glob("**/*.pt")) or any(folder.glob("**/*.dcp"))):
        raise LlamaScopeError(f"{folder}: only .pt / .dcp weights; they are not read (pickle, distributed). "
                              "Fix: save with save_pretrained on one process, which writes sae_weights.safetensors.")
    tensors = _weights(weights_path, folder)
    W_E = _need(tensors, "W_E", (d, n), weights_path, "d_model, d_sae")
    b_E = _need(tensors, "b_E", (n,), weights_path, "d_sae")
    W_D = _need(tensors, "W_D", (n, d), weights_path, "d_sae, d_model")
    use_bias = flag(cfg, "use_decoder_bias", True, cfg_path)
    b_D = _need(tensors, "b_D", (d,), weights_path, "d_model") if use_bias else torch.zeros(d, dtype=W_D.dtype)
    mode = cfg.get("norm_activation", "dataset-wise")
    hyper = dict(d_model=d, d_sae=n, hook_point_in=hook_in, hook_point_out=hook_out,
                 sparsity_include_decoder_norm=flag(cfg, "sparsity_include_decoder_norm", True, cfg_path),
                 apply_decoder_bias_to_pre_encoder=False, use_decoder_bias=use_bias, source_format="llamascopium")
    if mode == "dataset-wise":
        norms = {}
        for side, hook in (("in", hook_in), ("out", hook_out)):
            key = f"dataset_average_activation_norm.{hook}"
            if key not in tensors or tensors[key].numel() != 1:
                raise LlamaScopeError(f"{weights_path}: norm_activation is dataset-wise but the scalar {key!r} is "
                                      "missing. Fix: set the dataset norm (set_dataset_average_activation_norm) "
                                      "before saving.")
            norms[side] = float(tensors[key].reshape(()))
        hyper.update(norm_activation="dataset-wise", dataset_average_activation_norm=norms)
    elif mode == "inference":
        hyper["norm_activation"] = "none"
    else:
        raise LlamaScopeError(f"{cfg_path}: norm_activation {mode!r} scales each token or batch by its own norm; "
                              "only 'dataset-wise' and 'inference' are read.")
    out = {"encoder.weight": W_E.T, "encoder.bias": b_E, "decoder.weight": W_D.T, "decoder.bias": b_D}
    if act_fn == "topk":
        hyper.update(act_fn="topk", top_k=_int(cfg, "top_k", cfg_path))
    else:  # x * (x > threshold) on the score; relu is threshold 0
        key = "activation_function.log_jumprelu_threshold"
        threshold = (_need(tensors, key, (n,), weights_path, "d_sae").exp() if act_fn == "jumprelu"
                     else torch.zeros(n, dtype=W_E.dtype))
        hyper["act_fn"] = "jumprelu"
        out["threshold"] = threshold
    return SAEFiles("llamascopium", hyper, out, cfg_path, weights_path)


# ---- export -----------------------------------------------------------------------------------------------------


@dataclass
class PortableSAE:
    """One SAE in plain arithmetic, on the normalised scale (x_n = f_in x), ready to be written anywhere.

    pre = x_n W_enc^T + b_enc; score = pre * ||W_dec_i|| if include_norm else pre;
    topk: keep the top_k scores, value relu(pre); jumprelu: keep score > threshold, value pre;
    x_hat = (acts W_dec + b_dec) / f_out.
    """

    W_enc: Tensor  # [n, d]
    b_enc: Tensor  # [n]
    W_dec: Tensor  # [n, d], row i = feature i
    b_dec: Tensor  # [d]
    act_fn: str
    top_k: int | None
    threshold: Tensor | None  # [n] (jumprelu)
    include_norm: bool
    norm_in: float | None  # raw mean activation norm (dataset-wise), None: no normalisation
    norm_out: float | None
    hook_in: str | None
    hook_out: str | None
    info: dict

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[0]

    def f(self, side: str) -> float:
        norm = self.norm_in if side == "in" else self.norm_out
        return 1.0 if norm is None else math.sqrt(self.d_model) / norm


def portable(files: SAEFiles) -> PortableSAE:
    """The arithmetic of a folder read by :func:`read_sae_files` (checked first by ``load_llamascope``)."""
    h, t = files.hyper, {k: v.to(torch.float32) for k, v in files.tensors.items()}
    d = h["d_model"]
    W_enc, b_enc, W_dec, b_dec = t["encoder.weight"], t["encoder.bias"], t["decoder.weight"].T, t["decoder.bias"]
    if h.get("apply_decoder_bias_to_pre_encoder", False):
        b_enc = b_enc - W_enc @ b_dec  # (x_n - b_dec) W_enc^T + b_enc
    norms = h.get("dataset_average_activation_norm") if h.get("norm_activation") == "dataset-wise" else None
    norm_in, norm_out = (float(norms["in"]), float(norms["out"])) if norms else (None, None)
    include = bool(h.get("sparsity_include_decoder_norm", True))
    threshold = None
    if h["act_fn"] == "jumprelu":
        if "threshold" in t:
            threshold = t["threshold"]
        else:  # LlamaScope: one threshold on the raw scale, compared with score / f_in
            f_in = 1.0 if norm_in is None else math.sqrt(d) / norm_in
            threshold = torch.full((h["d_sae"],), float(h["jump_relu_threshold"]) * f_in)
    info = {k: h[k] for k in ("model", "dataset", "layer", "site", "run") if k in h}
    return PortableSAE(W_enc.contiguous(), b_enc.contiguous(), W_dec.contiguous(), b_dec.contiguous(), h["act_fn"],
                       h.get("top_k") if h["act_fn"] == "topk" else None, threshold, include, norm_in, norm_out,
                       h.get("hook_point_in"), h.get("hook_point_out"), info)


def fold_decoder_norms(sae: PortableSAE) -> PortableSAE:
    """The same SAE with unit decoder rows and a rule without the decoder norm (scores and x_hat unchanged)."""
    n = sae.W_dec.norm(dim=1)  # [n]
    if bool((n == 0).any()):
        raise LlamaScopeError(f"{int((n == 0).sum())} decoder rows are zero; their features cannot be folded.")
    return PortableSAE(sae.W_enc * n[:, None], sae.b_enc * n, sae.W_dec / n[:, None], sae.b_dec, sae.act_fn,
                       sae.top_k, sae.threshold, False, sae.norm_in, sae.norm_out, sae.hook_in, sae.hook_out, sae.info)


def _saelens_files(sae: PortableSAE) -> tuple[dict, dict[str, Tensor]]:
    if sae.include_norm:
        sae = fold_decoder_norms(sae)
    f_in, f_out = sae.f("in"), sae.f("out")
    cfg = dict(architecture=sae.act_fn, d_in=sae.d_model, d_sae=sae.d_sae, dtype="float32", device="cpu",
               apply_b_dec_to_input=False, normalize_activations="none", reshape_activations="none",
               # SAELens 6's cfg.json (its loaders rebuild a config without sae_lens_version as a pre-6 one);
               # documents start with BOS here, whose positions no statistic includes.
               metadata=dict(sae_lens_version=SAELENS_CFG_VERSION, hook_name=sae.hook_in,
                             model_name=sae.info.get("model"), prepend_bos=True, exported_from="attnspace",
                             **{k: v for k, v in sae.info.items() if k != "model"}))
    tensors = {"W_enc": (sae.W_enc * f_in).T, "b_enc": sae.b_enc, "W_dec": sae.W_dec / f_out,
               "b_dec": sae.b_dec / f_out}
    if sae.act_fn == "topk":
        cfg.update(k=sae.top_k, rescale_acts_by_decoder_norm=False)
    else:
        if bool((sae.threshold < 0).any()):
            raise LlamaScopeError("negative JumpReLU thresholds: SAELens keeps relu(pre), so the export would differ.")
        tensors["threshold"] = sae.threshold
    return cfg, tensors


def expansion_factor(d_model: int, d_sae: int) -> float:
    """A float e with int(d_model * e) == d_sae (llamascopium stores the size as this factor)."""
    e = d_sae / d_model
    for _ in range(4):
        if int(d_model * e) == d_sae:
            return e
        e = math.nextafter(e, math.inf)
    raise LlamaScopeError(f"d_sae={d_sae} is not reachable as int({d_model} x expansion_factor) in float64.")


def _llamascopium_files(sae: PortableSAE) -> tuple[dict, dict[str, Tensor]]:
    if sae.hook_in is None or sae.hook_out is None:
        raise LlamaScopeError("the SAE names no hook point (hook_point_in / hook_point_out); llamascopium keys its "
                              "dataset norm by hook point. Fix: add them to the source folder's configuration.")
    cfg = dict(sae_type="sae", d_model=sae.d_model, expansion_factor=expansion_factor(sae.d_model, sae.d_sae),
               use_decoder_bias=True, act_fn=sae.act_fn, sparsity_include_decoder_norm=sae.include_norm,
               top_k=sae.top_k if sae.act_fn == "topk" else 50, hook_point_in=sae.hook_in,
               hook_point_out=sae.hook_out, use_glu_encoder=False,
               norm_activation="dataset-wise" if sae.norm_in is not None else "inference")
    tensors = {"W_E": sae.W_enc.T, "b_E": sae.b_enc, "W_D": sae.W_dec, "b_D": sae.b_dec}
    if sae.norm_in is not None:
        if sae.hook_in == sae.hook_out and sae.norm_in != sae.norm_out:
            raise LlamaScopeError(f"input and output norms differ ({sae.norm_in}, {sae.norm_out}) on one hook point "
                                  f"{sae.hook_in}; llamascopium holds one norm per hook point.")
        tensors[f"dataset_average_activation_norm.{sae.hook_in}"] = torch.tensor(sae.norm_in, dtype=torch.float32)
        tensors[f"dataset_average_activation_norm.{sae.hook_out}"] = torch.tensor(sae.norm_out, dtype=torch.float32)
    if sae.act_fn == "jumprelu":
        tensors["activation_function.log_jumprelu_threshold"] = sae.threshold.log()
    return cfg, tensors


WRITERS = {"saelens": (_saelens_files, "cfg.json", "sae_weights.safetensors"),
           "llamascopium": (_llamascopium_files, "config.json", "sae_weights.safetensors")}
