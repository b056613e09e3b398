"""The verdict: each claim of the paper, the number this run measured for it, and whether it holds.

One function per claim (``c1`` .. ``c7``) reads the data behind a figure or table (the
csv written beside it) and returns rows of :data:`COLUMNS`. The rules are fixed here,
before any run, and stated in each row's ``test`` column. Each claim is tested on one or
more *cases* (a layer, a d_init, a grid point, ...), and each case is decided against the
noise the run measured:

* spectra (C1): the paired interval over documents of attention's intrinsic-dimension fraction
  minus each other site's, from the same replicates (``spectrum.bootstrap``, the rule of
  ``docs/coverage.md``); attention is lowest when both differences lie below zero, not lowest
  when one lies above (tables without paired intervals: the sites' separate intervals);
* dictionaries (C4 to C7): seeds; two settings differ when their means differ by more
  than twice the larger of their seed standard deviations (:func:`compare`);
* C3: Spearman's test at level :data:`ALPHA`.

A case that the noise cannot decide is *inconclusive*. The verdict of a row: **holds**
when a strict majority of its cases hold, **does not hold** when a strict majority fail,
**inconclusive** otherwise, **not run** when the data behind it was not produced by this
configuration. No threshold depends on the outcome.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from attnspace.defaults import schema_default

COLUMNS = ["claim", "statement", "tested_on", "measured", "paper", "test", "verdict"]

HOLDS, FAILS, INCONCLUSIVE, NOT_RUN = "holds", "does not hold", "inconclusive", "not run"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, NOT_RUN)
"""The four words a verdict may be."""
SPREAD = 2.0
"""Seeds: two settings differ when their means differ by more than SPREAD x the larger seed standard deviation."""

TAIL = 0.10
"""C2: the tail of the attention spectrum is its last 10% of principal directions."""
TAIL_WINDOW = 5
"""C2: each end of the tail is the mean log10 over this many directions (one direction is noisy)."""
THRESHOLD = schema_default("spectrum.threshold")
"""C1's default variance threshold (the config's main one)."""
ALPHA = 0.05
"""C3: significance level of the Spearman test."""


def _verdict(n_hold: int, n_fail: int, n_cases: int) -> str:
    """Majority rule over cases: holds / does not hold by strict majority, else inconclusive."""
    if n_cases == 0:
        return NOT_RUN
    if n_hold * 2 > n_cases:
        return HOLDS
    if n_fail * 2 > n_cases:
        return FAILS
    return INCONCLUSIVE


def _case(holds: bool, fails: bool) -> str:
    return HOLDS if holds else FAILS if fails else INCONCLUSIVE


def compare(a, b, noise: float | None = None) -> int:
    """-1 if a is lower than b, +1 if higher, 0 if the seeds cannot tell.

    a, b: the values of the seeds of two settings. They differ when |mean(a) - mean(b)| >
    SPREAD x the larger of their standard deviations (ddof 1), or SPREAD x ``noise`` when given
    (a noise scale measured elsewhere, for settings run once). With fewer than two seeds on
    either side and no ``noise``, the seeds cannot tell.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return 0
    if noise is None:
        if a.size < 2 or b.size < 2:
            return 0
        noise = max(a.std(ddof=1), b.std(ddof=1))
    if not np.isfinite(noise):
        return 0
    diff = a.mean() - b.mean()
    if abs(diff) <= SPREAD * noise:
        return 0
    return -1 if diff < 0 else 1


def _ms(values) -> str:
    """mean ± sd (ddof 1) of seed values, or the one value."""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.2f}" if v.size < 2 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def _form(centred: bool) -> str:
    return "centred" if centred else "uncentred"


SEED_TEST = (f"means of the seeds differ when they are more than {SPREAD:g} x the larger seed standard "
             "deviation apart (ddof 1), else inconclusive")


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
    return (f"per (model, dataset, layer): the fraction of directions for {threshold:g} of the variance; holds if "
            "the paired interval over documents (the same replicates for the three sites) of attn_out minus mlp_out "
            "and of attn_out minus resid_post both lie below 0, fails if either lies above 0, else inconclusive "
            "(a table without paired intervals: attn_out's interval against the others'); verdict by majority of "
            "layers; the point estimates' ordering is also reported at every nested subsample of the documents")


OTHER_SITES = {"mlp_out": "mlp", "resid_post": "resid"}
"""The sites attention is compared with, and the short names of their paired columns."""


