"""The W^O variance decomposition (Figure 3) on tiny random models cached through the
real activation cache: O from the cached Z and the weights equals the cached attn_out,
and Var(O e_i) = Var(Z v_i) ||v||^2 holds along every principal direction; the tables from the
moments the caching job streams (spectrum.mode: streamed) equal those from the stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnspace.cache import cache_activations
from attnspace.corpora import TokenSplit
from attnspace.spectrum import intrinsic_dimension
from attnspace.store import open_store
from attnspace.moments import RECORD
from attnspace.wo_decomposition import analyse, analyse_moments, covariance, decompose, head_overlap, wo_spectrum
from conftest import tiny_causal_lm

VOCAB, HIDDEN, LAYERS, BOS = 64, 32, 3, 1  # conftest.tiny_causal_lm's sizes


def _build(family: str):
    model = tiny_causal_lm(family, bos_token_id=BOS, eos_token_id=2)
    if family == "gpt_neox":  # o_proj (dense) carries a bias: make it non-zero
        with torch.no_grad():
            for layer in model.gpt_neox.layers:
                layer.attention.dense.bias.normal_(0.0, 0.1)
    return model


def _split() -> TokenSplit:
    """600 tokens in 6 documents, each opening with BOS."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[BOS], rng.integers(3, VOCAB, 99)]).astype(np.int32) for _ in range(6)]
    return TokenSplit(np.concatenate(docs), np.arange(0, 601, 100, dtype=np.int64))


@pytest.fixture(scope="module", params=["llama", "gemma3", "gpt_neox"])
def cached(request, tmp_path_factory):
    """(model, [store of layers 0 and 2]) with 600 tokens in 6 documents."""
    model = _build(request.param)
    split = _split()
    out = tmp_path_factory.mktemp(request.param)
    cache_activations(model, {"train": split, "heldout": split}, out, model_name="tiny", dataset="rand",
                      layers=[0, 2], sites=["attn_out", "attn_z"], logical_dtype="float32",
                      special_ids={BOS, 2}, chunk_rows=128, shard_rows=256)
    return model, [open_store(out / f"L{layer}.zarr") for layer in (0, 2)]


def test_o_from_cached_z_and_weights_equals_cached_attn_out(cached):
    model, stores = cached
    dec, spec, summary = analyse(model, stores, model_name="tiny", dataset="rand")
    assert (summary["o_rel_error"] < 1e-6).all(), summary["o_rel_error"]
    # and by hand, from the store's own rows and the module's own weights
    store = stores[1]
    proj = model.get_submodule("gpt_neox.layers.2.attention.dense" if model.config.model_type == "gpt_neox"
                               else "model.layers.2.self_attn.o_proj")
    z = torch.from_numpy(store.rows("attn_z", 0, store.n_rows, kept_only=False))
    o = store.rows("attn_out", 0, store.n_rows, kept_only=False)
    w_o = proj.weight.detach().T  # W^O [d_z, d]
    assert w_o.shape == (store.width("attn_z"), HIDDEN)
    o_hat = z @ w_o + (0 if proj.bias is None else proj.bias.detach())
    np.testing.assert_allclose(o_hat.numpy(), o, rtol=1e-5, atol=1e-5)


def test_identity_var_o_equals_z_times_wo(cached):
    model, stores = cached
    dec, spec, summary = analyse(model, stores, model_name="tiny", dataset="rand")
    assert list(dec.columns) == ["model", "dataset", "layer", "i", "var_o", "wo_contrib", "z_contrib"]
    assert len(dec) == 2 * HIDDEN
    for _, g in dec.groupby("layer"):
        # float32 round-off of the cached O bounds the agreement in the weakest directions
        np.testing.assert_allclose(g["var_o"], g["z_contrib"] * g["wo_contrib"], rtol=1e-4,
                                   atol=1e-7 * g["var_o"].max())
        assert g["var_o"].is_monotonic_decreasing
    assert (summary["identity_rel_error"] < 1e-6).all()
    # var_o is s_i^2 / n of the centred kept rows of O: compare with numpy's SVD
    store = stores[0]
    o = store.rows("attn_out", 0, store.n_rows).astype(np.float64)
    s = np.linalg.svd(o - o.mean(0), compute_uv=False)
    np.testing.assert_allclose(dec[dec["layer"] == 0]["var_o"], s**2 / o.shape[0], rtol=1e-6, atol=1e-12)


def test_decompose_against_direct_variances():
    """Var(Z v_hat) and ||W^O e||^2 computed row by row, on planted data."""
    rng = np.random.default_rng(1)
    n, d_z, d = 500, 12, 8
    z = rng.normal(size=(n, d_z)) * np.linspace(3, 0.1, d_z)
    w_o = rng.normal(size=(d_z, d))
    o = z @ w_o + 5.0  # a bias shifts the mean only
    from attnspace.spectrum import spectrum_from_gram

    spec = spectrum_from_gram(o.T @ o, o.sum(0), n)
    cov_z = np.cov(z, rowvar=False, bias=True)
    dec = decompose(spec, cov_z, w_o)
    for i, e in enumerate(spec.components):
        v = w_o @ e
        assert dec.wo_contrib[i] == pytest.approx(v @ v)
        assert dec.z_contrib[i] == pytest.approx(np.var(z @ (v / np.linalg.norm(v))))
        assert dec.var_o[i] == pytest.approx(np.var(o @ e))


