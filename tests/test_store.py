"""Activation store: lossless round trips, whole-shard writes, atomic publication."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnspace.store import (
    LOGICAL_DTYPES,
    StoreError,
    StoreWriter,
    clamp_layout,
    configure_io,
    decode_bf16,
    manifest_path,
    open_store,
)

SITES = {"attn_out": 12, "attn_z": 20}


def _batch(rng, rows, dtype, start=0):
    """Random activations as torch tensors of ``dtype`` plus per-row metadata."""
    acts = {s: torch.from_numpy(rng.standard_normal((rows, w)).astype(np.float32) * 3).to(dtype) for s, w in SITES.items()}
    idx = np.arange(start, start + rows)
    return acts, idx % 50_000, idx // 37, idx % 37, (idx % 37) != 0


def _write(path, sizes, dtype, *, chunk_rows=8, shard_rows=32, seed=0, config_hash="h1"):
    """Write a store from batches of ``sizes`` rows; return the expected arrays by name."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    expected = {s: [] for s in SITES} | {"token_id": [], "doc": [], "pos": [], "keep": []}
    with StoreWriter(
        path, model="m", dataset="ds", layer=3, split="train", n_rows=n, sites=SITES,
        logical_dtype=str(dtype).removeprefix("torch."), chunk_rows=chunk_rows, shard_rows=shard_rows,
        config_hash=config_hash,
    ) as w:
        start = 0
        for rows in sizes:
            acts, tok, doc, pos, keep = _batch(rng, rows, dtype, start)
            w.append(acts, tok, doc, pos, keep)
            for s, t in acts.items():
                expected[s].append(t.float().numpy())
            for name, a in zip(("token_id", "doc", "pos", "keep"), (tok, doc, pos, keep)):
                expected[name].append(a)
            start += rows
    return {k: np.concatenate(v) for k, v in expected.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_bitwise(tmp_path, dtype):
    path = tmp_path / "L3.zarr"
    exp = _write(path, [7, 13, 30, 1, 50], dtype)  # 101 rows, shards of 32: appends straddle shards
    st = open_store(path, expect_hash="h1")
    assert st.n_rows == 101 and st.n_kept == int(exp["keep"].sum())
    assert st.logical_dtype == str(dtype).removeprefix("torch.")
    assert st.sites == tuple(SITES)
    for s in SITES:
        got = st.dask(s).compute()
        assert got.dtype == np.float32
        # Bitwise: the float32 image of the stored dtype is exact for all three.
        np.testing.assert_array_equal(got.view(np.uint32), exp[s].view(np.uint32))
        np.testing.assert_array_equal(st.rows(s, 10, 90, kept_only=False), exp[s][10:90])
        np.testing.assert_array_equal(st.rows(s, 10, 90), exp[s][10:90][exp["keep"][10:90]])
    for name in ("token_id", "doc", "pos", "keep"):
        np.testing.assert_array_equal(st.meta(name), exp[name])
    assert st.meta("token_id").dtype == np.int32 and st.keep().dtype == bool


def test_bf16_stored_as_bits_and_decoded_exactly(tmp_path):
    path = tmp_path / "L0.zarr"
    # Values that exercise the whole bf16 range: subnormals, large, negative zero.
    vals = torch.tensor([0.0, -0.0, 1e-40, -3.5, 1.0e38, 7.0e-3], dtype=torch.bfloat16)
    x = vals.repeat(4, 1).T.contiguous()  # [6, 4]
    with StoreWriter(path, model="m", dataset="d", layer=0, split="train", n_rows=6, sites={"a": 4},
                     logical_dtype="bfloat16") as w:
        w.append({"a": x}, np.arange(6), np.zeros(6), np.arange(6), np.ones(6, bool))
    st = open_store(path)
    raw = st.group["a"][:]
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, x.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(st.rows("a", 0, 6).view(np.uint32), x.float().numpy().view(np.uint32))
    assert decode_bf16(np.array([0x3F80], np.uint16))[0] == 1.0


def test_layout_attributes_and_manifest(tmp_path):
    path = tmp_path / "L3.zarr"
    _write(path, [40, 61], torch.float32)
    m = json.loads(manifest_path(path).read_text())
    assert manifest_path(path).name == "L3.manifest.json"
    assert m["n_rows"] == 101 and m["store"] == "L3.zarr" and m["config_hash"] == "h1"
    assert m["sites"]["attn_z"] == {"width": 20, "dtype": "float32", "logical_dtype": "float32"}
    st = open_store(manifest_path(path))  # the manifest path is accepted too
    a = st.group["attn_out"]
    assert a.chunks == (8, 12) and a.shards == (32, 12)
    assert dict(a.attrs) == {
        "model": "m", "dataset": "ds", "layer": 3, "site": "attn_out", "logical_dtype": "float32",
        "n_tokens": 101, "split": "train",
    }
    assert {k: st.group.attrs[k] for k in ("model", "dataset", "layer", "split", "n_tokens", "config_hash")} == {
        "model": "m", "dataset": "ds", "layer": 3, "split": "train", "n_tokens": 101, "config_hash": "h1",
    }
    codecs = json.dumps(a.metadata.to_dict()["codecs"][0])
    assert "crc32c" in codecs
    # Dask blocks are whole chunks.
    assert all(c % 8 == 0 for c in st.dask("attn_out", block_rows=16).chunks[0][:-1])
    with pytest.raises(ValueError):
        st.dask("attn_out", block_rows=12)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_clamp_layout():
    assert clamp_layout(101, 8, 32) == (8, 32)
    assert clamp_layout(5, 2048, 65536) == (5, 5)
    assert clamp_layout(3000, 2048, 65536) == (2048, 4096)
    with pytest.raises(ValueError):
        clamp_layout(100, 8, 30)


def test_failed_writer_leaves_nothing_and_rerun_completes(tmp_path):
    path = tmp_path / "L3.zarr"
    _write(path, [101], torch.float32, config_hash="old")  # a previously published store
    rng = np.random.default_rng(1)
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(path, model="m", dataset="ds", layer=3, split="train", n_rows=101, sites=SITES,
                         logical_dtype="float32", chunk_rows=8, shard_rows=32) as w:
            w.append(*_batch(rng, 70, torch.float32))  # two whole shards already on disk
            raise RuntimeError("boom")
    with pytest.raises(StoreError, match="Fix: run snakemake"):
        open_store(path)
    assert not path.exists() and not list(tmp_path.glob("*.tmp-*"))
    exp = _write(path, [101], torch.float32, config_hash="new")
    st = open_store(path, expect_hash="new")
    np.testing.assert_array_equal(st.dask("attn_out").compute(), exp["attn_out"])


def test_killed_writer_is_not_accepted_and_cleaned_on_rerun(tmp_path):
    import socket
    import subprocess
    import sys

    path = tmp_path / "L3.zarr"
    w = StoreWriter(path, model="m", dataset="ds", layer=3, split="train", n_rows=101, sites=SITES,
                    logical_dtype="float32", chunk_rows=8, shard_rows=32)
    w.append(*_batch(np.random.default_rng(0), 64, torch.float32))
    w._wait()  # a killed process writes nothing more; here its background thread must finish first
    # Simulate a kill: no close, no __exit__. Temporary stores of a writer that has exited
    # (removed) and of one still running (kept: it is not ours to delete).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    (tmp_path / f"L3.zarr.tmp-{host}-{int(dead.stdout)}").mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"L3.zarr.tmp-{host}-{alive.pid}").mkdir()
        with pytest.raises(StoreError, match="no manifest"):
            open_store(path)
        _write(path, [101], torch.float32)
        assert open_store(path).n_rows == 101
        assert [p.name for p in tmp_path.glob("*.tmp-*")] == [f"L3.zarr.tmp-{host}-{alive.pid}"]
    finally:
        alive.kill()
        alive.wait()


def test_wrong_row_count_is_refused(tmp_path):
    path = tmp_path / "L3.zarr"
    with pytest.raises(StoreError, match="rows written"):
        with StoreWriter(path, model="m", dataset="ds", layer=3, split="train", n_rows=101, sites=SITES,
                         logical_dtype="float32", chunk_rows=8, shard_rows=32) as w:
            w.append(*_batch(np.random.default_rng(0), 100, torch.float32))
    assert not path.exists() and not manifest_path(path).exists()
    w = StoreWriter(path, model="m", dataset="ds", layer=3, split="train", n_rows=10, sites=SITES,
                    logical_dtype="float32")
    with pytest.raises(StoreError, match="exceed"):
        w.append(*_batch(np.random.default_rng(0), 11, torch.float32))
    w.abort()


def test_lossy_input_is_refused(tmp_path):
    w = StoreWriter(tmp_path / "x.zarr", model="m", dataset="d", layer=0, split="train", n_rows=4,
                    sites={"a": 3}, logical_dtype="float16")
    with pytest.raises(TypeError, match="float16"):
        w.append({"a": torch.zeros(4, 3)}, np.arange(4), np.zeros(4), np.arange(4), np.ones(4, bool))
    w.abort()
    assert set(LOGICAL_DTYPES) == {"float32", "float16", "bfloat16"}


def test_open_store_rejects_inconsistent(tmp_path):
    path = tmp_path / "L3.zarr"
    _write(path, [101], torch.float32)
    mpath = manifest_path(path)
    good = json.loads(mpath.read_text())

    bad = json.loads(json.dumps(good))
    bad["n_rows"] = 100
    mpath.write_text(json.dumps(bad))
    with pytest.raises(StoreError, match="disagree|shape"):
        open_store(path)

    bad = json.loads(json.dumps(good))
    bad["sites"]["attn_out"]["width"] = 13
    mpath.write_text(json.dumps(bad))
    with pytest.raises(StoreError, match="shape"):
        open_store(path)

    mpath.write_text(json.dumps(good))
    with pytest.raises(StoreError, match="stale"):
        open_store(path, expect_hash="other")

    # A lost shard file would otherwise read as fill values.
    shard = sorted(p for p in (path / "attn_out" / "c").rglob("*") if p.is_file())[1]
    shard.unlink()
    with pytest.raises(StoreError, match="shards"):
        open_store(path)

    import shutil

    shutil.rmtree(path)
    with pytest.raises(StoreError, match="store missing"):
        open_store(path)
    mpath.unlink()
    with pytest.raises(StoreError, match="no manifest"):
        open_store(path)


def test_configure_io():
    import dask
    import zarr

    old_dask = {k: dask.config.get(k, None) for k in ("scheduler", "num_workers")}
    old_zarr = {k: zarr.config.get(k) for k in ("async.concurrency", "threading.max_workers")}
    try:
        configure_io(2)
        assert dask.config.get("num_workers") == 2 and dask.config.get("scheduler") == "threads"
        assert zarr.config.get("threading.max_workers") == 2
    finally:
        dask.config.set(old_dask)
        zarr.config.set(old_zarr)