def attention_lowest(idim: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per (model, dataset, layer): the three sites' fractions (intervals, bias-corrected values) at ``threshold``,
    whether attention is lowest (point estimates), the paired differences attn - mlp and attn - resid with their
    intervals where the table has them, and the case (``case``: holds / does not hold / inconclusive) decided on
    the paired intervals, else on the separate ones; inconclusive wherever an interval is missing."""
    sel = idim[(idim["threshold"] == threshold) & idim["site"].isin(["attn_out", *OTHER_SITES])]
    cols = ("fraction_lo", "fraction_hi", "fraction_corrected", "attn_minus_site", "attn_minus_site_lo",
            "attn_minus_site_hi")
    sel = sel.assign(**{c: sel[c] if c in sel else np.nan for c in cols})
    wide = sel.pivot_table(index=["model", "dataset", "layer"], columns="site", values=["fraction", *cols],
                           dropna=False)
    wide = wide[wide["fraction"].notna().all(axis=1)]
    out = wide["fraction"].copy()
    for site in ("attn_out", *OTHER_SITES):
        for end in ("lo", "hi", "corrected"):
            out[f"{site}_{end}"] = wide[f"fraction_{end}"][site]
    for site, short in OTHER_SITES.items():
        for end in ("", "_lo", "_hi"):
            out[f"attn_minus_{short}{end}"] = wide[f"attn_minus_site{end}"][site]
    out["attn_lowest"] = (out["attn_out"] < out["mlp_out"]) & (out["attn_out"] < out["resid_post"])
    out["attn_below_mlp"] = out["attn_out"] < out["mlp_out"]
    paired = out[[f"attn_minus_{s}_{e}" for s in OTHER_SITES.values() for e in ("lo", "hi")]].notna().all(axis=1)
    below = np.where(paired, (out["attn_minus_mlp_hi"] < 0) & (out["attn_minus_resid_hi"] < 0),
                     (out["attn_out_hi"] < out["mlp_out_lo"]) & (out["attn_out_hi"] < out["resid_post_lo"]))
    above = np.where(paired, (out["attn_minus_mlp_lo"] > 0) | (out["attn_minus_resid_lo"] > 0),
                     (out["attn_out_lo"] > out["mlp_out_hi"]) | (out["attn_out_lo"] > out["resid_post_hi"]))
    out["paired"] = paired
    out["case"] = [_case(b, a) for b, a in zip(below, above)]
    out.columns.name = None
    return out.reset_index()


def ordering_at_every_n(convergence: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per (model, dataset, layer): whether attention's fraction is below both others' (point estimates) at
    every nested subsample of the convergence table (``all_n``), at how many subsamples, and their token range."""
    sel = convergence[(convergence["threshold"] == threshold)
                      & convergence["site"].isin(["attn_out", *OTHER_SITES])]
    wide = sel.pivot_table(index=["model", "dataset", "layer", "n_tokens"], columns="site", values="fraction")
    wide = wide.dropna()
    wide["lowest"] = (wide["attn_out"] < wide["mlp_out"]) & (wide["attn_out"] < wide["resid_post"])
    g = wide.reset_index().groupby(["model", "dataset", "layer"])
    return pd.DataFrame({"all_n": g["lowest"].all(), "n_lowest": g["lowest"].sum(), "n_subsamples": g.size(),
                         "min_tokens": g["n_tokens"].min(), "max_tokens": g["n_tokens"].max()}).reset_index()


def c1(idim: pd.DataFrame | None, threshold: float = THRESHOLD, convergence: pd.DataFrame | None = None) -> list[dict]:
    """C1 at the main variance ``threshold`` (the config's ``spectrum.threshold``); ``convergence``: the
    intrinsic dimension at nested subsamples (results/tables/id_convergence.csv), or None."""
    test = c1_test(threshold)
    if idim is None:
        return _not_run("C1", C1, C1_PAPER, test, "fig1 is not configured")
    cases = attention_lowest(idim, threshold)
    if convergence is not None and len(convergence):
        cases = cases.merge(ordering_at_every_n(convergence, threshold), on=["model", "dataset", "layer"], how="left")
    groups = [(f"{m}/{d}", g) for (m, d), g in cases.groupby(["model", "dataset"], sort=False)]
    groups.append((f"all: {_pairs(cases)}", cases))
    level = f"{idim['level'].iloc[0]:.0%} " if "level" in idim and len(idim) else ""
    rows = []
    for name, g in groups:
        n = len(g)
        hold, fail = int((g["case"] == HOLDS).sum()), int((g["case"] == FAILS).sum())
        rows.append(_row("C1", C1, name, _c1_measured(g, hold, fail, level), C1_PAPER, test, _verdict(hold, fail, n)))
    return rows


def _c1_measured(g: pd.DataFrame, hold: int, fail: int, level: str) -> str:
    n = len(g)

    def site(col):
        if not g[col + "_lo"].notna().all():
            return f"{g[col].mean():.2f} (no interval)"
        corrected = g[col + "_corrected"]
        moved = corrected.notna().all() and not np.allclose(corrected, g[col])
        return (f"{g[col].mean():.2f}" + (f" (bias-corrected {corrected.mean():.2f})" if moved else "")
                + f" [{g[col + '_lo'].mean():.2f}, {g[col + '_hi'].mean():.2f}]")

    paired = bool(g["paired"].all())
    text = (f"attention lowest beyond the {'paired intervals of the differences' if paired else 'intervals'} in "
            f"{hold}/{n} layers, above another site in {fail}/{n}, inconclusive in {n - hold - fail}/{n}; "
            f"mean fraction [mean {level}interval] attn {site('attn_out')}, mlp {site('mlp_out')}, "
            f"resid {site('resid_post')}")
    if paired:
        text += "; mean difference " + ", ".join(
            f"attn - {s} {g[f'attn_minus_{s}'].mean():+.2f} [{g[f'attn_minus_{s}_lo'].mean():+.2f}, "
            f"{g[f'attn_minus_{s}_hi'].mean():+.2f}]" for s in OTHER_SITES.values())
    if "all_n" in g and g["all_n"].notna().all():
        text += (f"; point estimates: attention lowest at every nested subsample ({int(g['min_tokens'].min()):,} to "
                 f"{int(g['max_tokens'].max()):,} tokens) in {int(g['all_n'].sum())}/{n} layers")
    return text


# ----------------------------------------------------------------------------- C2

C2 = "W^O's anisotropy, not Z, shapes the tail of the attention output's spectrum."
C2_PAPER = "Llama-3.1-8B layer 15: O follows Z for the top directions; the tail drop is mainly W^O's (Figure 3)"
C2_TEST = (f"over the last {TAIL:.0%} of O's principal directions, log10 Var(O e_i) = log10 Var(Z v_i) + "
           f"log10 ||W^O e_i||^2 drops; holds if ||W^O e_i||^2 drops by more decades than Var(Z v_i) "
           f"(ends: mean over {TAIL_WINDOW} directions); one sample, no interval")


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
                         _verdict(int(r.drop_wo > r.drop_z), int(r.drop_wo <= r.drop_z), 1)))
    return rows


