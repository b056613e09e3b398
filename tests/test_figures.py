"""Tests for attnspace.figures on small synthetic tables with a planted structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from attnspace.figures import SITE_LABELS, SITE_ORDER, fig2a, fig2b, fig3, fig8, save_figure
from attnspace.figures_idim import fig1, fig9

MODELS = ("tiny-llama", "tiny-gemma")
DATASETS = ("web", "code")
LAYERS = (0, 1, 2)
THRESHOLDS = (0.5, 0.9, 0.99, 0.999, 0.9999)
D = 256
# Planted per-site decay rates: attention decays fastest, so has the fewest s_i > 5%.
DECAY = {"attn_out": 0.03, "mlp_out": 0.012, "resid_post": 0.008, "attn_z": 0.02}


def _spectrum(site: str, layer: int) -> np.ndarray:
    """Decreasing singular values, s_1 = 10."""
    return 10.0 * np.exp(-(DECAY[site] + 0.001 * layer) * np.arange(D))


@pytest.fixture(scope="module")
def spectra() -> pd.DataFrame:
    rows = []
    for model in MODELS:
        for dataset in DATASETS:
            for layer in LAYERS:
                for site in DECAY:  # attn_z is present in the table but never drawn
                    s = _spectrum(site, layer)
                    rel = s / s[0]
                    rows.append(pd.DataFrame({
                        "model": model, "dataset": dataset, "layer": layer, "site": site,
                        "i": np.arange(1, D + 1), "s": s, "rel_s": rel,
                        "n_above_5pct": int((rel > 0.05).sum()),
                    }))
    return pd.concat(rows, ignore_index=True)


@pytest.fixture(scope="module")
def idim(spectra: pd.DataFrame) -> pd.DataFrame:
    """Intrinsic dimension computed from the planted spectra (numpy, not the module)."""
    rows = []
    for (model, dataset, layer, site), g in spectra.groupby(
        ["model", "dataset", "layer", "site"], sort=False
    ):
        var = np.cumsum(g["s"].to_numpy() ** 2)
        var /= var[-1]
        for tau in THRESHOLDS:
            k = int(np.searchsorted(var, tau) + 1)
            rows.append({
                "model": model, "dataset": dataset, "layer": layer, "site": site,
                "d": D, "n_tokens": 1000, "threshold": tau, "k": k, "fraction": k / D,
                "n_sv_above_5pct": int(g["n_above_5pct"].iloc[0]),
            })
    return pd.DataFrame(rows)


def _lines(fig: Figure) -> int:
    return sum(len(ax.get_lines()) for ax in fig.axes)


def test_fig1_plots_only_the_threshold_and_the_three_sites(idim):
    fig, data = fig1(idim, threshold=0.99)
    assert isinstance(fig, Figure)
    assert set(data["threshold"]) == {0.99}
    assert set(data["site"]) == set(SITE_ORDER)
    expected = idim[(idim["threshold"] == 0.99) & idim["site"].isin(SITE_ORDER)]
    assert len(data) == len(expected) == 2 * 2 * 3 * 3
    key = ["model", "dataset", "layer", "site"]
    pd.testing.assert_frame_equal(
        data.sort_values(key).reset_index(drop=True),
        expected.sort_values(key).reset_index(drop=True),
    )
    assert len(fig.axes) == len(MODELS) * len(DATASETS)
    assert _lines(fig) == len(MODELS) * len(DATASETS) * 3
    assert "0.99" in fig.get_suptitle()
    for ax in fig.axes:
        assert ax.get_ylim() == pytest.approx((0.0, 1.02))
    # The planted ordering survives selection: attention has the smallest fraction.
    mean = data.groupby("site")["fraction"].mean()
    assert mean["attn_out"] < mean["mlp_out"] < mean["resid_post"]


def test_fig1_missing_threshold_names_what_is_available(idim):
    with pytest.raises(ValueError, match=r"0\.95.*available: 0\.5, 0\.9, 0\.99"):
        fig1(idim, threshold=0.95)


def test_fig1_refuses_missing_columns_and_duplicates(idim):
    with pytest.raises(ValueError, match="fraction"):
        fig1(idim.drop(columns="fraction"))
    with pytest.raises(ValueError, match="repeat"):
        fig1(pd.concat([idim, idim.iloc[[0]]]), threshold=idim["threshold"].iloc[0])


def test_fig9_one_column_per_threshold(idim):
    thresholds = (0.5, 0.9, 0.999, 0.9999)
    fig, data = fig9(idim, thresholds)
    assert list(pd.unique(data["threshold"])) == list(thresholds)
    assert set(data["site"]) == set(SITE_ORDER)
    assert len(data) == len(thresholds) * 2 * 2 * 3 * 3
    assert len(fig.axes) == len(thresholds) * len(MODELS) * len(DATASETS)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"τ = {t:g} ({p} of variance)"
                      for t, p in zip(thresholds, ("50%", "90%", "99.9%", "99.99%"))]
    with pytest.raises(ValueError, match=r"0\.75.*0\.8.*available"):
        fig9(idim, (0.5, 0.75, 0.8))


def test_fig2a_legend_counts_and_rows(spectra):
    fig, data = fig2a(spectra, "tiny-gemma", "code", 1)
    assert isinstance(fig, Figure)
    expected = spectra[
        (spectra["model"] == "tiny-gemma") & (spectra["dataset"] == "code")
        & (spectra["layer"] == 1) & spectra["site"].isin(SITE_ORDER)
    ]
    assert len(data) == len(expected) == 3 * D
    assert set(data["site"]) == set(SITE_ORDER)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    for site in SITE_ORDER:
        n = int((_spectrum(site, 1) / _spectrum(site, 1)[0] > 0.05).sum())
        assert f"{SITE_LABELS[site]} ({n} > 5%)" in texts
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and set(dashed[0].get_ydata()) == {0.05}


def test_fig2a_unknown_key_names_what_is_available(spectra):
    with pytest.raises(ValueError, match=r"layer=7.*available.*\(tiny-llama, web, 0\)"):
        fig2a(spectra, "tiny-llama", "web", 7)
    with pytest.raises(ValueError, match="model=nope"):
        fig2a(spectra, "nope", "web", 0)


def test_fig8_excludes_the_focus_pair_and_picks_one_layer(spectra):
    fig, data = fig8(spectra, exclude=("tiny-llama", "web"))
    pairs = set(map(tuple, data[["model", "dataset"]].drop_duplicates().to_numpy()))
    assert pairs == {("tiny-llama", "code"), ("tiny-gemma", "web"), ("tiny-gemma", "code")}
    assert set(data["layer"]) == {1}  # middle of 0, 1, 2
    assert set(data["site"]) == set(SITE_ORDER)
    assert len(data) == 3 * 3 * D
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    assert all("layer 1" in ax.get_title() for ax in visible)


def test_fig8_uses_the_focus_column(spectra):
    marked = spectra.assign(focus=spectra["layer"] == 2)
    _, data = fig8(marked, exclude=("tiny-llama", "web"))
    assert set(data["layer"]) == {2}
    assert data["focus"].all()


def test_fig8_with_nothing_left_draws_a_note(spectra):
    single = spectra[(spectra["model"] == "tiny-llama") & (spectra["dataset"] == "web")]
    fig, data = fig8(single, exclude=("tiny-llama", "web"))
    assert isinstance(fig, Figure)
    assert data.empty and list(data.columns) == list(spectra.columns)
    assert any("no other model/dataset pairs configured" in t.get_text() for t in fig.texts)
    with pytest.raises(ValueError, match=r"available pairs: \(tiny-llama, web\)"):
        fig8(single, exclude=("tiny-gemma", "web"))


def test_save_figure_writes_three_files_atomically(tmp_path, idim, spectra):
    fig, data = fig1(idim)
    paths = save_figure(fig, data, tmp_path / "nested" / "dir" / "fig1.pdf")
    assert [p.suffix for p in paths] == [".pdf", ".png", ".csv"]
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert paths[0].read_bytes().startswith(b"%PDF")
    assert paths[1].read_bytes().startswith(b"\x89PNG")
    pd.testing.assert_frame_equal(pd.read_csv(paths[2]), data, check_dtype=False)
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["fig1.csv", "fig1.pdf", "fig1.png"]

    fig, data = fig8(spectra.iloc[0:0], exclude=None)  # empty table: the note, empty csv
    paths = save_figure(fig, data, tmp_path / "fig8.pdf")
    assert all(p.stat().st_size > 0 for p in paths)
    assert pd.read_csv(paths[2]).empty

    with pytest.raises(ValueError, match=r"\.pdf"):
        save_figure(*fig1(idim), tmp_path / "fig1.png")


# ---------------------------------------------------------------- figures 2b and 3

K_GRID = (0, 1, 2, 4, 8, 16, 32, 64, 128, 192, 256)
# Planted curves: recovered = 1 - exp(-k / scale); attention saturates first.
SCALE = {"attn_out": 10.0, "mlp_out": 40.0, "resid_post": 70.0}


@pytest.fixture(scope="module")
def curves() -> pd.DataFrame:
    rows = []
    for model, layer in (("tiny-llama", 1), ("tiny-gemma", 2)):
        for site, scale in SCALE.items():
            for k in K_GRID:
                rec = 1 - np.exp(-k / scale) if k < D else 1.0
                rows.append({"model": model, "dataset": "web", "layer": layer, "site": site, "k": k,
                             "k_fraction": k / D, "loss": 4.0 - 2.0 * rec, "loss_clean": 2.0,
                             "loss_zero": 4.0, "recovered": rec})
    return pd.DataFrame(rows)


def test_fig2b_one_panel_per_model_and_the_95_percent_marks(curves):
    from attnspace.interventions import recovery_summary

    summary = recovery_summary(curves, 0.95)
    fig, data = fig2b(curves, summary)
    assert isinstance(fig, Figure)
    assert len(data) == len(curves) and list(data.columns) == list(curves.columns)
    assert len(fig.axes) == 2
    for ax, model in zip(fig.axes, ("tiny-llama", "tiny-gemma")):
        assert model in ax.get_title()
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        marks = summary[summary["model"] == model].set_index("site")["k_fraction"]
        for site in SITE_ORDER:
            assert f"{SITE_LABELS[site]}: {100 * marks[site]:.1f}% of dims" in texts
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and set(dashed[0].get_ydata()) == {0.95}
        dotted = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":")
        assert dotted == pytest.approx(sorted(marks))
    # the planted order survives: attention reaches 95% with the fewest dimensions
    m = summary[summary["model"] == "tiny-llama"].set_index("site")["k_fraction"]
    assert m["attn_out"] < m["mlp_out"] < m["resid_post"]


def test_fig2b_says_when_a_curve_never_reaches_the_target(curves):
    from attnspace.interventions import recovery_summary

    capped = curves.assign(recovered=np.minimum(curves["recovered"], 0.9))
    fig, _ = fig2b(capped, recovery_summary(capped, 0.95))
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert f"{SITE_LABELS['attn_out']}: not reached" in texts
    with pytest.raises(ValueError, match="recovered"):
        fig2b(curves.drop(columns="recovered"), recovery_summary(curves, 0.95))


@pytest.fixture(scope="module")
def wo_table() -> pd.DataFrame:
    rows = []
    i = np.arange(1, D + 1)
    for model in MODELS:
        for dataset in DATASETS:
            for layer in LAYERS:
                z = np.exp(-0.01 * i)
                wo = 2.0 / (1 + np.exp((i - 200) / 10))  # W^O collapses at the tail
                rows.append(pd.DataFrame({"model": model, "dataset": dataset, "layer": layer, "i": i,
                                          "var_o": z * wo, "wo_contrib": wo, "z_contrib": z}))
    return pd.concat(rows, ignore_index=True)


def test_fig3_draws_each_models_focus_layer_normalised_at_the_first_direction(wo_table):
    fig, data = fig3(wo_table, {"tiny-llama": 2, "tiny-gemma": 1}, "code")
    assert list(data.columns) == list(wo_table.columns)
    assert len(data) == 2 * D
    assert set(map(tuple, data[["model", "layer"]].drop_duplicates().to_numpy())) == {
        ("tiny-llama", 2), ("tiny-gemma", 1)}
    assert (data["dataset"] == "code").all()
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_yscale() == "log"
        lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
        assert len(lines) == 3
        for y in lines.values():
            assert y[0] == pytest.approx(1.0)
        o, z, w = (lines[label] for label in (
            "Var(O $e_i$): attention output", "Var(Z $v_i$): Z contribution", "‖W$^O e_i$‖²: W$^O$ contribution"))
        np.testing.assert_allclose(o, z * w)  # the identity survives the normalisation


def test_fig3_names_what_is_available(wo_table):
    with pytest.raises(ValueError, match=r"layer=7.*available: \(web, 0\)"):
        fig3(wo_table, {"tiny-llama": 7}, "web")
    with pytest.raises(ValueError, match="none of the models"):
        fig3(wo_table, {"nope": 0}, "web")
