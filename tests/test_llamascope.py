"""LlamaScope-format SAEs: folders built here with known weights, checked against a
straightforward per-feature computation of the published inference rule, one hand-worked
threshold example, clear errors for broken folders, and the dead-feature evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from attnspace.dead_features import evaluate_dead_features
from attnspace.llamascope import LlamaScopeError, load_llamascope
from attnspace.store import StoreWriter, open_store


def write_folder(folder: Path, W_enc, b_enc, W_dec, b_dec, **hyper) -> Path:
    d_sae, d_model = W_enc.shape
    base = dict(d_model=d_model, d_sae=d_sae, act_fn="jumprelu", jump_relu_threshold=0.0,
                norm_activation="dataset-wise", dataset_average_activation_norm={"in": 1.0, "out": 1.0},
                sparsity_include_decoder_norm=True, apply_decoder_bias_to_pre_encoder=False)
    base.update(hyper)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "hyperparams.json").write_text(json.dumps(base))
    save_file({"encoder.weight": torch.as_tensor(W_enc, dtype=torch.float32).contiguous(),
               "encoder.bias": torch.as_tensor(b_enc, dtype=torch.float32).contiguous(),
               "decoder.weight": torch.as_tensor(W_dec, dtype=torch.float32).contiguous(),
               "decoder.bias": torch.as_tensor(b_dec, dtype=torch.float32).contiguous()},
              str(folder / "checkpoints" / "final.safetensors"))
    return folder


def reference(x, W_enc, b_enc, W_dec, b_dec, hyper):
    """The published rule, one token and one feature at a time (numpy, float64)."""
    d = W_enc.shape[1]
    norm = hyper["dataset_average_activation_norm"]
    f_in, f_out = math.sqrt(d) / norm["in"], math.sqrt(d) / norm["out"]
    acts = np.zeros((x.shape[0], W_enc.shape[0]))
    for t in range(x.shape[0]):
        xn = x[t] * f_in - (b_dec if hyper.get("apply_decoder_bias_to_pre_encoder") else 0)
        pre = W_enc @ xn + b_enc
        dec_norm = np.linalg.norm(W_dec, axis=0)
        score = pre * dec_norm if hyper.get("sparsity_include_decoder_norm", True) else pre
        if hyper["act_fn"] == "jumprelu":
            for i in range(len(pre)):
                if score[i] > hyper["jump_relu_threshold"] * f_in:
                    acts[t, i] = pre[i]
        else:
            for i in np.argsort(-score, kind="stable")[: hyper["top_k"]]:
                acts[t, i] = max(pre[i], 0.0)
    recon = (acts @ W_dec.T + b_dec) / f_out
    return acts, recon


def test_hand_worked_threshold_scale(tmp_path):
    # d_model 4, avg norm 4: f = sqrt(4)/4 = 0.5. x = [2,0,0,0] -> x_n = [1,0,0,0].
    # pre = [1, 0.5, 3, 0.7]; decoder column 1 has norm 2, so scores = [1, 1, 3, 0.7].
    # theta = 1.5 on the raw scale -> compared with theta * f = 0.75: features 0, 1, 2 fire, 3 does not.
    # (Comparing pre with 1.5 directly, the wrong scale, would keep only feature 2.)
    W_enc = np.array([[1, 0, 0, 0], [0.5, 0, 0, 0], [3, 0, 0, 0], [0.7, 0, 0, 0]], float)
    W_dec = np.diag([1.0, 2.0, 1.0, 1.0])
    folder = write_folder(tmp_path / "sae", W_enc, np.zeros(4), W_dec, np.zeros(4), jump_relu_threshold=1.5,
                          dataset_average_activation_norm={"in": 4.0, "out": 4.0})
    sae = load_llamascope(folder)
    assert sae.decoder_norms_folded
    acts = sae.encode(torch.tensor([[2.0, 0, 0, 0]]))
    # activations carry the decoder norm once folded: pre_i * ||dec_i|| = [1, 1, 3, 0]
    assert acts.tolist() == [[1.0, 1.0, 3.0, 0.0]]
    # reconstruction: W_dec @ [1, 0.5, 3, 0] = [1, 1, 3, 0], divided by f_out = 0.5
    assert sae.decode(acts).tolist() == [[2.0, 2.0, 6.0, 0.0]]


@pytest.mark.parametrize("hyper", [
    dict(act_fn="jumprelu", jump_relu_threshold=0.3),
    dict(act_fn="jumprelu", jump_relu_threshold=0.3, apply_decoder_bias_to_pre_encoder=True),
    dict(act_fn="jumprelu", jump_relu_threshold=0.2, sparsity_include_decoder_norm=False),
    dict(act_fn="topk", top_k=5),
    dict(act_fn="topk", top_k=5, sparsity_include_decoder_norm=False),
])
def test_matches_the_published_rule(tmp_path, hyper):
    rng = np.random.default_rng(0)
    d, n = 12, 40
    W_enc = rng.standard_normal((n, d)) * 0.3
    W_dec = rng.standard_normal((d, n)) * rng.uniform(0.5, 2.0, n)  # non-unit columns: folded on load
    b_enc, b_dec = rng.standard_normal(n) * 0.1, rng.standard_normal(d) * 0.1
    hyper = dict(hyper, dataset_average_activation_norm={"in": 2.5, "out": 3.0})
    full = dict(dict(sparsity_include_decoder_norm=True), **hyper)
    sae = load_llamascope(write_folder(tmp_path / "sae", W_enc, b_enc, W_dec, b_dec, **hyper))
    x = rng.standard_normal((30, d))
    acts_ref, recon_ref = reference(x, W_enc, b_enc, W_dec, b_dec, full)
    acts = sae.encode(torch.tensor(x, dtype=torch.float32)).double().numpy()
    norms = np.linalg.norm(W_dec, axis=0)
    np.testing.assert_allclose(acts, acts_ref * norms, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(acts > 0, acts_ref > 0)
    np.testing.assert_allclose(sae.decode(torch.tensor(acts, dtype=torch.float32)).numpy(), recon_ref,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("breakage,words", [
    ("no_hyper", "hyperparams.json is missing"),
    ("no_weights", "final.safetensors is missing"),
    ("bad_act_fn", "act_fn 'relu' is not supported"),
    ("bad_shape", "decoder.weight has shape"),
    ("no_threshold", "needs jump_relu_threshold"),
])
def test_broken_folders_name_the_problem(tmp_path, breakage, words):
    rng = np.random.default_rng(0)
    W_enc, W_dec = rng.standard_normal((6, 4)), rng.standard_normal((4, 6))
    folder = write_folder(tmp_path / "sae", W_enc, np.zeros(6), W_dec if breakage != "bad_shape" else W_dec[:, :5],
                          np.zeros(4), act_fn="relu" if breakage == "bad_act_fn" else "jumprelu")
    hyper = json.loads((folder / "hyperparams.json").read_text())
    if breakage == "no_hyper":
        (folder / "hyperparams.json").unlink()
    if breakage == "no_weights":
        (folder / "checkpoints" / "final.safetensors").unlink()
    if breakage == "no_threshold":
        del hyper["jump_relu_threshold"]
        (folder / "hyperparams.json").write_text(json.dumps(hyper))
    with pytest.raises(LlamaScopeError, match=words.replace("(", r"\(")):
        load_llamascope(folder)


def test_width_mismatch_is_refused(tmp_path):
    folder = write_folder(tmp_path / "sae", np.ones((6, 4)), np.zeros(6), np.eye(4, 6), np.zeros(4))
    with pytest.raises(LlamaScopeError, match="activations have width 8"):
        load_llamascope(folder, d_model=8)


def test_dead_feature_evaluation_counts_independently(tmp_path):
    rng = np.random.default_rng(1)
    d, n, rows = 8, 24, 300
    W_enc = rng.standard_normal((n, d))
    W_enc[:5] = -10.0  # these never fire on the positive data below
    W_dec = rng.standard_normal((d, n))
    W_dec /= np.linalg.norm(W_dec, axis=0)
    folder = write_folder(tmp_path / "sae", W_enc, np.zeros(n), W_dec, np.zeros(d), jump_relu_threshold=0.5,
                          dataset_average_activation_norm={"in": 3.0, "out": 3.0})
    x = np.abs(rng.standard_normal((rows, d))).astype(np.float32)
    keep = np.ones(rows, bool)
    keep[::50] = False  # "BOS" rows, huge values that would fire everything
    x[~keep] = 1e4
    with StoreWriter(tmp_path / "L0.zarr", model="m", dataset="d", layer=0, split="heldout", n_rows=rows,
                     sites={"attn_out": d}, logical_dtype="float32", chunk_rows=64, shard_rows=128) as w:
        w.append({"attn_out": x}, np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                 np.arange(rows, dtype=np.int32), keep)
    store = open_store(tmp_path / "L0.zarr")
    rec = evaluate_dead_features(load_llamascope(folder), store, "attn_out", batch_rows=100)
    acts_ref, recon_ref = reference(x[keep].astype(float), W_enc, np.zeros(n), W_dec, np.zeros(d),
                                    dict(act_fn="jumprelu", jump_relu_threshold=0.5,
                                         dataset_average_activation_norm={"in": 3.0, "out": 3.0}))
    fired = (acts_ref > 0).any(0)
    assert rec["n_tokens"] == keep.sum()
    assert rec["dead"] == int((~fired).sum()) >= 5
    assert rec["dead_fraction"] == pytest.approx((~fired).mean())
    assert rec["l0"] == pytest.approx((acts_ref > 0).sum(1).mean())
    xk = x[keep].astype(float)
    nmse = ((xk - recon_ref) ** 2).sum() / ((xk - xk.mean(0)) ** 2).sum()
    assert rec["nmse"] == pytest.approx(nmse, rel=1e-4)
    limited = evaluate_dead_features(load_llamascope(folder), store, "attn_out", n_tokens=50)
    assert limited["n_tokens"] == 50


def test_dead_features_table_joins_intrinsic_dimension_and_correlates():
    import pandas as pd
    from scipy.stats import spearmanr

    from attnspace.dead_features import DEAD_FEATURES_COLUMNS, dead_features_table, dead_vs_dimension

    records, idim = [], []
    for layer, (dead, frac) in enumerate([(0.8, 0.2), (0.5, 0.5), (0.1, 0.9)]):
        records.append(dict(model="m", dataset="d", layer=layer, site="attn_out", d_sae=10, n_tokens=100,
                            dead=int(dead * 10), dead_fraction=dead))
        for tau in (0.9, 0.99):
            idim.append(dict(model="m", dataset="d", layer=layer, site="attn_out", threshold=tau,
                             fraction=frac if tau == 0.99 else 0.0))
    table = dead_features_table(records, pd.DataFrame(idim))
    assert list(table.columns) == DEAD_FEATURES_COLUMNS
    assert table["intrinsic_dim_fraction"].tolist() == [0.2, 0.5, 0.9]
    corr = dead_vs_dimension(table)
    assert corr["spearman_rho"] == pytest.approx(spearmanr([0.8, 0.5, 0.1], [0.2, 0.5, 0.9]).statistic)
    assert corr["spearman_rho"] == pytest.approx(-1.0) and corr["n"] == 3
    with pytest.raises(ValueError, match="no intrinsic dimension"):
        dead_features_table(records, pd.DataFrame(idim).iloc[:2])


def test_reads_back_the_pipelines_own_topk_saes_exactly(tmp_path):
    """An SAE saved by attnspace.sae.io (free decoder norms, ranking on pre) gives the same
    reconstruction through this loader as through the training library."""
    from attnspace.sae.io import save_sae
    from attnspace.sae.model import TopKSAE, reconstruct

    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 6, dataset_norm=3.0)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.W_dec.normal_().mul_(torch.rand(64, 1) * 2 + 0.2)  # non-unit decoder rows
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    save_sae(sae, tmp_path / "sae", layer=3, site="attn_out")
    loaded = load_llamascope(tmp_path / "sae", d_model=16)
    x = torch.randn(50, 16) * 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), reconstruct(sae, x), rtol=1e-4, atol=1e-5)