# ----------------------------------------------------------------------------- C3

C3 = "Dead features of a layer-by-layer SAE suite correlate negatively with intrinsic dimension."
C3_PAPER = "LlamaScope 8x SAEs on Llama-3.1-8B, all layers and sites: 'strongly related' (no coefficient given)"
C3_TEST = (f"Spearman rank correlation of dead fraction and intrinsic dimension over layers x sites; holds if "
           f"rho < 0 and p < {ALPHA:g}, does not hold if rho > 0 and p < {ALPHA:g}, else inconclusive")


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
        significant = r["p_value"] < ALPHA
        holds, fails = significant and r["spearman_rho"] < 0, significant and r["spearman_rho"] > 0
        rows.append(_row("C3", C3, f"{model}/{dataset}, {g['layer'].nunique()} layers x {g['site'].nunique()} sites",
                         measured, C3_PAPER, C3_TEST, _verdict(int(holds), int(fails), 1)))
    return rows


# ----------------------------------------------------------------------------- C4

C4 = "ASI leaves fewer dead features than the base init and than a random subspace of the same d_init."
C4_PAPER = "Llama-3.1-8B L15 attention output, Figure 5: ASI lowers dead features; the random subspace does not"
C4_TEST = ("per form (uncentred, centred) and d_init: dead fraction on the held-out window over seeds; a d_init "
           "holds if ASI is below both the random subspace and the base init, fails if above either; " + SEED_TEST
           + "; the same ordering is also reported over the window's first quarter and half (one pass)")

