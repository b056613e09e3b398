"""Activation cache: one Zarr v3 group per (model, dataset, layer, split).

Layout of ``<name>.zarr`` (rows = tokens, in corpus order):

* one 2-D array per site, ``[n_rows, width]``, chunked by rows only
  (chunks ``(chunk_rows, width)`` inside shards ``(shard_rows, width)``), each inner
  chunk and each shard index carrying a ``crc32c`` checksum;
* 1-D arrays ``token_id``, ``doc``, ``pos`` (int32) and ``keep`` (bool; False for
  BOS/EOS rows, which every statistic excludes).

Storage is lossless in the model's dtype: float32 and float16 as is; bfloat16
(which zarr lacks) as its uint16 bit pattern, decoded to float32 exactly on read.
Site arrays carry ``model, dataset, layer, site, logical_dtype, n_tokens, split``;
the group carries ``model, dataset, layer, split, n_tokens, n_kept, config_hash``.

Writing is atomic: rows go to ``<name>.zarr.tmp-<host>-<pid>`` in whole shards (one
writer per array: zarr-python 3 loses data on concurrent partial-shard writes), the
directory is renamed into place, and ``<name>.manifest.json`` is written last. The
manifest is the checkable output: a store without one (a killed job) is never
accepted by :func:`open_store`. A writer removes another's temporary folder only when
that writer is gone (same host, process no longer running).

Integrity: the manifest records a digest of every chunk of every array (SHA-256 of
the stored bytes of its rows, taken from memory as each shard is written). Readers
check each chunk the first time they read it, so a damaged chunk, or a shard copied
over from another store or array, is refused with one line naming the store, the
array and the command that rebuilds it. (The crc32c codec inside each chunk catches
flipped bytes too, but not a swapped shard, whose checksums are intact.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from attnspace.errors import AttnspaceError
from attnspace.files import write_json

LOGICAL_DTYPES = ("float32", "float16", "bfloat16")
"""Activation dtypes a store holds losslessly."""

META_ARRAYS = ("token_id", "doc", "pos", "keep")
"""Per-row arrays stored beside the sites."""

FORMAT = "attnspace-activations/2"
"""Manifest format tag; bump when the layout changes."""

_STORED_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
_META_DTYPE = {"token_id": "int32", "doc": "int32", "pos": "int32", "keep": "bool"}
# NaN fill values: a region that was never written reads as NaN, not as zeros.
_FILL = {"float32": float("nan"), "float16": float("nan"), "bfloat16": 0x7FC0}
_META_FILL = {"token_id": -1, "doc": -1, "pos": -1, "keep": False}
_BLOCK_BYTES = 32 * 2**20  # default Dask block: about 32 MiB once widened to float64 (at least one chunk)


class StoreError(AttnspaceError, RuntimeError):
    """An activation store is missing, incomplete, stale or inconsistent."""


def chunk_digest(raw: np.ndarray) -> str:
    """Digest of one chunk's stored values (rows x width, stored dtype): 16 hex digits of SHA-256."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(raw)).cast("B")).hexdigest()[:16]


def rebuild_fix(store_path: Path) -> str:
    """The command that rebuilds the cache a store belongs to."""
    return f"rm {manifest_path(store_path)} && snakemake --cores all (the cache rule rebuilds the store)"


def _tmp_name(path: Path) -> Path:
    """``<name>.tmp-<host>-<pid>``: the writer that owns a temporary store."""
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _writer_gone(tmp: Path, prefix: str) -> bool:
    """Whether the writer named in ``tmp``'s suffix (host-pid) is no longer running on this host."""
    host, _, pid = tmp.name[len(prefix):].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's writer (shared filesystem), or not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed writer whose parent is gone too may linger as a zombie nobody reaps
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def drop_incomplete_cache(record: Path | str) -> list[str]:
    """Remove a cache record (cache.json) whose stores are not all published; return what is missing.

    A store whose manifest or folder is gone (deleted, damaged) leaves its cache record
    claiming a complete cache; without the record, the next plain ``snakemake`` run
    rebuilds the cache instead of reporting nothing to do. Called when the workflow loads.
    """
    record = Path(record)
    if not record.is_file():
        return []
    try:
        stores = json.loads(record.read_text())["stores"]
        paths = [record.parent / ("" if m["split"] == "train" else m["split"]) / m["store"] for m in stores]
    except (OSError, ValueError, KeyError, TypeError):
        paths = None
    missing = ["unreadable record"] if paths is None else [
        str(p) for p in paths if not (p.is_dir() and manifest_path(p).is_file())]
    if missing:
        record.unlink()
    return missing


