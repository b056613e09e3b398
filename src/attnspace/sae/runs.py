"""Names of SAE training runs and the table of all runs.

A run is named ``{init}-d{d_init}-{optimizer}-n{d_sae}-k{k}[-auxk]`` (d_init 0 for
the base init), e.g. ``asi-d64-adam-n4608-k32``; it is the last folder of
``results/saes/{model}/{dataset}/L{layer}/{site}/{run}/``. This module is the one
place that writes and reads the name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

RUN = re.compile(r"^(?P<init>base|asi|random_subspace)-d(?P<d_init>\d+)-(?P<optimizer>adam|sparse_adam)"
                 r"-n(?P<d_sae>\d+)-k(?P<k>\d+)(?P<auxk>-auxk)?$")
RUN_PATH = re.compile(r"(?P<model>[^/]+)/(?P<dataset>[^/]+)/L(?P<layer>\d+)/(?P<site>[a-z_]+)/(?P<run>[^/]+)/metrics\.json$")

RUN_COLUMNS = ["model", "dataset", "layer", "site", "run", "init", "d_init", "optimizer", "auxk", "d_sae", "k",
               "tokens_trained", "nmse", "explained_variance", "l0", "dead_fraction", "n_dead",
               "dead_window_tokens", "delta_lm_loss", "lm_loss_recovered", "tokens_per_second", "status", "failure"]


def run_name(init: str, d_init: int | None, optimizer: str, d_sae: int, k: int, auxk: bool = False) -> str:
    name = f"{init}-d{0 if init == 'base' else int(d_init)}-{optimizer}-n{d_sae}-k{k}"
    return name + ("-auxk" if auxk else "")


def parse_run_name(run: str) -> dict:
    """init, d_init (None for base), optimizer, d_sae, k, auxk of a run name."""
    m = RUN.match(run)
    if not m:
        raise ValueError(f"{run!r} is not a run name like 'asi-d64-adam-n4608-k32' "
                         "(init-d<d_init>-optimizer-n<d_sae>-k<k>[-auxk]).")
    return dict(init=m["init"], d_init=None if m["init"] == "base" else int(m["d_init"]),
                optimizer=m["optimizer"], d_sae=int(m["d_sae"]), k=int(m["k"]), auxk=bool(m["auxk"]))


def runs_table(metrics_paths: list[str | Path]) -> pd.DataFrame:
    """One row per trained SAE from its metrics.json; a run whose metrics hold no finite NMSE is 'failed'."""
    rows = []
    for path in metrics_paths:
        m = RUN_PATH.search(str(path))
        if not m:
            raise ValueError(f"{path} is not saes/{{model}}/{{dataset}}/L{{layer}}/{{site}}/{{run}}/metrics.json")
        metrics = json.loads(Path(path).read_text())
        row = {**m.groupdict(), "layer": int(m["layer"]), **parse_run_name(m["run"]), **metrics}
        nmse = row.get("nmse")
        finite = isinstance(nmse, (int, float)) and nmse == nmse and abs(nmse) != float("inf")
        row["status"] = "ok" if finite and metrics.get("status", "ok") == "ok" else "failed"
        rows.append({c: row.get(c) for c in RUN_COLUMNS})
    return pd.DataFrame(rows, columns=RUN_COLUMNS)