WINDOWS = (("dead_fraction_quarter_window", 4), ("dead_fraction_half_window", 2), ("dead_fraction", 1))
"""Dead fraction over the first N / q tokens of the held-out window of N (the same pass), per column."""


def _windows(runs: pd.DataFrame) -> list[tuple[str, int]]:
    """(column, tokens) of each dead-fraction window the runs recorded, shortest first."""
    tokens = runs["dead_window_tokens"] if "dead_window_tokens" in runs else pd.Series(dtype=float)
    n = int(tokens.max()) if tokens.notna().any() else 0
    return [(col, n // q) for col, q in WINDOWS if col in runs and runs[col].notna().all()]


def _tokens(n: int) -> str:
    return f"{n:,} tokens" if n else "the window"


def _ok(runs: pd.DataFrame) -> pd.DataFrame:
    ok = runs[runs["status"] == "ok"].copy()
    ok["centred"] = ok["centred"].astype(bool) if "centred" in ok else False
    return ok


def c4(runs: pd.DataFrame | None) -> list[dict]:
    if runs is None:
        return _not_run("C4", C4, C4_PAPER, C4_TEST, "fig5 is not configured")
    ok = _ok(runs)
    rows = []
    r0 = runs.iloc[0]
    tested = f"{r0['model']}/{r0['dataset']} L{r0['layer']} {r0['site']}, {int(r0['d_sae'])} latents, k {int(r0['k'])}"
    for centred, f in ok.groupby("centred", sort=True):
        base = f.loc[f["init"] == "base", "dead_fraction"].to_numpy(float)
        d_inits = sorted(set(f.loc[f["init"] == "asi", "d_init"]) & set(f.loc[f["init"] == "random_subspace", "d_init"]))
        if base.size == 0 or not d_inits:
            continue
        hold = fail = 0
        parts = []
        for d in d_inits:
            asi = f.loc[(f["init"] == "asi") & (f["d_init"] == d), "dead_fraction"].to_numpy(float)
            rnd = f.loc[(f["init"] == "random_subspace") & (f["d_init"] == d), "dead_fraction"].to_numpy(float)
            vs_rnd, vs_base = compare(asi, rnd), compare(asi, base)
            hold += vs_rnd < 0 and vs_base < 0
            fail += vs_rnd > 0 or vs_base > 0
            parts.append(f"{int(d)}: ASI {_ms(asi)} / random {_ms(rnd)}")
        n_seeds = int(f.groupby(["init", "d_init"], dropna=False).size().min())
        measured = (f"{_form(centred)}, {n_seeds} seeds: ASI below both at {hold}/{len(d_inits)} d_init, above one at "
                    f"{fail}/{len(d_inits)}; dead fraction (mean ± sd) at d_init " + ", ".join(parts)
                    + f"; base {_ms(base)}" + _c4_windows(f, d_inits))
        rows.append(_row("C4", C4, f"{tested}, {_form(centred)}", measured, C4_PAPER, C4_TEST,
                         _verdict(hold, fail, len(d_inits))))
    return rows or _not_run("C4", C4, C4_PAPER, C4_TEST, "no finished base / ASI / random-subspace runs")


def _c4_windows(f: pd.DataFrame, d_inits: list) -> str:
    """'; ASI below both over <tokens>: h/n d_init, ...' for each recorded window ('' with the full one only)."""
    windows = _windows(f)
    if len(windows) < 2:
        return ""

    def held(col: str) -> int:
        base = f.loc[f["init"] == "base", col].to_numpy(float)
        count = 0
        for d in d_inits:
            asi = f.loc[(f["init"] == "asi") & (f["d_init"] == d), col].to_numpy(float)
            rnd = f.loc[(f["init"] == "random_subspace") & (f["d_init"] == d), col].to_numpy(float)
            count += compare(asi, rnd) < 0 and compare(asi, base) < 0
        return count

    return "; ASI below both over " + ", ".join(f"{_tokens(n)}: {held(col)}/{len(d_inits)} d_init"
                                                for col, n in windows)


# ----------------------------------------------------------------------------- C5

C5 = "ASI reaches lower NMSE than TopK and TopK + AuxK at equal size."
C5_PAPER = "Llama-3.1-8B L15 attention output: at 32,768 features for every k (Figure 6) and at every size 16K-1M (Figure 7)"
C5_TEST = ("per (d_sae, k) grid point of Figures 6 and 7 (uncentred): held-out NMSE of ASI against TopK and TopK + "
           "AuxK; holds if below both, fails if above either; points with seeds: " + SEED_TEST + "; points run once: "
           f"against {SPREAD:g} x the largest NMSE seed standard deviation of the replicated points")


def c5(sweeps: pd.DataFrame | None) -> list[dict]:
    if sweeps is None:
        return _not_run("C5", C5, C5_PAPER, C5_TEST, "neither fig6 nor fig7 is configured")
    ok = _ok(sweeps).drop_duplicates("run")
    ok = ok[~ok["centred"]]
    need = ["asi", "topk", "topk_auxk"]
    if any(v not in set(ok["variant"]) for v in need):
        return _not_run("C5", C5, C5_PAPER, C5_TEST, "the sweeps lack one of ASI, TopK, TopK + AuxK")
    groups = ok[ok["variant"].isin(need)].groupby(["d_sae", "k", "variant"])["nmse"]
    spread = groups.std(ddof=1).dropna()
    noise = float(spread.max()) if len(spread) else float("nan")
    values = groups.apply(lambda v: v.to_numpy(float))
    points = sorted({(n, k) for n, k, _ in values.index if all((n, k, v) in values.index for v in need)})
    hold = fail = 0
    ratios = []
    for n, k in points:
        a, t, x = (values[(n, k, v)] for v in need)
        replicated = min(a.size, t.size, x.size) >= 2
        c_t, c_x = (compare(a, t), compare(a, x)) if replicated else (compare(a, t, noise), compare(a, x, noise))
        hold += c_t < 0 and c_x < 0
        fail += c_t > 0 or c_x > 0
        ratios.append(a.mean() / min(t.mean(), x.mean()))
    ratios = np.asarray(ratios)
    measured = (f"ASI below both at {hold}/{len(points)} points, above one at {fail}/{len(points)}; NMSE ASI / best of "
                f"TopK, AuxK: {ratios.min():.2f}-{ratios.max():.2f} (median {np.median(ratios):.2f}); noise for points "
                f"run once: seed sd {noise:.3f}")
    return [_row("C5", C5, f"{_pairs(ok)} L{int(ok['layer'].iloc[0])} {ok['site'].iloc[0]}", measured, C5_PAPER,
                 C5_TEST, _verdict(hold, fail, len(points)))]


# ----------------------------------------------------------------------------- C6

C6 = "ASI + SparseAdam has the fewest dead features at the largest size."
C6_PAPER = "1M features: dead features 87% (TopK) -> below 1% (ASI + SparseAdam)"
C6_TEST = ("per form, Figure 7's largest d_sae: dead fraction of ASI + SparseAdam over seeds; holds if below every "
           "other variant's, fails if above any; " + SEED_TEST + "; the same ordering is also reported over the "
           "window's first quarter and half (one pass)")


def c6(scaling: pd.DataFrame | None) -> list[dict]:
    if scaling is None:
        return _not_run("C6", C6, C6_PAPER, C6_TEST, "fig7 is not configured")
    ok = _ok(scaling)
    top = ok[ok["d_sae"] == scaling["d_sae"].max()]
    rows = []
    for centred, f in top.groupby("centred", sort=True):
        values = {v: g["dead_fraction"].to_numpy(float) for v, g in f.groupby("variant", sort=False)}
        if "asi_sparseadam" not in values or len(values) < 2:
            continue
        mine = values["asi_sparseadam"]
        cmp = [compare(mine, v) for name, v in values.items() if name != "asi_sparseadam"]
        holds, fails = all(c < 0 for c in cmp), any(c > 0 for c in cmp)
        n_seeds = min(v.size for v in values.values())
        measured = (f"{int(scaling['d_sae'].max())} latents, {_form(centred)}, {n_seeds} seeds: dead fraction "
                    + ", ".join(f"{v} {_ms(x)}" for v, x in values.items()) + _c6_windows(f))
        tested = f"{_pairs(ok)} L{int(ok['layer'].iloc[0])} {ok['site'].iloc[0]}, k {int(ok['k'].iloc[0])}, {_form(centred)}"
        rows.append(_row("C6", C6, tested, measured, C6_PAPER, C6_TEST, _verdict(int(holds), int(fails and not holds), 1)))
    return rows or _not_run("C6", C6, C6_PAPER, C6_TEST, "no finished ASI + SparseAdam run and rival at the largest size")


def _c6_windows(f: pd.DataFrame) -> str:
    """'; ASI + SparseAdam below every other over <tokens>: yes/no, ...' for each recorded window."""
    windows = _windows(f)
    if len(windows) < 2:
        return ""

    def lowest(col: str) -> str:
        values = {v: g[col].to_numpy(float) for v, g in f.groupby("variant", sort=False)}
        mine = values.pop("asi_sparseadam")
        return "yes" if all(compare(mine, v) < 0 for v in values.values()) else "no"

    return "; ASI + SparseAdam below every other over " + ", ".join(f"{_tokens(n)}: {lowest(col)}"
                                                              for col, n in windows)


# ----------------------------------------------------------------------------- C7

C7 = "ASI lowers Lorsa's dead parameters and its NMSE."
C7_PAPER = "Llama-3.1-8B L15: dead parameters 68.4% -> 40.5%, NMSE 0.130 -> 0.121 (Table 1)"
C7_TEST = ("per model, over seeds: holds if ASI's dead-parameter fraction and NMSE are both below vanilla's, fails "
           "if either is above; " + SEED_TEST)


def c7(lorsa: pd.DataFrame | None) -> list[dict]:
    if lorsa is None:
        return _not_run("C7", C7, C7_PAPER, C7_TEST, "Table 1 is not configured")
    rows = []
    for (model, dataset, layer), g in lorsa.groupby(["model", "dataset", "layer"], sort=False):
        failed = g[g["status"] == "failed"] if "status" in g else g.iloc[:0]  # diverged: no measurements
        g = g.drop(failed.index)
        v, a = g[g["init"] == "vanilla"], g[g["init"] == "asi"]
        c_dead = compare(a["dead_param_fraction"], v["dead_param_fraction"])
        c_nmse = compare(a["nmse"], v["nmse"])
        holds, fails = c_dead < 0 and c_nmse < 0, c_dead > 0 or c_nmse > 0
        n_seeds = min(len(v), len(a))
        if n_seeds == 0:
            measured = "no finished run of " + " and ".join(i for i, runs in (("vanilla", v), ("asi", a)) if runs.empty)
        else:
            measured = (f"{n_seeds} seeds: dead parameters {_ms(100 * v['dead_param_fraction'])}% -> "
                        f"{_ms(100 * a['dead_param_fraction'])}%, NMSE {_ms(v['nmse'])} -> {_ms(a['nmse'])}")
        if len(failed):
            measured += f"; {len(failed)} failed run(s) left out (listed under Table 1)"
        rows.append(_row("C7", C7, f"{model}/{dataset} L{layer}", measured, C7_PAPER, C7_TEST,
                         _verdict(int(holds), int(fails), 1)))
    return rows


# ----------------------------------------------------------------------------- the table

CLAIMS: dict[str, tuple[Callable, str]] = {
    "C1": (c1, "fig1"), "C2": (c2, "fig3"), "C3": (c3, "fig4"), "C4": (c4, "fig5"),
    "C5": (c5, "sweeps"), "C6": (c6, "fig7"), "C7": (c7, "table1"),
}
"""Claim -> (its test, the data it reads)."""


def claims_table(data: dict[str, pd.DataFrame | None], threshold: float = THRESHOLD) -> pd.DataFrame:
    """All claims from the data behind the figures: keys fig1, fig3, fig4, fig5, fig6, fig7, table1 and
    convergence (C1's nested subsamples) (None or absent: not produced by this configuration);
    ``threshold``: C1's variance threshold."""
    sweeps = [d for d in (data.get("fig6"), data.get("fig7")) if d is not None]
    inputs = dict(data, sweeps=pd.concat(sweeps, ignore_index=True) if sweeps else None)
    rows = []
    for test, source in CLAIMS.values():
        rows += (test(inputs.get(source), threshold, inputs.get("convergence")) if test is c1
                 else test(inputs.get(source)))
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
        "Verdict: each case is decided against the noise this run measured (intervals over documents "
        "for the spectra, seeds for the dictionaries); a case the noise cannot decide is inconclusive. *holds* "
        "when a strict majority of a row's cases hold, *does not hold* when a strict majority fail, "
        "*inconclusive* otherwise, *not run* when this configuration did not produce its data (counts in "
        "*measured*). The tests, fixed before the run:",
        "",
        *[f"* {c}: {t}." for c, t in tests.itertuples(index=False)],
        "",
        *lines,
        "",
    ])
