"""The verdict: each claim of the paper, the number this run measured for it, and whether it holds.

One function per claim (``c1`` .. ``c7``) reads the data behind a figure or table (the
csv written beside it) and returns rows of :data:`COLUMNS`. The rules are fixed here,
before any run, and stated in each row's ``test`` column:

* a claim is tested on one or more *cases* (a layer, a d_init, a grid point, ...);
  ``measured`` gives the count of cases where it holds and the numbers behind them;
* **verdict**: ``holds`` when it holds in a strict majority of its cases (in the one
  case, when there is one), ``does not hold`` otherwise, ``not run`` when the data
  behind it was not produced by this configuration (its figure is not configured).

No threshold depends on the outcome: the majority rule and each claim's test are the
same for every configuration and scale.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from attnspace.defaults import schema_default

COLUMNS = ["claim", "statement", "tested_on", "measured", "paper", "test", "verdict"]

HOLDS, FAILS, NOT_RUN = "holds", "does not hold", "not run"

TAIL = 0.10
"""C2: the tail of the attention spectrum is its last 10% of principal directions."""
TAIL_WINDOW = 5
"""C2: each end of the tail is the mean log10 over this many directions (one direction is noisy)."""
THRESHOLD = schema_default("spectrum.threshold")
"""C1's default variance threshold (the config's main one)."""
ALPHA = 0.05
"""C3: significance level of the Spearman test."""


def _verdict(n_hold: int, n_cases: int) -> str:
    if n_cases == 0:
        return NOT_RUN
    return HOLDS if n_hold * 2 > n_cases else FAILS


def _row(claim: str, statement: str, tested_on: str, measured: str, paper: str, test: str, verdict: str) -> dict:
    return dict(claim=claim, statement=statement, tested_on=tested_on, measured=measured, paper=paper, test=test,
                verdict=verdict)


def _not_run(claim: str, statement: str, paper: str, test: str, why: str) -> list[dict]:
    return [_row(claim, statement, "-", f"not run: {why}", paper, test, NOT_RUN)]


def _pairs(df: pd.DataFrame) -> str:
    return ", ".join(f"{m}/{d}" for m, d in df[["model", "dataset"]].drop_duplicates().itertuples(index=False))


# ----------------------------------------------------------------------------- C1

C1 = "Attention outputs have the lowest intrinsic dimension of the three sites."
C1_PAPER = "Llama-3.1-8B and three other models, every layer: attention ~60% of d vs MLP output and residual > 90%"


def c1_test(threshold: float) -> str:
    return (f"per (model, dataset, layer): the fraction of directions for {threshold:g} of the variance is lower for "
            "attn_out than for mlp_out and resid_post; share of cases")


def attention_lowest(idim: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per (model, dataset, layer): the three sites' fractions at ``threshold`` and whether attention is lowest."""
    sel = idim[(idim["threshold"] == threshold) & idim["site"].isin(["attn_out", "mlp_out", "resid_post"])]
    wide = sel.pivot_table(index=["model", "dataset", "layer"], columns="site", values="fraction").dropna()
    wide["attn_lowest"] = (wide["attn_out"] < wide["mlp_out"]) & (wide["attn_out"] < wide["resid_post"])
    wide["attn_below_mlp"] = wide["attn_out"] < wide["mlp_out"]
    return wide.reset_index()


def c1(idim: pd.DataFrame | None, threshold: float = THRESHOLD) -> list[dict]:
    """C1 at the main variance ``threshold`` (the config's ``spectrum.threshold``)."""
    test = c1_test(threshold)
    if idim is None:
        return _not_run("C1", C1, C1_PAPER, test, "fig1 is not configured")
    cases = attention_lowest(idim, threshold)
    groups = [(f"{m}/{d}", g) for (m, d), g in cases.groupby(["model", "dataset"], sort=False)]
    groups.append((f"all: {_pairs(cases)}", cases))
    rows = []
    for name, g in groups:
        n, hold = len(g), int(g["attn_lowest"].sum())
        measured = (f"attention lowest in {hold}/{n} layers; below MLP in {int(g['attn_below_mlp'].sum())}/{n}; "
                    f"mean fraction attn {g['attn_out'].mean():.2f}, mlp {g['mlp_out'].mean():.2f}, "
                    f"resid {g['resid_post'].mean():.2f}")
        rows.append(_row("C1", C1, name, measured, C1_PAPER, test, _verdict(hold, n)))
    return rows


