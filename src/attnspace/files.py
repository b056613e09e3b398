"""Atomic writes for the files each stage leaves (JSON records, CSV tables, .npz arrays,
safetensors weights), and the safetensors reader that goes with them.

A job killed mid-write leaves a hidden ``.*.tmp-<pid>`` file, never a half-written output that
a downstream rule would accept.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd


@contextmanager
def atomic_path(path: Path | str, sync: bool = True) -> Iterator[Path]:
    """The one way outputs are written: yield a temporary path beside ``path`` (its name
    carries the writer's pid), then fsync it and rename it into place. On any error the
    temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if sync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """:func:`atomic_path` for a folder: yield an empty temporary folder beside ``path`` (its name
    carries the writer's pid); when the block ends, it replaces ``path`` (removed first if it
    exists). On any error the temporary folder is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process with this pid, which is gone
    tmp.mkdir()
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(record: dict, path: Path | str) -> Path:
    """JSON (sorted keys), flushed to disk before it is renamed into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_text(text: str, path: Path | str) -> Path:
    """A text file (Markdown, reStructuredText), written to a temporary name and renamed into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _c_order(value) -> np.ndarray:
    a = np.asarray(value)
    return a if a.flags.c_contiguous else a.copy(order="C")


def write_npz(path: Path | str, **arrays) -> Path:
    """An uncompressed .npz of C-contiguous arrays (numpy writes a view's memory order, so copy first)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: _c_order(v) for k, v in arrays.items()})
    return Path(path)


def write_csv(frame: pd.DataFrame, path: Path | str) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def write_safetensors(tensors: dict, path: Path | str, metadata: dict[str, str] | None = None) -> Path:
    """Contiguous CPU copies of torch ``tensors`` to ``path``, atomically (tmp, fsync, rename)."""
    from safetensors.torch import save_file

    # Contiguous copies: save_file refuses a non-contiguous tensor (a transposed view).
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def read_safetensors(path: Path | str) -> tuple[dict, dict[str, str]]:
    """(torch tensors, header metadata) of a safetensors file. Never pickle."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
