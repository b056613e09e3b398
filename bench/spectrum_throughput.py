"""Throughput and memory of compute_spectrum against in-memory numpy X^T X.

Writes synthetic float32 stores (low-rank signal plus noise, a BOS row every
``--doc-len`` rows) at each size, then in the same process measures:

* ``numpy``: G = X^T X in float64 on the kept rows, already in memory (the baseline;
  the float32 -> float64 conversion is timed separately and not charged to it);
* ``spectrum``: compute_spectrum on the store (read, decode, mask, Gram, eigh);
* ``ratio``: spectrum rows/s over numpy rows/s (target >= 0.5);
* ``memory``: peak traced allocation (tracemalloc) and peak RSS growth (psutil,
  sampled every 5 ms) during compute_spectrum, at each size (should be flat in n).

Prints one JSON line per measurement and a short summary. Timings are the best of
``--repeats`` runs, baseline and candidate interleaved; the store is read through the OS page cache after the first run.

    python bench/spectrum_throughput.py                    # d=576, n=20k and 200k, 2 threads
    python bench/spectrum_throughput.py --rows 100000 1000000 --threads 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil

from attnspace.spectrum import compute_spectrum, intrinsic_dimension
from attnspace.store import StoreWriter, configure_io, open_store


def synthetic_rows(rng: np.random.Generator, rows: int, d: int, rank: int, basis: np.ndarray) -> np.ndarray:
    """float32 [rows, d]: rank-``rank`` signal with decaying scales, plus small noise and a mean."""
    scales = np.geomspace(10.0, 0.5, rank)
    x = (rng.standard_normal((rows, rank)) * scales) @ basis + 0.05 * rng.standard_normal((rows, d)) + 1.0
    return x.astype(np.float32)


def write_store(path: Path, n: int, d: int, doc_len: int, seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Write a synthetic store; return (seconds, X float32 [n, d], keep [n])."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0][: d // 4]
    x = synthetic_rows(rng, n, d, d // 4, basis)
    idx = np.arange(n)
    keep = idx % doc_len != 0
    x[~keep] = 300.0  # BOS-like outliers the spectrum must drop
    t0 = time.perf_counter()
    with StoreWriter(path, model="synthetic", dataset="gauss", layer=0, split="train", n_rows=n,
                     sites={"attn_out": d}, logical_dtype="float32") as w:
        for i in range(0, n, 4096):
            sl = slice(i, min(i + 4096, n))
            w.append({"attn_out": x[sl]}, idx[sl] % 49152, idx[sl] // doc_len, idx[sl] % doc_len, keep[sl])
    return time.perf_counter() - t0, x, keep


class RssPeak:
    """Sample this process's RSS in a thread; ``peak - start`` is the growth."""

    def __init__(self, every: float = 0.005) -> None:
        self.proc = psutil.Process()
        self.every = every
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=576, help="width of the site (SmolLM2-135M d_model)")
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000], help="store sizes (rows)")
    ap.add_argument("--threads", type=int, default=2, help="Dask workers and zarr concurrency")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--doc-len", type=int, default=256, help="rows per document (one BOS each)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write stores (default: a temp dir)")
    args = ap.parse_args()

    configure_io(args.threads)
    records = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in args.rows:
            path = Path(tmp) / f"n{n}.zarr"
            t_write, x, keep = write_store(path, n, args.d, args.doc_len, seed=n)
            records.append(emit(dict(kind="write", n_rows=n, d=args.d, seconds=t_write, rows_per_s=n / t_write,
                                     bytes_on_disk=sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))))
            store = open_store(path)

            n_kept = int(keep.sum())
            t0 = time.perf_counter()
            x64 = np.ascontiguousarray(x[keep], dtype=np.float64)
            t_conv = time.perf_counter() - t0
            del x
            # Interleave baseline and candidate so that load from other processes hits both alike.
            t_np = t_sp = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                x64.T @ x64
                t_np = min(t_np, time.perf_counter() - t0)
                t0 = time.perf_counter()
                spec = compute_spectrum(store, "attn_out", threads=args.threads)
                t_sp = min(t_sp, time.perf_counter() - t0)
            del x64
            gc.collect()
            assert spec.n_tokens == n_kept
            rec_np = emit(dict(kind="numpy_gram", n_rows=n, n_kept=n_kept, d=args.d, seconds=t_np,
                               rows_per_s=n_kept / t_np, f64_convert_seconds=t_conv))
            rec_sp = emit(dict(kind="compute_spectrum", n_rows=n, n_kept=n_kept, d=args.d, threads=args.threads,
                               seconds=t_sp, rows_per_s=n_kept / t_sp,
                               id_099=intrinsic_dimension(spec.singular_values, 0.99)))
            records += [rec_np, rec_sp]
            records.append(emit(dict(kind="ratio", n_rows=n, spectrum_over_numpy=rec_sp["rows_per_s"] / rec_np["rows_per_s"])))

            gc.collect()
            with RssPeak() as rss:
                tracemalloc.start()
                compute_spectrum(store, "attn_out", threads=args.threads)
                _, traced_peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
            records.append(emit(dict(kind="memory", n_rows=n, d=args.d, threads=args.threads,
                                     traced_peak_mb=traced_peak / 2**20, rss_growth_mb=(rss.peak - rss.start) / 2**20,
                                     data_f32_mb=n * args.d * 4 / 2**20)))

    ratios = [r for r in records if r["kind"] == "ratio"]
    mem = [r for r in records if r["kind"] == "memory"]
    print(f"\nsummary (d={args.d}, threads={args.threads}, cpu_count={os.cpu_count()}):")
    for r in ratios:
        sp = next(s for s in records if s["kind"] == "compute_spectrum" and s["n_rows"] == r["n_rows"])
        nb = next(s for s in records if s["kind"] == "numpy_gram" and s["n_rows"] == r["n_rows"])
        ok = "ok" if r["spectrum_over_numpy"] >= 0.5 else "BELOW TARGET"
        print(f"  n={r['n_rows']:>9,}: compute_spectrum {sp['rows_per_s']:>10,.0f} rows/s, numpy X^T X "
              f"{nb['rows_per_s']:>10,.0f} rows/s, ratio {r['spectrum_over_numpy']:.2f} (target >= 0.5: {ok})")
    for m in mem:
        print(f"  n={m['n_rows']:>9,}: peak traced {m['traced_peak_mb']:.0f} MiB, RSS growth {m['rss_growth_mb']:.0f} MiB "
              f"(data itself {m['data_f32_mb']:.0f} MiB float32)")
    if len(mem) >= 2:
        print(f"  memory growth for {mem[-1]['n_rows'] / mem[0]['n_rows']:.0f}x rows: "
              f"{mem[-1]['traced_peak_mb'] / mem[0]['traced_peak_mb']:.2f}x traced peak")


if __name__ == "__main__":
    main()
