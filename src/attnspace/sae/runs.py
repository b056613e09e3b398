"""Names of SAE training runs and the table of all runs.

A run is named ``{init}-d{d_init}-{optimizer}-n{d_sae}-k{k}[-auxk][-c][-r{replicate}]``
(d_init 0 for the base init; ``-c`` the centred form; ``-r{n}`` the n-th replicate, seeded
``sae.seed + n``, none for replicate 0), e.g. ``asi-d64-adam-n4608-k32-c-r2``; it is the last folder of
``results/saes/{model}/{dataset}/L{layer}/{site}/{run}/``. This module is the one
place that writes and reads the name.

The sweeps of Figures 6 and 7 compare named *variants* (:data:`VARIANTS`): each is an
(init, optimizer, AuxK) triple, so a variant at a given size, k and d_init is one run
name, and a run shared by several figures (e.g. base TopK at 8x and the focus k) is
trained once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

RUN = re.compile(r"^(?P<init>base|asi|random_subspace)-d(?P<d_init>\d+)-(?P<optimizer>adam|sparse_adam|masked_adam)"
                 r"-n(?P<d_sae>\d+)-k(?P<k>\d+)(?P<auxk>-auxk)?(?P<centred>-c)?(?:-r(?P<replicate>[1-9]\d*))?$")
RUN_PATH = re.compile(r"(?P<model>[^/]+)/(?P<dataset>[^/]+)/L(?P<layer>\d+)/(?P<site>[a-z_]+)/(?P<run>[^/]+)/metrics\.json$")

RUN_COLUMNS = ["model", "dataset", "layer", "site", "run", "variant", "init", "d_init", "optimizer", "auxk", "d_sae", "k",
               "centred", "replicate", "seed",
               "lr", "tokens_trained", "nmse", "train_nmse", "explained_variance", "l0", "dead_fraction", "n_dead",
               "dead_window_tokens", "delta_lm_loss", "lm_loss_recovered", "tokens_per_second", "status", "failure",
               "dead_fraction_quarter_window", "dead_fraction_half_window"]


VARIANTS = {
    "topk": ("base", "adam", False),
    "topk_auxk": ("base", "adam", True),
    "asi": ("asi", "adam", False),
    "asi_sparseadam": ("asi", "sparse_adam", False),
    "asi_maskedadam": ("asi", "masked_adam", False),
}
"""Sweep variant -> (init, optimizer, auxk): TopK, TopK + AuxK, ASI, ASI + SparseAdam (Figures 6, 7), and
ASI with the authors' masked sparse Adam (attnspace.sae.optim.MaskedAdam), for Figure 7's comparison of the rules."""

VARIANT_LABELS = {
    "topk": "TopK",
    "topk_auxk": "TopK + AuxK",
    "asi": "Active Subspace Init",
    "asi_sparseadam": "ASI + SparseAdam",
    "asi_maskedadam": "ASI + masked Adam (authors' rule)",
}


def variant_run(variant: str, d_sae: int, k: int, d_init: int, centred: bool = False, replicate: int = 0) -> str:
    """The run name of a sweep variant (d_init applies to the ASI variants only)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAE variant {variant!r}; choose from {', '.join(VARIANTS)}")
    init, optimizer, auxk = VARIANTS[variant]
    return run_name(init, d_init if init != "base" else None, optimizer, d_sae, k, auxk, centred, replicate)


def variant_of(init: str, optimizer: str, auxk: bool) -> str | None:
    """The sweep variant a run belongs to, or None (e.g. a random-subspace control)."""
    for name, triple in VARIANTS.items():
        if triple == (init, optimizer, bool(auxk)):
            return name
    return None


def run_name(init: str, d_init: int | None, optimizer: str, d_sae: int, k: int, auxk: bool = False,
             centred: bool = False, replicate: int = 0) -> str:
    name = f"{init}-d{0 if init == 'base' else int(d_init)}-{optimizer}-n{d_sae}-k{k}"
    return name + ("-auxk" if auxk else "") + ("-c" if centred else "") + (f"-r{int(replicate)}" if replicate else "")


def parse_run_name(run: str) -> dict:
    """init, d_init (None for base), optimizer, d_sae, k, auxk, centred, replicate of a run name."""
    m = RUN.match(run)
    if not m:
        raise ValueError(f"{run!r} is not a run name like 'asi-d64-adam-n4608-k32' "
                         "(init-d<d_init>-optimizer-n<d_sae>-k<k>[-auxk][-c][-r<replicate>]).")
    return dict(init=m["init"], d_init=None if m["init"] == "base" else int(m["d_init"]),
                optimizer=m["optimizer"], d_sae=int(m["d_sae"]), k=int(m["k"]), auxk=bool(m["auxk"]),
                centred=bool(m["centred"]), replicate=int(m["replicate"] or 0))


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
        row["variant"] = variant_of(row["init"], row["optimizer"], row["auxk"])
        rows.append({c: row.get(c) for c in RUN_COLUMNS})
    return pd.DataFrame(rows, columns=RUN_COLUMNS)
