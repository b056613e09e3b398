"""Figures 2 to 8 of the paper, drawn from tidy tables (Figures 1 and 9, the intrinsic dimension,
and its convergence in tokens: :mod:`attnspace.figures_idim`).

Every figure function takes a tidy ``pandas.DataFrame`` (one row per number), draws
it, and returns ``(figure, data)`` where ``data`` holds exactly the rows drawn, in
the input's columns. ``save_figure`` writes the figure (PDF and PNG) and that table
(CSV) side by side, so every figure ships with the numbers behind it. Nothing here
reads files or computes statistics: intrinsic dimensions and spectra come from the
spectrum stage; this module only selects rows and draws them.

Input tables
------------
``idim`` (intrinsic dimension), one row per (model, dataset, layer, site, threshold):
    ``model, dataset, layer, site, d, n_tokens, threshold, k, fraction,
    n_sv_above_5pct``. ``k`` is the smallest k with
    ``sum_{i<=k} s_i^2 / sum_i s_i^2 >= threshold`` for the singular values ``s`` of
    the mean-centred ``[n_tokens, d]`` activation matrix; ``fraction = k / d``.
``spectra``, one row per singular value:
    ``model, dataset, layer, site, i, s, rel_s, n_above_5pct`` (optional ``focus``).
    ``i`` is the 1-based index, ``rel_s = s_i / s_1`` and ``n_above_5pct`` is the
    number of ``i`` with ``rel_s > 0.05`` (repeated on every row of its site).
``loss_recovered`` (Figure 2B), one row per (model, dataset, layer, site, k):
    ``model, dataset, layer, site, k, k_fraction, loss, loss_clean, loss_zero,
    recovered`` with ``recovered = (loss_zero - loss) / (loss_zero - loss_clean)``;
    its summary gives, per site, the ``k_fraction`` at which ``recovered`` first
    reaches ``target`` (``attnspace.interventions.recovery_summary``).
``wo_decomposition`` (Figure 3), one row per (model, dataset, layer, i):
    ``model, dataset, layer, i, var_o, wo_contrib, z_contrib`` with
    ``var_o = z_contrib * wo_contrib`` (``attnspace.wo_decomposition``).

Sites are drawn in ``SITE_ORDER`` with the colours of ``SITE_COLORS`` in every
figure; other sites in the tables (``attn_z``, ``attn_in``) are not drawn. Models
and datasets keep the order in which they first appear in the table (the config's
order). Figures are built on Agg canvases without pyplot, so they never pop up a
window and never pile up in pyplot's list of open figures.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from attnspace.files import atomic_path

SITE_ORDER = ("attn_out", "mlp_out", "resid_post")
"""Sites drawn, in legend order."""
SITE_LABELS = {
    "attn_out": "attention output",
    "mlp_out": "MLP output",
    "resid_post": "residual stream",
}
"""Legend text per site."""
SITE_COLORS = {
    "attn_out": "#d55e00",  # seaborn "colorblind" vermillion: the site the paper is about
    "mlp_out": "#0173b2",  # colorblind blue
    "resid_post": "#029e73",  # colorblind green
}
"""One colour per site, the same in every figure."""

FIVE_PERCENT = 0.05
"""Relative singular value marked by the dashed line in the spectrum panels."""

SPECTRA_COLUMNS = ("model", "dataset", "layer", "site", "i", "rel_s", "n_above_5pct")
CURVE_COLUMNS = ("model", "dataset", "layer", "site", "k", "k_fraction", "recovered")
SUMMARY_COLUMNS = ("model", "dataset", "layer", "site", "target", "k_fraction")
WO_COLUMNS = ("model", "dataset", "layer", "i", "var_o", "wo_contrib", "z_contrib")

WO_CURVES = {
    "var_o": ("Var(O $e_i$): attention output", SITE_COLORS["attn_out"], "-"),
    "z_contrib": ("Var(Z $v_i$): Z contribution", "#cc78bc", "--"),  # colorblind pink
    "wo_contrib": ("‖W$^O e_i$‖²: W$^O$ contribution", "#ca9161", "-."),  # colorblind brown
}
"""Figure 3's curves: column -> (legend text, colour, line style)."""

_STYLE = "whitegrid"
_CONTEXT = "paper"
_FONT_SCALE = 1.25
_PNG_DPI = 150
_MIN_WIDTH = 7.0
_MAX_LAYER_TICKS = 12


# ---------------------------------------------------------------- figure 2a and 8


def fig2a(
    spectra: pd.DataFrame, model: str, dataset: str, layer: int
) -> tuple[Figure, pd.DataFrame]:
    """Figure 2(A): relative singular values ``s_i / s_1`` of each site at one layer.

    The rule behind the figure: the singular values ``s_1 >= s_2 >= ...`` of the
    mean-centred activation matrix, divided by the largest, on a log scale against
    their 1-based index ``i``. A faster decay means the activations concentrate in
    fewer directions. The legend counts the singular values above 5% of the largest
    (``rel_s > 0.05``, the table's ``n_above_5pct``; dashed line); the paper reports
    1174 for attention outputs against 3276 (MLP) and 3943 (residual) in
    Llama-3.1-8B layer 15 on SlimPajama. Zero singular values (a rank-deficient
    sample) stay in the returned table but cannot be drawn on a log axis.

    Args:
        spectra: the spectra table (see the module docstring).
        model, dataset, layer: which spectra to draw; must be present.

    Returns:
        The figure, and the ``spectra`` rows drawn, sorted by site then ``i``.

    Raises:
        ValueError: a required column is missing, the (model, dataset, layer) has no
            rows for the three sites (the message lists those available), a site's
            ``n_above_5pct`` is not constant, or an index appears twice.
    """
    _require_columns(spectra, SPECTRA_COLUMNS, "spectra")
    data = _select_spectrum(spectra, model, dataset, layer)
    with _style():
        fig = _new_figure((6.4, 4.6))
        ax = fig.subplots()
        _draw_spectrum_panel(ax, data)
        ax.set_title(f"{model} · {dataset} · layer {layer}")
        fig.suptitle("Relative singular values $s_i / s_1$")
    return fig, data


