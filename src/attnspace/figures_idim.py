"""Figures of the intrinsic dimension: Figures 1 and 9 of the paper, and its convergence in tokens.

Input tables: ``idim`` (module docstring of :mod:`attnspace.figures`; with ``fraction_lo``,
``fraction_hi`` the interval over documents and ``fraction_corrected`` the bias-corrected estimate
it is built around, drawn as a band and a dashed line) and ``convergence``
(``results/tables/id_convergence.csv``, :func:`attnspace.spectrum.convergence_frame`), one row per
(model, dataset, layer, site, threshold, n_tokens): the fraction k/d on the nested subsample of the
first ``n_tokens`` kept rows (whole documents). Styling and saving are :mod:`attnspace.figures`'.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from attnspace.defaults import schema_default
from attnspace.figures import (_MAX_LAYER_TICKS, SITE_COLORS, SITE_LABELS, SITE_ORDER, _new_figure, _ordered, _pairs,
                               _percent, _require_columns, _require_unique, _site_legend, _sort, _style)

THRESHOLD = schema_default("spectrum.threshold")
"""Figure 1's default variance threshold (the config's main one)."""
IDIM_COLUMNS = ("model", "dataset", "layer", "site", "d", "threshold", "k", "fraction")
CONVERGENCE_COLUMNS = ("model", "dataset", "layer", "site", "threshold", "n_tokens", "fraction")


def fig1(idim: pd.DataFrame, threshold: float = THRESHOLD) -> tuple[Figure, pd.DataFrame]:
    """Figure 1: fraction of directions needed to hold ``threshold`` of the variance.

    The rule behind the figure: for each (model, dataset, layer, site), ``k`` is the
    smallest number of top singular directions of the mean-centred activations whose
    squared singular values sum to at least ``threshold`` of the total; the y value is
    ``fraction = k / d`` (unitless, in [0, 1]). A site whose activations fill the
    whole width sits near 1; the paper reports attention outputs near 0.6 and MLP
    outputs / residual streams above 0.9 at threshold 0.99.

    Layout: x = layer, one line per site, a panel per (dataset row, model column).

    Args:
        idim: the intrinsic-dimension table (see the module docstring).
        threshold: the variance threshold to draw; must be present in ``idim``.

    Returns:
        The figure, and the ``idim`` rows drawn (that threshold, the three sites),
        sorted by model, dataset, site, layer.

    Raises:
        ValueError: a required column is missing, ``threshold`` is not in ``idim``,
            none of the three sites is present, or a point appears twice.
    """
    data = _select_idim(idim, [threshold])
    models, datasets = _ordered(data["model"]), _ordered(data["dataset"])
    with _style():
        fig = _new_figure((0.6 + 3.4 * len(models), 1.2 + 2.7 * len(datasets)))
        axes = fig.subplots(
            len(datasets), len(models), sharex="col", sharey=True, squeeze=False
        )
        for r, dataset in enumerate(datasets):
            for c, model in enumerate(models):
                ax = axes[r, c]
                panel = data[(data["model"] == model) & (data["dataset"] == dataset)]
                _draw_idim_panel(ax, panel, data.loc[data["model"] == model, "layer"])
                ax.set_title(f"{model} · {dataset}")
                ax.set_xlabel("layer" if r == len(datasets) - 1 else "")
                ax.set_ylabel("intrinsic dim. / d" if c == 0 else "")
        _site_legend(fig, data["site"])
        fig.suptitle(
            f"Intrinsic dimension fraction k/d at variance threshold τ = {threshold:g}\n"
            f"(k = fewest singular directions holding {_percent(threshold)} of the variance)"
        )
    return fig, data


def fig9(
    idim: pd.DataFrame, thresholds: Sequence[float] = tuple(schema_default("figures.fig9.thresholds"))
) -> tuple[Figure, pd.DataFrame]:
    """Figure 9: Figure 1 at other variance thresholds.

    The rule behind the figure is Figure 1's (``fraction = k / d``, ``k`` the fewest
    top singular directions holding ``threshold`` of the variance), repeated for each
    threshold, to show that the ordering of the sites does not hinge on the choice of
    0.99.

    Layout: one column of panels per threshold, one row per (model, dataset) pair;
    x = layer, one line per site.

    Args:
        idim: the intrinsic-dimension table (see the module docstring).
        thresholds: the thresholds to draw, one column each; all must be in ``idim``.

    Returns:
        The figure, and the ``idim`` rows drawn, sorted by threshold (in the order
        given), model, dataset, site, layer.

    Raises:
        ValueError: as ``fig1``, naming every missing threshold; or ``thresholds``
            is empty.
    """
    thresholds = list(thresholds)
    if not thresholds:
        raise ValueError("fig9 needs at least one threshold")
    data = _select_idim(idim, thresholds)
    pairs = _pairs(data)
    with _style():
        fig = _new_figure((1.0 + 3.0 * len(thresholds), 1.2 + 2.4 * len(pairs)))
        axes = fig.subplots(
            len(pairs), len(thresholds), sharex="row", sharey=True, squeeze=False
        )
        for c, tau in enumerate(thresholds):
            at_tau = data[np.isclose(data["threshold"], tau, rtol=0.0, atol=1e-12)]
            for r, (model, dataset) in enumerate(pairs):
                ax = axes[r, c]
                panel = at_tau[(at_tau["model"] == model) & (at_tau["dataset"] == dataset)]
                pair_layers = data.loc[
                    (data["model"] == model) & (data["dataset"] == dataset), "layer"
                ]
                _draw_idim_panel(ax, panel, pair_layers)
                if r == 0:
                    ax.set_title(f"τ = {tau:g} ({_percent(tau)} of variance)")
                ax.set_xlabel("layer" if r == len(pairs) - 1 else "")
                ax.set_ylabel(f"{model}\n{dataset}\nk / d" if c == 0 else "")
        _site_legend(fig, data["site"])
        fig.suptitle(
            "Intrinsic dimension fraction k/d at several variance thresholds τ\n"
            "(k = fewest singular directions holding τ of the variance)"
        )
    return fig, data


def _select_idim(idim: pd.DataFrame, thresholds: Sequence[float]) -> pd.DataFrame:
    """Rows of ``idim`` at ``thresholds`` and in ``SITE_ORDER``, sorted for drawing."""
    _require_columns(idim, IDIM_COLUMNS, "idim")
    available = sorted(float(t) for t in pd.unique(idim["threshold"]))
    missing = [
        t for t in thresholds if not np.isclose(available, t, rtol=0.0, atol=1e-12).any()
    ]
    if missing:
        raise ValueError(
            f"threshold(s) {', '.join(f'{t:g}' for t in missing)} not in idim; "
            f"available: {', '.join(f'{t:g}' for t in available) or 'none'}"
        )
    # Which requested threshold each row belongs to, by closeness, to sort by request order.
    rank = np.full(len(idim), -1)
    for j, t in enumerate(thresholds):
        rank[np.isclose(idim["threshold"].to_numpy(float), t, rtol=0.0, atol=1e-12)] = j
    data = idim.assign(_rank=rank)
    data = data[(data["_rank"] >= 0) & data["site"].isin(SITE_ORDER)]
    if data.empty:
        raise ValueError(
            f"idim has no rows for sites {', '.join(SITE_ORDER)} at the requested "
            f"threshold(s); sites present: {', '.join(map(str, _ordered(idim['site'])))}"
        )
    _require_unique(data, ["model", "dataset", "layer", "site", "threshold"], "idim")
    return _sort(data, ["_rank", "model", "dataset", "site", "layer"]).drop(columns="_rank")


def _draw_idim_panel(ax, panel: pd.DataFrame, shared_layers: pd.Series) -> None:
    """Fraction vs layer, one line per site with its interval as a band and its bias-corrected value dashed,
    y fixed to [0, 1].

    ``shared_layers`` are the layers of every panel sharing this x axis; the ticks
    are set from them, since on a shared axis the last panel's ticks win.
    """
    for site in SITE_ORDER:
        rows = panel[panel["site"] == site].sort_values("layer")
        if not rows.empty:
            ax.plot(
                rows["layer"], rows["fraction"], color=SITE_COLORS[site],
                marker="o", markersize=4, linewidth=1.6, label=SITE_LABELS[site],
            )
            if {"fraction_lo", "fraction_hi"} <= set(rows) and rows["fraction_lo"].notna().any():
                # The interval over documents (spectrum.bootstrap): a band around the line.
                ax.fill_between(rows["layer"], rows["fraction_lo"], rows["fraction_hi"],
                                color=SITE_COLORS[site], alpha=0.25, linewidth=0)
            if "fraction_corrected" in rows and rows["fraction_corrected"].notna().any():
                # The bias-corrected estimate the band is built around, dashed beside the raw one.
                ax.plot(rows["layer"], rows["fraction_corrected"], color=SITE_COLORS[site], linewidth=1.0,
                        linestyle="--")
    ax.set_ylim(0.0, 1.02)
    layers = sorted(pd.unique(shared_layers))
    if len(layers) <= _MAX_LAYER_TICKS:  # a few sampled layers: tick exactly those
        ax.set_xticks(layers)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


def convergence(table: pd.DataFrame, threshold: float = THRESHOLD) -> tuple[Figure, pd.DataFrame]:
    """The intrinsic dimension against the number of tokens it is measured on.

    The rule behind the figure: for each (model, dataset, layer, site), ``fraction = k / d`` at
    ``threshold`` on nested subsamples of the documents (the first 1/16, 1/8, 1/4, 1/2 and all of the
    document groups). A curve still rising at the right edge has not converged: the sample covariance
    spreads the eigenvalues, so k at a high threshold is biased low by an amount that shrinks with n.

    Layout: x = kept tokens (log axis), one thin line per layer and a thick line for the mean over
    layers, per site; a panel per (dataset row, model column).

    Returns:
        The figure, and the rows drawn (that threshold, the three sites), sorted by model, dataset,
        site, layer, n_tokens.

    Raises:
        ValueError: a required column is missing, ``threshold`` is not in the table, or a point
            appears twice.
    """
    _require_columns(table, CONVERGENCE_COLUMNS, "convergence")
    data = table[np.isclose(table["threshold"].to_numpy(float), threshold, rtol=0.0, atol=1e-12)
                 & table["site"].isin(SITE_ORDER)]
    if data.empty:
        raise ValueError(f"convergence has no rows for sites {', '.join(SITE_ORDER)} at threshold {threshold:g}; "
                         f"thresholds present: {', '.join(f'{t:g}' for t in sorted(pd.unique(table['threshold'])))}")
    _require_unique(data, ["model", "dataset", "layer", "site", "n_tokens"], "convergence")
    data = _sort(data, ["model", "dataset", "site", "layer", "n_tokens"])
    models, datasets = _ordered(data["model"]), _ordered(data["dataset"])
    with _style():
        fig = _new_figure((0.6 + 3.4 * len(models), 1.2 + 2.7 * len(datasets)))
        axes = fig.subplots(len(datasets), len(models), sharey=True, squeeze=False)
        for r, dataset in enumerate(datasets):
            for c, model in enumerate(models):
                ax = axes[r, c]
                panel = data[(data["model"] == model) & (data["dataset"] == dataset)]
                for site in SITE_ORDER:
                    rows = panel[panel["site"] == site]
                    for _, layer in rows.groupby("layer"):
                        ax.plot(layer["n_tokens"], layer["fraction"], color=SITE_COLORS[site], alpha=0.35,
                                linewidth=0.8)
                    mean = rows.groupby("n_tokens")["fraction"].mean()
                    if not mean.empty:
                        ax.plot(mean.index, mean.to_numpy(), color=SITE_COLORS[site], marker="o", markersize=4,
                                linewidth=1.8, label=SITE_LABELS[site])
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.set_ylim(0.0, 1.02)
                ax.set_title(f"{model} · {dataset}")
                ax.set_xlabel("kept tokens (nested subsamples)" if r == len(datasets) - 1 else "")
                ax.set_ylabel("intrinsic dim. / d" if c == 0 else "")
        _site_legend(fig, data["site"])
        fig.suptitle(f"Intrinsic dimension k/d ({_percent(threshold)} of the variance) against tokens\n"
                     "(thin: each layer; thick: mean over layers)")
    return fig, data
