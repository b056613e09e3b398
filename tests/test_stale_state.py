"""State that outlives a run or a config: a resumable state is discarded, with one line saying why,
when what it was computed from changed or when it is damaged, and the run that starts over gives
bitwise what an uninterrupted run on the new inputs gives; a failed run leaves no earlier run's
weights under its name, and every reader refuses its folder naming the failure.

Each case is checked against a run that never met the stale state (a straight run on the same
inputs), never against the code's own account of what it did.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_moments import tiny  # noqa: F401 (fixture: the tiny model and its tokens)
from test_sae_data import write_store
from test_sae_train import Killed, PoisonedStream, planted, small_config

from attnspace.errors import AttnspaceError
from attnspace.sae import load_sae, train_sae
from attnspace.sae.group import Member, train_sae_group
from attnspace.sae.io import WEIGHTS, store_identity
from attnspace.sae.train import CHECKPOINT

WALL_CLOCK = {"train_seconds_this_run", "tokens_per_second"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as every job runs (the machine's cores are shared; more threads only contend)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two training stores of one shape with different rows (the same cache after tokens.seed
    changed), and a held-out store."""
    root = tmp_path_factory.mktemp("stale_stores")
    kw = dict(bos_every=500, chunk_rows=1024, shard_rows=4096)
    old = write_store(root / "old.zarr", planted(4096, 1), **kw)
    new = write_store(root / "new.zarr", planted(4096, 3), **kw)
    heldout = write_store(root / "heldout.zarr", planted(2048, 2), **kw)
    return old, new, heldout


def inputs(store) -> dict:
    """The identity the CLI records for a cached stream (attnspace.cli.dictionaries._stream_inputs)."""
    return {"run": "r", "inputs": {"train": store_identity(store)}}


def killed(config, store, heldout, out, at: int = 6) -> None:
    """train_sae killed after step ``at`` (checkpoint_every 4: a checkpoint of step 4 is left)."""
    def kill(step):
        if step == at:
            raise Killed

    with pytest.raises(Killed):
        train_sae(config, store, heldout, out, info=inputs(store), on_step=kill)
    assert (out / CHECKPOINT).is_file()


def same_weights(a, b) -> None:
    x, y = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def same_metrics(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k not in WALL_CLOCK} == {k: v for k, v in b.items() if k not in WALL_CLOCK}


def discarded(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "discarding the training checkpoint" in r.getMessage()]


# --- SAE checkpoints ---------------------------------------------------------------------------

def test_a_checkpoint_of_other_data_is_discarded_and_the_run_matches_a_straight_one(stores, tmp_path, caplog):
    """The reported case: kill after a checkpoint, the cache changes (another tokens.seed), rerun.
    The checkpoint's settings all match; only the store it read differs."""
    old, new, heldout = stores
    config = small_config()
    straight = train_sae(config, new, heldout, tmp_path / "straight", info=inputs(new))
    killed(config, old, heldout, tmp_path / "sae")
    with caplog.at_level(logging.INFO, logger="attnspace.sae"):
        rerun = train_sae(config, new, heldout, tmp_path / "sae", info=inputs(new))
    [line] = discarded(caplog)
    assert "computed from other inputs (train)" in line and "starts over" in line
    assert not any("resuming" in r.getMessage() for r in caplog.records)
    same_weights(tmp_path / "straight", tmp_path / "sae")
    same_metrics(straight, rerun)
    old_norm = train_sae(config, old, heldout, tmp_path / "old", info=inputs(old))["dataset_average_activation_norm"]
    assert rerun["dataset_average_activation_norm"] != old_norm  # the new data's normalisation, not the old


def test_a_checkpoint_of_the_same_data_still_resumes(stores, tmp_path, caplog):
    _, new, heldout = stores
    config = small_config()
    straight = train_sae(config, new, heldout, tmp_path / "straight", info=inputs(new))
    killed(config, new, heldout, tmp_path / "sae")
    with caplog.at_level(logging.INFO, logger="attnspace.sae"):
        resumed = train_sae(config, new, heldout, tmp_path / "sae", info=inputs(new))
    assert not discarded(caplog) and any("resuming" in r.getMessage() and "step 4" in r.getMessage()
                                         for r in caplog.records)
    same_weights(tmp_path / "straight", tmp_path / "sae")
    same_metrics(straight, resumed)