def manifest_path(store_path: Path) -> Path:
    """``…/L15.zarr`` -> ``…/L15.manifest.json`` (beside the store)."""
    store_path = Path(store_path)
    if store_path.suffix != ".zarr":
        raise ValueError(f"store path must end in .zarr: {store_path}")
    return store_path.with_name(store_path.name[: -len(".zarr")] + ".manifest.json")


def configure_io(threads: int) -> None:
    """Cap zarr's async concurrency and Dask's threaded scheduler at ``threads``.

    Call once per process (e.g. at the start of a Snakemake job with the rule's
    ``threads``) so that zarr, Dask and the BLAS below them do not oversubscribe.
    """
    import dask

    threads = max(1, int(threads))
    zarr.config.set({"async.concurrency": max(2, 2 * threads), "threading.max_workers": threads})
    dask.config.set(scheduler="threads", num_workers=threads)


def decode_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16, any shape) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _decode(raw: np.ndarray, logical_dtype: str) -> np.ndarray:
    """Stored site values -> float32 (same shape)."""
    if logical_dtype == "bfloat16":
        return decode_bf16(raw)
    return np.asarray(raw, dtype=np.float32)


def _encode(x: torch.Tensor | np.ndarray, logical_dtype: str, site: str) -> np.ndarray:
    """Activations [rows, width] -> the stored numpy representation, losslessly.

    Accepts tensors of the logical dtype (or, for float32 stores, any float tensor,
    which widens exactly) and numpy arrays already in the stored dtype. Anything that
    would round is refused rather than silently truncated.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if logical_dtype == "float32" and t.is_floating_point() and t.dtype.itemsize <= 4:
            t = t.to(torch.float32)
        if t.dtype != getattr(torch, logical_dtype):
            raise TypeError(f"site {site!r}: got a {t.dtype} tensor for a {logical_dtype} store")
        if logical_dtype == "bfloat16":
            return t.contiguous().view(torch.int16).numpy().view(np.uint16)
        return t.contiguous().numpy()
    a = np.asarray(x)
    stored = _STORED_DTYPE[logical_dtype]
    if logical_dtype == "float32" and a.dtype == np.float16:
        a = a.astype(np.float32)
    if a.dtype != np.dtype(stored):
        raise TypeError(
            f"site {site!r}: got a numpy {a.dtype} array for a {logical_dtype} store "
            f"(expected {stored}{' bit patterns' if logical_dtype == 'bfloat16' else ''})"
        )
    return a


def _meta_array(x: Any, name: str) -> np.ndarray:
    """One per-row array (tensor or array-like) -> numpy [rows] of its stored dtype."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x).reshape(-1)
    dtype = np.dtype(_META_DTYPE[name])
    if dtype == np.int32 and a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} does not fit int32")
    return a.astype(dtype, copy=False)