def fig8(
    spectra: pd.DataFrame, exclude: tuple[str, str] | None = None
) -> tuple[Figure, pd.DataFrame]:
    """Figure 8: Figure 2(A)'s spectrum panel for every other (model, dataset) pair.

    The rule behind each panel is Figure 2(A)'s (``s_i / s_1`` on a log scale against
    ``i``, legend counts of ``s_i / s_1 > 0.05``). One panel per (model, dataset) pair
    in ``spectra`` except ``exclude`` (the pair Figure 2(A) shows), at one layer:
    the only layer present for that pair; else the layer whose rows have
    ``focus == True`` (when a ``focus`` column exists); else the middle layer
    present (``sorted(layers)[(n - 1) // 2]``, which is layer 15 of 0..31).

    With no pair left (a config with a single model and dataset) the figure holds a
    single note, "no other model/dataset pairs configured", and the table is empty
    (with the input's columns), so a workflow target can still be built.

    Args:
        spectra: the spectra table (see the module docstring).
        exclude: the (model, dataset) pair to leave out; must be present if given.

    Returns:
        The figure (panels in a grid of up to 3 columns), and the ``spectra`` rows
        drawn, sorted by pair (table order), site, ``i``.

    Raises:
        ValueError: a required column is missing, ``exclude`` is not a pair in
            ``spectra``, ``focus`` marks several layers of one pair, or a panel's
            rows fail ``fig2a``'s checks.
    """
    _require_columns(spectra, SPECTRA_COLUMNS, "spectra")
    pairs = _pairs(spectra)
    if exclude is not None:
        exclude = tuple(exclude)
        if exclude not in pairs:
            raise ValueError(
                f"exclude pair {exclude} not in spectra; available pairs: "
                f"{_fmt_pairs(pairs)}"
            )
        pairs = [p for p in pairs if p != exclude]
    panels = [(m, ds, _panel_layer(spectra, m, ds)) for m, ds in pairs]
    frames = [_select_spectrum(spectra, m, ds, layer) for m, ds, layer in panels]

    with _style():
        if not panels:
            fig = _new_figure((6.4, 2.4))
            fig.text(
                0.5, 0.5, "no other model/dataset pairs configured",
                ha="center", va="center", fontsize="large",
            )
            fig.suptitle("Relative singular values $s_i / s_1$ (other model/dataset pairs)")
            return fig, spectra.iloc[0:0].reset_index(drop=True)

        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = _new_figure((0.4 + 4.6 * ncols, 0.8 + 3.6 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for j, (ax, (model, dataset, layer), frame) in enumerate(zip(axes, panels, frames)):
            _draw_spectrum_panel(ax, frame, legend_size="small")
            ax.set_title(f"{model} · {dataset} · layer {layer}")
            if j % ncols:
                ax.set_ylabel("")
            if j + ncols < len(panels):  # another panel below carries the x label
                ax.set_xlabel("")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.suptitle("Relative singular values $s_i / s_1$ (other model/dataset pairs)")
    return fig, pd.concat(frames, ignore_index=True)


def _select_spectrum(
    spectra: pd.DataFrame, model: str, dataset: str, layer: int
) -> pd.DataFrame:
    """Rows of one (model, dataset, layer) in ``SITE_ORDER``, sorted by site then i."""
    data = spectra[
        (spectra["model"] == model)
        & (spectra["dataset"] == dataset)
        & (spectra["layer"] == layer)
        & spectra["site"].isin(SITE_ORDER)
    ]
    if data.empty:
        keys = spectra.loc[spectra["site"].isin(SITE_ORDER), ["model", "dataset", "layer"]]
        available = ", ".join(
            f"({m}, {ds}, {int(l)})" for m, ds, l in keys.drop_duplicates().itertuples(index=False)
        )
        raise ValueError(
            f"spectra has no rows for sites {', '.join(SITE_ORDER)} at "
            f"(model={model}, dataset={dataset}, layer={layer}); "
            f"available (model, dataset, layer): {available or 'none'}"
        )
    _require_unique(data, ["site", "i"], f"spectra ({model}, {dataset}, layer {layer})")
    counts = data.groupby("site")["n_above_5pct"].nunique()
    if (counts > 1).any():
        raise ValueError(
            f"n_above_5pct varies within site(s) {', '.join(counts.index[counts > 1])} "
            f"of ({model}, {dataset}, layer {layer}); it must be one count per site"
        )
    return _sort(data, ["site", "i"])


def _panel_layer(spectra: pd.DataFrame, model: str, dataset: str) -> int:
    """The layer Figure 8 draws for a pair: the only one, the focus one, or the middle."""
    rows = spectra[(spectra["model"] == model) & (spectra["dataset"] == dataset)]
    layers = sorted(int(layer) for layer in pd.unique(rows["layer"]))
    if len(layers) == 1:
        return layers[0]
    if "focus" in rows.columns:
        marked = rows["focus"].fillna(False).astype(bool)
        focus = sorted(int(layer) for layer in pd.unique(rows.loc[marked, "layer"]))
        if len(focus) > 1:
            raise ValueError(
                f"focus marks several layers {focus} of ({model}, {dataset}); mark one"
            )
        if focus:
            return focus[0]
    return layers[(len(layers) - 1) // 2]


def _draw_spectrum_panel(ax, data: pd.DataFrame, legend_size: str = "medium") -> None:
    """rel_s vs i on a log y axis, one line per site, dashed line at 5%."""
    for site in SITE_ORDER:
        rows = data[data["site"] == site]
        if rows.empty:
            continue
        n = int(rows["n_above_5pct"].iloc[0])
        ax.plot(
            rows["i"], rows["rel_s"], color=SITE_COLORS[site], linewidth=1.6,
            label=f"{SITE_LABELS[site]} ({n} > 5%)",
        )
    ax.set_yscale("log", nonpositive="mask")
    ax.axhline(FIVE_PERCENT, color="0.3", linestyle="--", linewidth=1.0, label="5% of $s_1$")
    ax.set_xlim(left=0)
    ax.set_xlabel("singular value index $i$")
    ax.set_ylabel("$s_i / s_1$ (log scale)")
    ax.legend(loc="best", fontsize=legend_size, frameon=True)


# ---------------------------------------------------------------- figure 2b


def fig2b(curves: pd.DataFrame, summary: pd.DataFrame) -> tuple[Figure, pd.DataFrame]:
    """Figure 2B: fraction of downstream loss recovered by the top-k principal directions.

    The rule behind the figure: one site at one layer is replaced, at every non-BOS/EOS
    position, by its mean plus its projection onto its top-k principal directions; the
    y value is ``recovered = (L_zero - L_k) / (L_zero - L_clean)`` (1 = the clean model,
    0 = zero ablation), x is ``k_fraction = k / d``. The paper reports that attention
    outputs recover 95% with 25.0% of the dimensions, against 78.1% (MLP) and 85.9%
    (residual) for Llama-3.1-8B layer 15.

    Layout: one panel per (model, dataset, layer) in ``curves``, one line per site; a
    dashed line at the summary's target and a dotted vertical at each site's crossing,
    whose fraction the legend states.

    Args:
        curves: ``model, dataset, layer, site, k, k_fraction, recovered`` (the
            loss-recovered table).
        summary: ``model, dataset, layer, site, target, k_fraction``: the fraction of
            dimensions at which each curve first reaches ``target`` (NaN: never).

    Returns:
        The figure, and the ``curves`` rows drawn (the three sites), sorted by model,
        dataset, layer, site, k.

    Raises:
        ValueError: a required column is missing, none of the three sites is present,
            a point appears twice, or the summary holds several targets.
    """
    _require_columns(curves, CURVE_COLUMNS, "the loss-recovered table")
    _require_columns(summary, SUMMARY_COLUMNS, "the loss-recovered summary")
    data = curves[curves["site"].isin(SITE_ORDER)]
    if data.empty:
        raise ValueError(f"the loss-recovered table has none of the sites {', '.join(SITE_ORDER)}")
    _require_unique(data, ["model", "dataset", "layer", "site", "k"], "the loss-recovered table")
    targets = pd.unique(summary["target"])
    if len(targets) > 1:
        raise ValueError(f"the summary holds several targets {sorted(targets)}; give one")
    target = float(targets[0]) if len(targets) else 0.95
    data = _sort(data, ["model", "dataset", "layer", "site", "k"])
    panels = list(data[["model", "dataset", "layer"]].drop_duplicates().itertuples(index=False))
    with _style():
        fig = _new_figure((0.6 + 4.2 * len(panels), 4.4))
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        for ax, (model, dataset, layer) in zip(axes, panels):
            panel = data[(data["model"] == model) & (data["dataset"] == dataset) & (data["layer"] == layer)]
            marks = summary[(summary["model"] == model) & (summary["dataset"] == dataset)
                            & (summary["layer"] == layer)]
            for site in SITE_ORDER:
                rows = panel[panel["site"] == site]
                if rows.empty:
                    continue
                hit = marks.loc[marks["site"] == site, "k_fraction"]
                frac = float(hit.iloc[0]) if len(hit) else float("nan")
                reach = "not reached" if math.isnan(frac) else f"{100 * frac:.1f}% of dims"
                ax.plot(rows["k_fraction"], rows["recovered"], color=SITE_COLORS[site], marker="o",
                        markersize=3, linewidth=1.6, label=f"{SITE_LABELS[site]}: {reach}")
                if not math.isnan(frac):
                    ax.axvline(frac, color=SITE_COLORS[site], linestyle=":", linewidth=1.2)
            ax.axhline(target, color="0.3", linestyle="--", linewidth=1.0)
            ax.set_xlim(0, 1)
            ax.set_ylim(min(-0.05, float(panel["recovered"].min()) - 0.05),
                        max(1.05, float(panel["recovered"].max()) + 0.05))
            ax.set_title(f"{model} · {dataset} · layer {layer}")
            ax.set_xlabel("fraction of dimensions kept, k / d")
            ax.set_ylabel("fraction of loss recovered" if ax is axes[0] else "")
            ax.legend(loc="lower right", fontsize="small", frameon=True,
                      title=f"{_percent(target)} recovered at", title_fontsize="small")
        fig.suptitle("Loss recovered by each site's top-k principal directions\n"
                     "(1 = clean model, 0 = zero ablation; held-out tokens)")
    return fig, data


# ---------------------------------------------------------------- figure 3


def fig3(wo: pd.DataFrame, focus_layers: dict[str, int], dataset: str) -> tuple[Figure, pd.DataFrame]:
    """Figure 3: where the low rank of the attention output comes from.

    The rule behind the figure: with O = Z W^O and e_i the right singular vectors of the
    centred O, ``var_o = Var(O e_i)``, ``wo_contrib = ||W^O e_i||^2`` and ``z_contrib =
    Var(Z v_i)`` with ``v_i = W^O e_i / ||W^O e_i||``, so that ``var_o = z_contrib *
    wo_contrib``. Each curve is divided by its value at i = 1, so on the log axis O's
    curve is the sum of the other two. The paper finds that O follows Z for the top
    components and that its fall at the tail comes mainly from W^O.

    Layout: one panel per model (at ``dataset`` and the model's focus layer), x = i.

    Args:
        wo: ``model, dataset, layer, i, var_o, wo_contrib, z_contrib`` (the W^O
            decomposition table).
        focus_layers: the layer to draw for each model.
        dataset: the dataset to draw.

    Returns:
        The figure, and the ``wo`` rows drawn, sorted by model and i.

    Raises:
        ValueError: a required column is missing, a model has no rows at its focus
            layer and ``dataset``, or a point appears twice.
    """
    _require_columns(wo, WO_COLUMNS, "the W^O decomposition table")
    parts = []
    for model in _ordered(wo["model"]):
        if model not in focus_layers:
            continue
        layer = focus_layers[model]
        rows = wo[(wo["model"] == model) & (wo["dataset"] == dataset) & (wo["layer"] == layer)]
        if rows.empty:
            have = wo.loc[wo["model"] == model, ["dataset", "layer"]].drop_duplicates()
            raise ValueError(
                f"no W^O decomposition for model={model}, dataset={dataset}, layer={layer}; available: "
                + ", ".join(f"({d}, {int(layer)})" for d, layer in have.itertuples(index=False)))
        parts.append(rows)
    if not parts:
        raise ValueError(f"none of the models {sorted(focus_layers)} is in the W^O decomposition table")
    data = _sort(pd.concat(parts), ["model", "i"])
    _require_unique(data, ["model", "i"], "the W^O decomposition table")
    models = _ordered(data["model"])
    with _style():
        fig = _new_figure((0.6 + 4.2 * len(models), 4.4))
        axes = fig.subplots(1, len(models), squeeze=False)[0]
        for ax, model in zip(axes, models):
            rows = data[data["model"] == model]
            for column, (label, color, style) in WO_CURVES.items():
                y = rows[column].to_numpy(dtype=float)
                ax.plot(rows["i"], y / y[0], color=color, linestyle=style, linewidth=1.6, label=label)
            ax.set_yscale("log", nonpositive="mask")
            ax.set_xlim(left=0)
            ax.set_title(f"{model} · {dataset} · layer {int(rows['layer'].iloc[0])}")
            ax.set_xlabel("principal direction $i$ of $O$")
            ax.set_ylabel("relative to $i = 1$ (log scale)" if ax is axes[0] else "")
            ax.legend(loc="lower left", fontsize="small", frameon=True)
        fig.suptitle("Attention output O = Z W$^O$ along its principal directions $e_i$:\n"
                     "Var(O $e_i$) = Var(Z $v_i$) · ‖W$^O e_i$‖², $v_i$ ∝ W$^O e_i$")
    return fig, data


# ---------------------------------------------------------------- figure 4

DEAD_COLUMNS = ("model", "dataset", "layer", "site", "dead_fraction", "intrinsic_dim_fraction")
RUN_COLUMNS = ("model", "dataset", "layer", "site", "init", "d_init", "optimizer", "auxk", "d_sae", "k", "nmse",
               "dead_fraction", "status")
INIT_STYLE = {
    "asi": ("active subspace init (ASI)", "#d55e00", "o"),
    "random_subspace": ("random subspace (control)", "#0173b2", "s"),
}


def fig4(dead: pd.DataFrame, correlation: dict) -> tuple[Figure, pd.DataFrame]:
    """Figure 4: dead features of the layer-by-layer SAE suite beside intrinsic dimension.

    The rule behind the figure: one SAE per layer and site (LlamaScope's released suite
    in the paper, a base-init TopK suite trained here in the embedded default) is run over
    N held-out tokens; a feature is dead if it never fires. Left: dead fraction per layer,
    one line per site; right: intrinsic dimension (fraction of directions for 99% of the
    variance) of the same sites. The title gives Spearman's rank correlation between the
    two across all layers and sites (the paper: activations with lower intrinsic
    dimension have more dead features, a negative correlation).

    Args:
        dead: ``model, dataset, layer, site, dead_fraction, intrinsic_dim_fraction``.
        correlation: ``spearman_rho, p_value, n`` (attnspace.dead_features.dead_vs_dimension).
    """
    _require_columns(dead, DEAD_COLUMNS, "the dead-features table")
    data = dead[dead["site"].isin(SITE_ORDER)]
    if data.empty:
        raise ValueError(f"the dead-features table has none of the sites {', '.join(SITE_ORDER)}")
    _require_unique(data, ["model", "dataset", "layer", "site"], "the dead-features table")
    data = _sort(data, ["model", "dataset", "site", "layer"])
    with _style():
        fig = _new_figure((11.0, 4.4))
        left, right = fig.subplots(1, 2, sharex=True)
        for site in SITE_ORDER:
            rows = data[data["site"] == site]
            if rows.empty:
                continue
            left.plot(rows["layer"], rows["dead_fraction"], color=SITE_COLORS[site], marker="o", linewidth=1.6)
            right.plot(rows["layer"], rows["intrinsic_dim_fraction"], color=SITE_COLORS[site], marker="o",
                       linewidth=1.6)
        left.set_ylabel("dead features / d_sae")
        right.set_ylabel("intrinsic dim. / d (99% var.)")
        for ax in (left, right):
            ax.set_xlabel("layer")
            ax.set_ylim(0, 1.02)
            layers = sorted(pd.unique(data["layer"]))
            if len(layers) <= _MAX_LAYER_TICKS:
                ax.set_xticks(layers)
        pairs = _fmt_pairs(_pairs(data))
        fig.suptitle(f"Dead features vs intrinsic dimension, {pairs}\n"
                     f"Spearman ρ = {correlation['spearman_rho']:+.2f} (p = {correlation['p_value']:.2g}, "
                     f"n = {correlation['n']} layer × site)")
        _site_legend(fig, data["site"])
    return fig, data


# ---------------------------------------------------------------- figure 5


def fig5(runs: pd.DataFrame, model: str, dataset: str, layer: int, site: str, d_sae: int, k: int,
         optimizer: str = "adam") -> tuple[Figure, pd.DataFrame]:
    """Figure 5: dead features and NMSE against d_init, ASI vs the random-subspace control.

    The rule behind the figure: TopK SAEs of the same size and k, trained on the same
    tokens in the same order, differ only in how the decoder is initialised: inside the
    top-d_init principal directions of the activations (ASI), inside a random d_init-
    dimensional subspace (control), or uniformly on the sphere (base init, drawn as a
    horizontal reference line). Dead = never fires on the held-out window; NMSE on the
    same window. Each point is the mean over seeds with +- one seed standard deviation; the
    centred form (decoder bias at the training mean, subtracted before the encoder) is drawn
    dashed with hollow markers. Failed runs (no finite NMSE) are listed in the title, never
    dropped silently.

    Args:
        runs: the SAE runs table (``attnspace.sae.runs.RUN_COLUMNS``); the csv beside the
            figure holds every run drawn, one row per seed.
    """
    _require_columns(runs, RUN_COLUMNS, "the SAE runs table")
    sel = runs[(runs["model"] == model) & (runs["dataset"] == dataset) & (runs["layer"] == layer)
               & (runs["site"] == site) & (runs["d_sae"] == d_sae) & (runs["k"] == k)]
    # only the inits differ: same optimizer, no AuxK (the sweeps' other variants share the folder)
    sel = sel[sel["init"].isin(["base", *INIT_STYLE]) & (sel["optimizer"] == optimizer)
              & ~sel["auxk"].astype(bool)]
    if sel.empty:
        raise ValueError(f"no SAE runs for {model} {dataset} layer {layer} {site} d_sae {d_sae} k {k}; "
                         f"available: {runs[['model', 'dataset', 'layer', 'site', 'd_sae', 'k']].drop_duplicates().to_dict('records')}")
    ok = sel[sel["status"] == "ok"]
    failed = sel[sel["status"] != "ok"]
    centred = sel["centred"].astype(bool) if "centred" in sel else pd.Series(False, index=sel.index)
    data = sel.assign(centred=centred).sort_values(["centred", "init", "d_init", "seed"], na_position="first")
    data = data.reset_index(drop=True)
    ok = data[data["status"] == "ok"]
    forms = sorted(ok["centred"].unique())
    with _style():
        fig = _new_figure((11.0, 4.4))
        axes = fig.subplots(1, 2, sharex=True)
        for ax, metric, label in ((axes[0], "dead_fraction", "dead features / d_sae"), (axes[1], "nmse", "NMSE")):
            for form in forms:
                mine = ok[ok["centred"] == form]
                style, suffix = ("--", ", centred") if form else ("-", "")
                face = "white" if form else None
                for init, (text, color, marker) in INIT_STYLE.items():
                    stats = mine[mine["init"] == init].groupby("d_init")[metric].agg(["mean", "std", "count"])
                    if stats.empty:
                        continue
                    # Mean over seeds with +- one seed standard deviation (no bar for a single seed).
                    ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].where(stats["count"] > 1),
                                color=color, marker=marker, linestyle=style, linewidth=1.6, capsize=3,
                                markerfacecolor=face, label=text + suffix)
                base = mine.loc[mine["init"] == "base", metric]
                if not base.empty:
                    ax.axhline(float(base.mean()), color="0.3", linestyle=":" if form else "--", linewidth=1.2,
                               label="base init (sphere)" + suffix)
                    if len(base) > 1:
                        ax.axhspan(base.mean() - base.std(ddof=1), base.mean() + base.std(ddof=1), color="0.3",
                                   alpha=0.12, linewidth=0)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("d_init (subspace dimension)")
            ax.set_ylabel(label)
        axes[0].set_ylim(0, 1.02)
        axes[0].legend(loc="best", fontsize="x-small")
        seeds = int(ok.groupby(["centred", "init", "d_init"], dropna=False).size().min()) if len(ok) else 0
        note = (f"; failed: {', '.join(failed['run'].astype(str))}" if len(failed) else "")
        fig.suptitle(f"Active subspace initialisation, {model} · {dataset} · layer {layer} · {site}\n"
                     f"TopK SAE, {d_sae} latents, k = {k}; mean ± sd over {seeds} seed(s){note}")
    return fig, data


# ---------------------------------------------------------------- figures 6 and 7

VARIANT_STYLE = {
    "topk": ("#0173b2", "s", "-"),
    "topk_auxk": ("#029e73", "^", "-"),
    "asi": ("#d55e00", "o", "-"),
    "asi_sparseadam": ("#cc78bc", "D", "--"),
    "asi_maskedadam": ("#029e73", "s", ":"),
}
"""Sweep variant -> (colour, marker, line style), the same in Figures 6 and 7."""


def _sweep_rows(runs: pd.DataFrame, model: str, dataset: str, layer: int, site: str,
                expected: dict[str, tuple[str, int]]) -> pd.DataFrame:
    """The runs of a sweep, by run name: ``expected`` maps run name -> (variant, grid value).

    Every expected run must be present (a missing one is an error naming it); failed runs
    stay in, marked by ``status``.
    """
    from attnspace.sae.runs import VARIANT_LABELS

    _require_columns(runs, RUN_COLUMNS + ("run", "l0", "delta_lm_loss"), "the SAE runs table")
    sel = runs[(runs["model"] == model) & (runs["dataset"] == dataset) & (runs["layer"] == layer)
               & (runs["site"] == site) & runs["run"].isin(expected)]
    sel = sel.drop_duplicates("run")
    missing = sorted(set(expected) - set(sel["run"]))
    if missing:
        raise ValueError(f"the SAE runs table has no {', '.join(missing)} for {model} {dataset} layer {layer} {site}")
    data = sel.copy()
    data["variant"] = [expected[r][0] for r in data["run"]]
    data["variant_label"] = [VARIANT_LABELS[v] for v in data["variant"]]
    order = {name: i for i, name in enumerate(expected)}
    return data.sort_values("run", key=lambda c: c.map(order)).reset_index(drop=True)


def _failed_note(data: pd.DataFrame) -> str:
    failed = data[data["status"] != "ok"]
    return f"\nfailed (no finite loss): {', '.join(failed['run'])}" if len(failed) else ""


def fig6(runs: pd.DataFrame, model: str, dataset: str, layer: int, site: str, d_sae: int, ks: Sequence[int],
         d_init: int, variants: Sequence[str]) -> tuple[Figure, pd.DataFrame]:
    """Figure 6: the sparsity-reconstruction frontier at a fixed number of features.

    The rule behind the figure: at one size (d_sae latents), each variant (TopK with the
    base init, TopK + AuxK, ASI with subspace d_init, ...) is trained at each k on the
    same tokens in the same order, and evaluated on the same held-out window. Left: NMSE
    (unexplained variance) against k; right: the increase of the language model's loss
    (nats per token) when the SAE's reconstruction replaces the site. Lower is better
    in both. Failed runs are named in the title, never dropped.

    Args:
        runs: the SAE runs table (``attnspace.sae.runs.RUN_COLUMNS``).
        ks: the k grid; d_init: ASI's subspace; variants: keys of ``attnspace.sae.runs.VARIANTS``.
    """
    from attnspace.sae.runs import variant_run

    expected = {variant_run(v, d_sae, k, d_init): (v, k) for v in variants for k in ks}
    data = _sweep_rows(runs, model, dataset, layer, site, expected)
    ok = data[data["status"] == "ok"]
    with _style():
        fig = _new_figure((11.0, 4.4))
        axes = fig.subplots(1, 2, sharex=True)
        panels = ((axes[0], "nmse", "NMSE (held-out)"), (axes[1], "delta_lm_loss", "Δ LM loss, SAE spliced in (nats)"))
        for ax, metric, label in panels:
            for v in variants:
                rows = ok[ok["variant"] == v].sort_values("k")
                color, marker, style = VARIANT_STYLE[v]
                ax.plot(rows["k"], rows[metric], color=color, marker=marker, linestyle=style, linewidth=1.6,
                        label=rows["variant_label"].iloc[0] if len(rows) else v)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("k (active latents per token)")
            ax.set_ylabel(label)
        axes[1].axhline(0.0, color="0.3", linewidth=0.8)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), frameon=False)
        fig.suptitle(f"Sparsity-reconstruction frontier, {model} · {dataset} · layer {layer} · {site}\n"
                     f"TopK SAEs with {d_sae} latents; ASI with d_init = {d_init}{_failed_note(data)}")
    return fig, data


