"""train_sae end to end on tiny stores: outputs, exact resumption after a kill, and ASI vs base
vs random-subspace on a planted low-rank structure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sae_data import write_store

from attnspace.sae import SAETrainConfig, load_sae, train_sae
from attnspace.sae.train import CHECKPOINT

D, D_ACTIVE, N_TRUE = 64, 8, 128


def planted(n: int, seed: int, d: int = D) -> np.ndarray:
    """Tokens that lie (up to noise 0.01) in a D_ACTIVE-dim subspace of R^d: each is a positive
    combination of 4 of N_TRUE ground-truth directions inside that subspace, plus an offset."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((d, D_ACTIVE)))
    feats = rng.standard_normal((N_TRUE, D_ACTIVE))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    r = np.random.default_rng(seed)
    idx = np.argsort(r.random((n, N_TRUE)), axis=1)[:, :4]
    z = np.zeros((n, N_TRUE))
    np.put_along_axis(z, idx, r.exponential(1.0, (n, 4)), axis=1)
    return ((z @ feats) @ basis.T + 0.5 * basis[:, 0] + 0.01 * r.standard_normal((n, d))).astype(np.float32)


def planted_stores(root, train_rows: int, heldout_rows: int):
    """A train and a held-out store of planted rows (different samples), a BOS row every 500."""
    train = write_store(root / "train.zarr", planted(train_rows, 1), bos_every=500, chunk_rows=1024, shard_rows=4096)
    heldout = write_store(root / "heldout.zarr", planted(heldout_rows, 2), bos_every=500, chunk_rows=1024,
                          shard_rows=4096)
    return train, heldout


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return planted_stores(tmp_path_factory.mktemp("sae_stores"), 16384, 4096)


def small_config(**kw) -> SAETrainConfig:
    base = dict(d_sae=256, k=8, lr=1e-3, batch_size=128, train_tokens=128 * 12, buffer_rows=512, eval_tokens=2048,
                asi_sample_tokens=2048, init_batch_tokens=512, checkpoint_every=4, log_every=0)
    return SAETrainConfig(**{**base, **kw})


METRIC_KEYS = {"nmse", "explained_variance", "l0", "dead_fraction", "dead_window_tokens", "d_sae", "k", "init",
               "d_init", "optimizer", "tokens_trained", "delta_lm_loss"}


def test_train_writes_a_llamascope_folder_with_metrics(stores, tmp_path):
    train, heldout = stores
    calls = []

    def lm_eval(recon):
        x = torch.from_numpy(planted(16, 3))
        calls.append(recon(x).shape)
        return {"delta_lm_loss": 0.25, "loss_recovered": 0.9}

    m = train_sae(small_config(init="asi", d_init=D_ACTIVE, auxk=True, dead_threshold_tokens=256), train, heldout,
                  tmp_path / "sae", lm_eval=lm_eval, info={"model": "synthetic", "layer": 0})
    assert METRIC_KEYS <= set(m)
    assert calls == [torch.Size([16, D])] and m["delta_lm_loss"] == 0.25
    assert m["tokens_trained"] == 128 * 12 and m["dead_window_tokens"] == 2048
    assert 0 < m["nmse"] < 1 and m["l0"] <= 8
    assert json.loads((tmp_path / "sae" / "metrics.json").read_text()) == json.loads(json.dumps(m))
    hyper = json.loads((tmp_path / "sae" / "hyperparams.json").read_text())
    assert hyper["hook_point_out"] == "blocks.0.hook_attn_out" and hyper["d_sae"] == 256
    assert not (tmp_path / "sae" / CHECKPOINT).exists()
    sae = load_sae(tmp_path / "sae")
    assert sae.dataset_norm == pytest.approx(m["dataset_average_activation_norm"])


def test_without_model_the_lm_loss_is_none(stores, tmp_path):
    train, heldout = stores
    m = train_sae(small_config(train_tokens=128 * 2), train, heldout, tmp_path / "sae")
    assert m["delta_lm_loss"] is None


class Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam", "masked_adam"])
def test_killed_run_resumes_to_the_same_result_bitwise(stores, tmp_path, optimizer):
    train, heldout = stores
    # AuxK on, with a short dead window, so the dead-latent counters matter for the result.
    config = small_config(optimizer=optimizer, auxk=True, dead_threshold_tokens=256, k_aux=16)
    straight = train_sae(config, train, heldout, tmp_path / "straight")

    def kill_at_10(step):
        if step == 10:
            raise Killed

    with pytest.raises(Killed):
        train_sae(config, train, heldout, tmp_path / "resumed", on_step=kill_at_10)
    assert (tmp_path / "resumed" / CHECKPOINT).exists()  # from step 8
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = train_sae(config, train, heldout, tmp_path / "resumed")

    a = load_file(str(tmp_path / "straight" / "checkpoints" / "final.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "final.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    drop = {"train_seconds_this_run", "tokens_per_second"}  # wall-clock dependent
    assert {k: v for k, v in straight.items() if k not in drop} == {k: v for k, v in resumed.items() if k not in drop}
    assert straight["dead_for_auxk_at_end"] > 0  # AuxK had dead latents to work with


def test_asi_leaves_fewer_dead_latents_than_base_on_a_planted_subspace(stores, tmp_path):
    """Observation, not a tuned result: the same short run (200 steps of 128 tokens, 256 latents,
    k 8, Adam lr 1e-3) from base init, ASI (d_init = the planted 8) and a random 8-dim subspace."""
    train, heldout = stores
    results = {}
    for init in ("base", "asi", "random_subspace"):
        config = small_config(init=init, d_init=None if init == "base" else D_ACTIVE, train_tokens=128 * 200,
                              checkpoint_every=0)
        results[init] = train_sae(config, train, heldout, tmp_path / init)
    print({k: (round(v["dead_fraction"], 3), round(v["nmse"], 4)) for k, v in results.items()})
    assert results["asi"]["dead_fraction"] < results["base"]["dead_fraction"]
    assert results["asi"]["dead_fraction"] < results["random_subspace"]["dead_fraction"]
    assert results["asi"]["nmse"] < results["base"]["nmse"]


class PoisonedStream:
    """A ready training stream whose batches turn NaN from batch ``poison_at`` on (a diverging run)."""

    def __init__(self, poison_at: int, batch: int = 128) -> None:
        self.data = torch.from_numpy(planted(4096, 5))
        self.poison_at, self.batch, self.calls = poison_at, batch, 0

    def sample(self, n: int) -> torch.Tensor:
        return self.data[:n]

    def next_batch(self) -> torch.Tensor:
        self.calls += 1
        x = self.data[torch.randint(0, len(self.data), (self.batch,), generator=torch.Generator().manual_seed(self.calls))]
        return x * float("nan") if self.calls >= self.poison_at else x


def test_a_diverged_run_is_recorded_as_failed_not_dropped(stores, tmp_path):
    from attnspace.sae.runs import runs_table

    _, heldout = stores
    out = tmp_path / "smollm" / "pydocs" / "L3" / "attn_out" / "base-d0-adam-n256-k8"
    m = train_sae(small_config(log_every=2), PoisonedStream(poison_at=3), heldout, out)
    assert m["status"] == "failed" and "step 4" in m["failure"] and m["nmse"] is None
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"
    assert not (out / "sae_weights.safetensors").exists() and not (out / "checkpoints").exists()
    row = runs_table([out / "metrics.json"]).iloc[0]
    assert row["status"] == "failed" and "not finite" in row["failure"]
    ok = train_sae(small_config(train_tokens=128 * 2), PoisonedStream(poison_at=99), heldout, tmp_path / "ok")
    assert ok["status"] == "ok" and ok["failure"] is None


def test_centred_form_starts_at_the_training_mean_and_reports_train_nmse(stores, tmp_path):
    train, heldout = stores
    cfg = small_config(init="asi", d_init=D_ACTIVE, centred=True, train_tokens=128)  # one step
    m = train_sae(cfg, train, heldout, tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    assert sae.centred and m["centred"] is True
    # b_dec started at the mean of the normalisation sample (the first asi_sample_tokens kept rows), then took one
    # Adam step of at most lr per coordinate
    from attnspace.sae.data import first_kept_rows

    sample = first_kept_rows(train, "attn_out", cfg.asi_sample_tokens).double()
    mean = (sample.mean(0) * sae.norm_factor).float()
    assert torch.allclose(sae.b_dec.detach(), mean, atol=1.5 * cfg.lr)
    # train NMSE: on the first min(eval_tokens, trained tokens) kept training rows, beside the held-out NMSE
    assert m["train_eval_tokens"] == 128 and 0 < m["train_nmse"] < 1 and 0 < m["nmse"] < 1
    from attnspace.sae.data import heldout_batches
    from attnspace.sae.evaluate import evaluate

    assert m["train_nmse"] == pytest.approx(evaluate(sae, heldout_batches(train, "attn_out", 64, 128)).nmse, rel=1e-6)
    plain = train_sae(small_config(init="asi", d_init=D_ACTIVE, train_tokens=128), train, heldout, tmp_path / "plain")
    assert plain["centred"] is False and not load_sae(tmp_path / "plain").centred
    assert float(load_sae(tmp_path / "plain").b_dec.detach().abs().max()) <= 1.5 * cfg.lr  # starts at zero
