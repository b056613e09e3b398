"""SAE files: the LlamaScope layout for trained SAEs, and training checkpoints. Safetensors + JSON only.

A trained SAE is a folder::

    hyperparams.json                 LlamaScope keys (act_fn "topk", top_k, dataset-wise norm, ...)
    checkpoints/final.safetensors    encoder.weight [d_sae, d_model], encoder.bias [d_sae],
                                     decoder.weight [d_model, d_sae], decoder.bias [d_model]
    metrics.json                     evaluation (see attnspace.sae.evaluate) and training settings

Weights act on normalised inputs, as in LlamaScope: x_n = x sqrt(d) / avg_norm,
z = ReLU(TopK(W_enc x_n + b_enc)), x_hat = (W_dec z + b_dec) avg_norm / sqrt(d), with
avg_norm = ``dataset_average_activation_norm["in"]`` (= ``["out"]``: input and target are one site).

A training checkpoint is one safetensors file whose header metadata holds a JSON
record (key ``"attnspace"``); written to a temporary name, fsynced and renamed, so a
killed job leaves the previous checkpoint or the new one, never half of one. The record
names what the run read (:func:`store_identity` of its training store), so a checkpoint
outlives neither its settings nor its data (:mod:`attnspace.sae.train`).

A failed run (its loss turned NaN or infinite) keeps only its metrics.json, ``status:
failed``; :func:`refuse_failed_run` is how every reader of an SAE folder refuses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from attnspace.errors import AttnspaceError
from attnspace.files import read_safetensors, write_json, write_safetensors
from attnspace.sae.model import TopKSAE

FORMAT = "attnspace-sae/1"
"""Tag in hyperparams.json."""

WEIGHTS = Path("checkpoints") / "final.safetensors"
"""Weights file inside an SAE folder."""


def hook_point(layer: int | None, site: str) -> str:
    """TransformerLens-style hook name used by LlamaScope, e.g. ``blocks.15.hook_attn_out``."""
    return f"blocks.{layer}.hook_{site}" if layer is not None else f"hook_{site}"


def save_sae(sae: TopKSAE, folder: Path, *, metrics: dict | None = None, **info) -> Path:
    """Write ``sae`` to ``folder`` in the LlamaScope layout; ``metrics`` (if given) to metrics.json, last.

    info: extra hyperparams (e.g. model, dataset, layer, site); ``layer`` and ``site``
    also set ``hook_point_in`` / ``hook_point_out``.
    """
    if sae.dataset_norm is None:
        raise ValueError("an SAE is saved with its dataset-wise norm; set sae.dataset_norm")
    folder = Path(folder)
    hook = hook_point(info.get("layer"), info.get("site", "attn_out"))
    hyper = dict(
        d_model=sae.d_model,
        d_sae=sae.d_sae,
        expansion_factor=sae.d_sae / sae.d_model,
        hook_point_in=hook,
        hook_point_out=hook,
        act_fn="topk",
        top_k=sae.k,
        norm_activation="dataset-wise",
        dataset_average_activation_norm={"in": sae.dataset_norm, "out": sae.dataset_norm},
        sparsity_include_decoder_norm=False,
        apply_decoder_bias_to_pre_encoder=bool(sae.centred),
        use_decoder_bias=True,
        format=FORMAT,
        **info,
    )
    write_safetensors(
        {
            "encoder.weight": sae.W_enc,  # [d_sae, d_model]
            "encoder.bias": sae.b_enc,  # [d_sae]
            "decoder.weight": sae.W_dec.T,  # [d_model, d_sae]; column i = latent i
            "decoder.bias": sae.b_dec,  # [d_model]
        },
        folder / WEIGHTS,
    )
    write_json(hyper, folder / "hyperparams.json")
    if metrics is not None:
        write_json(metrics, folder / "metrics.json")
    return folder


def refuse_failed_run(folder: Path | str) -> None:
    """Raise AttnspaceError, naming the failure, when ``folder/metrics.json`` records a failed run."""
    path = Path(folder) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no record of a run here (an SAE from elsewhere): the weights speak for themselves
    if isinstance(metrics, dict) and metrics.get("status") == "failed":
        raise AttnspaceError(f"{folder}: its training run failed ({metrics.get('failure') or 'no reason recorded'}); "
                             "the folder holds no SAE",
                             fix="change the setting that made it diverge (e.g. sae.lr) and rerun snakemake")


def remove_weights(folder: Path | str) -> None:
    """Delete the SAE files of ``folder`` (weights and hyperparams.json), so that a failed run
    leaves no earlier run's SAE under its name."""
    folder = Path(folder)
    (folder / WEIGHTS).unlink(missing_ok=True)
    (folder / "hyperparams.json").unlink(missing_ok=True)
    try:
        (folder / WEIGHTS).parent.rmdir()  # checkpoints/, when nothing else is in it
    except OSError:
        pass