def _plain_log_axis(axis) -> None:
    """Label a log axis that spans less than a few decades with plain numbers (0.3, 2000)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())


def power_law(n: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares fit of y = a * n^(-b) in log-log space; returns (a, b). Needs two points or more."""
    slope, intercept = np.polyfit(np.log(np.asarray(n, float)), np.log(np.asarray(y, float)), 1)
    return float(np.exp(intercept)), float(-slope)


def fig7(runs: pd.DataFrame, model: str, dataset: str, layer: int, site: str, sizes: Sequence[int], k: int,
         d_init: int, variants: Sequence[str], seeds: int = 1,
         forms: Sequence[str] = ("uncentred",)) -> tuple[Figure, pd.DataFrame]:
    """Figure 7: scaling in the number of features at fixed k.

    The rule behind the figure: each variant is trained at each size d_sae on the same
    tokens in the same order with the same k. (A) NMSE at the end of training against
    d_sae, log-log, with a power law NMSE = a * d_sae^(-b) fitted per variant (b in the
    legend, a and b in the csv); (B) fraction of dead features (never fire on the
    held-out window); (C) NMSE against the number of alive features, d_sae - dead.
    At the largest size every variant is trained with ``seeds`` seeds in each of ``forms``:
    the uncentred points there are means with +- one seed standard deviation, the centred
    ones hollow markers beside them. Failed runs are named in the title, never dropped.

    Args:
        runs: the SAE runs table. sizes: the d_sae grid; variants: keys of ``VARIANTS``.
    """
    from attnspace.sae.runs import variant_run

    largest = max(sizes)
    expected = {variant_run(v, n, k, d_init, centred=form == "centred", replicate=r): (v, n)
                for v in variants for n in sizes
                for form, r in ([(f, r) for f in forms for r in range(seeds)] if n == largest else [("uncentred", 0)])}
    data = _sweep_rows(runs, model, dataset, layer, site, expected)
    data["centred"] = data["centred"].astype(bool)
    data["n_alive"] = data["d_sae"] - data["n_dead"]
    data["fit_coefficient"] = np.nan
    data["fit_exponent"] = np.nan
    ok = data["status"] == "ok"
    # One point per (variant, size): the mean over the uncentred seeds; the fit goes through those.
    means = (data[ok & ~data["centred"]].groupby(["variant", "d_sae"])
             .agg(nmse=("nmse", "mean"), nmse_sd=("nmse", "std"), dead_fraction=("dead_fraction", "mean"),
                  dead_sd=("dead_fraction", "std"), n_alive=("n_alive", "mean")).reset_index())
    for v in variants:
        mine = means[means["variant"] == v]
        if len(mine) >= 2:
            a, b = power_law(mine["d_sae"], mine["nmse"])
            data.loc[data["variant"] == v, ["fit_coefficient", "fit_exponent"]] = a, b
    with _style():
        fig = _new_figure((15.0, 4.6))
        axes = fig.subplots(1, 3)
        for v in variants:
            rows = means[means["variant"] == v].sort_values("d_sae")
            if rows.empty:
                continue
            color, marker, style = VARIANT_STYLE[v]
            label = data.loc[data["variant"] == v, "variant_label"].iloc[0]
            b = data.loc[data["variant"] == v, "fit_exponent"].iloc[0]
            fit_label = f"{label} (b = {b:.2f})" if np.isfinite(b) else label
            axes[0].errorbar(rows["d_sae"], rows["nmse"], yerr=rows["nmse_sd"], color=color, marker=marker,
                             linestyle="none", capsize=3, label=fit_label)
            if np.isfinite(b):
                grid = np.geomspace(rows["d_sae"].min(), rows["d_sae"].max(), 50)
                axes[0].plot(grid, data.loc[data["variant"] == v, "fit_coefficient"].iloc[0] * grid ** -b,
                             color=color, linestyle=style, linewidth=1.4)
            axes[1].errorbar(rows["d_sae"], rows["dead_fraction"], yerr=rows["dead_sd"], color=color, marker=marker,
                             linestyle=style, linewidth=1.6, capsize=3, label=label)
            axes[2].plot(rows["n_alive"], rows["nmse"], color=color, marker=marker, linestyle=style, linewidth=1.6,
                         label=label)
            cen = data[ok & data["centred"] & (data["variant"] == v)]
            if not cen.empty:  # the centred form at the largest size: hollow markers, nudged right
                c = cen.groupby("d_sae").agg(nmse=("nmse", "mean"), nmse_sd=("nmse", "std"),
                                             dead=("dead_fraction", "mean"), dead_sd=("dead_fraction", "std"))
                for ax, y, e in ((axes[0], c["nmse"], c["nmse_sd"]), (axes[1], c["dead"], c["dead_sd"])):
                    ax.errorbar(c.index * 1.12, y, yerr=e, color=color, marker=marker, markerfacecolor="white",
                                linestyle="none", capsize=3)
        axes[0].set(xscale="log", yscale="log", xlabel="d_sae (features)", ylabel="NMSE (held-out)",
                    title="(A) NMSE ≈ a · d_sae^(−b), fitted")
        axes[1].set(xscale="log", xlabel="d_sae (features)", ylabel="dead features / d_sae", ylim=(0, 1.02),
                    title="(B) dead features")
        axes[2].set(xscale="log", yscale="log", xlabel="alive features (d_sae − dead)", ylabel="NMSE (held-out)",
                    title="(C) NMSE vs alive features")
        for ax in axes[:2]:
            ax.set_xticks(sorted(sizes), [str(n) for n in sorted(sizes)])
            ax.xaxis.set_minor_locator(NullLocator())
        _plain_log_axis(axes[0].yaxis)
        _plain_log_axis(axes[2].xaxis)
        _plain_log_axis(axes[2].yaxis)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), frameon=False)
        spread = (f"; at {largest}: mean ± sd over {seeds} seeds" + (", hollow: centred" if "centred" in forms else "")
                  if seeds > 1 or "centred" in forms else "")
        fig.suptitle(f"Scaling the number of features, {model} · {dataset} · layer {layer} · {site}\n"
                     f"TopK SAEs with k = {k}; ASI with d_init = {d_init}{spread}{_failed_note(data)}")
    return fig, data


