"""Atomic writes for the small files each stage leaves (JSON records, CSV tables).

A job killed mid-write leaves a ``*.tmp`` file, never a half-written output that
a downstream rule would accept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd


def write_json(record: dict, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_csv(frame: pd.DataFrame, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path
