"""Table 1: dead parameters, dead heads and NMSE of each Lorsa init, as csv rows and markdown."""

from __future__ import annotations

import pandas as pd

from attnspace.lorsa.init import INITS

TABLE1_COLUMNS = ("model", "dataset", "layer", "init", "n_ov_heads", "n_qk_heads", "k", "dead_heads",
                  "dead_param_fraction", "nmse", "n_eval_tokens")
"""Columns of results/tables/table1_lorsa.csv, in order."""


def table1_frame(rows: list[dict]) -> pd.DataFrame:
    """Table 1 rows (metrics dicts of :func:`train_lorsa`) -> DataFrame with :data:`TABLE1_COLUMNS`."""
    return pd.DataFrame([{c: r[c] for c in TABLE1_COLUMNS} for r in rows], columns=list(TABLE1_COLUMNS))


def table1_markdown(frame: pd.DataFrame) -> str:
    """The paper's layout: one column per init, rows dead parameters (%), dead heads and NMSE, per site."""
    lines = []
    for (model, dataset, layer), part in frame.groupby(["model", "dataset", "layer"], sort=True):
        part = part.set_index("init")
        inits = [i for i in INITS if i in part.index] + [i for i in part.index if i not in INITS]
        first = part.iloc[0]
        lines += [f"### {model} / {dataset} / layer {layer}", "",
                  (f"{first.n_ov_heads} OV heads, {first.n_qk_heads} QK heads, k = {first.k}; "
                   f"evaluated on {first.n_eval_tokens} held-out tokens."), "",
                  "| | " + " | ".join(inits) + " |", "|---|" + "---|" * len(inits),
                  "| Dead parameters (%) | " + " | ".join(f"{100 * part.loc[i, 'dead_param_fraction']:.1f}"
                                                       for i in inits) + " |",
                  "| Dead heads | " + " | ".join(f"{int(part.loc[i, 'dead_heads'])}" for i in inits) + " |",
                  "| Normalized MSE | " + " | ".join(f"{part.loc[i, 'nmse']:.3f}" for i in inits) + " |", ""]
    return "\n".join(lines)
