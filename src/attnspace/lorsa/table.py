"""Table 1: dead parameters, dead heads and NMSE of each Lorsa init, as csv rows and markdown.

A failed run (its loss turned non-finite: ``status`` failed) stays a row of the csv, its
measurements empty; the markdown leaves it out of the means, shows "failed" where an init has
no run left, and lists every failed run under its table with the reason.
"""

from __future__ import annotations

import pandas as pd

from attnspace.lorsa.init import INITS

TABLE1_COLUMNS = ("model", "dataset", "layer", "init", "seed", "n_ov_heads", "n_qk_heads", "k", "dead_heads",
                  "dead_param_fraction", "nmse", "n_eval_tokens", "status", "failure")
"""Columns of results/tables/table1_lorsa.csv, in order."""

_RUN_STATUS = {"status": "ok", "failure": None}
"""Metrics written before runs recorded their status were all of finished runs."""

_MEASURED = ["dead_param_fraction", "dead_heads", "nmse"]


def table1_frame(rows: list[dict]) -> pd.DataFrame:
    """Table 1 rows (metrics dicts of :func:`train_lorsa`) -> DataFrame with :data:`TABLE1_COLUMNS`."""
    return pd.DataFrame([{c: r[c] if c in r or c not in _RUN_STATUS else _RUN_STATUS[c] for c in TABLE1_COLUMNS}
                         for r in rows], columns=list(TABLE1_COLUMNS))


def table1_markdown(frame: pd.DataFrame) -> str:
    """The paper's layout: one column per init, rows dead parameters (%), dead heads and NMSE, per site;
    with several seeds, each cell is the mean ± the standard deviation over seeds (ddof 1). Failed runs
    are left out of every cell and listed below the table."""
    lines = []
    for (model, dataset, layer), site in frame.groupby(["model", "dataset", "layer"], sort=True):
        failed = site[site["status"] == "failed"]
        runs = site[site["status"] != "failed"].astype({c: float for c in _MEASURED})
        n_seeds = runs.groupby("init")["seed"].nunique().min() if len(runs) else 0
        mean = runs.groupby("init")[_MEASURED].mean()
        std = runs.groupby("init")[_MEASURED].std(ddof=1)

        def cell(i, col, fmt, scale=1.0):
            if i not in mean.index:
                return "failed"
            text = format(scale * mean.loc[i, col], fmt)
            return text + (f" ± {format(scale * std.loc[i, col], fmt)}" if n_seeds > 1 else "")

        present = list(dict.fromkeys(site["init"]))
        inits = [i for i in INITS if i in present] + [i for i in present if i not in INITS]
        first = site.iloc[0]
        seeds = {0: "no run finished.", 1: "one seed."}.get(n_seeds, f"mean ± standard deviation over {n_seeds} seeds.")
        lines += [f"### {model} / {dataset} / layer {layer}", "",
                  (f"{first.n_ov_heads} OV heads, {first.n_qk_heads} QK heads, k = {first.k}; "
                   + (f"evaluated on {int(runs.iloc[0].n_eval_tokens)} held-out tokens; " if len(runs) else "")
                   + seeds), "",
                  "| | " + " | ".join(inits) + " |", "|---|" + "---|" * len(inits),
                  "| Dead parameters (%) | " + " | ".join(cell(i, "dead_param_fraction", ".1f", 100.0)
                                                       for i in inits) + " |",
                  "| Dead heads | " + " | ".join(cell(i, "dead_heads", ".1f" if n_seeds > 1 else ".0f")
                                                for i in inits) + " |",
                  "| Normalized MSE | " + " | ".join(cell(i, "nmse", ".3f") for i in inits) + " |", ""]
        lines += [f"Failed, left out: {r.init} seed {r.seed} ({r.failure})." for r in failed.itertuples()]
        lines += [""] if len(failed) else []
    return "\n".join(lines)
