"""Atomic writes for the files each stage leaves (JSON records, CSV tables, .npz arrays,
safetensors weights), and the safetensors reader that goes with them.

A job killed mid-write leaves a ``*.tmp`` file, never a half-written output that
a downstream rule would accept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def write_json(record: dict, path: Path | str) -> Path:
    """JSON (sorted keys), flushed to disk before it is renamed into place."""
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "w") as f:
        f.write(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_text(text: str, path: Path | str) -> Path:
    """A text file (Markdown, reStructuredText), written to a temporary name and renamed into place."""
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _c_order(value) -> np.ndarray:
    a = np.asarray(value)
    return a if a.flags.c_contiguous else a.copy(order="C")


def write_npz(path: Path | str, **arrays) -> Path:
    """An uncompressed .npz of contiguous arrays (see the safetensors pitfall in REFERENCE.md)."""
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.savez(f, **{k: _c_order(v) for k, v in arrays.items()})
    os.replace(tmp, path)
    return path


def write_csv(frame: pd.DataFrame, path: Path | str) -> Path:
    path = Path(path)
    tmp = _tmp(path)
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def write_safetensors(tensors: dict, path: Path | str, metadata: dict[str, str] | None = None) -> Path:
    """Contiguous CPU copies of torch ``tensors`` to ``path``, atomically (tmp, fsync, rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp(path)
    # Contiguous copies: a transposed view would be refused (torch) or silently
    # scrambled (numpy), see REFERENCE.md.
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_safetensors(path: Path | str) -> tuple[dict, dict[str, str]]:
    """(torch tensors, header metadata) of a safetensors file. Never pickle."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