def load_sae(folder: Path, device: torch.device | str = "cpu") -> TopKSAE:
    """Read a TopK SAE folder written by :func:`save_sae` (or any LlamaScope folder with act_fn "topk");
    a failed run's folder is refused."""
    folder = Path(folder)
    refuse_failed_run(folder)
    hyper = json.loads((folder / "hyperparams.json").read_text())
    if hyper.get("act_fn") != "topk":
        raise ValueError(f"{folder}: act_fn {hyper.get('act_fn')!r}; this loader reads TopK SAEs only")
    if hyper.get("sparsity_include_decoder_norm", False) is not False:
        raise ValueError(f"{folder}: sparsity_include_decoder_norm={hyper['sparsity_include_decoder_norm']!r} "
                         "is a TopK variant this SAE class does not implement")
    tensors, _ = read_safetensors(folder / WEIGHTS)
    norm = hyper["dataset_average_activation_norm"]["in"] if hyper.get("norm_activation") == "dataset-wise" else None
    sae = TopKSAE(int(hyper["d_model"]), int(hyper["d_sae"]), int(hyper["top_k"]), dataset_norm=norm)
    with torch.no_grad():
        sae.W_enc.copy_(tensors["encoder.weight"])
        sae.b_enc.copy_(tensors["encoder.bias"])
        sae.W_dec.copy_(tensors["decoder.weight"].T)
        sae.b_dec.copy_(tensors["decoder.bias"])
    sae.centred = bool(hyper.get("apply_decoder_bias_to_pre_encoder", False))
    return sae.to(device)


IDENTITY_SKIPS = ("created", "zarr_version", "store")
"""Manifest fields that a rebuild of the same rows changes: left out of a store's identity."""


def store_identity(store) -> str:
    """What a store holds, as 16 hex digits of SHA-256: its manifest (model, dataset, layer, split,
    rows, sites, every chunk's digest, config hash) without :data:`IDENTITY_SKIPS`."""
    fields = {k: v for k, v in store.manifest.items() if k not in IDENTITY_SKIPS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def file_identity(path: Path | str) -> str:
    """16 hex digits of SHA-256 of a file's bytes (a token file a live stream reads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, tensors: dict[str, Tensor], record: dict) -> Path:
    """One atomic safetensors file: ``tensors`` plus the JSON ``record`` in its header."""
    return write_safetensors(tensors, path, metadata={"attnspace": json.dumps(record, sort_keys=True)})


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, record) of a file written by :func:`save_checkpoint`."""
    tensors, meta = read_safetensors(path)
    return tensors, json.loads(meta["attnspace"])


def checkpoint_record(path: Path) -> dict:
    """The JSON record of a checkpoint, read from its header alone (no tensor is loaded); raises
    on a file that is not a whole safetensors file with a record (safetensors refuses a header
    whose tensors do not exactly cover the file: truncated or extended)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    record = json.loads(meta["attnspace"])
    if not isinstance(record, dict):
        raise ValueError("the record is not a JSON object")
    return record
