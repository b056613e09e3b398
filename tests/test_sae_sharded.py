"""Feature-sharded SAE training (attnspace.sae.sharded) on gloo CPU ranks, against one process.

One process is the reference: :func:`attnspace.sae.train.train_sae` (the fast path) on the same store, the
same seeds, so the same batches; the sharded SAEs train as one group on one broadcast stream. 50 steps of each optimizer with ASI and AuxK (a dead window short
enough that AuxK works from step 4 on) on 1, 2 and 4 ranks must give the one process's weights and
metrics within :data:`RTOL`: the sharded step sums the decoder's terms in another order (per rank, then
the all-reduce), so the two agree to float32 rounding, which 50 Adam steps carry to at most 2.5e-6 here;
the selections must agree exactly (same latents fired, same dead counts). Two runs on 2 ranks are
bitwise equal; a job stopped by SIGTERM (SLURM's time limit) checkpoints one step on every rank, a job
whose rank 1 is killed fails in one line naming that rank and its log, and each rerun resumes from the
last sharded checkpoint to the uninterrupted run's result, bitwise. The CLI's ``--ranks`` runs the same.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_sae_train import D_ACTIVE, planted, planted_stores

from attnspace.errors import AttnspaceError
from attnspace.sae import SAETrainConfig, train_sae
from attnspace.sae.group import Member
from attnspace.sae.sharded import bytes_per_step, checkpoint_files, launch, train_sharded
from attnspace.sae.train import TrainingStopped
from attnspace.store import open_store

OPTIMIZERS = ("adam", "sparse_adam", "masked_adam")
STEPS = 50
RTOL = 1e-4
"""Relative tolerance on weights (max |a - b| / max |b| per tensor) and on metrics. Measured on this machine:
at most 2.5e-6 over 1, 2 and 4 ranks and the three optimizers (float32 rounding carried by 50 steps)."""

METRICS = ("nmse", "explained_variance", "l0", "dead_fraction", "n_dead", "dead_for_auxk_at_end", "train_nmse",
           "init_norm", "dataset_average_activation_norm", "delta_lm_loss", "loss_recovered")


def config(optimizer: str, **kw) -> SAETrainConfig:
    base = dict(d_sae=128, k=8, lr=3e-3, batch_size=64, train_tokens=64 * STEPS, buffer_rows=256, eval_tokens=1024,
                asi_sample_tokens=1024, init_batch_tokens=256, checkpoint_every=10, log_every=0, init="asi",
                d_init=D_ACTIVE, auxk=True, k_aux=16, dead_threshold_tokens=256, optimizer=optimizer,
                centred=optimizer == "masked_adam")  # the centred form: b_dec's encoder share crosses the ranks
    return SAETrainConfig(**{**base, **kw})


def probe_lm_eval(recon) -> dict:
    """A stand-in for the LM-loss splice: reconstruct fixed raw activations through ``recon``."""
    x = torch.from_numpy(planted(16, 3))
    x_hat = recon(x)
    return {"delta_lm_loss": float(x_hat.norm()), "loss_recovered": float((x - x_hat).norm())}


def _rank_job(root: str, out: str, optimizers: tuple[str, ...], stop_at: int = 0, kill_at: int = 0) -> None:
    """Every rank: train one sharded SAE per optimizer, as one group on one stream, on the planted stores in
    ``root``. Rank 1 sends SIGTERM to the launcher after step ``stop_at`` (SLURM's time limit) and is
    killed (SIGKILL) after step ``kill_at`` (0: neither)."""
    torch.set_num_threads(1)
    train, heldout = open_store(os.path.join(root, "train.zarr")), open_store(os.path.join(root, "heldout.zarr"))

    def on_step(done: int) -> None:
        if torch.distributed.get_rank() == 1 and done == stop_at:
            os.kill(os.getppid(), signal.SIGTERM)
        if torch.distributed.get_rank() == 1 and done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    members = [Member(config(opt), os.path.join(out, opt), lm_eval=probe_lm_eval) for opt in optimizers]
    train_sharded(members, train, heldout, on_step=on_step)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_stores")
    planted_stores(root, 8192, 2048)
    return root


@pytest.fixture(scope="module")
def one_process(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    train, heldout = open_store(stores / "train.zarr"), open_store(stores / "heldout.zarr")
    return {opt: (train_sae(config(opt), train, heldout, out / opt, lm_eval=probe_lm_eval), out / opt)
            for opt in OPTIMIZERS}


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


def test_a_stopped_or_killed_job_resumes_to_the_same_result_bitwise(stores, two_ranks, tmp_path):
    """Reruns of the two-rank job. 1: SIGTERM to the launcher after step 15: the ranks agree on a step,
    checkpoint it and stop. 2: resumes; its rank 1 is killed after step 35 (the last checkpoint is
    step 30): the job ends in one line naming that rank and its log. 3: resumes from step 30. Every
    SAE of the group equals the uninterrupted run's bitwise."""
    job, logs = (str(stores), str(tmp_path), OPTIMIZERS), tmp_path / "logs"
    with pytest.raises(TrainingStopped, match="stopped by a signal on all 2 ranks"):
        launch(2, _rank_job, (*job, 15), log_dir=logs)
    stopped = {step for opt in OPTIMIZERS for _, _, step, _ in checkpoint_files(tmp_path / opt)}
    assert len(stopped) == 1 and 15 <= stopped.pop() < 30
    with pytest.raises(AttnspaceError) as err:
        launch(2, _rank_job, (*job, 0, 35), log_dir=logs)
    line = err.value.line()
    assert line.startswith("rank 1 of 2 failed (killed by signal 9); its log: " + str(logs / "rank1.log"))
    assert "\n" not in line
    for opt in OPTIMIZERS:
        assert sorted(step for _, _, step, _ in checkpoint_files(tmp_path / opt)) == [30, 30]
    launch(2, _rank_job, job, log_dir=logs)
    assert "resuming" in (logs / "rank1.log").read_text()
    for opt in OPTIMIZERS:
        got, ref = _weights(tmp_path / opt), _weights(two_ranks / opt)
        for k in ref:
            assert torch.equal(got[k], ref[k]), (opt, k)
        drop = {"train_seconds_this_run", "tokens_per_second"}
        assert ({k: v for k, v in _metrics(tmp_path / opt).items() if k not in drop}
                == {k: v for k, v in _metrics(two_ranks / opt).items() if k not in drop})


def test_the_cli_trains_on_ranks_like_one_process(stores, tmp_path):
    from attnspace.cli import main

    def run(ranks: int) -> dict:
        out = tmp_path / f"r{ranks}"
        argv = ["train-sae-group", "--store", str(stores / "train.zarr"), "--heldout", str(stores / "heldout.zarr"),
                "--site", "attn_out", "--batch-size", "64", "--train-tokens", "640", "--buffer-rows", "256",
                "--eval-tokens", "512", "--checkpoint-every", "0", "--log-every", "0", "--ranks", str(ranks),
                "--member", f"--run asi-d{D_ACTIVE}-sparse_adam-n128-k8-auxk --out-dir {out} --lr 0.003 --k-aux 16 "
                "--dead-threshold-tokens 256 --seed 0"]
        assert main(argv) == 0
        return _metrics(out)

    one, two = run(1), run(2)
    assert (tmp_path / "r2" / "ranks" / "rank1.log").exists()
    for key in ("nmse", "l0", "dead_fraction", "init_norm"):
        assert two[key] == pytest.approx(one[key], rel=RTOL), key
    got, ref = _weights(tmp_path / "r2"), _weights(tmp_path / "r1")
    assert max(_rel(got[k], ref[k]) for k in ref) < RTOL


def test_the_merged_sae_reads_like_one_process_in_dead_features_and_export_sae(stores, two_ranks, one_process,
                                                                              tmp_path):
    from attnspace.dead_features import evaluate_dead_features
    from attnspace.llamascope import export_sae
    from attnspace.llamascope import load_llamascope

    heldout = open_store(stores / "heldout.zarr")
    sharded, single = two_ranks / "sparse_adam", one_process["sparse_adam"][1]
    got, ref = (evaluate_dead_features(load_llamascope(f, d_model=64), heldout, "attn_out") for f in (sharded, single))
    assert got.keys() == ref.keys() and got["dead"] == ref["dead"] and got["l0"] == ref["l0"]
    assert got["nmse"] == pytest.approx(ref["nmse"], rel=RTOL)
    for name, folder in (("sharded", sharded), ("single", single)):
        export_sae(folder, "saelens", tmp_path / name)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert (json.loads((tmp_path / "sharded" / "cfg.json").read_text())
            == json.loads((tmp_path / "single" / "cfg.json").read_text()))


def test_bytes_per_step_counts_the_ring_collectives():
    # 2 ranks, B 4, k 2, no AuxK, d 3: the batch (48 bytes), the all-gather sends the other rank 4 x 2 x 12
    # bytes; the all-reduce of [4, 3] float32 sends 2 (R - 1)/R of its 48 bytes.
    assert bytes_per_step(4, 3, 2, 2) == 48 + 4 * 2 * 12 + 48
    assert bytes_per_step(4, 3, 2, 1) == 0
    # with AuxK (k_aux 1) on 4 ranks: the candidates of 3 others, [4, 2, 3] reduced, and the dead count
    assert bytes_per_step(4, 3, 2, 4, k_aux=1) == 48 + 3 * 4 * 3 * 12 + 2 * 3 * (96 + 8) // 4


def _refusing_job(message: str) -> None:
    raise AttnspaceError(message, fix="do the other thing")


def test_bad_input_is_one_line_from_the_launcher_or_the_rank(stores, tmp_path):
    # refused before any rank starts: latents the ranks cannot share, a resume with another R, no ranks
    base = ["train-sae-group", "--store", str(stores / "train.zarr"), "--heldout", str(stores / "heldout.zarr"),
            "--site", "attn_out", "--member", f"--run base-d0-adam-n128-k8 --out-dir {tmp_path / 'sae'}"]
    with pytest.raises(AttnspaceError, match="--ranks 3: base-d0-adam-n128-k8 has 128 latents"):
        _command(base + ["--ranks", "3"])
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "train_state.rank0-of-4.step10.safetensors").write_bytes(b"")
    with pytest.raises(AttnspaceError, match="sharded checkpoints of 4 ranks, this job has 2") as err:
        _command(base + ["--ranks", "2"])
    assert "resume with --ranks 4" in err.value.line()
    with pytest.raises(AttnspaceError, match="--ranks 0"):
        _command(base + ["--ranks", "0"])
    assert not (tmp_path / "sae" / "ranks").exists()  # no rank started
    # a rank's own refusal comes back as its one line
    with pytest.raises(AttnspaceError) as err:
        launch(1, _refusing_job, ("the store is not what it seems",), log_dir=tmp_path / "logs")
    assert err.value.line() == ("rank 0 of 1: the store is not what it seems Fix: do the other thing "
                                f"(its log: {tmp_path / 'logs' / 'rank0.log'})")


def _command(argv: list[str]) -> None:
    """The command's error as raised (main() turns it into a line on stderr)."""
    from attnspace.cli import build_parser

    args = build_parser().parse_args(argv)
    args.func(args)


def test_shard_ranks_takes_the_fewest_gpus_whose_share_fits():
    from attnspace.sae.group import rank_bytes, shard_ranks, training_bytes

    d, n, batch = 4096, 1 << 20, 4096
    whole = training_bytes(d, n, batch)
    assert shard_ranks(d, n, batch, whole, 8) == 1  # fits one device: one process
    for budget in (0.9 * whole, 0.4 * whole, 0.2 * whole):
        R = shard_ranks(d, n, batch, budget, 8)
        assert R > 1 and rank_bytes(d, n, batch, R) <= budget < rank_bytes(d, n, batch, R // 2)
    # a shard is the SAE of n / R latents plus the whole-batch buffers: [B, d] float32, five of them
    assert rank_bytes(d, n, batch, 4) == training_bytes(d, n // 4, batch) + 5 * 4 * batch * d
    assert shard_ranks(d, n, batch, 0.2 * whole, 2) == 1  # more GPUs than a node allows: left to the plan