@pytest.mark.parametrize("change", [dict(k=4), dict(train_tokens=128 * 16), dict(lr=2e-3)])
def test_a_checkpoint_of_other_settings_is_discarded(stores, tmp_path, caplog, change):
    """sae.k, sae.train_tokens (the issue's 'another sae.train_tokens') and the learning rate."""
    _, new, heldout = stores
    killed(small_config(), new, heldout, tmp_path / "sae")
    with caplog.at_level(logging.INFO, logger="attnspace.sae"):
        rerun = train_sae(small_config(**change), new, heldout, tmp_path / "sae", info=inputs(new))
    [line] = discarded(caplog)
    assert "other settings" in line and next(iter(change)) in line
    straight = train_sae(small_config(**change), new, heldout, tmp_path / "straight", info=inputs(new))
    same_weights(tmp_path / "straight", tmp_path / "sae")
    same_metrics(straight, rerun)


@pytest.mark.parametrize("damage", ["truncated", "zeroed header", "garbage"])
def test_a_damaged_checkpoint_is_discarded_and_the_run_starts_over(stores, tmp_path, caplog, damage):
    _, new, heldout = stores
    config = small_config()
    killed(config, new, heldout, tmp_path / "sae")
    path = tmp_path / "sae" / CHECKPOINT
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "zeroed header": bytes(64) + data[64:],
                      "garbage": b"not a checkpoint"}[damage])
    with caplog.at_level(logging.INFO, logger="attnspace.sae"):
        rerun = train_sae(config, new, heldout, tmp_path / "sae", info=inputs(new))
    [line] = discarded(caplog)
    assert "cannot be read" in line
    straight = train_sae(config, new, heldout, tmp_path / "straight", info=inputs(new))
    same_weights(tmp_path / "straight", tmp_path / "sae")
    same_metrics(straight, rerun)


def test_every_stale_checkpoint_of_a_group_is_handled_in_one_run(stores, tmp_path, caplog):
    """Three members killed after their checkpoints; the data and one member's k change. One rerun
    discards all three, with a line each, and gives each member its straight result."""
    old, new, heldout = stores
    configs = {"a": small_config(data_seed=0), "b": small_config(data_seed=0, d_sae=128, seed=1),
               "c": small_config(data_seed=0, k=4, seed=2)}

    def members(root, store, changed=None):
        return [Member(changed if changed and name == "c" else cfg, root / name, info=inputs(store))
                for name, cfg in configs.items()]

    def kill(step):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train_sae_group(members(tmp_path / "group", old), old, heldout, on_step=kill)
    assert all((tmp_path / "group" / name / CHECKPOINT).is_file() for name in configs)
    k6 = small_config(data_seed=0, k=6, seed=2)
    with caplog.at_level(logging.INFO, logger="attnspace.sae"):
        rerun = train_sae_group(members(tmp_path / "group", new, k6), new, heldout)
    assert len(discarded(caplog)) == 3
    straight = train_sae_group(members(tmp_path / "straight", new, k6), new, heldout)
    for name, a, b in zip(configs, straight, rerun):
        same_weights(tmp_path / "straight" / name, tmp_path / "group" / name)
        same_metrics(a, b)


def test_the_cli_records_the_store_it_read(stores, tmp_path, caplog, monkeypatch):
    """attnspace train-sae killed after a checkpoint, then rerun on another store: the checkpoint
    names the store it read (the CLI fills info["inputs"]), so the rerun starts over."""
    from attnspace.cli import main
    from attnspace.sae import train as train_module

    old, new, heldout = stores

    def argv(store, out):
        return ["train-sae", "--store", str(store.path), "--heldout", str(heldout.path), "--site", "attn_out",
                "--run", "base-d0-adam-n256-k8", "--out-dir", str(out), "--batch-size", "128",
                "--train-tokens", str(128 * 12), "--buffer-rows", "512", "--eval-tokens", "2048",
                "--checkpoint-every", "4", "--log-every", "0", "--lr", "0.001"]

    checkpoint = train_module.SAERun.checkpoint

    def checkpoint_then_die(self, state, done):
        checkpoint(self, state, done)
        raise Killed

    monkeypatch.setattr(train_module.SAERun, "checkpoint", checkpoint_then_die)
    assert main(argv(old, tmp_path / "sae")) == 1
    monkeypatch.undo()
    record = json.loads(load_file_header(tmp_path / "sae" / CHECKPOINT))
    assert record["inputs"] == {"train": store_identity(old)} and record["step"] == 4
    with caplog.at_level(logging.INFO, logger="attnspace.sae"):
        assert main(argv(new, tmp_path / "sae")) == 0
    assert len(discarded(caplog)) == 1
    assert main(argv(new, tmp_path / "straight")) == 0
    same_weights(tmp_path / "straight", tmp_path / "sae")
    hyper = json.loads((tmp_path / "sae" / "hyperparams.json").read_text())
    assert hyper["inputs"] == {"train": store_identity(new)}


