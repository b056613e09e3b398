"""Lorsa files: a folder with ``lorsa.safetensors`` (contiguous tensors) and ``lorsa.json``
(config, width, normalisation norms, RoPE scaling, provenance), and metrics.json. A failed run's
folder holds its metrics.json alone (``status: failed``); :func:`load_lorsa` refuses it, naming
the failure."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from attnspace.errors import AttnspaceError
from attnspace.files import read_safetensors, write_json, write_safetensors
from attnspace.lorsa.config import LorsaConfig
from attnspace.lorsa.model import TOPK_VARIANT, Lorsa
from attnspace.lorsa.rope import Rope

FORMAT = "attnspace-lorsa/1"
"""Tag in lorsa.json."""

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


def remove_lorsa(folder: Path | str) -> None:
    """Delete the Lorsa files of ``folder`` (weights and lorsa.json): a failed run leaves no earlier run's Lorsa."""
    for name in (WEIGHTS_FILE, META_FILE):
        (Path(folder) / name).unlink(missing_ok=True)


def refuse_failed_run(folder: Path | str) -> None:
    """AttnspaceError, naming the failure, when ``folder/metrics.json`` records a failed run."""
    try:
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(metrics, dict) and metrics.get("status") == "failed":
        raise AttnspaceError(f"{folder}: its Lorsa training run failed ({metrics.get('failure')}); the folder holds "
                             "no Lorsa", fix="lower lorsa.lr (or change what made it diverge) and rerun snakemake")


def load_lorsa(folder: Path) -> Lorsa:
    """Read a Lorsa written by :func:`save_lorsa` (CPU); a failed run's folder is refused."""
    folder = Path(folder)
    refuse_failed_run(folder)
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
