"""Table 1: dead parameters, dead heads and NMSE of each Lorsa init, as csv rows and markdown."""

from __future__ import annotations

import pandas as pd

from attnspace.lorsa.init import INITS

TABLE1_COLUMNS = ("model", "dataset", "layer", "init", "seed", "n_ov_heads", "n_qk_heads", "k", "dead_heads",
                  "dead_param_fraction", "nmse", "n_eval_tokens")
"""Columns of results/tables/table1_lorsa.csv, in order."""


def table1_frame(rows: list[dict]) -> pd.DataFrame:
    """Table 1 rows (metrics dicts of :func:`train_lorsa`) -> DataFrame with :data:`TABLE1_COLUMNS`."""
    return pd.DataFrame([{c: r[c] for c in TABLE1_COLUMNS} for r in rows], columns=list(TABLE1_COLUMNS))


def table1_markdown(frame: pd.DataFrame) -> str:
    """The paper's layout: one column per init, rows dead parameters (%), dead heads and NMSE, per site;
    with several seeds, each cell is the mean ± the standard deviation over seeds (ddof 1)."""
    lines = []
    for (model, dataset, layer), runs in frame.groupby(["model", "dataset", "layer"], sort=True):
        n_seeds = runs.groupby("init")["seed"].nunique().min()
        mean = runs.groupby("init")[["dead_param_fraction", "dead_heads", "nmse"]].mean()
        std = runs.groupby("init")[["dead_param_fraction", "dead_heads", "nmse"]].std(ddof=1)
        part = runs.drop_duplicates("init").set_index("init")
        part[["dead_param_fraction", "dead_heads", "nmse"]] = mean

        def cell(i, col, fmt, scale=1.0):
            text = format(scale * part.loc[i, col], fmt)
            return text + (f" ± {format(scale * std.loc[i, col], fmt)}" if n_seeds > 1 else "")

        inits = [i for i in INITS if i in part.index] + [i for i in part.index if i not in INITS]
        first = part.iloc[0]
        lines += [f"### {model} / {dataset} / layer {layer}", "",
                  (f"{first.n_ov_heads} OV heads, {first.n_qk_heads} QK heads, k = {first.k}; "
                   f"evaluated on {first.n_eval_tokens} held-out tokens; "
                   + (f"mean ± standard deviation over {n_seeds} seeds." if n_seeds > 1 else "one seed.")), "",
                  "| | " + " | ".join(inits) + " |", "|---|" + "---|" * len(inits),
                  "| Dead parameters (%) | " + " | ".join(cell(i, "dead_param_fraction", ".1f", 100.0)
                                                       for i in inits) + " |",
                  "| Dead heads | " + " | ".join(cell(i, "dead_heads", ".1f" if n_seeds > 1 else ".0f")
                                                for i in inits) + " |",
                  "| Normalized MSE | " + " | ".join(cell(i, "nmse", ".3f") for i in inits) + " |", ""]
    return "\n".join(lines)
