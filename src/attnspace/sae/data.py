"""Training data for SAEs: from the Zarr cache through a shuffle buffer, or from a live model.

Shuffle buffer (Appendix E.1): a buffer of ``capacity`` rows; whenever fewer than
half remain, it is topped up with the next rows of the source and the *whole* buffer
is reshuffled, then batches are taken from its front. Rows are kept non-BOS/EOS rows
of one site, read in store order and cycled (epochs) when the store is exhausted.

Resumption: the buffer remembers each row's store row id, so its state is small (the
ids left, the read cursor, the RNG state) and :meth:`StoreStream.load_state` restores
it exactly by re-reading those rows.

Dataset-wise normalisation: :func:`mean_norm` over a sample; the SAE stores it and
scales inputs by sqrt(d) / mean_norm.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from attnspace.store import Store, decode_bf16


def mean_norm(x: Tensor) -> float:
    """Mean L2 norm of the rows of x [N, d] (the dataset-wise normalisation statistic), in float64."""
    return float(x.double().norm(dim=1).mean())


def first_kept_rows(store: Store, site: str, n: int) -> Tensor:
    """float32 [min(n, n_kept), d]: the first n kept rows of ``site`` in store order."""
    keep = store.keep()
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise ValueError(f"{store.path}: no kept rows")
    stop = int(kept[min(n, kept.size) - 1]) + 1
    return torch.from_numpy(store.rows(site, 0, stop, kept_only=True))


def heldout_batches(store: Store, site: str, batch_size: int, max_tokens: int | None = None) -> Iterator[Tensor]:
    """Kept rows of ``site`` in store order, float32 [<= batch_size, d] at a time, up to ``max_tokens`` rows."""
    kept = np.flatnonzero(store.keep())
    if max_tokens is not None:
        kept = kept[:max_tokens]
    for s in range(0, kept.size, batch_size):
        ids = kept[s : s + batch_size]
        x = store.rows(site, int(ids[0]), int(ids[-1]) + 1, kept_only=False)
        yield torch.from_numpy(np.ascontiguousarray(x[ids - ids[0]]))


class ShuffleBuffer:
    """Rows [m, d] with ids [m]; refilled to capacity and reshuffled whenever half is used."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity = int(capacity)
        self.generator = generator
        self.data = torch.empty(0)  # [m, d]
        self.ids = torch.empty(0, dtype=torch.int64)  # [m]
        self.pos = 0

    @property
    def remaining(self) -> int:
        return self.ids.shape[0] - self.pos

    def needs_refill(self, batch_size: int) -> bool:
        return self.remaining < max(batch_size, self.capacity // 2)

    def refill(self, rows: Tensor, ids: Tensor) -> None:
        """Append rows [r, d] with ids [r] to what is left, then permute the whole buffer."""
        data = torch.cat([self.data[self.pos :], rows]) if self.remaining else rows
        all_ids = torch.cat([self.ids[self.pos :], ids])
        perm = torch.randperm(all_ids.shape[0], generator=self.generator)
        self.data, self.ids, self.pos = data[perm], all_ids[perm], 0

    def take(self, batch_size: int) -> Tensor:
        """The next batch_size rows [batch_size, d] (call :meth:`needs_refill` first)."""
        out = self.data[self.pos : self.pos + batch_size]
        self.pos += batch_size
        return out


class StoreStream:
    """Shuffled training batches (float32 [batch_size, d], raw scale, CPU) from one site of a store."""

    def __init__(self, store: Store, site: str, batch_size: int, buffer_rows: int, seed: int) -> None:
        if buffer_rows < 2 * batch_size:
            raise ValueError(f"buffer_rows ({buffer_rows}) must be at least 2 x batch_size ({batch_size})")
        self.store, self.site, self.batch_size = store, site, int(batch_size)
        self.kept = np.flatnonzero(store.keep())  # store row ids of kept rows, ascending
        if self.kept.size == 0:
            raise ValueError(f"{store.path}: no kept rows")
        self.cursor = 0  # position in self.kept of the next row to read
        self.epoch = 0  # completed passes over the store
        self.generator = torch.Generator().manual_seed(int(seed))
        self.buffer = ShuffleBuffer(buffer_rows, self.generator)

    @property
    def d(self) -> int:
        return self.store.width(self.site)

    def _read(self, n: int) -> tuple[Tensor, Tensor]:
        """The next n kept rows in store order, cycling: (rows [n, d], store row ids [n])."""
        parts, ids = [], []
        while n > 0:
            take = min(n, self.kept.size - self.cursor)
            sel = self.kept[self.cursor : self.cursor + take]
            a, b = int(sel[0]), int(sel[-1]) + 1
            parts.append(self.store.rows(self.site, a, b, kept_only=False)[sel - a])
            ids.append(sel)
            self.cursor += take
            n -= take
            if self.cursor == self.kept.size:
                self.cursor, self.epoch = 0, self.epoch + 1
        return torch.from_numpy(np.concatenate(parts)), torch.from_numpy(np.concatenate(ids).astype(np.int64))

    def next_batch(self) -> Tensor:
        if self.buffer.needs_refill(self.batch_size):
            self.buffer.refill(*self._read(self.buffer.capacity - self.buffer.remaining))
        return self.buffer.take(self.batch_size)

    def sample(self, n: int) -> Tensor:
        """The first n kept rows (for the normalisation statistic and a sample SVD); does not move the stream."""
        return first_kept_rows(self.store, self.site, n)

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything needed to continue the exact same sequence of batches."""
        return {
            "data.ids": self.buffer.ids[self.buffer.pos :].clone(),
            "data.cursor": torch.tensor([self.cursor, self.epoch], dtype=torch.int64),
            "data.rng": self.generator.get_state(),
        }

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        ids = tensors["data.ids"].to(torch.int64)
        self.cursor, self.epoch = (int(v) for v in tensors["data.cursor"])
        self.generator.set_state(tensors["data.rng"])
        self.buffer.data, self.buffer.ids, self.buffer.pos = self._gather(ids.numpy()), ids, 0

    def _gather(self, ids: np.ndarray) -> Tensor:
        """Rows [len(ids), d] at store row ids (any order), decoded exactly as :meth:`Store.rows` does."""
        if ids.size == 0:
            return torch.empty(0, self.d)
        uniq, inverse = np.unique(ids, return_inverse=True)
        raw = self.store.take(self.site, uniq)
        rows = decode_bf16(raw) if self.store.logical_dtype == "bfloat16" else np.asarray(raw, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(rows[inverse]))


class PrefetchIterator:
    """Iterate over ``producer()`` results, computed ahead by one background thread.

    producer: a callable returning the next item (e.g. a batch of activations captured
    from a live model with :func:`attnspace.sites.capture`), or None when exhausted.
    Up to ``depth`` items are kept ready. An exception in the producer is raised in
    the consumer at the point where its item would have been. Call :meth:`close` (or
    use it as a context manager) to stop the thread early.
    """

    _DONE = object()

    def __init__(self, producer: Callable[[], object], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(producer,), daemon=True, name="sae-prefetch")
        self._thread.start()

    def _run(self, producer) -> None:
        try:
            while not self._stop.is_set():
                item = producer()
                if item is None:
                    break
                self._put(item)
        except Exception as e:  # handed to the consumer
            self._put(e)
        self._put(self._DONE)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            self._queue.put(self._DONE)  # later calls stop too
            raise StopIteration
        if isinstance(item, Exception):
            self.close()
            raise item
        return item

    def close(self, wait: float | None = 5) -> None:
        """Stop the thread: it ends after the item it is computing; wait up to ``wait`` seconds
        (None: until it has ended, so that nothing else runs the producer's model after this)."""
        self._stop.set()
        self._thread.join(timeout=wait)

    def __enter__(self) -> PrefetchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LiveStream:
    """Shuffled training batches from a live producer of activation chunks, prefetched in the background.

    producer: callable returning float [rows, d] (any number of rows; e.g. the kept
    rows of one captured forward pass) or None when exhausted. Same shuffle buffer as
    :class:`StoreStream`; its ids are running row counts.

    Resumption needs ``restart``: ``restart(c)`` returns a producer that starts with the
    producer's (c+1)-th chunk (:func:`attnspace.sae.live.live_stream` skips the documents of
    the first c chunks). The state then holds the buffer's rows themselves (they cannot be
    re-read), the rows produced but not yet buffered, the count of chunks taken, and the
    RNG; :meth:`load_state` restarts the producer after those chunks, so a resumed run sees
    the batches an uninterrupted one would (given a deterministic producer). Without
    ``restart`` a killed live run starts over.

    Hooked to a model, for example::

        def producer():
            ids = next(token_batches, None)            # [batch, seq] input ids, or None at the end
            if ids is None:
                return None
            acts = capture(model, ids, [layer], [site])[(layer, site)]   # attnspace.sites.capture
            return acts[keep_mask(ids)]                # drop BOS/EOS rows -> [rows, d]

        stream = LiveStream(producer, d, batch_size=4096, buffer_rows=262144, seed=0)
        train_sae(config, stream, heldout_store, out_dir)
    """

    def __init__(self, producer: Callable[[], Tensor | None], d: int, batch_size: int, buffer_rows: int,
                 seed: int, depth: int = 2, restart: Callable[[int], Callable[[], Tensor | None]] | None = None) -> None:
        if buffer_rows < 2 * batch_size:
            raise ValueError(f"buffer_rows ({buffer_rows}) must be at least 2 x batch_size ({batch_size})")
        self.d, self.batch_size = int(d), int(batch_size)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.buffer = ShuffleBuffer(buffer_rows, self.generator)
        self.prefetch = PrefetchIterator(producer, depth)
        self._depth, self._restart = depth, restart
        self._pending: list[Tensor] = []  # produced rows not yet in the buffer
        self._n_pending = 0
        self._next_id = 0
        self._chunks = 0  # chunks taken from the producer
        self._exhausted = False

    @property
    def resumable(self) -> bool:
        """Whether :meth:`state_tensors` can be restored (the producer can restart after a chunk)."""
        return self._restart is not None

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything needed to continue the exact same sequence of batches (with ``restart``)."""
        pending = torch.cat(self._pending) if self._pending else torch.empty(0, self.d)
        return {
            "data.rows": self.buffer.data[self.buffer.pos :].clone(),
            "data.ids": self.buffer.ids[self.buffer.pos :].clone(),
            "data.pending": pending.clone(),
            "data.cursor": torch.tensor([self._chunks, self._next_id, int(self._exhausted)], dtype=torch.int64),
            "data.rng": self.generator.get_state(),
        }

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        if self._restart is None:
            raise ValueError("this live stream cannot resume: it was made without restart")
        chunks, next_id, exhausted = (int(v) for v in tensors["data.cursor"])
        self.prefetch.close(wait=None)  # its thread must end before another runs the same model
        self.prefetch = PrefetchIterator(self._restart(chunks), self._depth)
        self._chunks, self._next_id, self._exhausted = chunks, next_id, bool(exhausted)
        pending = tensors["data.pending"].to(torch.float32)
        self._pending, self._n_pending = ([pending] if pending.shape[0] else []), pending.shape[0]
        self.generator.set_state(tensors["data.rng"])
        rows = tensors["data.rows"].to(torch.float32)
        self.buffer.data, self.buffer.ids, self.buffer.pos = rows, tensors["data.ids"].to(torch.int64), 0

    def _read(self, n: int) -> tuple[Tensor, Tensor]:
        while self._n_pending < n and not self._exhausted:
            try:
                chunk = next(self.prefetch).detach().to("cpu", torch.float32)
            except StopIteration:
                self._exhausted = True
                break
            self._pending.append(chunk.reshape(-1, self.d))
            self._n_pending += self._pending[-1].shape[0]
            self._chunks += 1
        if self._n_pending == 0:
            return torch.empty(0, self.d), torch.empty(0, dtype=torch.int64)
        rows = torch.cat(self._pending)
        out, rest = rows[:n], rows[n:]
        self._pending, self._n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
        ids = torch.arange(self._next_id, self._next_id + out.shape[0])
        self._next_id += out.shape[0]
        return out, ids

    def next_batch(self) -> Tensor:
        if self.buffer.needs_refill(self.batch_size):
            self.buffer.refill(*self._read(self.buffer.capacity - self.buffer.remaining))
        if self.buffer.remaining < self.batch_size:
            raise StopIteration("the live producer is exhausted")
        return self.buffer.take(self.batch_size)

    def sample(self, n: int) -> Tensor:
        """n rows from the producer, kept for training as well (they are read into the stream first)."""
        rows, _ = self._read(n)
        self._pending.insert(0, rows)  # put them back, in order, ahead of the rest
        self._n_pending += rows.shape[0]
        self._next_id -= rows.shape[0]
        return rows

    def close(self) -> None:
        """Stop prefetching and wait until the producer's last forward has ended: the model is free for
        other use (an LM evaluation hooks the same model)."""
        self.prefetch.close(wait=None)