def test_a_live_streams_identity_names_its_model_tokens_source_and_seeds(stores, tmp_path):
    """What the CLI records for a live stream changes with each of the prepared model's files, the
    token file's bytes, the source and its seed; for a cached stream, it is the store's identity."""
    from argparse import Namespace

    from attnspace.cli.dictionaries import _stream_inputs
    from attnspace.models import FILES_FORMAT, FILES_RECORD

    model = tmp_path / "hf"
    model.mkdir()
    (model / FILES_RECORD).write_text(json.dumps({"format": FILES_FORMAT, "sha256": {"model.safetensors": "ab"}}))
    (tmp_path / "tokens.npz").write_bytes(b"tokens")
    shared = Namespace(live_source='{"kind": "embedded", "name": "python_docs"}', model_dir=str(model),
                       tokens=str(tmp_path / "tokens.npz"), live_seed=0, live_batch_docs=8)
    base = _stream_inputs(shared, None)

    def changed(**kw) -> list[str]:
        now = _stream_inputs(Namespace(**{**vars(shared), **kw}), None)
        return sorted(k for k in base if base[k] != now[k])

    assert changed() == []
    assert changed(live_seed=1) == ["seed"] and changed(live_batch_docs=4) == ["batch_docs"]
    assert changed(live_source='{"kind": "embedded", "name": "python_code"}') == ["source"]
    (tmp_path / "tokens.npz").write_bytes(b"tokenz")
    assert changed() == ["tokens"]
    (tmp_path / "tokens.npz").write_bytes(b"tokens")
    (model / FILES_RECORD).write_text(json.dumps({"format": FILES_FORMAT, "sha256": {"model.safetensors": "cd"}}))
    assert changed() == ["model"]
    old, _, _ = stores
    assert _stream_inputs(Namespace(live_source=None), old) == {"train": store_identity(old)}


