"""Report captions: what a figure shows (docs/captions/<name>.rst, fixed text) and the numbers
behind it in this run (one sentence per figure, computed here from the rows it drew).

``attnspace figure`` writes ``results/figures/<name>.caption.rst`` beside the figure;
the Snakemake report shows it under the figure. The numbers come from the same
functions as the claims table (:mod:`attnspace.claims`), so a caption and its claim
cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from attnspace.claims import attention_lowest, tail_drops

SITES = ("attn_out", "mlp_out", "resid_post")


def _per_model(data: pd.DataFrame, fmt: Callable[[pd.DataFrame], str]) -> str:
    return "; ".join(f"{model}: {fmt(g)}" for model, g in data.groupby("model", sort=False))


def _idim(data: pd.DataFrame) -> str:
    parts = []
    for tau in sorted(data["threshold"].unique()):
        cases = attention_lowest(data, tau)

        def fmt(g):
            return (f"attention lowest in {int(g['attn_lowest'].sum())}/{len(g)} (dataset, layer) cases, mean fraction "
                    + ", ".join(f"{s} {g[s].mean():.2f}" for s in SITES))

        parts.append(f"at τ = {tau:g}, " + _per_model(cases, fmt))
    return ". ".join(parts)


def _spectra(data: pd.DataFrame) -> str:
    counts = data.drop_duplicates(["model", "dataset", "layer", "site"])
    return "singular values above 5% of the largest: " + "; ".join(
        f"{m}/{d} L{L}: " + ", ".join(f"{r.site} {int(r.n_above_5pct)}" for r in g.itertuples())
        for (m, d, L), g in counts.groupby(["model", "dataset", "layer"], sort=False))


def _fig2b(data: pd.DataFrame, summary: pd.DataFrame | None = None) -> str:
    if summary is None:
        return ""
    return "fraction of dimensions recovering the target share of the loss: " + _per_model(
        summary, lambda g: ", ".join(f"{r.site} {r.k_fraction:.1%}" if r.k_fraction == r.k_fraction
                                     else f"{r.site} never" for r in g.itertuples()))


def _fig3(data: pd.DataFrame) -> str:
    return "over the last 10% of O's directions: " + "; ".join(
        f"{r.model} L{r.layer}: O drops {r.drop_o:.2f} decades, {r.drop_wo:.2f} of them from W^O, "
        f"{r.drop_z:.2f} from Z" for r in tail_drops(data).itertuples())


def _fig4(data: pd.DataFrame) -> str:
    from attnspace.dead_features import dead_vs_dimension

    r = dead_vs_dimension(data)
    means = data.groupby("site", sort=False)[["dead_fraction", "intrinsic_dim_fraction"]].mean()
    return (f"Spearman ρ = {r['spearman_rho']:+.2f} (p = {r['p_value']:.2g}, n = {r['n']}); mean dead fraction "
            + ", ".join(f"{s} {v.dead_fraction:.2f} (intrinsic dim. {v.intrinsic_dim_fraction:.2f})"
                        for s, v in means.iterrows()))


def _fig5(data: pd.DataFrame) -> str:
    ok = data[data["status"] == "ok"]
    base = ok[ok["init"] == "base"]
    parts = [f"{init} " + ", ".join(f"d_init {int(r.d_init)}: dead {r.dead_fraction:.2f}, NMSE {r.nmse:.3f}"
                                    for r in ok[ok["init"] == init].sort_values("d_init").itertuples())
             for init in ("asi", "random_subspace")]
    if len(base):
        parts.append(f"base dead {base['dead_fraction'].iloc[0]:.2f}, NMSE {base['nmse'].iloc[0]:.3f}")
    return "; ".join(parts)


def _fig6(data: pd.DataFrame) -> str:
    ok = data[data["status"] == "ok"]
    return "held-out NMSE by k: " + "; ".join(
        f"{v}: " + ", ".join(f"k {int(r.k)} {r.nmse:.3f}" for r in g.sort_values("k").itertuples())
        for v, g in ok.groupby("variant", sort=False))


def _fig7(data: pd.DataFrame) -> str:
    ok = data[data["status"] == "ok"]
    top = ok[ok["d_sae"] == ok["d_sae"].max()]
    fits = ok.drop_duplicates("variant")
    return ("fitted exponents b: " + ", ".join(f"{r.variant} {r.fit_exponent:.3f}" for r in fits.itertuples())
            + f"; at {int(top['d_sae'].max())} latents, NMSE / dead fraction: "
            + ", ".join(f"{r.variant} {r.nmse:.3f} / {r.dead_fraction:.2f}" for r in top.itertuples()))


def _convergence(data: pd.DataFrame) -> str:
    ends = data.groupby(["model", "dataset", "layer", "site"], sort=False)["n_tokens"].transform("max")
    last = data[data["n_tokens"] == ends].set_index(["model", "dataset", "layer", "site"])["fraction"]
    half_n = data[data["n_tokens"] < ends].groupby(["model", "dataset", "layer", "site"], sort=False)["n_tokens"].max()
    half = data.set_index(["model", "dataset", "layer", "site", "n_tokens"])["fraction"].reindex(
        [(*key, n) for key, n in half_n.items()])
    change = last.reindex(half_n.index).to_numpy() - half.to_numpy()
    return (f"in the last doubling of tokens the fraction moved by more than 0.01 in {int((abs(change) > 0.01).sum())}"
            f" of {change.size} (model, dataset, layer, site) rows; mean change "
            + ", ".join(f"{s} {change[half_n.index.get_level_values('site') == s].mean():+.3f}" for s in SITES
                        if (half_n.index.get_level_values("site") == s).any()))


NUMBERS: dict[str, Callable[..., str]] = {
    "fig1": _idim, "fig9": _idim, "fig2a": _spectra, "fig8": _spectra, "fig2b": _fig2b, "fig3": _fig3,
    "fig4": _fig4, "fig5": _fig5, "fig6": _fig6, "fig7": _fig7, "convergence": _convergence,
}
"""Figure -> the sentence of numbers under its caption."""


def caption(name: str, text: str, data: pd.DataFrame, **extra) -> str:
    """The fixed caption ``text`` of figure ``name`` followed by this run's numbers."""
    numbers = NUMBERS[name](data, **extra) if not data.empty else "no rows drawn"
    failed = int((data["status"] != "ok").sum()) if "status" in data else 0
    tail = f" {failed} failed run(s), listed in the figure's csv." if failed else ""
    return f"{text.strip()}\n\nThis run: {numbers}.{tail}\n"
