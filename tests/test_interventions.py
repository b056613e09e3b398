"""Loss recovered (Figure 2B) on tiny random models, against manual computations:
full forward passes of the model with a plain hook on one site, and the model's
own logits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from attnspace.corpora import TokenSplit
from attnspace.interventions import (
    SITES,
    SiteBasis,
    Variant,
    fraction_recovered,
    heldout_documents,
    k_at_recovery,
    k_grid,
    loss_recovered,
    recovery_summary,
    scored_positions,
    variant_losses,
)
from attnspace.sites import decoder_layers

from conftest import randomise_norms, tiny_causal_lm

VOCAB, HIDDEN, LAYERS, BOS, EOS = 64, 32, 3, 1, 2
SPECIAL = {BOS, EOS}
LAYER = 1


def _build(family: str):
    # Gemma 3 with sliding-window layers shorter than the documents
    return tiny_causal_lm(family, **({"sliding_window": 4} if family == "gemma3" else {}))


@pytest.fixture(scope="module", params=["llama", "gemma2", "gemma3", "gpt_neox"])
def model(request):
    return randomise_norms(_build(request.param))


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(1)
    out = [np.concatenate([[BOS], rng.integers(3, VOCAB, n)]) for n in (23, 11, 16)]
    out[0][9] = EOS  # an EOS inside a document: neither replaced nor scored
    return out


@pytest.fixture(scope="module")
def bases():
    """A random orthonormal basis and mean per site (the test needs no real spectrum)."""
    g = torch.Generator().manual_seed(2)
    out = {}
    for site in SITES:
        q, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=g, dtype=torch.float64))
        out[site] = SiteBasis(0.3 * torch.randn(HIDDEN, generator=g, dtype=torch.float64), q.T.contiguous())
    return out


def _site_module(model, site):
    layer = decoder_layers(model)[LAYER]
    if site == "resid_post":
        return layer
    if site == "mlp_out":
        return layer.mlp
    return layer.attention.dense if model.config.model_type == "gpt_neox" else layer.self_attn.o_proj


def manual_loss(model, docs, site=None, replace=None) -> float:
    """Mean next-token loss from the model's own logits, with ``replace(x)`` applied by a
    plain forward hook to ``site`` at the non-BOS/EOS positions of a full forward pass."""
    total, count = 0.0, 0
    for ids in docs:
        keep = torch.as_tensor(~np.isin(ids, list(SPECIAL)))
        handle = None
        if site is not None:
            def hook(module, args, output):
                x = output[0] if isinstance(output, tuple) else output
                y = x.clone()
                y[:, keep] = replace(x[:, keep])
                return (y, *output[1:]) if isinstance(output, tuple) else y

            handle = _site_module(model, site).register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
        finally:
            if handle is not None:
                handle.remove()
        pos = torch.as_tensor(scored_positions(ids, SPECIAL))
        total += F.cross_entropy(logits[pos].double(), torch.as_tensor(ids)[pos + 1], reduction="sum").item()
        count += len(pos)
    return total / count


def test_scored_positions_skip_bos_and_eos():
    ids = np.array([BOS, 5, 6, EOS, 7, 8])
    # t -> t+1 pairs with both kept: (1, 2), (4, 5)
    assert scored_positions(ids, SPECIAL).tolist() == [1, 4]


def test_clean_loss_matches_the_models_own_logits(model, docs, bases):
    losses, n = variant_losses(model, docs, LAYER, [Variant()], bases, SPECIAL)
    assert n == sum(len(scored_positions(d, SPECIAL)) for d in docs)
    assert losses[0] == pytest.approx(manual_loss(model, docs), rel=1e-6)


def test_k_equal_d_reproduces_the_clean_loss(model, docs, bases):
    variants = [Variant()] + [Variant(s, HIDDEN) for s in SITES]
    losses, _ = variant_losses(model, docs, LAYER, variants, bases, SPECIAL, batch=4)
    np.testing.assert_allclose(losses[1:], losses[0], rtol=1e-6)


@pytest.mark.parametrize("site", SITES)
def test_zero_ablation_equals_manual_computation(model, docs, bases, site):
    losses, _ = variant_losses(model, docs, LAYER, [Variant(), Variant(site)], bases, SPECIAL)
    manual = manual_loss(model, docs, site, torch.zeros_like)
    assert losses[1] == pytest.approx(manual, rel=1e-6)
    assert losses[1] != pytest.approx(losses[0], rel=1e-6)  # the ablation does something


def numpy_projection(x: torch.Tensor, basis: SiteBasis, k: int) -> torch.Tensor:
    """mean + (x - mean) V_k^T V_k in numpy float64 (k = 0: the mean), independent of ``project``."""
    mean, v = basis.mean.numpy(), basis.components[:k].numpy()
    y = mean + (x.double().numpy() - mean) @ v.T @ v
    return torch.from_numpy(y).to(x.dtype)


def test_batched_projections_equal_one_pass_each(model, docs, bases):
    """Every site and k in shared batches (mixed sites per batch) = one hooked full pass each:
    the replacement changes only its named site, in its own copy."""
    variants = [Variant(s, k) for s in SITES for k in (0, 3, 17)]
    losses, _ = variant_losses(model, docs, LAYER, variants, bases, SPECIAL, batch=4)
    for v, loss in zip(variants, losses):
        manual = manual_loss(model, docs, v.site, lambda x, v=v: numpy_projection(x, bases[v.site], v.k))
        assert loss == pytest.approx(manual, rel=1e-6), v
    alone, _ = variant_losses(model, docs, LAYER, variants, bases, SPECIAL, batch=1)
    np.testing.assert_allclose(losses, alone, rtol=1e-6)


def test_loss_recovered_rows(docs, bases):
    model = _build("llama")
    ks = {s: [0, 8, HIDDEN] for s in SITES}
    rows, n = loss_recovered(model, docs, LAYER, bases, ks, SPECIAL, model_name="m", dataset="ds", batch=5)
    table = pd.DataFrame(rows)
    assert list(table.columns) == ["model", "dataset", "layer", "site", "k", "k_fraction", "loss", "loss_clean",
                                   "loss_zero", "recovered"]
    assert len(table) == 9 and table["loss_clean"].nunique() == 1
    full = table[table["k"] == HIDDEN]
    np.testing.assert_allclose(full["recovered"], 1.0, atol=1e-4)
    np.testing.assert_allclose(table["recovered"],
                               fraction_recovered(table["loss"], table["loss_clean"], table["loss_zero"]))
    assert table["k_fraction"].tolist() == [0.0, 0.25, 1.0] * 3


def test_k_grid_is_dense_then_log_spaced():
    grid = k_grid(576)
    assert grid[:5] == [0, 1, 2, 3, 4] and grid[-1] == 576
    assert grid == sorted(set(grid)) and 18 <= len(grid) <= 24
    assert {58, 115, 288, 518} <= set(grid)  # the linear points d/10, 2d/10, ...
    steps = np.diff(grid[4:])
    assert (steps[1:] >= steps[:-1] - 1).all()  # spacing only grows
    assert k_grid(3) == [0, 1, 2, 3]
    assert k_grid(48, dense=2, log_points=0, linear_points=4) == [0, 1, 2, 12, 24, 36, 48]
    assert k_grid(48, dense=2, log_points=3, linear_points=4) == [0, 1, 2, 3, 6, 12, 24, 36, 48]


def test_fraction_recovered_and_crossing():
    assert fraction_recovered(3.0, 2.0, 4.0) == pytest.approx(0.5)
    assert fraction_recovered(4.0, 2.0, 4.0) == pytest.approx(0.0)
    k = np.array([0, 10, 20, 40])
    assert k_at_recovery(k, np.array([0.1, 0.5, 0.9, 1.0]), 0.95) == pytest.approx(30.0)
    assert k_at_recovery(k, np.array([0.96, 0.97, 0.99, 1.0]), 0.95) == 0.0
    assert np.isnan(k_at_recovery(k, np.array([0.1, 0.2, 0.3, 0.4]), 0.95))
    # the first crossing counts, even if the curve dips again
    assert k_at_recovery(k, np.array([0.0, 1.0, 0.9, 1.0]), 0.95) == pytest.approx(9.5)


def test_recovery_summary():
    curves = pd.DataFrame({"model": "m", "dataset": "ds", "layer": 3, "site": ["attn_out"] * 3 + ["mlp_out"] * 3,
                           "k": [0, 50, 100] * 2, "k_fraction": [0.0, 0.5, 1.0] * 2,
                           "recovered": [0.0, 0.9, 1.0, 0.0, 0.5, 1.0], "loss_clean": 2.0, "loss_zero": 3.0,
                           "loss": 0.0})
    s = recovery_summary(curves, 0.95)
    assert s["site"].tolist() == ["attn_out", "mlp_out"]
    assert s["d"].tolist() == [100, 100]
    np.testing.assert_allclose(s["k"], [75.0, 95.0])
    np.testing.assert_allclose(s["k_fraction"], [0.75, 0.95])


def test_heldout_documents_cut_to_budget():
    split = TokenSplit(np.arange(30, dtype=np.int32), np.array([0, 10, 25, 30]))
    docs = heldout_documents(split, 12)
    assert [len(d) for d in docs] == [10, 2]
    assert [len(d) for d in heldout_documents(split, 11)] == [10]  # a lone token predicts nothing
    assert sum(map(len, heldout_documents(split, 1000))) == 30


def test_refuses_unknown_site_and_k_beyond_the_basis(docs, bases):
    model = _build("llama")
    with pytest.raises(ValueError, match="attn_z"):
        variant_losses(model, docs, LAYER, [Variant("attn_z", 1)], bases, SPECIAL)
    short = {"attn_out": SiteBasis(bases["attn_out"].mean, bases["attn_out"].components[:4])}
    with pytest.raises(ValueError, match="n_vectors"):
        variant_losses(model, docs, LAYER, [Variant("attn_out", 5)], short, SPECIAL)


def test_a_replacement_function_equals_manual_splicing(model, docs):
    """Variant(replace=f), as used to splice an SAE's reconstruction: no basis needed."""
    def squash(x):
        return torch.tanh(x) * 0.5

    variants = [Variant(), Variant("attn_out", replace=lambda x: x), Variant("mlp_out", replace=squash)]
    losses, _ = variant_losses(model, docs, LAYER, variants, {}, SPECIAL, batch=3)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert losses[2] == pytest.approx(manual_loss(model, docs, "mlp_out", squash), rel=1e-6)