def test_wo_spectrum_and_null_space():
    rng = np.random.default_rng(2)
    d_z, d = 10, 6
    w_o = rng.normal(size=(d_z, d))
    cov_z = np.diag(rng.uniform(0.5, 2.0, d_z))
    spec = wo_spectrum(w_o, cov_z)
    assert len(spec) == d_z
    np.testing.assert_allclose(spec["sv"][:d], np.linalg.svd(w_o, compute_uv=False))
    assert (spec["sv"][d:] == 0).all()  # d_z - d null directions
    assert spec["z_var_fraction"].sum() == pytest.approx(1.0)
    # Z living entirely in W^O's null space is discarded completely
    null = np.linalg.svd(w_o, full_matrices=True)[0][:, d:]
    share = wo_spectrum(w_o, null @ null.T)["z_var_fraction"]
    assert share[:d].sum() == pytest.approx(0.0, abs=1e-12)


def test_head_overlap_extremes():
    eye = np.eye(8)
    assert head_overlap(eye, 4) == pytest.approx(0.0)  # four orthogonal 2-dim subspaces
    shared = np.tile(np.eye(8)[:, :2], (1, 4))  # every head writes into the same plane
    assert head_overlap(shared, 4) == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    w = rng.normal(size=(400, 8 * 10))  # random 10-dim subspaces of R^400: about 10/400
    assert head_overlap(w, 8) == pytest.approx(10 / 400, rel=0.3)


def test_summary_counterfactuals(cached):
    model, stores = cached
    _, spec, summary = analyse(model, stores, model_name="tiny", dataset="rand")
    row = summary.iloc[0]
    d_z = stores[0].width("attn_z")
    assert (row["d_model"], row["d_z"]) == (HIDDEN, d_z)
    assert row["head_dim"] * row["n_heads"] == d_z
    assert (summary["z_var_null"] > 0).all() == (d_z > HIDDEN)
    # with W^O's singular values flattened and d_z = d, O is Z rotated: same intrinsic dimension
    cov_z = covariance(stores[0], "attn_z")
    s = np.sqrt(np.clip(np.linalg.eigvalsh(cov_z)[::-1], 0, None))
    if d_z == HIDDEN:
        assert row["id_o_flat_wo"] == pytest.approx(intrinsic_dimension(s, 0.99) / HIDDEN)
    assert (summary["z_var_below_5pct"] >= summary["z_var_null"]).all()
    for col in ("id_o", "id_z", "id_o_white_z", "id_o_flat_wo", "z_var_weakest_half"):
        assert 0 < row[col] <= 1
    assert spec.groupby("layer")["z_var_fraction"].sum().to_numpy() == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("spectrum_sites", [["attn_out", "mlp_out"], ["resid_post"]])
def test_streamed_decomposition_equals_stored(cached, spectrum_sites, tmp_path):
    """The same tokens, no store written: attn_z's moments in one group, attn_out's from the spectrum
    moments (3 groups, summed) or, when attn_out is no spectrum site, beside attn_z's; the check
    Z W^O + b = O taken in the forward."""
    model, stores = cached
    split = _split()
    manifests = cache_activations(model, {"train": split, "heldout": split}, tmp_path / "activations",
                                  model_name="tiny", dataset="rand", layers=[0, 2], sites=["attn_out", "attn_z"],
                                  logical_dtype="float32", special_ids={BOS, 2}, chunk_rows=128, shard_rows=256,
                                  store_sites={}, moments_dir=tmp_path / "moments", moment_sites=spectrum_sites,
                                  groups=3, wo_moments_dir=tmp_path / "moments" / "wo")
    assert manifests == [] and not (tmp_path / "activations").exists()
    records = [tmp_path / "moments" / "wo" / RECORD, tmp_path / "moments" / RECORD]
    wo_record = json.loads(records[0].read_text())
    assert wo_record["n_groups"] == 1
    assert sorted(wo_record["files"]["0"]) == sorted(["attn_z"] + (["attn_out"] if "attn_out" not in spectrum_sites
                                                                   else []))
    stored = analyse(model, stores, model_name="tiny", dataset="rand")
    streamed = analyse_moments(model, records, [0, 2], model_name="tiny", dataset="rand")
    for a, b in zip(stored, streamed):
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
        for col in a.columns:
            if col == "identity_rel_error":  # itself a float64 round-off residue, relative to max Var(O e_i)
                np.testing.assert_allclose(b[col], a[col], rtol=0, atol=1e-10, err_msg=col)
            elif col in ("wo_contrib", "z_contrib"):
                # the principal directions of O: those of very small variance are round-off in either path
                # (float64 centring after the product, amplified where a bias makes the mean large)
                strong = a["var_o"] >= 1e-4 * a.groupby("layer")["var_o"].transform("max")
                np.testing.assert_allclose(b[col][strong], a[col][strong], rtol=1e-7, err_msg=col)
            elif a[col].dtype.kind in "fc":
                # float64 centring after the product cancels about eps x ||mean||^2, large where a bias makes
                # the mean large (GPT-NeoX): an absolute floor of 1e-11 of the column's largest value
                # (measured: up to 1.04e-12 on the weakest variances)
                np.testing.assert_allclose(b[col], a[col], rtol=1e-9, atol=1e-11 * np.abs(a[col]).max(), err_msg=col)
            else:
                assert (a[col] == b[col]).all(), col
    # the reconstruction check taken in the forward is the stored path's, over the same rows
    np.testing.assert_allclose(streamed[2]["o_rel_error"], stored[2]["o_rel_error"], rtol=1e-9)
    assert (streamed[2]["o_rel_error"] > 0).all()