# ---------------------------------------------------------------- saving


def save_figure(fig: Figure, data: pd.DataFrame, pdf_path: str | os.PathLike) -> list[Path]:
    """Write ``fig`` as ``<stem>.pdf`` and ``<stem>.png`` and ``data`` as ``<stem>.csv``.

    Each file is written to a temporary name in the same directory and then moved into
    place with ``os.replace``, so a reader (or an interrupted Snakemake job) never sees
    a half-written file. Parent directories are created. The PNG is drawn at 150 dpi;
    the PDF carries no creation date, so identical inputs give identical PDFs. The
    figure is closed afterwards (removed from pyplot if pyplot manages it).

    Args:
        fig: the figure to save.
        data: the table behind it; written without the index.
        pdf_path: the ``.pdf`` path; the PNG and CSV take the same stem beside it.

    Returns:
        ``[pdf, png, csv]`` paths.

    Raises:
        ValueError: ``pdf_path`` does not end in ``.pdf``.
    """
    pdf = Path(pdf_path)
    if pdf.suffix.lower() != ".pdf":
        raise ValueError(f"pdf_path must end in .pdf, got {str(pdf)!r}")
    png, csv = pdf.with_suffix(".png"), pdf.with_suffix(".csv")
    pdf.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(pdf) as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None})
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=_PNG_DPI)
    with atomic_path(csv) as tmp:
        data.to_csv(tmp, index=False)
    if "matplotlib.pyplot" in sys.modules:  # only pyplot keeps a list of open figures
        sys.modules["matplotlib.pyplot"].close(fig)
    return [pdf, png, csv]


