"""Dead-feature evaluation of any LlamaScope-format SAE on a cached activation store.

A feature is dead when it never activates (value > 0) over an evaluation window of
N held-out non-BOS/EOS tokens; N is always reported with the count.
The SAE reads and reconstructs one site (LlamaScope's A/M/R SAEs: hook_point_in =
hook_point_out), so NMSE compares the site with its reconstruction.
"""

from __future__ import annotations

import torch

from attnspace.llamascope import LlamaScopeSAE, check_sae
from attnspace.sae.losses import ReconstructionStats, dead_fraction
from attnspace.spectrum import THRESHOLD
from attnspace.store import Store

FREQUENCY_BUCKETS = (1e-6, 1e-5)
"""Firing-frequency limits reported with the dead count (features rarer than each)."""


def evaluate_dead_features(sae: LlamaScopeSAE, store: Store, site: str, n_tokens: int | None = None,
                           batch_rows: int = 4096) -> dict:
    """Fire counts, dead features, L0 and NMSE over the first ``n_tokens`` kept rows (all if None)."""
    # however the SAE was loaded: finite numbers, and the same width, layer and site as the store
    check_sae(sae, sae.source or "the SAE", site=site, layer=store.layer, d_model=store.width(site))
    fires = torch.zeros(sae.d_sae, dtype=torch.int64)
    stats = ReconstructionStats()
    seen, active = 0, 0
    limit = store.n_kept if n_tokens is None else min(n_tokens, store.n_kept)
    for start in range(0, store.n_rows, batch_rows):
        if seen >= limit:
            break
        x = torch.from_numpy(store.rows(site, start, min(start + batch_rows, store.n_rows)))[: limit - seen]
        with torch.no_grad():
            acts = sae.encode(x)
            stats.add(x, sae.decode(acts))
        on = acts > 0
        fires += on.sum(0)
        active += int(on.sum())
        seen += x.shape[0]
    if seen == 0:
        raise ValueError(f"{store.path}: no kept (non-BOS/EOS) rows to evaluate.")
    freq = fires.double() / seen
    record = {
        "d_sae": sae.d_sae, "n_tokens": seen, "dead": int((fires == 0).sum()),
        "dead_fraction": dead_fraction(fires > 0), "l0": active / seen, "nmse": stats.nmse,
        "act_fn": sae.act_fn, "decoder_norms_folded": sae.decoder_norms_folded,
    }
    for limit_freq in FREQUENCY_BUCKETS:
        record[f"frequency_below_{limit_freq:g}"] = int((freq < limit_freq).sum())
    return record


DEAD_FEATURES_COLUMNS = ["model", "dataset", "layer", "site", "d_sae", "n_tokens", "dead", "dead_fraction",
                         "intrinsic_dim_fraction"]


def dead_features_table(records: list[dict], idim, threshold: float = THRESHOLD):
    """results/tables/dead_features.csv: each suite SAE's dead count beside its site's intrinsic dimension.

    records: dicts of :func:`evaluate_dead_features` plus model, dataset, layer, site;
    idim: the intrinsic_dim table (fraction at ``threshold`` is joined).
    """
    import pandas as pd

    ids = idim[idim["threshold"] == threshold][["model", "dataset", "layer", "site", "fraction"]]
    frame = pd.DataFrame(records).merge(ids, on=["model", "dataset", "layer", "site"], how="left")
    if frame["fraction"].isna().any():
        missing = frame[frame["fraction"].isna()][["model", "dataset", "layer", "site"]].to_dict("records")
        raise ValueError(f"no intrinsic dimension at {threshold} for {missing}")
    frame = frame.rename(columns={"fraction": "intrinsic_dim_fraction"})
    return frame[DEAD_FEATURES_COLUMNS].sort_values(["model", "dataset", "site", "layer"]).reset_index(drop=True)


def dead_vs_dimension(table) -> dict:
    """Spearman rank correlation of dead fraction and intrinsic dimension across layers and sites."""
    from scipy.stats import spearmanr

    result = spearmanr(table["dead_fraction"], table["intrinsic_dim_fraction"])
    return {"spearman_rho": float(result.statistic), "p_value": float(result.pvalue), "n": int(len(table))}
