"""The intrinsic dimension at nested subsamples of the documents: spectra against numpy on the first groups'
rows, the table's last-doubling columns, C1's ordering at every subsample, the figure and its caption."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnspace.captions import caption
from attnspace.claims import HOLDS, c1, ordering_at_every_n
from attnspace.figures_idim import convergence
from attnspace.spectrum import (convergence_frame, intrinsic_dim_frame, intrinsic_dimension, load_spectrum,
                                nested_singular_values, save_spectrum, spectrum_from_moments)

D, G, L = 10, 32, 15


def documents(seed: int, scales: np.ndarray) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((G, L, D)) * scales


def moments(docs: np.ndarray) -> np.ndarray:
    z = np.concatenate([docs, np.ones(docs.shape[:2] + (1,))], axis=2)
    return np.einsum("gni,gnj->gij", z, z)


def test_nested_subsamples_are_the_first_groups():
    docs = documents(0, np.geomspace(3, 0.1, D))
    sv, tokens = nested_singular_values(moments(docs))
    assert tokens.tolist() == [2 * L, 4 * L, 8 * L, 16 * L, 32 * L]  # 1/16 .. all of 32 groups
    for s, n in zip(sv, tokens):
        rows = docs[: n // L].reshape(-1, D)
        np.testing.assert_allclose(s, np.linalg.svd(rows - rows.mean(0), compute_uv=False), rtol=1e-9)
    # fewer groups than the divisor: one group at least, and no size twice
    assert nested_singular_values(moments(docs[:3]))[1].tolist() == [L, 2 * L, 3 * L]


def spectra_files(tmp_path, attn_scales: np.ndarray) -> list:
    paths = []
    sites = (("attn_out", attn_scales), ("mlp_out", np.ones(D)), ("resid_post", np.ones(D)))
    for i, (site, scales) in enumerate(sites):
        spec = spectrum_from_moments(moments(documents(i, scales)), resamples=20, seed=0,
                                     key=dict(model="m", dataset="ds", layer=3, site=site))
        save_spectrum(spec, tmp_path / f"{site}.npz")
        paths.append(tmp_path / f"{site}.npz")
    return paths


def test_table_columns_and_convergence_frame(tmp_path):
    paths = spectra_files(tmp_path, np.r_[np.ones(3), np.full(D - 3, 0.05)])
    conv = convergence_frame(paths, thresholds=(0.9,))
    assert len(conv) == 3 * 5 and (conv.groupby("site")["share"].max() == 1.0).all()
    idim = intrinsic_dim_frame(paths, thresholds=(0.9,)).set_index("site")
    for site in ("attn_out", "mlp_out", "resid_post"):
        spec = load_spectrum(tmp_path / f"{site}.npz")
        half = intrinsic_dimension(spec.nested_singular_values[-2], 0.9) / D
        row = conv[(conv["site"] == site) & (conv["n_tokens"] == 16 * L)].iloc[0]
        assert idim.loc[site, "fraction_half"] == half == row["fraction"]
        assert idim.loc[site, "tokens_half"] == 16 * L
        assert idim.loc[site, "last_doubling_change"] == pytest.approx(idim.loc[site, "fraction"] - half)
        whole = conv[(conv["site"] == site) & (conv["share"] == 1.0)]["fraction"].iloc[0]
        assert whole == idim.loc[site, "fraction"]


def test_c1_states_the_ordering_at_every_n(tmp_path):
    paths = spectra_files(tmp_path, np.r_[np.ones(3), np.full(D - 3, 0.05)])
    idim, conv = intrinsic_dim_frame(paths, thresholds=(0.9,)), convergence_frame(paths, thresholds=(0.9,))
    every = ordering_at_every_n(conv, 0.9).iloc[0]
    assert bool(every["all_n"]) and every["n_subsamples"] == 5 and every["min_tokens"] == 2 * L
    text = c1(idim, 0.9, conv)[0]["measured"]
    assert f"at every nested subsample ({2 * L:,} to {32 * L:,} tokens) in 1/1 layers" in text
    # attention above the MLP at the smallest subsample only: the ordering does not hold at every n
    flipped = conv.copy()
    first = (flipped["n_tokens"] == 2 * L) & (flipped["site"] == "attn_out")
    flipped.loc[first, "fraction"] = 1.0
    assert not bool(ordering_at_every_n(flipped, 0.9).iloc[0]["all_n"])
    assert "in 0/1 layers" in c1(idim, 0.9, flipped)[0]["measured"]


def test_convergence_figure_and_caption(tmp_path):
    rows = []
    for site, start in (("attn_out", 0.30), ("mlp_out", 0.70), ("resid_post", 0.80)):
        for layer in (1, 2):
            for j, n in enumerate((1024, 2048, 4096, 8192, 16384)):
                f = start + 0.02 * j if site != "resid_post" else start + 0.005 * j  # last step: 0.02 or 0.005
                rows.append(dict(model="m", dataset="ds", layer=layer, site=site, d=100, threshold=0.99,
                                 n_tokens=n, share=n / 16384, k=round(100 * f), fraction=f))
    table = pd.DataFrame(rows + [dict(rows[0], threshold=0.5)])
    fig, data = convergence(table, threshold=0.99)
    assert len(data) == 30 and (data["threshold"] == 0.99).all()
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and len(ax.lines) == 3 * 2 + 3  # a line per (site, layer), a mean per site
    text = caption("convergence", "What it shows.", data)
    assert "moved by more than 0.01 in 4 of 6 (model, dataset, layer, site) rows" in text
    assert "attn_out +0.020, mlp_out +0.020, resid_post +0.005" in text
    with pytest.raises(ValueError, match="no rows .* at threshold 0.9"):
        convergence(table, threshold=0.9)


def test_dead_fraction_at_the_quarter_and_half_windows_of_one_pass():
    """A latent fires only at a planted token: it is dead over every window that ends before that token.
    Latent i reads direction i; token t holds direction 0, and a stronger one at t = 10 (latent 1), 30 (latent 2) and
    80 (latent 3) only; latent 0 fires at every token; latents 4-7 never fire. Windows of 90 tokens: 22, 45, 90."""
    import torch

    from attnspace.sae.evaluate import evaluate
    from attnspace.sae.model import TopKSAE

    sae = TopKSAE(8, 8, k=1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8))
        sae.b_enc.fill_(0.0)
    x = torch.zeros(90, 8)
    x[:, 0] = 1.0
    for token, latent in ((10, 1), (30, 2), (80, 3)):
        x[token, latent] = 5.0
    res = evaluate(sae, [x[:37], x[37:]])  # the window's order across batches counts
    assert res.dead_window_tokens == 90
    assert res.dead_fraction == 4 / 8  # latents 4-7
    assert res.dead_fraction_half_window == 5 / 8  # first 45 tokens: latents 0, 1 and 2 fired
    assert res.dead_fraction_quarter_window == 6 / 8  # first 22: latents 0 and 1


def test_c4_and_c6_state_the_ordering_at_each_window():
    """The verdict stays the full window's; the measured text adds the ordering over the first quarter and half,
    from the runs' own columns (ASI's advantage planted only in the full window here)."""
    from test_claims import FIG5, runs, sweep_points

    from attnspace.claims import c4, c6

    fig5 = runs(FIG5, seeds=(0, 1, 2), spread=0.01).assign(dead_window_tokens=4096)
    fig5 = fig5.assign(dead_fraction_half_window=fig5["dead_fraction"],
                       dead_fraction_quarter_window=0.9 + 0.01 * fig5["seed"])  # all equal at the quarter
    (row,) = c4(fig5)
    assert row["verdict"] == HOLDS
    assert row["measured"].endswith("; ASI below both over 1,024 tokens: 0/3 d_init, 2,048 tokens: 2/3 d_init, "
                                    "4,096 tokens: 2/3 d_init")
    fig7 = sweep_points({512: (0.28, 0.27, 0.22, 0.22)}, seeds=(0, 1, 2), spread=0.005).assign(dead_window_tokens=4096)
    fig7 = fig7.assign(dead_fraction_half_window=fig7["dead_fraction"],
                       dead_fraction_quarter_window=fig7["dead_fraction"][::-1].to_numpy())
    (row,) = c6(fig7)
    assert row["measured"].endswith("below every other over 1,024 tokens: no, 2,048 tokens: yes, 4,096 tokens: yes")
    assert "over" not in c4(runs(FIG5, seeds=(0, 1, 2), spread=0.01))[0]["measured"]  # one window: nothing added