# ---------------------------------------------------------------- helpers


@contextmanager
def _style() -> Iterator[None]:
    """Seaborn style and context for the figures, without touching global rcParams."""
    with sns.axes_style(_STYLE), sns.plotting_context(_CONTEXT, font_scale=_FONT_SCALE):
        yield


def _new_figure(size: tuple[float, float]) -> Figure:
    """A figure on an Agg canvas with constrained layout; no pyplot involved.

    Width is at least ``_MIN_WIDTH`` inches so that titles and the site legend fit
    even when there is a single panel (the embedded one-model config).
    """
    fig = Figure(figsize=(max(size[0], _MIN_WIDTH), size[1]), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _site_legend(fig: Figure, sites: pd.Series) -> None:
    """One legend for the whole figure, below the panels, for the sites present."""
    present = set(sites)
    handles = [
        Line2D([], [], color=SITE_COLORS[s], marker="o", markersize=4, linewidth=1.6,
               label=SITE_LABELS[s])
        for s in SITE_ORDER
        if s in present
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)


def _percent(tau: float) -> str:
    """0.99 -> '99%', 0.9999 -> '99.99%'."""
    return f"{round(tau * 100, 10):g}%"


def _ordered(values: pd.Series) -> list:
    """Distinct values in order of first appearance."""
    return list(pd.unique(values))


def _pairs(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """Distinct (model, dataset) pairs in order of first appearance."""
    pairs = frame[["model", "dataset"]].drop_duplicates()
    return [tuple(p) for p in pairs.itertuples(index=False)]


def _fmt_pairs(pairs: list[tuple[str, str]]) -> str:
    return ", ".join(f"({m}, {ds})" for m, ds in pairs) or "none"


def _sort(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Sort with models, datasets in table order and sites in ``SITE_ORDER``."""
    keys = {
        "model": {v: j for j, v in enumerate(_ordered(frame["model"]))},
        "dataset": {v: j for j, v in enumerate(_ordered(frame["dataset"]))},
        "site": {v: j for j, v in enumerate(SITE_ORDER)},
    }

    def key(col: pd.Series) -> pd.Series:
        return col.map(keys[col.name]) if col.name in keys else col

    return frame.sort_values(by, key=key, kind="stable").reset_index(drop=True)


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{name} lacks column(s) {', '.join(missing)}; "
            f"it has: {', '.join(map(str, frame.columns))}"
        )


def _require_unique(frame: pd.DataFrame, keys: list[str], name: str) -> None:
    """Two rows for one point would draw a zig-zag line; refuse them instead."""
    dup = frame.duplicated(keys, keep=False)
    if dup.any():
        first = frame.loc[dup, keys].iloc[0]
        raise ValueError(
            f"{name} has {int(dup.sum())} rows that repeat a point, e.g. {first.to_dict()}"
        )
