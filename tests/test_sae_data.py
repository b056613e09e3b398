"""SAE data: the shuffle buffer over a store (coverage, reshuffling, BOS exclusion, exact resume),
live prefetch with a synthetic producer, the normalisation statistic."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from attnspace.sae.data import LiveStream, PrefetchIterator, StoreStream, heldout_batches, mean_norm
from attnspace.store import StoreWriter, open_store

BOS_VALUE = 1e6


def write_store(path, x: np.ndarray, bos_every: int = 0, site: str = "attn_out", logical_dtype: str = "float32",
                chunk_rows: int = 64, shard_rows: int = 128):
    """A published store with x [n, d] as ``site``; with bos_every > 0 a BOS row (value 1e6, keep False)
    precedes every ``bos_every`` rows. Returns the open Store."""
    rows, keep = [], []
    for i in range(0, len(x), bos_every or len(x)):
        if bos_every:
            rows.append(np.full((1, x.shape[1]), BOS_VALUE, dtype=np.float32))
            keep.append(False)
        part = x[i : i + (bos_every or len(x))]
        rows.append(part.astype(np.float32))
        keep += [True] * len(part)
    data = np.concatenate(rows)
    n = len(data)
    with StoreWriter(path, model="synthetic", dataset="planted", layer=0, split="train", n_rows=n,
                     sites={site: x.shape[1]}, logical_dtype=logical_dtype, chunk_rows=chunk_rows,
                     shard_rows=shard_rows) as w:
        t = torch.from_numpy(data)
        w.append({site: t.to(getattr(torch, logical_dtype))}, np.zeros(n), np.zeros(n), np.arange(n), np.array(keep))
    return open_store(path)


def id_rows(n: int, d: int = 4) -> np.ndarray:
    """Rows whose first column is their index among kept rows (so batches reveal which rows they hold)."""
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    x[:, 0] = np.arange(n)
    return x


def test_each_epoch_serves_every_kept_row_once_and_never_bos(tmp_path):
    n = 600
    store = write_store(tmp_path / "s.zarr", id_rows(n), bos_every=37)
    stream = StoreStream(store, "attn_out", batch_size=20, buffer_rows=100, seed=0)
    seen = torch.cat([stream.next_batch() for _ in range(3 * n // 20)])[:, 0]
    assert (seen < BOS_VALUE).all()
    counts = torch.bincount(seen.long(), minlength=n)
    # Three epochs' worth of rows: each row about 3 times (the buffer straddles epoch boundaries).
    assert counts.min() >= 2 and counts.max() <= 4 and counts.sum() == 3 * n
    assert not torch.equal(seen[:n].sort().values, seen[:n]), "rows should come out shuffled"


def test_buffer_is_reshuffled_on_every_refill(tmp_path):
    store = write_store(tmp_path / "s.zarr", id_rows(400))
    stream = StoreStream(store, "attn_out", batch_size=10, buffer_rows=40, seed=0)
    served = torch.cat([stream.next_batch()[:, 0] for _ in range(3)]).long()  # 10 of the first 40 rows left
    leftover = sorted(set(range(40)) - set(served.tolist()))
    assert len(leftover) == 10
    stream.next_batch()  # below half: top up with rows 40..69, reshuffle all 40
    ids = stream.buffer.ids
    assert sorted(ids.tolist()) == sorted(leftover + list(range(40, 70)))
    old = torch.isin(ids, torch.tensor(leftover))
    assert old.nonzero().max() >= 10, "the leftover rows must be mixed in, not kept at the front"
    assert ((ids[1:] - ids[:-1]) != 1).any()


def test_stream_state_resumes_the_exact_sequence(tmp_path):
    store = write_store(tmp_path / "s.zarr", id_rows(333), bos_every=50)
    a = StoreStream(store, "attn_out", batch_size=16, buffer_rows=48, seed=7)
    for _ in range(13):
        a.next_batch()
    state = {k: v.clone() for k, v in a.state_tensors().items()}
    rest_a = torch.cat([a.next_batch() for _ in range(40)])
    b = StoreStream(store, "attn_out", batch_size=16, buffer_rows=48, seed=123)  # seed comes from the state
    b.load_state(state)
    rest_b = torch.cat([b.next_batch() for _ in range(40)])
    assert torch.equal(rest_a, rest_b)


def test_bfloat16_store_is_decoded_the_same_way_by_both_read_paths(tmp_path):
    x = id_rows(200)
    store = write_store(tmp_path / "s.zarr", x, logical_dtype="bfloat16")
    a = StoreStream(store, "attn_out", batch_size=8, buffer_rows=32, seed=0)
    for _ in range(5):
        a.next_batch()
    state = a.state_tensors()
    b = StoreStream(store, "attn_out", batch_size=8, buffer_rows=32, seed=0)
    b.load_state(state)
    assert torch.equal(a.buffer.data[a.buffer.pos :], b.buffer.data)
    assert torch.equal(b.buffer.data, torch.from_numpy(x).bfloat16().float()[b.buffer.ids])


def test_heldout_batches_are_the_kept_rows_in_order(tmp_path):
    x = id_rows(150)
    store = write_store(tmp_path / "s.zarr", x, bos_every=40)
    got = torch.cat(list(heldout_batches(store, "attn_out", 32)))
    assert torch.equal(got, torch.from_numpy(x))
    assert torch.cat(list(heldout_batches(store, "attn_out", 32, max_tokens=70))).shape[0] == 70


def test_mean_norm():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert mean_norm(x) == pytest.approx(3.0)


def test_prefetch_runs_ahead_in_order_and_reraises():
    calls, lock = [], threading.Lock()

    def producer():
        with lock:
            i = len(calls)
            calls.append(i)
        return None if i == 5 else torch.full((3, 2), float(i))

    with PrefetchIterator(producer, depth=2) as it:
        time.sleep(0.2)
        assert len(calls) >= 2, "the producer should have run ahead of the consumer"
        got = [int(t[0, 0]) for t in it]
    assert got == [0, 1, 2, 3, 4]

    def failing():
        raise RuntimeError("capture failed")

    with pytest.raises(RuntimeError, match="capture failed"):
        next(iter(PrefetchIterator(failing)))


def test_live_stream_rebatches_chunks_through_the_buffer():
    chunks = iter([torch.arange(i * 7, (i + 1) * 7, dtype=torch.float32)[:, None].repeat(1, 3) for i in range(20)])
    stream = LiveStream(lambda: next(chunks, None), d=3, batch_size=10, buffer_rows=30, seed=0)
    sample = stream.sample(12)
    assert torch.equal(sample[:, 0], torch.arange(12.0))  # first rows, and still served for training
    seen = torch.cat([stream.next_batch() for _ in range(14)])[:, 0]
    assert sorted(seen.long().tolist()) == list(range(140))
    with pytest.raises(StopIteration):
        for _ in range(10):
            stream.next_batch()
    stream.close()
