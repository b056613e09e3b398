"""SAE groups: several SAEs on one stream give bitwise what each gives trained alone on the same
batches (sizes, inits, optimizers, AuxK, centred form, seeds), resume bitwise after a kill, keep
going when one member fails; the group CLI and its memory model against sums done by hand."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sae_train import D_ACTIVE, Killed, PoisonedStream, planted, planted_stores, small_config

from attnspace.errors import AttnspaceError
from attnspace.sae import train_sae
from attnspace.sae.group import Member, pack, pack_devices, train_sae_group, training_bytes
from attnspace.sae.train import CHECKPOINT
from attnspace.spectrum import Spectrum

WALL_CLOCK = {"train_seconds_this_run", "tokens_per_second"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return planted_stores(tmp_path_factory.mktemp("group_stores"), 8192, 2048)


def sample_spectrum() -> Spectrum:
    """An SVD spectrum of planted rows (another sample than the training store's), as ASI's basis."""
    x = planted(4096, 7).astype(np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return Spectrum(singular_values=s, mean=mean, components=vt, n_tokens=len(x))


def members_configs():
    """Five members that differ in everything but the stream: size, k, init (ASI with and without a
    spectrum), d_init, optimizer, learning rate, AuxK, centred form and init seed."""
    common = dict(data_seed=0, train_tokens=128 * 12, checkpoint_every=4)
    return {
        "base": (small_config(**common), None),
        "asi_spectrum": (small_config(d_sae=128, k=4, init="asi", d_init=D_ACTIVE, optimizer="sparse_adam", lr=2e-3,
                                      seed=1, **common), sample_spectrum()),
        "random_auxk": (small_config(d_sae=192, init="random_subspace", d_init=4, auxk=True, k_aux=16,
                                     dead_threshold_tokens=256, seed=2, **common), None),
        "base_centred_masked": (small_config(d_sae=64, k=6, centred=True, optimizer="masked_adam", seed=3, **common),
                                None),
        "asi_sample_centred": (small_config(init="asi", d_init=D_ACTIVE, centred=True, auxk=True, k_aux=8,
                                            dead_threshold_tokens=256, seed=4, **common), None),
    }


def assert_same(a_dir, b_dir, a: dict, b: dict) -> None:
    x = load_file(str(a_dir / "checkpoints" / "final.safetensors"))
    y = load_file(str(b_dir / "checkpoints" / "final.safetensors"))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), (a_dir.name, key)
    assert {k: v for k, v in a.items() if k not in WALL_CLOCK} == {k: v for k, v in b.items() if k not in WALL_CLOCK}
    assert (a_dir / "hyperparams.json").read_text() == (b_dir / "hyperparams.json").read_text()


@pytest.fixture(scope="module")
def alone(stores, tmp_path_factory):
    """Each member trained on its own with train_sae (its own stream, seeded data_seed 0)."""
    train, heldout = stores
    root = tmp_path_factory.mktemp("alone")
    return root, {name: train_sae(cfg, train, heldout, root / name, spectrum, info={"run": name})
                  for name, (cfg, spectrum) in members_configs().items()}


def group_members(root):
    return [Member(cfg, root / name, spectrum, info={"run": name}) for name, (cfg, spectrum) in members_configs().items()]


def test_a_group_trains_each_member_bitwise_as_alone(stores, alone, tmp_path):
    train, heldout = stores
    alone_root, alone_metrics = alone
    metrics = train_sae_group(group_members(tmp_path), train, heldout)
    assert [m["d_sae"] for m in metrics] == [256, 128, 192, 64, 256]
    for (name, a), m in zip(alone_metrics.items(), metrics):
        assert_same(alone_root / name, tmp_path / name, a, m)
        assert json.loads((tmp_path / name / "metrics.json").read_text()) == json.loads(json.dumps(m))
        assert not (tmp_path / name / CHECKPOINT).exists()
    # the members differ from each other (each its own init and settings), and trained
    assert len({round(m["nmse"], 12) for m in metrics}) == len(metrics)
    assert all(0 < m["nmse"] < 1 and m["data_seed"] == 0 for m in metrics)
    assert metrics[2]["dead_for_auxk_at_end"] > 0  # AuxK had dead latents to act on


def test_replicates_share_batches_not_inits(stores, tmp_path):
    """seed (init) differs, data_seed is shared: replicate 0 (data_seed None) equals data_seed = seed."""
    train, heldout = stores
    r0 = train_sae(small_config(train_tokens=128 * 3), train, heldout, tmp_path / "r0")
    r0_data = train_sae(small_config(train_tokens=128 * 3, data_seed=0), train, heldout, tmp_path / "r0_data")
    assert_same(tmp_path / "r0", tmp_path / "r0_data", r0, r0_data)
    r1 = train_sae(small_config(train_tokens=128 * 3, seed=1, data_seed=0), train, heldout, tmp_path / "r1")
    assert r1["seed"] == 1 and r1["data_seed"] == 0 and r1["nmse"] != r0["nmse"]


@pytest.mark.parametrize("kill_at", [6, 10])
def test_a_killed_group_resumes_bitwise(stores, alone, tmp_path, kill_at):
    train, heldout = stores
    alone_root, alone_metrics = alone

    def kill(step):
        if step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        train_sae_group(group_members(tmp_path), train, heldout, on_step=kill)
    for name in members_configs():
        assert (tmp_path / name / CHECKPOINT).exists() and not (tmp_path / name / "metrics.json").exists()
    metrics = train_sae_group(group_members(tmp_path), train, heldout)
    for (name, a), m in zip(alone_metrics.items(), metrics):
        assert_same(alone_root / name, tmp_path / name, a, m)


def test_members_at_different_checkpoints_resume_bitwise(stores, alone, tmp_path):
    """A kill between two members' checkpoints (or a member without one) leaves them at different
    steps: the stream restarts from the earliest, and members further on skip the batches they took."""
    train, heldout = stores
    alone_root, alone_metrics = alone
    names = list(members_configs())

    def kill_at(n):
        def kill(step):
            if step == n:
                raise Killed
        return kill

    with pytest.raises(Killed):
        train_sae_group(group_members(tmp_path), train, heldout, on_step=kill_at(6))  # all at step 4
    with pytest.raises(Killed):
        train_sae_group(group_members(tmp_path)[:1], train, heldout, on_step=kill_at(10))  # the first at step 8
    (tmp_path / names[1] / CHECKPOINT).unlink()  # the second from scratch
    metrics = train_sae_group(group_members(tmp_path), train, heldout)
    for (name, a), m in zip(alone_metrics.items(), metrics):
        assert_same(alone_root / name, tmp_path / name, a, m)


def test_a_failing_member_is_recorded_and_the_others_go_on(stores, tmp_path):
    train, heldout = stores
    ok_cfg = small_config(log_every=2, seed=1, data_seed=0)
    # member 0 diverges: a learning rate so large its weights overflow to inf within a few steps
    bad = small_config(log_every=2, lr=1e30, data_seed=0)
    members = [Member(bad, tmp_path / "bad"), Member(ok_cfg, tmp_path / "ok")]
    metrics = train_sae_group(members, train, heldout)
    assert metrics[0]["status"] == "failed" and "not finite" in metrics[0]["failure"] and metrics[0]["nmse"] is None
    assert not (tmp_path / "bad" / "checkpoints").exists() and not (tmp_path / "bad" / CHECKPOINT).exists()
    assert metrics[1]["status"] == "ok"
    alone = train_sae(ok_cfg, train, heldout, tmp_path / "ok_alone")
    assert_same(tmp_path / "ok_alone", tmp_path / "ok", alone, metrics[1])


def test_a_poisoned_stream_fails_every_member(stores, tmp_path):
    _, heldout = stores
    members = [Member(small_config(log_every=2), tmp_path / "a"), Member(small_config(log_every=2, seed=5, data_seed=0), tmp_path / "b")]
    stream = PoisonedStream(poison_at=3)
    metrics = train_sae_group(members, stream, heldout)
    assert [m["status"] for m in metrics] == ["failed", "failed"]
    assert all("step 4" in m["failure"] for m in metrics)
    assert stream.calls == 4  # the loop stops once every member has failed


def test_members_must_share_the_stream(stores, tmp_path):
    train, heldout = stores
    with pytest.raises(AttnspaceError, match="batch_size 128 vs 256"):
        train_sae_group([Member(small_config(), tmp_path / "a"),
                         Member(small_config(batch_size=256, buffer_rows=512), tmp_path / "b")], train, heldout)
    with pytest.raises(AttnspaceError, match="stream_seed 0 vs 1"):
        train_sae_group([Member(small_config(), tmp_path / "a"), Member(small_config(seed=1), tmp_path / "b")],
                        train, heldout)
    with pytest.raises(AttnspaceError, match="same folder"):
        train_sae_group([Member(small_config(), tmp_path / "a"), Member(small_config(k=4), tmp_path / "a")],
                        train, heldout)


def test_training_bytes_by_hand():
    # d_model 4, d_sae 8, batch 2, k 2, Adam: P = 4 x 8 x 4 = 128 bytes a matrix; weights, moments and
    # mirror 6.5 P = 832, dense gradients 2 P = 256, one [U, d] block with U = min(8, 2 x 2) = 4: 64;
    # [B, d] tensors 20 x 2 x 4 = 160; 56 bytes for each of the 4 entries = 224
    assert training_bytes(4, 8, 2, k=2) == 832 + 256 + 64 + 160 + 224
    # SparseAdam: no dense gradients, three [U, d] blocks
    assert training_bytes(4, 8, 2, optimizer="sparse_adam", k=2) == 832 + 3 * 64 + 160 + 224
    # the paper's 1,048,576 latents on d 4096, batch 4096, Adam with AuxK (k 50 + k_aux 512): P = 16 GiB,
    # every latent touched (U = n), 9.5 P + 20 B d + 56 B (k + k_aux): 163.7 GB, as measured (152.4 GiB)
    P = 4 * 2**20 * 4096
    assert training_bytes(4096, 2**20, 4096, auxk=True) == int(9.5 * P + 20 * 4096 * 4096 + 56 * 4096 * 562)
    with pytest.raises(AttnspaceError, match="no memory model"):
        training_bytes(4, 8, 2, optimizer="sgd")


def test_pack_by_hand():
    items = [("a", 3), ("b", 5), ("c", 2), ("d", 9), ("e", 2)]
    # largest first: d 9 alone (budget 10: 9 + 5 > 10), then b 5 + a 3 + c 2 = 10, then e
    assert pack(items, 10, 8) == [["d"], ["b", "a", "c"], ["e"]]
    assert pack(items, 10, 2) == [["d"], ["b", "a"], ["c", "e"]]
    with pytest.raises(AttnspaceError, match=r"SAE run bigger needs .* budget .*; 1 more runs too"):
        pack([("big", 50), ("x", 1), ("bigger", 60)], 10, 8)  # larger than the budget: refused, not alone
    assert pack([], 10, 8) == []


def test_pack_devices_by_hand():
    """Two devices of 10 each: d 9 on device 0, b 5 on device 1, then a 3 (no room on 0: 12; 1: 8),
    c 2 on device 1 (10), e 2 fits neither: a second group."""
    items = [("a", 3), ("b", 5), ("c", 2), ("d", 9), ("e", 2)]
    assert pack_devices(items, 10, 8, 2) == [[("d", 0), ("b", 1), ("a", 1), ("c", 1)], [("e", 0)]]
    assert pack_devices(items, 10, 8, 3) == [[("d", 0), ("b", 1), ("a", 1), ("c", 1), ("e", 2)]]
    # at most 2 a device: d; b, a on 1 (8); c on 2; e on 2 (4)
    assert pack_devices(items, 10, 2, 3) == [[("d", 0), ("b", 1), ("a", 1), ("c", 2), ("e", 2)]]
    assert pack_devices(items, 10, 1, 2) == [[("d", 0), ("b", 1)], [("a", 0), ("c", 1)], [("e", 0)]]
    assert pack_devices(items, 10, 8, 1) == [[(n, 0) for n in g] for g in pack(items, 10, 8)]


def test_cli_trains_a_group_as_train_sae_would(stores, alone, tmp_path):
    """attnspace train-sae-group: shared options once, each member's own in --member; each member's
    command (shared + own) is a train-sae command, and their results agree bitwise."""
    from attnspace.cli import build_parser, main
    from attnspace.cli.dictionaries import member_commands

    train, heldout = stores
    shared = ["--store", str(train.path), "--heldout", str(heldout.path), "--site", "attn_out", "--batch-size", "128",
              "--train-tokens", str(128 * 4), "--buffer-rows", "512", "--eval-tokens", "2048", "--data-seed", "0",
              "--checkpoint-every", "2", "--log-every", "0"]
    runs = {"base-d0-adam-n256-k8": ["--seed", "0", "--lr", "0.001"],
            "asi-d8-sparse_adam-n128-k4-auxk-c-r1": ["--seed", "1", "--lr", "0.002", "--k-aux", "16"]}
    argv = ["train-sae-group", *shared]
    for run, own in runs.items():
        argv += ["--member", shlex.join(["--run", run, "--out-dir", str(tmp_path / "group" / run), *own])]
    commands = member_commands(argv)
    assert len(commands) == 2 and all(c[0] == "train-sae" for c in commands)
    parser = build_parser()
    parsed = [parser.parse_args(c) for c in commands]
    assert [a.run for a in parsed] == list(runs) and parsed[1].seed == 1 and parsed[1].data_seed == 0
    assert parsed[1].batch_size == 128 and parsed[1].k_aux == 16
    assert main(argv) == 0
    for command, run in zip(commands, runs):  # each member's own train-sae command, into another folder
        command = list(command)
        command[command.index("--out-dir") + 1] = str(tmp_path / "alone" / run)
        assert main(command) == 0
    for run in runs:
        a = json.loads((tmp_path / "alone" / run / "metrics.json").read_text())
        g = json.loads((tmp_path / "group" / run / "metrics.json").read_text())
        assert_same(tmp_path / "alone" / run, tmp_path / "group" / run, a, g)


def test_cli_group_errors_are_one_line(stores, tmp_path, capsys):
    from attnspace.cli import main

    train, heldout = stores
    shared = ["train-sae-group", "--store", str(train.path), "--heldout", str(heldout.path), "--site", "attn_out",
              "--batch-size", "128", "--train-tokens", "256", "--buffer-rows", "512"]
    # a member cannot set the stream's settings: they are the group's
    rc = main([*shared, "--member", f"--run base-d0-adam-n64-k4 --out-dir {tmp_path / 'a'} --batch-size 64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: train-sae-group --member: unrecognized arguments: --batch-size 64")
    assert "Fix:" in err[-1]
    rc = main([*shared, "--member", f"--run not-a-run --out-dir {tmp_path / 'b'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: ") and "not-a-run" in err[-1] and "Fix:" in err[-1]
