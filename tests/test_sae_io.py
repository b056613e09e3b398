"""SAE files (LlamaScope layout) and checkpoints; losses and evaluation against direct computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from attnspace.sae.evaluate import evaluate
from attnspace.sae.io import load_checkpoint, load_sae, save_checkpoint, save_sae
from attnspace.sae.losses import DeadLatentTracker, ReconstructionStats, nmse
from attnspace.sae.model import TopKSAE, reconstruct

D, N, K = 8, 24, 3


def random_sae(seed=0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(D, N, K, dataset_norm=5.5)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sae


def test_llamascope_layout_round_trip(tmp_path):
    sae = random_sae()
    save_sae(sae, tmp_path / "sae", metrics={"nmse": 0.5}, model="m", layer=3, site="attn_out")
    hyper = json.loads((tmp_path / "sae" / "hyperparams.json").read_text())
    assert hyper["act_fn"] == "topk" and hyper["top_k"] == K
    assert hyper["d_model"] == D and hyper["d_sae"] == N
    assert hyper["dataset_average_activation_norm"] == {"in": 5.5, "out": 5.5}
    assert hyper["norm_activation"] == "dataset-wise"
    assert hyper["hook_point_in"] == hyper["hook_point_out"] == "blocks.3.hook_attn_out"
    assert hyper["apply_decoder_bias_to_pre_encoder"] is False and hyper["sparsity_include_decoder_norm"] is False
    # Read the tensors independently (numpy): shapes and element order (the non-contiguous pitfall).
    t = load_file(str(tmp_path / "sae" / "checkpoints" / "final.safetensors"))
    assert t["encoder.weight"].shape == (N, D) and t["decoder.weight"].shape == (D, N)
    assert t["encoder.bias"].shape == (N,) and t["decoder.bias"].shape == (D,)
    np.testing.assert_array_equal(t["decoder.weight"][:, 5], sae.W_dec.detach().numpy()[5])
    np.testing.assert_array_equal(t["encoder.weight"], sae.W_enc.detach().numpy())
    loaded = load_sae(tmp_path / "sae")
    for a, b in zip(loaded.parameters(), sae.parameters()):
        assert torch.equal(a, b)
    x = torch.randn(10, D) * 4
    assert torch.equal(reconstruct(loaded, x), reconstruct(sae, x))
    assert json.loads((tmp_path / "sae" / "metrics.json").read_text()) == {"nmse": 0.5}


def test_llamascope_inference_recipe_matches_reconstruct(tmp_path):
    """The file read with the LlamaScope recipe (attnspace.llamascope's docstring, written out here) gives reconstruct()'s output."""
    sae = random_sae(1)
    save_sae(sae, tmp_path / "sae")
    t = {k: torch.from_numpy(v) for k, v in load_file(str(tmp_path / "sae" / "checkpoints" / "final.safetensors")).items()}
    hyper = json.loads((tmp_path / "sae" / "hyperparams.json").read_text())
    x = torch.randn(7, D) * 3
    f = D**0.5 / hyper["dataset_average_activation_norm"]["in"]
    pre = (x * f) @ t["encoder.weight"].T + t["encoder.bias"]
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(hyper["top_k"], dim=1).indices, True)
    acts = torch.where(keep, pre.relu(), 0.0)
    x_hat = (acts @ t["decoder.weight"].T + t["decoder.bias"]) / f
    torch.testing.assert_close(reconstruct(sae, x), x_hat, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_is_exact(tmp_path):
    tensors = {"a": torch.randn(3, 4).T, "rng": torch.Generator().manual_seed(1).get_state(),
               "n": torch.tensor([5, 7], dtype=torch.int64)}
    save_checkpoint(tmp_path / "c.safetensors", tensors, {"step": 12, "x": [1.5, None]})
    got, record = load_checkpoint(tmp_path / "c.safetensors")
    assert record == {"step": 12, "x": [1.5, None]}
    for k in tensors:
        assert torch.equal(got[k], tensors[k])
    assert not list(tmp_path.glob("*.tmp-*"))


def test_load_refuses_other_activation_functions(tmp_path):
    sae = random_sae()
    save_sae(sae, tmp_path / "sae")
    p = tmp_path / "sae" / "hyperparams.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "act_fn": "jumprelu"}))
    with pytest.raises(ValueError, match="TopK"):
        load_sae(tmp_path / "sae")


def test_streaming_nmse_equals_nmse_on_the_whole_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, D, generator=g) + 4.0
    x_hat = x + 0.3 * torch.randn(100, D, generator=g)
    stats = ReconstructionStats()
    for s in range(0, 100, 17):
        stats.add(x[s : s + 17], x_hat[s : s + 17])
    assert stats.nmse == pytest.approx(float(nmse(x.double(), x_hat.double())), rel=1e-10)
    xd, hd = x.double().numpy(), x_hat.double().numpy()
    assert stats.nmse == pytest.approx(((xd - hd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum(), rel=1e-10)


def test_dead_latent_tracker_counts_tokens_since_last_fire():
    t = DeadLatentTracker(4, threshold_tokens=10)
    idx = torch.tensor([[0, 1], [0, 2]])
    t.update(torch.tensor([[1.0, 0.0], [2.0, 3.0]]), idx)  # latent 1 selected but zero: did not fire
    assert t.tokens_since_fired.tolist() == [0, 2, 0, 2]
    for _ in range(4):
        t.update(torch.tensor([[1.0, 1.0]]), torch.tensor([[0, 2]]))
    assert t.tokens_since_fired.tolist() == [0, 6, 0, 6]
    t.update(torch.ones(4, 2), torch.tensor([[0, 2]] * 4))
    assert t.dead().tolist() == [False, True, False, True]


def test_evaluate_against_a_dense_reference():
    sae = random_sae(2)
    with torch.no_grad():
        sae.b_enc -= 6.0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(90, D, generator=g) * 2 + 1
    res = evaluate(sae, [x[:40], x[40:]])
    f = sae.norm_factor
    pre = (x * f) @ sae.W_enc.detach().T + sae.b_enc.detach()
    idx = pre.topk(K, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    x_hat = (z @ sae.W_dec.detach() + sae.b_dec.detach()) / f
    xd, hd = x.double(), x_hat.double()
    want = float(((xd - hd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
    assert res.nmse == pytest.approx(want, rel=1e-5)
    assert res.explained_variance == pytest.approx(1 - want, rel=1e-5)
    assert res.l0 == pytest.approx(float((z > 0).sum(1).float().mean()))
    assert res.l0 < K  # some selected values are zero and do not count
    dead = (z > 0).sum(0) == 0
    assert res.n_dead == int(dead.sum()) and res.dead_fraction == pytest.approx(float(dead.float().mean()))
    assert res.dead_window_tokens == 90


def test_centred_form_subtracts_the_decoder_bias_before_the_encoder_and_round_trips(tmp_path):
    sae = random_sae(seed=3)
    sae.centred = True
    x = torch.randn(12, D) * 4
    # numpy reference: pre = W_enc (x f - b_dec) + b_enc, top-k, ReLU, decode, add b_dec, undo f
    f = sae.norm_factor
    W_enc, b_enc = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    W_dec, b_dec = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy()
    pre = (x.double().numpy() * f - b_dec) @ W_enc.T + b_enc
    z = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :K]
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0), axis=1)
    ref = (z @ W_dec + b_dec) / f
    np.testing.assert_allclose(reconstruct(sae, x).double().numpy(), ref, rtol=1e-4, atol=1e-4)
    save_sae(sae, tmp_path / "sae", layer=1, site="attn_out")
    hyper = json.loads((tmp_path / "sae" / "hyperparams.json").read_text())
    assert hyper["apply_decoder_bias_to_pre_encoder"] is True
    loaded = load_sae(tmp_path / "sae")
    assert loaded.centred and torch.equal(reconstruct(loaded, x), reconstruct(sae, x))
    sae.centred = False  # the uncentred form reads x itself: a different reconstruction
    assert not torch.allclose(reconstruct(sae, x), reconstruct(loaded, x))
