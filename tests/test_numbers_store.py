"""The store's digest check reaches the last chunk of every read: a last shard copied from another
store (checksums intact, data wrong) and a last chunk rewritten through zarr (a valid checksum over
other bytes) are refused by every reader (rows, dask, take), whatever the read's extent."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from attnspace.store import StoreError, StoreWriter, open_store

N, WIDTH, CHUNK = 60, 3, 16  # 4 chunks: rows 0-15, 16-31, 32-47 and the short last one, 48-59


def write(path, seed: int, shard_rows: int):
    x = np.random.default_rng(seed).standard_normal((N, WIDTH)).astype(np.float32)
    with StoreWriter(path, model="m", dataset="d", layer=0, split="train", n_rows=N, sites={"attn_out": WIDTH},
                     logical_dtype="float32", chunk_rows=CHUNK, shard_rows=shard_rows) as w:
        w.append({"attn_out": torch.from_numpy(x)}, np.zeros(N), np.zeros(N), np.arange(N), np.ones(N, dtype=bool))
    return x


READS = {
    "rows, whole array": lambda s: s.rows("attn_out", 0, N),
    "rows, the last two chunks": lambda s: s.rows("attn_out", 20, N),
    "rows, inside the last chunk": lambda s: s.rows("attn_out", 50, 55),
    "dask": lambda s: s.dask("attn_out").compute(),
    "dask, one chunk per block": lambda s: s.dask("attn_out", block_rows=CHUNK).compute(),
    "take, rows of the last chunk": lambda s: s.take("attn_out", np.array([3, 49, 59])),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two stores of the same layout and different data, one chunk per shard."""
    root = tmp_path_factory.mktemp("digests")
    write(root / "a.zarr", 0, shard_rows=CHUNK)
    write(root / "b.zarr", 1, shard_rows=CHUNK)
    return root


@pytest.mark.parametrize("read", READS)
def test_last_shard_copied_from_another_store_is_refused(pair, tmp_path, read):
    shutil.copytree(pair / "a.zarr", tmp_path / "a.zarr")
    shutil.copy(pair / "a.manifest.json", tmp_path / "a.manifest.json")
    open_store(tmp_path / "a.zarr").rows("attn_out", 0, N)  # intact: reads
    shutil.copy(pair / "b.zarr/attn_out/c/3/0", tmp_path / "a.zarr/attn_out/c/3/0")
    store = open_store(tmp_path / "a.zarr")
    with pytest.raises(StoreError, match="chunk 3 .rows 48-59. does not match its digest"):
        READS[read](store)


@pytest.mark.parametrize("read", READS)
def test_last_chunk_rewritten_with_a_valid_checksum_is_refused(tmp_path, read):
    x = write(tmp_path / "a.zarr", 0, shard_rows=2 * CHUNK)  # two chunks per shard: only the last one changes
    array = zarr.open_array(str(tmp_path / "a.zarr/attn_out"), mode="r+")
    array[48:60] = -x[48:60]
    store = open_store(tmp_path / "a.zarr")
    np.testing.assert_array_equal(store.rows("attn_out", 0, 48), x[:48])  # the other chunks still read
    with pytest.raises(StoreError, match="chunk 3 .rows 48-59. does not match its digest"):
        READS[read](store)
