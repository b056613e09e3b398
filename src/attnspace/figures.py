"""Figures 1, 2a, 8 and 9 of the paper, drawn from tidy tables.

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
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

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

IDIM_COLUMNS = ("model", "dataset", "layer", "site", "d", "threshold", "k", "fraction")
SPECTRA_COLUMNS = ("model", "dataset", "layer", "site", "i", "rel_s", "n_above_5pct")

_STYLE = "whitegrid"
_CONTEXT = "paper"
_FONT_SCALE = 1.25
_PNG_DPI = 150
_MIN_WIDTH = 7.0
_MAX_LAYER_TICKS = 12


# ---------------------------------------------------------------- figure 1 and 9


def fig1(idim: pd.DataFrame, threshold: float = 0.99) -> tuple[Figure, pd.DataFrame]:
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
    idim: pd.DataFrame, thresholds: Sequence[float] = (0.5, 0.9, 0.999, 0.9999)
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
    """Fraction vs layer, one line per site, y fixed to [0, 1].

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
    ax.set_ylim(0.0, 1.02)
    layers = sorted(pd.unique(shared_layers))
    if len(layers) <= _MAX_LAYER_TICKS:  # a few sampled layers: tick exactly those
        ax.set_xticks(layers)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


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
    _write_atomic(pdf, lambda f: fig.savefig(f, format="pdf", metadata={"CreationDate": None}))
    _write_atomic(png, lambda f: fig.savefig(f, format="png", dpi=_PNG_DPI))
    _write_atomic(csv, lambda f: data.to_csv(f, index=False))
    if "matplotlib.pyplot" in sys.modules:  # only pyplot keeps a list of open figures
        sys.modules["matplotlib.pyplot"].close(fig)
    return [pdf, png, csv]


def _write_atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