def load_file_header(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["attnspace"]


def test_store_identity_names_the_rows_not_the_build(tmp_path):
    """The same rows written twice (another build time, another folder) have one identity; one
    changed value does not."""
    x = planted(1024, 9)
    a = write_store(tmp_path / "a.zarr", x, chunk_rows=256, shard_rows=512)
    b = write_store(tmp_path / "b.zarr", x, chunk_rows=256, shard_rows=512)
    y = x.copy()
    y[700, 3] += 1e-3
    c = write_store(tmp_path / "c.zarr", y, chunk_rows=256, shard_rows=512)
    assert store_identity(a) == store_identity(b) != store_identity(c)


# --- failed SAE runs ---------------------------------------------------------------------------

def test_a_failed_run_deletes_the_earlier_runs_sae_and_readers_refuse_it(stores, tmp_path, capsys):
    """An SAE trained under a run name, then the same name diverges: nothing of the earlier SAE
    is left to read, and load_sae and dead-features name the failure."""
    from attnspace.cli import main

    _, new, heldout = stores
    out = tmp_path / "smollm" / "pydocs" / "L2" / "attn_out" / "base-d0-adam-n256-k8"
    ok = train_sae(small_config(), new, heldout, out)
    assert ok["status"] == "ok" and (out / WEIGHTS).is_file() and (out / "hyperparams.json").is_file()
    failed = train_sae(small_config(log_every=2), PoisonedStream(poison_at=3), heldout, out)
    assert failed["status"] == "failed"
    assert not (out / WEIGHTS).exists() and not (out / "hyperparams.json").exists()
    with pytest.raises(AttnspaceError, match="training run failed .*loss not finite"):
        load_sae(out)
    assert main(["dead-features", str(out), str(heldout.path), "--site", "attn_out"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "training run failed" in err and "Fix:" in err
    assert main(["export-sae", str(out), "--to", "saelens", str(out.parent / "exported")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training run failed" in err and not (out.parent / "exported").exists()


def test_a_killed_rerun_leaves_only_its_checkpoint_never_the_earlier_sae(stores, tmp_path):
    """A finished SAE, then the same name retrained and killed: the folder holds the new run's
    checkpoint and nothing of the earlier run (no weights, hyperparams or metrics to mistake for it)."""
    _, new, heldout = stores
    out = tmp_path / "sae"
    train_sae(small_config(), new, heldout, out, info=inputs(new))
    killed(small_config(k=4), new, heldout, out)
    assert sorted(p.name for p in out.rglob("*")) == [CHECKPOINT]


def test_a_diverging_learning_rate_is_recorded_failed_with_no_weights(stores, tmp_path):
    """The reported case: sae.lr.adam 1e30 over an existing SAE."""
    _, new, heldout = stores
    out = tmp_path / "sae"
    train_sae(small_config(), new, heldout, out)
    m = train_sae(small_config(lr=1e30, log_every=1), new, heldout, out)
    assert m["status"] == "failed" and "not finite" in m["failure"]
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in out.rglob("*")) == ["metrics.json"]


def test_a_folder_without_a_run_record_still_loads(stores, tmp_path):
    """An SAE from elsewhere (no metrics.json) is read as before."""
    _, new, heldout = stores
    out = tmp_path / "sae"
    train_sae(small_config(train_tokens=128 * 2), new, heldout, out)
    (out / "metrics.json").unlink()
    assert load_sae(out).d_sae == 256


# --- failed Lorsa runs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lorsa_stores(tmp_path_factory):
    from test_lorsa import write_store as write_lorsa_store

    root = tmp_path_factory.mktemp("lorsa_stale")
    rng = np.random.default_rng(0)
    return (write_lorsa_store(root / "L1.zarr", rng.integers(5, 40, size=16).tolist(), seed=1),
            write_lorsa_store(root / "heldout" / "L1.zarr", rng.integers(5, 40, size=6).tolist(), seed=2))


def test_a_diverged_lorsa_is_recorded_failed_and_table1_says_so(lorsa_stores, tmp_path):
    """The reported case: lorsa.lr 1e30 over a finished run. No Lorsa is left under the name,
    load_lorsa names the failure, and Table 1 shows "failed" and the reason instead of nan."""
    from test_lorsa import tiny_model

    from attnspace.lorsa import LorsaConfig, load_lorsa, table1_frame, table1_markdown, train_lorsa
    from attnspace.lorsa.io import META_FILE, WEIGHTS_FILE

    train, heldout = lorsa_stores
    model_config = tiny_model("llama").config

    def run(init, lr, out):
        config = LorsaConfig(n_ov_heads=8, n_qk_heads=2, d_qk=8, k=2, d_init=6, n_epochs=1, batch_tokens=80, lr=lr,
                             log_every=0)
        return train_lorsa(config, train, heldout, None, init, seed=0, model_config=model_config, out_dir=out)

    ok = run("vanilla", 3e-3, tmp_path / "vanilla")
    assert ok["status"] == "ok" and (tmp_path / "vanilla" / WEIGHTS_FILE).is_file()
    failed = run("vanilla", 1e30, tmp_path / "vanilla")
    assert failed["status"] == "failed" and "not finite" in failed["failure"]
    assert failed["nmse"] is None and failed["dead_heads"] is None
    assert json.loads((tmp_path / "vanilla" / "metrics.json").read_text())["status"] == "failed"
    assert not (tmp_path / "vanilla" / WEIGHTS_FILE).exists() and not (tmp_path / "vanilla" / META_FILE).exists()
    with pytest.raises(AttnspaceError, match="Lorsa training run failed .*not finite"):
        load_lorsa(tmp_path / "vanilla")

    asi = run("vanilla", 3e-3, tmp_path / "other") | {"init": "asi"}  # a finished run beside the failed one
    md = table1_markdown(table1_frame([failed, asi]))
    assert "nan" not in md
    assert "| Normalized MSE | failed | " in md and f"{asi['nmse']:.3f} |" in md
    assert "Failed, left out: vanilla seed 0 (loss not finite" in md
    frame = table1_frame([failed, asi])
    assert list(frame["status"]) == ["failed", "ok"] and frame["nmse"].isna().tolist() == [True, False]
    alone = table1_markdown(table1_frame([failed]))
    assert "no run finished." in alone and "| Normalized MSE | failed |" in alone and "nan" not in alone


# --- streamed moments (.partial) ---------------------------------------------------------------

def moments_run(tiny, out, splits=None, checkpoint_docs=3, **kw):
    """The caching job with streamed moments only (no store), as test_moments runs it."""
    from test_moments import LAYERS, SPECTRUM_SITES

    from attnspace.cache import cache_activations

    model, tok, own = tiny
    return cache_activations(model, splits or own, out / "activations", model_name="tiny", dataset="synthetic",
                             layers=LAYERS, sites=[], logical_dtype="float32",
                             special_ids={tok.bos_token_id, tok.eos_token_id}, chunk_rows=64, shard_rows=128,
                             config_hash="abc", moments_dir=out / "moments", moment_sites=SPECTRUM_SITES, groups=5,
                             checkpoint_docs=checkpoint_docs, **kw)


def killed_moments(tiny, out, monkeypatch, **kw) -> None:
    """Killed at the 8th document, checkpoints every 3: .partial holds the state after 6."""
    from test_cache import kill_capture_at

    kill_capture_at(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        moments_run(tiny, out, **kw)
    monkeypatch.undo()
    assert json.loads((out / "moments" / ".partial" / "state.json").read_text())["next_doc"] == 6


def same_moments(a, b) -> None:
    from test_moments import LAYERS, SPECTRUM_SITES

    from attnspace.moments import RECORD, load_moments

    for layer in LAYERS:
        for site in SPECTRUM_SITES:
            x, _ = load_moments(a / "moments" / RECORD, layer, site)
            y, _ = load_moments(b / "moments" / RECORD, layer, site)
            assert np.array_equal(x, y), (layer, site)


def moments_discarded(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "discarding the moments checkpoint" in r.getMessage()]


@pytest.fixture(scope="module")
def tiny_moments(tiny, tmp_path_factory):
    """An uninterrupted run of the streamed moments on the tiny model's tokens."""
    out = tmp_path_factory.mktemp("moments_whole")
    moments_run(tiny, out)
    return out


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped bit", "other totals"])
def test_a_damaged_moments_checkpoint_is_discarded_in_one_rerun(tiny, tiny_moments, tmp_path, monkeypatch, caplog,
                                                                damage):
    """The reported case: a damaged .partial/sums.npz made every rerun fail with BadZipFile. A
    flipped bit fails the zip's CRC; a whole, readable file of other totals fails the state's digests."""
    killed_moments(tiny, tmp_path, monkeypatch)
    sums = tmp_path / "moments" / ".partial" / "sums.npz"
    data = bytearray(sums.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"PK\x03\x04 not a zip")
    elif damage == "flipped bit":
        data[len(data) // 2] ^= 0x01  # one bit of one float64 in the middle of an array
    if damage == "other totals":
        with np.load(sums) as z:
            totals = {name: z[name] + 1.0 for name in z.files}
        np.savez(sums, **totals)
    else:
        sums.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="attnspace.moments"):
        moments_run(tiny, tmp_path)
    [line] = moments_discarded(caplog)
    assert "cannot be read" in line and "starting from the first document" in line
    assert ("does not match its digest" in line) == (damage == "other totals")
    same_moments(tmp_path, tiny_moments)
    assert not (tmp_path / "moments" / ".partial").exists()


def test_a_moments_checkpoint_of_other_tokens_is_discarded(tiny, tmp_path, monkeypatch, caplog):
    """The same number of documents and tokens cut from another corpus order (another tokens.seed):
    only the token ids differ, and they are part of the checkpoint's key."""
    from test_corpora import synthetic_docs

    from attnspace.corpora import tokenize_documents

    model, tok, splits = tiny
    killed_moments(tiny, tmp_path, monkeypatch)
    docs = synthetic_docs(0)
    other = tokenize_documents(iter(docs[1:] + docs[:1]), tok, max_doc_tokens=40, budgets={"train": 300, "heldout": 90})
    assert not np.array_equal(other["train"].ids, splits["train"].ids)
    with caplog.at_level(logging.INFO, logger="attnspace.moments"):
        moments_run(tiny, tmp_path, splits=other)
    [line] = moments_discarded(caplog)
    assert "other inputs or settings" in line and "inputs" in line
    moments_run(tiny, tmp_path / "straight", splits=other)
    same_moments(tmp_path, tmp_path / "straight")


def test_a_moments_checkpoint_of_another_model_is_discarded(tiny, tiny_moments, tmp_path, monkeypatch, caplog):
    """The prepared model's identity (attnspace.models.recorded_identity, passed by the CLI) is part
    of the key: the same tokens through a changed model start over."""
    killed_moments(tiny, tmp_path, monkeypatch, model_identity="aaaa")
    with caplog.at_level(logging.INFO, logger="attnspace.moments"):
        moments_run(tiny, tmp_path, model_identity="bbbb")
    [line] = moments_discarded(caplog)
    assert "inputs" in line
    same_moments(tmp_path, tiny_moments)