def _remove(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clamp_layout(n_rows: int, chunk_rows: int, shard_rows: int) -> tuple[int, int]:
    """Clamp (chunk_rows, shard_rows) for a store of ``n_rows`` rows.

    Chunks never exceed the row count; shards are a multiple of chunks and never
    exceed the row count rounded up to whole chunks.
    """
    if n_rows < 1 or chunk_rows < 1 or shard_rows < 1:
        raise ValueError(f"n_rows, chunk_rows, shard_rows must be >= 1, got {n_rows}, {chunk_rows}, {shard_rows}")
    if shard_rows % chunk_rows:
        raise ValueError(f"shard_rows ({shard_rows}) must be a multiple of chunk_rows ({chunk_rows})")
    chunk = min(chunk_rows, n_rows)
    shard = min(shard_rows, -(-n_rows // chunk) * chunk)
    shard -= shard % chunk
    return chunk, shard


class StoreWriter:
    """Write one activation store, whole shards at a time, then publish it atomically.

    Usage::

        with StoreWriter(path, model=..., dataset=..., layer=15, split="train",
                         n_rows=N, sites={"attn_out": 576}, logical_dtype="float32") as w:
            for batch in batches:
                w.append(acts, token_id, doc, pos, keep)
        # leaving the block calls close(); an exception removes the temporary store

    Memory: two shards of rows per site are buffered (``2 * shard_rows * width`` values).
    """

    def __init__(
        self,
        path: Path,
        *,
        model: str,
        dataset: str,
        layer: int,
        split: str,
        n_rows: int,
        sites: dict[str, int],
        logical_dtype: str,
        chunk_rows: int = 2048,
        shard_rows: int = 65536,
        config_hash: str = "",
    ) -> None:
        if logical_dtype not in LOGICAL_DTYPES:
            raise ValueError(f"logical_dtype must be one of {LOGICAL_DTYPES}, got {logical_dtype!r}")
        if not sites:
            raise ValueError("a store needs at least one site")
        clash = set(sites) & set(META_ARRAYS)
        if clash:
            raise ValueError(f"site names clash with per-row arrays: {sorted(clash)}")
        self.path = Path(path)
        self.manifest_file = manifest_path(self.path)
        self.n_rows = int(n_rows)
        self.chunk_rows, self.shard_rows = clamp_layout(self.n_rows, int(chunk_rows), int(shard_rows))
        self.sites = {str(s): int(w) for s, w in sites.items()}
        self.logical_dtype = logical_dtype
        self.info = dict(model=model, dataset=dataset, layer=int(layer), split=split)
        self.config_hash = config_hash
        self.tmp = _tmp_name(self.path)

        # Unpublish first: from here on no stale store can pass for this one.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove(self.manifest_file)
        _remove(self.path)
        prefix = f"{self.path.name}.tmp-"
        for stale in self.path.parent.glob(f"{prefix}*"):
            if _writer_gone(stale, prefix):
                _remove(stale)

        group = zarr.open_group(
            str(self.tmp),
            mode="w",
            zarr_format=3,
            attributes=dict(self.info, n_tokens=self.n_rows, config_hash=config_hash),
        )
        stored = _STORED_DTYPE[logical_dtype]
        self._arrays: dict[str, zarr.Array] = {}
        self._buffers: dict[str, np.ndarray] = {}  # name -> [shard_rows(, width)]
        for site, width in self.sites.items():
            self._arrays[site] = self._create(
                group, site, (self.n_rows, width), stored, _FILL[logical_dtype],
                dict(self.info, site=site, logical_dtype=logical_dtype, n_tokens=self.n_rows),
            )
            self._buffers[site] = np.empty((self.shard_rows, width), dtype=stored)
        for name in META_ARRAYS:
            self._arrays[name] = self._create(
                group, name, (self.n_rows,), _META_DTYPE[name], _META_FILL[name], dict(self.info, n_tokens=self.n_rows)
            )
            self._buffers[name] = np.empty((self.shard_rows,), dtype=_META_DTYPE[name])
        # Double buffering: a full shard is written by this writer's one background
        # thread (still one writer per array) while the next shard fills.
        self._spare = {name: np.empty_like(b) for name, b in self._buffers.items()}
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"zarr-{self.path.name}")
        self._pending: Future | None = None
        self._group = group
        self._filled = 0  # rows in the buffers
        self._written = 0  # rows flushed to the store (always a multiple of shard_rows until close)
        self._n_kept = 0
        self._digests: dict[str, list[str]] = {name: [] for name in self._arrays}
        self._state = "open"

    def _create(self, group, name, shape, dtype, fill, attributes) -> zarr.Array:
        """One row-chunked, sharded, checksummed array in ``group``."""
        return group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=(self.chunk_rows,) + shape[1:],
            shards=(self.shard_rows,) + shape[1:],
            compressors=[Crc32cCodec()],
            fill_value=fill,
            attributes=attributes,
            # Write every chunk, even all-fill ones, so a missing shard file is detectable.
            config={"write_empty_chunks": True},
        )

    def append(
        self,
        acts: dict[str, torch.Tensor | np.ndarray],
        token_id: Any,
        doc: Any,
        pos: Any,
        keep: Any,
    ) -> None:
        """Add a batch of rows.

        acts[site]: [rows, width] for every site; token_id, doc, pos: int [rows];
        keep: bool [rows] (False for BOS/EOS). Rows are buffered; whole shards are
        written as they fill.
        """
        if self._state != "open":
            raise StoreError(f"{self.tmp}: append after the writer was {self._state}")
        if set(acts) != set(self.sites):
            raise ValueError(f"acts has sites {sorted(acts)}, store expects {sorted(self.sites)}")
        batch = {name: _meta_array(v, name) for name, v in zip(META_ARRAYS, (token_id, doc, pos, keep))}
        for site, x in acts.items():
            batch[site] = _encode(x, self.logical_dtype, site)
        rows = batch["keep"].shape[0]
        for name, a in batch.items():
            want = (rows, self.sites[name]) if name in self.sites else (rows,)
            if a.shape != want:
                raise ValueError(f"{name}: shape {a.shape}, expected {want}")
        if self._written + self._filled + rows > self.n_rows:
            raise StoreError(
                f"{self.tmp}: appending {rows} rows would exceed n_rows={self.n_rows} "
                f"({self._written + self._filled} already written)"
            )
        self._n_kept += int(batch["keep"].sum())
        start = 0
        while start < rows:
            take = min(rows - start, self.shard_rows - self._filled)
            for name, a in batch.items():
                self._buffers[name][self._filled : self._filled + take] = a[start : start + take]
            self._filled += take
            start += take
            if self._filled == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        """Hand the buffered rows to the background thread as one whole shard (the last may be short)."""
        self._wait()
        start, stop = self._written, self._written + self._filled
        full, self._buffers, self._spare = self._buffers, self._spare, self._buffers
        self._pending = self._io.submit(self._write, full, start, stop)
        self._written = stop
        self._filled = 0

    def _write(self, buffers: dict[str, np.ndarray], start: int, stop: int) -> None:
        for name, arr in self._arrays.items():
            rows = buffers[name][: stop - start]
            arr[start:stop] = rows
            # start is a whole number of shards, so of chunks: digest each chunk from memory
            self._digests[name] += [chunk_digest(rows[i : i + self.chunk_rows])
                                    for i in range(0, stop - start, self.chunk_rows)]

    def _wait(self) -> None:
        """Block until the shard in flight is written; re-raise its error here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> dict:
        """Flush, check the row count, publish the store, write the manifest; return it."""
        if self._state != "open":
            raise StoreError(f"{self.path}: close() on a writer that is already {self._state}")
        try:
            if self._filled:
                self._flush()
            self._wait()
            self._io.shutdown()
            if self._written != self.n_rows:
                raise StoreError(
                    f"{self.tmp}: {self._written} rows written, n_rows={self.n_rows}; "
                    "the token plan and the cache disagree, rerun the cache rule"
                )
            self._group.attrs.update({"n_kept": self._n_kept})
            manifest = dict(
                format=FORMAT,
                **self.info,
                n_rows=self.n_rows,
                n_kept=self._n_kept,
                sites={
                    s: {"width": w, "dtype": _STORED_DTYPE[self.logical_dtype], "logical_dtype": self.logical_dtype}
                    for s, w in self.sites.items()
                },
                chunk_rows=self.chunk_rows,
                shard_rows=self.shard_rows,
                config_hash=self.config_hash,
                digest="sha256/16 of each chunk's stored bytes",
                chunk_digests=self._digests,
                store=self.path.name,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                zarr_version=zarr.__version__,
            )
            _remove(self.path)
            os.replace(self.tmp, self.path)
            write_json(manifest, self.manifest_file)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return manifest

    def abort(self) -> None:
        """Drop everything written so far; nothing that :func:`open_store` accepts remains."""
        self._pending = None
        self._io.shutdown(wait=True, cancel_futures=True)
        _remove(self.manifest_file)
        _remove(self.tmp)
        self._buffers = self._spare = {}
        self._state = "aborted"

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._state == "open":
                self.abort()
            return
        if self._state == "open":
            self.close()


@dataclass
class Store:
    """Read side of a published activation store (see :func:`open_store`)."""

    path: Path
    """The ``.zarr`` directory."""
    manifest: dict
    """The parsed manifest."""
    group: zarr.Group
    """The open zarr group (read-only)."""
    _verified: set = field(default_factory=set, repr=False)
    """(array, chunk) pairs already checked against the manifest's digests."""

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    @property
    def layer(self) -> int:
        return int(self.manifest["layer"])

    @property
    def split(self) -> str:
        return self.manifest["split"]

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def n_kept(self) -> int:
        return int(self.manifest["n_kept"])

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.manifest["sites"])

    @property
    def logical_dtype(self) -> str:
        return self.manifest["sites"][self.sites[0]]["logical_dtype"]

    @property
    def chunk_rows(self) -> int:
        return int(self.manifest["chunk_rows"])

    def width(self, site: str) -> int:
        """Columns of ``site``."""
        return int(self.manifest["sites"][self._site(site)]["width"])

    def _site(self, site: str) -> str:
        if site not in self.manifest["sites"]:
            raise KeyError(f"{self.path}: no site {site!r}; has {list(self.sites)}")
        return site

    def dask(self, site: str, block_rows: int | None = None):
        """Lazy float32 [n_rows, width] of ``site`` (all rows; use :meth:`keep` to mask).

        Blocks are ``block_rows`` rows, a multiple of the stored chunk rows; by default
        about 32 MiB once widened to float64 (at least one chunk). bfloat16 is decoded exactly.
        """
        import dask.array as da

        width = self.width(site)
        if block_rows is None:
            per_chunk = self.chunk_rows * width * 8
            block_rows = self.chunk_rows * max(1, _BLOCK_BYTES // per_chunk)
        if block_rows % self.chunk_rows and block_rows < self.n_rows:
            raise ValueError(f"block_rows ({block_rows}) must be a multiple of chunk_rows ({self.chunk_rows})")
        block_rows = min(block_rows, self.n_rows)
        site = self._site(site)
        sizes = tuple(min(block_rows, self.n_rows - s) for s in range(0, self.n_rows, block_rows))
        dtype = np.dtype(self.manifest["sites"][site]["dtype"])

        def block(block_info=None):  # every block is read through _read, so every chunk is checked
            (start, stop), _ = block_info[None]["array-location"]
            return self._read(site, start, stop)

        raw = da.map_blocks(block, chunks=(sizes, (width,)), dtype=dtype, meta=np.empty((0, 0), dtype))
        if self.logical_dtype == "bfloat16":
            return raw.map_blocks(decode_bf16, dtype=np.float32)
        return raw.astype(np.float32)

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Stored values of rows ``start:stop`` of array ``name``, each chunk checked against its digest once."""
        cr = self.chunk_rows
        lo, hi = start // cr * cr, min(-(-stop // cr) * cr, self.n_rows)
        try:
            raw = np.asarray(self.group[name][lo:hi])
        except Exception as e:  # zarr reports a failed checksum or a broken shard in several types
            raise StoreError(f"{self.path}: array {name!r} rows {lo}-{hi - 1} cannot be read "
                             f"({type(e).__name__}: {e}); the store is damaged.", rebuild_fix(self.path)) from e
        self._check(name, lo, raw)
        return raw[start - lo : stop - lo]

    def _check(self, name: str, lo: int, raw: np.ndarray) -> None:
        """Compare each whole chunk of ``raw`` (rows from ``lo``, a chunk boundary) with the manifest."""
        cr, digests = self.chunk_rows, self.manifest["chunk_digests"][name]
        for offset in range(0, raw.shape[0], cr):
            i = (lo + offset) // cr
            if (name, i) in self._verified:
                continue
            if chunk_digest(raw[offset : offset + cr]) != digests[i]:
                raise StoreError(
                    f"{self.path}: array {name!r} chunk {i} (rows {i * cr}-{min((i + 1) * cr, self.n_rows) - 1}) does "
                    f"not match its digest in {manifest_path(self.path).name}: the chunk is damaged or was copied "
                    "from another store.", rebuild_fix(self.path))
            self._verified.add((name, i))

    def take(self, site: str, ids: np.ndarray) -> np.ndarray:
        """Stored values [len(ids), width] of rows ``ids`` (sorted, unique); chunks touched are checked first."""
        site = self._site(site)
        ids = np.asarray(ids, dtype=np.int64)
        cr = self.chunk_rows
        for i in np.unique(ids // cr):
            if (site, int(i)) not in self._verified:
                self._read(site, int(i) * cr, min((int(i) + 1) * cr, self.n_rows))
        try:
            return np.asarray(self.group[site].get_orthogonal_selection((ids, slice(None))))
        except Exception as e:
            raise StoreError(f"{self.path}: array {site!r} cannot be read ({type(e).__name__}: {e}); "
                             "the store is damaged.", rebuild_fix(self.path)) from e

    def keep(self) -> np.ndarray:
        """bool [n_rows]: False for BOS/EOS rows."""
        return self.meta("keep")

    def meta(self, name: str) -> np.ndarray:
        """One per-row array [n_rows]: 'token_id' | 'doc' | 'pos' (int32) or 'keep' (bool)."""
        if name not in META_ARRAYS:
            raise KeyError(f"meta name must be one of {META_ARRAYS}, got {name!r}")
        return self._read(name, 0, self.n_rows)

    def rows(self, site: str, start: int, stop: int, kept_only: bool = True) -> np.ndarray:
        """float32 [rows, width] of rows ``start:stop`` (only kept rows if ``kept_only``)."""
        x = _decode(self._read(self._site(site), start, stop), self.logical_dtype)
        if kept_only:
            x = x[self._read("keep", start, stop)]
        return x


def open_store(path: Path, expect_hash: str | None = None) -> Store:
    """Open a published store by its ``.zarr`` path or its manifest path.

    Verifies that the manifest and the store both exist and agree (shapes, dtypes,
    attributes, every shard present) and, if ``expect_hash`` is given, that the store
    was built from that config. Raises :class:`StoreError` otherwise.
    """
    path = Path(path)
    if path.name.endswith(".manifest.json"):
        mpath = path
        spath = path.with_name(path.name[: -len(".manifest.json")] + ".zarr")
    else:
        spath, mpath = path, manifest_path(path)
    fix = f"Fix: {rebuild_fix(spath)}" if mpath.is_file() else "Fix: run snakemake (the cache rule rebuilds it)"
    if not mpath.is_file():
        raise StoreError(f"{spath}: no manifest at {mpath}; the cache job did not finish or the manifest was "
                         f"deleted. {fix}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{mpath}: unreadable manifest ({e}); {fix}") from e
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}; {fix}")
    if manifest.get("store") != spath.name:
        raise StoreError(f"{mpath}: describes {manifest.get('store')!r}, not {spath.name!r}; {fix}")
    if expect_hash is not None and manifest["config_hash"] != expect_hash:
        raise StoreError(
            f"{spath}: built with config hash {manifest['config_hash']!r}, expected {expect_hash!r}; "
            f"the cache is stale, {fix}"
        )
    if not spath.is_dir():
        raise StoreError(f"{spath}: store missing although its manifest exists; {fix}")
    try:
        group = zarr.open_group(str(spath), mode="r", zarr_format=3)
    except Exception as e:  # zarr raises several types for a damaged group
        raise StoreError(f"{spath}: cannot open as a zarr v3 group ({e}); {fix}") from e

    n = int(manifest["n_rows"])
    want_attrs = {k: manifest[k] for k in ("model", "dataset", "layer", "split", "config_hash")}
    want_attrs["n_tokens"] = n
    got = {k: group.attrs.get(k) for k in want_attrs}
    if got != want_attrs:
        raise StoreError(f"{spath}: group attributes {got} disagree with manifest {want_attrs}; {fix}")
    expected = {s: ((n, int(v["width"])), v["dtype"]) for s, v in manifest["sites"].items()}
    expected.update({m: ((n,), _META_DTYPE[m]) for m in META_ARRAYS})
    for name, (shape, dtype) in expected.items():
        if name not in group:
            raise StoreError(f"{spath}: array {name!r} missing; {fix}")
        arr = group[name]
        if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
            raise StoreError(
                f"{spath}/{name}: shape {tuple(arr.shape)} dtype {arr.dtype}, manifest says {shape} {dtype}; {fix}"
            )
        if name in manifest["sites"]:
            if arr.attrs.get("logical_dtype") != manifest["sites"][name]["logical_dtype"]:
                raise StoreError(f"{spath}/{name}: logical_dtype attribute disagrees with the manifest; {fix}")
        n_chunks = -(-n // int(manifest["chunk_rows"]))
        if len(manifest.get("chunk_digests", {}).get(name, [])) != n_chunks:
            raise StoreError(f"{mpath}: no digest for each of the {n_chunks} chunks of {name!r}; {fix}")
        n_shards = -(-n // arr.shards[0])
        present = _count_shards(spath / name)
        if present != n_shards:
            raise StoreError(f"{spath}/{name}: {present} of {n_shards} shards on disk; {fix}")
    return Store(path=spath, manifest=manifest, group=group)


def _count_shards(array_dir: Path) -> int:
    """Shard files of a row-chunked array (default chunk keys ``c/<i>[/0]``)."""
    root = array_dir / "c"
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
