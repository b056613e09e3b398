"""Feature-sharded SAE training (attnspace.sae.sharded) on gloo CPU ranks, against one process.

One process is the reference: :func:`attnspace.sae.train.train_sae` (the fast path) on the same store, the
same seeds, so the same batches. 50 steps of each optimizer with ASI and AuxK (a dead window short
enough that AuxK works from step 4 on) on 1, 2 and 4 ranks must give the one process's weights and
metrics within :data:`RTOL`: the sharded step sums the decoder's terms in another order (per rank, then
the all-reduce), so the two agree to float32 rounding, which 50 Adam steps carry to about 1e-6 here;
the selections must agree exactly (same latents fired, same dead counts). Two runs on 2 ranks are
bitwise equal; a run whose rank 1 is killed fails in one line naming that rank and its log, and the
rerun resumes from the last sharded checkpoint to the uninterrupted run's result, bitwise.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sae_train import D_ACTIVE, planted_stores

from attnspace.errors import AttnspaceError
from attnspace.sae import SAETrainConfig, train_sae
from attnspace.sae.group import Member
from attnspace.sae.sharded import bytes_per_step, checkpoint_files, launch, train_sharded
from attnspace.store import open_store

OPTIMIZERS = ("adam", "sparse_adam", "masked_adam")
STEPS = 50
RTOL = 1e-4
"""Relative tolerance on weights (max |a - b| / max |b| per tensor) and on metrics; measured: see the note."""

METRICS = ("nmse", "explained_variance", "l0", "dead_fraction", "n_dead", "dead_for_auxk_at_end", "train_nmse",
           "init_norm", "dataset_average_activation_norm")


def config(optimizer: str, **kw) -> SAETrainConfig:
    base = dict(d_sae=128, k=8, lr=3e-3, batch_size=64, train_tokens=64 * STEPS, buffer_rows=256, eval_tokens=1024,
                asi_sample_tokens=1024, init_batch_tokens=256, checkpoint_every=10, log_every=0, init="asi",
                d_init=D_ACTIVE, auxk=True, k_aux=16, dead_threshold_tokens=256, optimizer=optimizer)
    return SAETrainConfig(**{**base, **kw})


def _rank_job(root: str, out: str, optimizers: tuple[str, ...], kill_rank: int | None = None,
              kill_at: int = 0) -> None:
    """Every rank: train one sharded SAE per optimizer on the planted stores in ``root``."""
    torch.set_num_threads(1)
    train, heldout = open_store(os.path.join(root, "train.zarr")), open_store(os.path.join(root, "heldout.zarr"))

    def on_step(done: int) -> None:
        if torch.distributed.get_rank() == kill_rank and done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    for opt in optimizers:
        train_sharded([Member(config(opt), os.path.join(out, opt))], train, heldout, on_step=on_step)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_stores")
    planted_stores(root, 8192, 2048)
    return root


@pytest.fixture(scope="module")
def one_process(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    train, heldout = open_store(stores / "train.zarr"), open_store(stores / "heldout.zarr")
    return {opt: (train_sae(config(opt), train, heldout, out / opt), out / opt) for opt in OPTIMIZERS}


def _weights(folder):
    return load_file(str(folder / "checkpoints" / "final.safetensors"))


def _metrics(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def two_ranks(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    launch(2, _rank_job, (str(stores), str(out), OPTIMIZERS), log_dir=out / "logs")
    return out


def _assert_like_one_process(out, one_process, ranks: int) -> None:
    for opt in OPTIMIZERS:
        ref_metrics, ref_dir = one_process[opt]
        got, ref = _weights(out / opt), _weights(ref_dir)
        assert got.keys() == ref.keys()
        errs = {k: _rel(got[k], ref[k]) for k in ref}
        print(ranks, opt, {k: f"{v:.1e}" for k, v in errs.items()})
        assert max(errs.values()) < RTOL, (opt, errs)
        m = _metrics(out / opt)
        assert m["status"] == "ok" and m["d_sae"] == 128
        for key in METRICS:
            assert m[key] == pytest.approx(ref_metrics[key], rel=RTOL, abs=1e-9), (opt, key)
        assert m["dead_for_auxk_at_end"] > 0  # AuxK had dead latents to work with
        hyper = json.loads((out / opt / "hyperparams.json").read_text())
        assert hyper == json.loads((ref_dir / "hyperparams.json").read_text())
        assert not checkpoint_files(out / opt) and not (out / opt / "shards").exists()


def test_two_ranks_equal_one_process(two_ranks, one_process):
    _assert_like_one_process(two_ranks, one_process, 2)


@pytest.mark.parametrize("ranks", [1, 4])
def test_one_and_four_ranks_equal_one_process(stores, one_process, tmp_path, ranks):
    launch(ranks, _rank_job, (str(stores), str(tmp_path), OPTIMIZERS), log_dir=tmp_path / "logs")
    _assert_like_one_process(tmp_path, one_process, ranks)


def test_a_killed_rank_fails_in_one_line_and_the_rerun_resumes_bitwise(stores, two_ranks, tmp_path):
    """Rerun of the two-rank job: Adam's rank 1 is killed at step 25 (after the checkpoint of step 20);
    the job ends naming it; the rerun resumes Adam from step 20 and trains the other two afresh.
    All three equal the uninterrupted two-rank run bitwise."""
    with pytest.raises(AttnspaceError) as err:
        launch(2, _rank_job, (str(stores), str(tmp_path), OPTIMIZERS, 1, 25), log_dir=tmp_path / "logs")
    line = err.value.line()
    assert "rank 1 of 2 failed (killed by signal 9)" in line and str(tmp_path / "logs" / "rank1.log") in line
    assert "\n" not in line
    assert sorted(step for _, _, step, _ in checkpoint_files(tmp_path / "adam")) == [20, 20]
    launch(2, _rank_job, (str(stores), str(tmp_path), OPTIMIZERS), log_dir=tmp_path / "logs")
    assert "resuming" in (tmp_path / "logs" / "rank1.log").read_text()
    for opt in OPTIMIZERS:
        got, ref = _weights(tmp_path / opt), _weights(two_ranks / opt)
        for k in ref:
            assert torch.equal(got[k], ref[k]), (opt, k)
        drop = {"train_seconds_this_run", "tokens_per_second"}
        assert ({k: v for k, v in _metrics(tmp_path / opt).items() if k not in drop}
                == {k: v for k, v in _metrics(two_ranks / opt).items() if k not in drop})


def test_bytes_per_step_counts_the_ring_collectives():
    # 2 ranks, B 4, k 2, no AuxK, d 3: the all-gather sends the other rank 4 x 2 x 12 bytes; the all-reduce
    # of [4, 3] float32 sends 2 (R - 1)/R of its 48 bytes.
    assert bytes_per_step(4, 3, 2, 2) == 4 * 2 * 12 + 48
    assert bytes_per_step(4, 3, 2, 1) == 0