# ----------------------------------------------------------------------------- C2

C2 = "W^O's anisotropy, not Z, shapes the tail of the attention output's spectrum."
C2_PAPER = "Llama-3.1-8B layer 15: O follows Z for the top directions; the tail drop is mainly W^O's (Figure 3)"
C2_TEST = (f"over the last {TAIL:.0%} of O's principal directions, log10 Var(O e_i) = log10 Var(Z v_i) + "
           f"log10 ||W^O e_i||^2 drops; holds if ||W^O e_i||^2 drops by more decades than Var(Z v_i) "
           f"(ends: mean over {TAIL_WINDOW} directions)")


def tail_drops(wo: pd.DataFrame) -> pd.DataFrame:
    """Per (model, dataset, layer): decades dropped over the spectrum's tail by O, W^O's and Z's terms.

    drop_o = drop_wo + drop_z exactly, since var_o = wo_contrib * z_contrib.
    """
    rows = []
    for (model, dataset, layer), g in wo.groupby(["model", "dataset", "layer"], sort=False):
        g = g.sort_values("i")
        tail = g[g["i"] > (1 - TAIL) * g["i"].max()]
        w = max(1, min(TAIL_WINDOW, len(tail) // 2))

        def drop(col: str) -> float:
            logs = np.log10(tail[col].to_numpy(float))
            return float(logs[:w].mean() - logs[-w:].mean())

        d_wo, d_z = drop("wo_contrib"), drop("z_contrib")
        rows.append(dict(model=model, dataset=dataset, layer=layer, n_tail=len(tail), drop_o=d_wo + d_z,
                         drop_wo=d_wo, drop_z=d_z, wo_share=d_wo / (d_wo + d_z) if d_wo + d_z else np.nan))
    return pd.DataFrame(rows)


def c2(wo: pd.DataFrame | None) -> list[dict]:
    if wo is None:
        return _not_run("C2", C2, C2_PAPER, C2_TEST, "fig3 is not configured")
    rows = []
    for r in tail_drops(wo).itertuples(index=False):
        measured = (f"tail of {r.n_tail} directions: O drops {r.drop_o:.2f} decades, W^O {r.drop_wo:.2f}, "
                    f"Z {r.drop_z:.2f} (W^O's share {r.wo_share:.0%})")
        rows.append(_row("C2", C2, f"{r.model}/{r.dataset} L{r.layer}", measured, C2_PAPER, C2_TEST,
                         _verdict(int(r.drop_wo > r.drop_z), 1)))
    return rows


# ----------------------------------------------------------------------------- C3

C3 = "Dead features of a layer-by-layer SAE suite correlate negatively with intrinsic dimension."
C3_PAPER = "LlamaScope 8x SAEs on Llama-3.1-8B, all layers and sites: 'strongly related' (no coefficient given)"
C3_TEST = f"Spearman rank correlation of dead fraction and intrinsic dimension over layers x sites; holds if rho < 0 and p < {ALPHA:g}"


def c3(dead: pd.DataFrame | None) -> list[dict]:
    if dead is None:
        return _not_run("C3", C3, C3_PAPER, C3_TEST, "fig4 is not configured")
    from attnspace.dead_features import dead_vs_dimension

    rows = []
    for (model, dataset), g in dead.groupby(["model", "dataset"], sort=False):
        r = dead_vs_dimension(g)
        means = g.groupby("site", sort=False)["dead_fraction"].mean()
        measured = (f"rho = {r['spearman_rho']:+.2f}, p = {r['p_value']:.2g}, n = {r['n']}; mean dead fraction "
                    + ", ".join(f"{s} {v:.2f}" for s, v in means.items()))
        holds = r["spearman_rho"] < 0 and r["p_value"] < ALPHA
        rows.append(_row("C3", C3, f"{model}/{dataset}, {g['layer'].nunique()} layers x {g['site'].nunique()} sites",
                         measured, C3_PAPER, C3_TEST, _verdict(int(holds), 1)))
    return rows


# ----------------------------------------------------------------------------- C4

C4 = "ASI leaves fewer dead features than the base init and than a random subspace of the same d_init."
C4_PAPER = "Llama-3.1-8B L15 attention output, Figure 5: ASI lowers dead features; the random subspace does not"
C4_TEST = "per d_init: dead fraction on the held-out window, ASI < random subspace and ASI < base; share of d_init"


def c4(runs: pd.DataFrame | None) -> list[dict]:
    if runs is None:
        return _not_run("C4", C4, C4_PAPER, C4_TEST, "fig5 is not configured")
    ok = runs[runs["status"] == "ok"]
    base = ok.loc[ok["init"] == "base", "dead_fraction"]
    asi = ok[ok["init"] == "asi"].set_index("d_init")["dead_fraction"]
    rnd = ok[ok["init"] == "random_subspace"].set_index("d_init")["dead_fraction"]
    d_inits = sorted(set(asi.index) & set(rnd.index))
    if base.empty or not d_inits:
        return _not_run("C4", C4, C4_PAPER, C4_TEST, "no finished base / ASI / random-subspace runs")
    b = float(base.iloc[0])
    hold = sum(asi[d] < rnd[d] and asi[d] < b for d in d_inits)
    measured = (f"lower than both at {hold}/{len(d_inits)} d_init; dead fraction at d_init "
                + ", ".join(f"{int(d)}: ASI {asi[d]:.2f} / random {rnd[d]:.2f}" for d in d_inits)
                + f"; base {b:.2f}")
    r = runs.iloc[0]
    tested = f"{r['model']}/{r['dataset']} L{r['layer']} {r['site']}, {int(r['d_sae'])} latents, k {int(r['k'])}"
    return [_row("C4", C4, tested, measured, C4_PAPER, C4_TEST, _verdict(hold, len(d_inits)))]


# ----------------------------------------------------------------------------- C5

C5 = "ASI reaches lower NMSE than TopK and TopK + AuxK at equal size."
C5_PAPER = "Llama-3.1-8B L15 attention output: at 32,768 features for every k (Figure 6) and at every size 16K-1M (Figure 7)"
C5_TEST = "per (d_sae, k) grid point of Figures 6 and 7: held-out NMSE of ASI < TopK and < TopK + AuxK; share of points"


def c5(sweeps: pd.DataFrame | None) -> list[dict]:
    if sweeps is None:
        return _not_run("C5", C5, C5_PAPER, C5_TEST, "neither fig6 nor fig7 is configured")
    ok = sweeps[sweeps["status"] == "ok"].drop_duplicates("run")
    wide = ok.pivot_table(index=["d_sae", "k"], columns="variant", values="nmse")
    need = ["asi", "topk", "topk_auxk"]
    if any(v not in wide for v in need):
        return _not_run("C5", C5, C5_PAPER, C5_TEST, "the sweeps lack one of ASI, TopK, TopK + AuxK")
    wide = wide[need].dropna()
    best_other = wide[["topk", "topk_auxk"]].min(axis=1)
    hold = int((wide["asi"] < best_other).sum())
    ratio = (wide["asi"] / best_other)
    measured = (f"ASI lower at {hold}/{len(wide)} points; NMSE ASI / best of TopK, AuxK: "
                f"{ratio.min():.2f}-{ratio.max():.2f} (median {ratio.median():.2f})")
    return [_row("C5", C5, f"{_pairs(ok)} L{int(ok['layer'].iloc[0])} {ok['site'].iloc[0]}", measured, C5_PAPER,
                 C5_TEST, _verdict(hold, len(wide)))]


# ----------------------------------------------------------------------------- C6

C6 = "ASI + SparseAdam has the fewest dead features at the largest size."
C6_PAPER = "1M features: dead features 87% (TopK) -> below 1% (ASI + SparseAdam)"
C6_TEST = "Figure 7's largest d_sae: dead fraction of ASI + SparseAdam below every other variant's"


def c6(scaling: pd.DataFrame | None) -> list[dict]:
    if scaling is None:
        return _not_run("C6", C6, C6_PAPER, C6_TEST, "fig7 is not configured")
    ok = scaling[scaling["status"] == "ok"]
    top = ok[ok["d_sae"] == scaling["d_sae"].max()].set_index("variant")["dead_fraction"]
    if "asi_sparseadam" not in top or len(top) < 2:
        return _not_run("C6", C6, C6_PAPER, C6_TEST, "no finished ASI + SparseAdam run and rival at the largest size")
    others = top.drop("asi_sparseadam")
    holds = bool(top["asi_sparseadam"] < others.min())
    measured = (f"{int(scaling['d_sae'].max())} latents: dead fraction "
                + ", ".join(f"{v} {f:.2f}" for v, f in top.items()))
    tested = f"{_pairs(ok)} L{int(ok['layer'].iloc[0])} {ok['site'].iloc[0]}, k {int(ok['k'].iloc[0])}"
    return [_row("C6", C6, tested, measured, C6_PAPER, C6_TEST, _verdict(int(holds), 1))]


# ----------------------------------------------------------------------------- C7

C7 = "ASI lowers Lorsa's dead parameters and its NMSE."
C7_PAPER = "Llama-3.1-8B L15: dead parameters 68.4% -> 40.5%, NMSE 0.130 -> 0.121 (Table 1)"
C7_TEST = "per model: ASI's dead-parameter fraction and NMSE both below vanilla's"


def c7(lorsa: pd.DataFrame | None) -> list[dict]:
    if lorsa is None:
        return _not_run("C7", C7, C7_PAPER, C7_TEST, "Table 1 is not configured")
    rows = []
    for (model, dataset, layer), g in lorsa.groupby(["model", "dataset", "layer"], sort=False):
        v, a = g.set_index("init").loc["vanilla"], g.set_index("init").loc["asi"]
        holds = a["dead_param_fraction"] < v["dead_param_fraction"] and a["nmse"] < v["nmse"]
        measured = (f"dead parameters {v['dead_param_fraction']:.1%} -> {a['dead_param_fraction']:.1%}, "
                    f"NMSE {v['nmse']:.3f} -> {a['nmse']:.3f}")
        rows.append(_row("C7", C7, f"{model}/{dataset} L{layer}", measured, C7_PAPER, C7_TEST,
                         _verdict(int(holds), 1)))
    return rows


# ----------------------------------------------------------------------------- the table

CLAIMS: dict[str, tuple[Callable, str]] = {
    "C1": (c1, "fig1"), "C2": (c2, "fig3"), "C3": (c3, "fig4"), "C4": (c4, "fig5"),
    "C5": (c5, "sweeps"), "C6": (c6, "fig7"), "C7": (c7, "table1"),
}
"""Claim -> (its test, the data it reads)."""


def claims_table(data: dict[str, pd.DataFrame | None], threshold: float = THRESHOLD) -> pd.DataFrame:
    """All claims from the data behind the figures: keys fig1, fig3, fig4, fig5, fig6, fig7, table1
    (None or absent: not produced by this configuration); ``threshold``: C1's variance threshold."""
    sweeps = [d for d in (data.get("fig6"), data.get("fig7")) if d is not None]
    inputs = dict(data, sweeps=pd.concat(sweeps, ignore_index=True) if sweeps else None)
    rows = []
    for test, source in CLAIMS.values():
        rows += test(inputs.get(source), threshold) if test is c1 else test(inputs.get(source))
    return pd.DataFrame(rows, columns=COLUMNS)


def claims_markdown(table: pd.DataFrame) -> str:
    """The claims table as Markdown, with the verdict rule stated above it."""
    lines = [
        "| claim | tested on | measured | paper | verdict |",
        "|---|---|---|---|---|",
    ]
    previous = None
    for r in table.itertuples(index=False):
        first = r.claim != previous  # the statement and the paper's number once per claim
        previous = r.claim
        cells = [f"**{r.claim}** {r.statement}" if first else "", r.tested_on, r.measured, r.paper if first else "",
                 f"**{r.verdict}**"]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    tests = table.drop_duplicates("claim")[["claim", "test"]]
    return "\n".join([
        "Verdict: *holds* when the claim holds in a strict majority of its cases (the count is in "
        "*measured*), *does not hold* otherwise, *not run* when this configuration did not produce its data. "
        "The tests, fixed before the run:",
        "",
        *[f"* {c}: {t}." for c, t in tests.itertuples(index=False)],
        "",
        *lines,
        "",
    ])
