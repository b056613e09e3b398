"""Spectrum: Dask Gram vs numpy, planted rank, BOS exclusion, intrinsic dimension."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from attnspace.spectrum import (
    Spectrum,
    bootstrap_interval,
    bootstrap_singular_values,
    compute_spectrum,
    document_groups,
    group_moments,
    explained_fraction,
    gram,
    intrinsic_dim_rows,
    intrinsic_dimension,
    load_spectrum,
    n_above_fraction_of_max,
    save_spectrum,
    spectrum_from_gram,
)
from attnspace.store import StoreWriter, open_store

N, D, R = 5000, 64, 8
VARIANCES = np.arange(R, 0, -1, dtype=np.float64)  # 8..1, total 36: cum fractions 8/36, 15/36, ..., 35/36, 1
# tau -> intrinsic dimension, read off the cumulative fractions above.
PLANTED_ID = {0.2: 1, 0.5: 3, 0.7: 4, 0.9: 6, 0.95: 7, 0.99: 8, 0.9999: 8}


def planted(seed=0, n=N):
    """x [n, D] = mean + U diag(s) V^T with U [n, R] centred orthonormal, V [D, R] orthonormal.

    The centred rows then have exactly the singular values s = sqrt(100 * VARIANCES).
    """
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, R))
    z -= z.mean(axis=0)
    u, _ = np.linalg.qr(z)
    v, _ = np.linalg.qr(rng.standard_normal((D, R)))
    s = np.sqrt(100 * VARIANCES)
    mean = 5.0 + rng.standard_normal(D)
    return mean + (u * s) @ v.T, s, v


def with_bos(x, every=50, value=1e6):
    """Insert a huge BOS row before every ``every`` rows; return (rows, keep)."""
    out, keep = [], []
    for i in range(0, x.shape[0], every):
        out += [np.full((1, x.shape[1]), value), x[i : i + every]]
        keep += [False] + [True] * len(x[i : i + every])
    return np.concatenate(out), np.array(keep)


def test_gram_matches_numpy_on_kept_rows():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3001, 40)) * 2 + 3).astype(np.float32)
    keep = rng.random(3001) > 0.1
    xk = x[keep].astype(np.float64)
    for chunks, k in [(500, keep), (1024, da.from_array(keep, chunks=300)), (3001, keep)]:
        G, colsum, n = gram(da.from_array(x, chunks=(chunks, 40)), k, threads=2, split_every=2)
        np.testing.assert_allclose(G, xk.T @ xk, rtol=1e-10)
        np.testing.assert_allclose(colsum, xk.sum(axis=0), rtol=1e-10)
        assert n == keep.sum()
    G, colsum, n = gram(da.from_array(x, chunks=(700, 20)), None)
    np.testing.assert_allclose(G, x.astype(np.float64).T @ x.astype(np.float64), rtol=1e-10)
    assert n == 3001


def test_spectrum_matches_numpy_svd():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4000, 32)) @ np.diag(np.linspace(0.1, 5, 32)) @ np.linalg.qr(rng.standard_normal((32, 32)))[0]
    x += 7.0
    keep = rng.random(4000) > 0.2
    spec = spectrum_from_gram(*gram(da.from_array(x, chunks=(512, 32)), keep), n_vectors=5)
    xc = x[keep] - x[keep].mean(axis=0)
    _, s_ref, vt_ref = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(spec.singular_values, s_ref, rtol=1e-8)
    np.testing.assert_allclose(spec.mean, x[keep].mean(axis=0), rtol=1e-12)
    assert spec.components.shape == (5, 32) and spec.n_tokens == keep.sum()
    np.testing.assert_allclose(np.abs(np.sum(spec.components * vt_ref[:5], axis=1)), 1.0, rtol=1e-8)


def test_planted_rank_and_intrinsic_dimension():
    x, s, v = planted()
    spec = spectrum_from_gram(*gram(da.from_array(x, chunks=(999, D)), None, threads=2))
    assert np.all(np.diff(spec.singular_values) <= 0)
    np.testing.assert_allclose(spec.singular_values[:R], s, rtol=1e-9)
    # Centring after the product (G - n mu mu^T) leaves a float64 floor of about
    # sqrt(eps * n) * |mean| in the null singular values: ~2e-6 of the largest here.
    assert n_above_fraction_of_max(spec.singular_values, 1e-4) == R
    assert spec.singular_values[R] < 1e-5 * spec.singular_values[0]
    for tau, k in PLANTED_ID.items():
        assert intrinsic_dimension(spec.singular_values, tau) == k
    # The top components span the planted subspace.
    np.testing.assert_allclose(np.linalg.svd(spec.components[:R] @ v)[1], 1.0, rtol=1e-9)


def _store(tmp_path, rows, keep, logical_dtype="float32", chunk_rows=256, shard_rows=1024):
    """Publish rows [n, D] (cast to float32) as site 'attn_out'; return the open Store."""
    path = tmp_path / "L0.zarr"
    n = rows.shape[0]
    with StoreWriter(path, model="m", dataset="d", layer=0, split="train", n_rows=n, sites={"attn_out": D},
                     logical_dtype=logical_dtype, chunk_rows=chunk_rows, shard_rows=shard_rows) as w:
        for i in range(0, n, 777):
            sl = slice(i, min(i + 777, n))
            w.append({"attn_out": rows[sl].astype(np.float32)}, np.arange(sl.start, sl.stop), np.zeros(sl.stop - sl.start),
                     np.arange(sl.start, sl.stop), keep[sl])
    return open_store(path)


def test_compute_spectrum_from_store_excludes_bos(tmp_path):
    x, s, _ = planted(seed=3)
    rows, keep = with_bos(x)
    st = _store(tmp_path, rows, keep)
    spec = compute_spectrum(st, "attn_out", threads=2, n_vectors=R)
    assert spec.n_tokens == N and spec.components.shape == (R, D)
    x32 = x.astype(np.float32).astype(np.float64)  # what the store holds
    s_ref = np.linalg.svd(x32 - x32.mean(axis=0), compute_uv=False)
    np.testing.assert_allclose(spec.singular_values[:R], s_ref[:R], rtol=1e-8)
    np.testing.assert_allclose(spec.singular_values[:R], s, rtol=1e-5)
    assert n_above_fraction_of_max(spec.singular_values, 1e-4) == R  # float32 rounding is the only other variance
    for tau, k in PLANTED_ID.items():
        assert intrinsic_dimension(spec.singular_values, tau) == k
    np.testing.assert_allclose(spec.mean, x32.mean(axis=0), rtol=1e-10)

    part = compute_spectrum(st, "attn_out", max_tokens=1234)
    ref = x32[:1234] - x32[:1234].mean(axis=0)
    assert part.n_tokens == 1234
    np.testing.assert_allclose(part.singular_values[:R], np.linalg.svd(ref, compute_uv=False)[:R], rtol=1e-8)


def test_save_load_round_trip(tmp_path):
    x, _, _ = planted(seed=4, n=500)
    spec = spectrum_from_gram(*gram(da.from_array(x, chunks=(128, D)), None), n_vectors=10)
    save_spectrum(spec, tmp_path / "s.npz")
    back = load_spectrum(tmp_path / "s.npz")
    assert isinstance(back, Spectrum) and back.n_tokens == spec.n_tokens == 500
    for name in ("singular_values", "mean", "components"):
        np.testing.assert_array_equal(getattr(back, name), getattr(spec, name))
    assert not list(tmp_path.glob("*.tmp-*"))


def test_intrinsic_dimension_definition():
    s = np.sqrt(np.array([4.0, 3.0, 2.0, 1.0]))  # cum fractions .4 .7 .9 1.0
    assert [intrinsic_dimension(s, t) for t in (0.1, 0.4, 0.41, 0.7, 0.89, 0.95)] == [1, 1, 2, 2, 3, 4]
    np.testing.assert_allclose(explained_fraction(s), [0.4, 0.7, 0.9, 1.0])
    for tau in (0.0, 1.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError):
            intrinsic_dimension(s, tau)
    # At the top, round-off in the cumulative sum must never push k past d.
    rng = np.random.default_rng(0)
    s = np.sort(rng.random(4096))[::-1]
    assert intrinsic_dimension(s, np.nextafter(1.0, 0.0)) <= 4096
    assert explained_fraction(s)[-1] == 1.0
    assert n_above_fraction_of_max(np.array([10.0, 0.6, 0.5, 0.0])) == 2


def test_intrinsic_dim_rows():
    x, _, _ = planted(seed=5)
    spec = spectrum_from_gram(*gram(da.from_array(x, chunks=(2000, D)), None))
    rows = intrinsic_dim_rows(spec, model="m", dataset="d", layer=2, site="attn_out", thresholds=(0.5, 0.99))
    no_interval = {k: v for k, v in rows[0].items() if k.startswith(("fraction_", "tokens_", "last_", "attn_"))}
    assert len(no_interval) == 9 and all(np.isnan(v) for v in no_interval.values())  # no replicates: no interval
    assert {r.pop("method") for r in rows} == {""}
    assert [{k: v for k, v in r.items() if k not in no_interval} for r in rows] == [
        {"model": "m", "dataset": "d", "layer": 2, "site": "attn_out", "d": D, "n_tokens": N, "threshold": 0.5,
         "k": 3, "fraction": 3 / D, "level": 0.9, "resamples": 0, "n_groups": 0, "n_sv_above_5pct": R},
        {"model": "m", "dataset": "d", "layer": 2, "site": "attn_out", "d": D, "n_tokens": N, "threshold": 0.99,
         "k": 8, "fraction": 8 / D, "level": 0.9, "resamples": 0, "n_groups": 0, "n_sv_above_5pct": R},
    ]


def test_document_groups_keep_documents_whole():
    doc = np.repeat(np.arange(10), [5, 1, 30, 2, 2, 2, 40, 3, 3, 12])
    keep = np.ones(doc.size, dtype=bool)
    keep[np.r_[0, np.flatnonzero(np.diff(doc)) + 1]] = False  # BOS rows
    g = document_groups(doc, keep, 4)
    assert np.all(np.diff(g) >= 0) and set(g) == set(range(g.max() + 1))  # consecutive runs, no empty group
    for d in np.unique(doc):
        assert np.unique(g[doc == d]).size == 1  # a document never straddles two groups
    assert g.max() + 1 <= 4
    # More groups than documents: one per document with kept rows (document 1 is a lone BOS, which joins the next).
    assert document_groups(doc, keep, 100).max() + 1 == 9


def test_group_moments_sum_to_gram_and_match_numpy():
    x, _, _ = planted(seed=6, n=1000)
    rows, keep = with_bos(x, every=37)
    doc = np.cumsum(~keep) - 1
    groups = document_groups(doc, keep, 7)
    m = group_moments(da.from_array(rows, chunks=(100, D)), keep, groups, threads=2, blocks_per_step=3)
    G, colsum, n = gram(da.from_array(rows, chunks=(100, D)), keep)
    np.testing.assert_allclose(m.sum(axis=0)[:D, :D], G, rtol=1e-12)
    np.testing.assert_allclose(m.sum(axis=0)[:D, D], colsum, rtol=1e-12)
    for gid in range(m.shape[0]):
        xs = rows[(groups == gid) & keep]
        np.testing.assert_allclose(m[gid, :D, :D], xs.T @ xs, rtol=1e-10)
        assert m[gid, D, D] == xs.shape[0]


def test_bootstrap_replicate_is_the_spectrum_of_the_resampled_documents():
    x, _, _ = planted(seed=7, n=600)
    rows, keep = with_bos(x, every=60)
    doc = np.cumsum(~keep) - 1
    groups = document_groups(doc, keep, 5)
    m = group_moments(da.from_array(rows, chunks=(128, D)), keep, groups)
    boot = bootstrap_singular_values(m, resamples=3, seed=11)
    counts = np.random.default_rng(11).multinomial(5, np.full(5, 0.2), size=3)
    for r in range(3):  # numpy reference: stack each drawn group's kept rows as often as it was drawn
        xs = np.concatenate([rows[(groups == g) & keep] for g in range(5) for _ in range(counts[r, g])])
        ref = np.linalg.svd(xs - xs.mean(axis=0), compute_uv=False)
        np.testing.assert_allclose(boot[r, :R], ref[:R], rtol=1e-7)


def test_bootstrap_interval_in_the_table(tmp_path):
    """Store -> spectrum with replicates -> saved -> table rows with an interval around the estimate."""
    rng = np.random.default_rng(8)
    n_docs, per_doc = 40, 50
    # Each document has its own spread along 16 directions: the intrinsic dimension varies across documents.
    scales = np.exp(rng.normal(0, 0.6, size=(n_docs, 16)))
    x = np.concatenate([rng.standard_normal((per_doc, 16)) * scales[i] for i in range(n_docs)]) @ \
        np.linalg.qr(rng.standard_normal((D, 16)))[0].T
    doc = np.repeat(np.arange(n_docs), per_doc)
    path = tmp_path / "L0.zarr"
    with StoreWriter(path, model="m", dataset="d", layer=0, split="train", n_rows=x.shape[0], sites={"attn_out": D},
                     logical_dtype="float32", chunk_rows=128, shard_rows=512) as w:
        w.append({"attn_out": x.astype(np.float32)}, np.zeros(x.shape[0]), doc, np.zeros(x.shape[0]),
                 np.ones(x.shape[0], dtype=bool))
    spec = compute_spectrum(open_store(path), "attn_out", resamples=50, groups=20, seed=0)
    assert spec.boot_singular_values.shape == (50, D) and spec.n_groups == 20
    plain = compute_spectrum(open_store(path), "attn_out")
    np.testing.assert_allclose(spec.singular_values[:16], plain.singular_values[:16], rtol=1e-9)
    save_spectrum(spec, tmp_path / "s.npz")
    back = load_spectrum(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.boot_singular_values, spec.boot_singular_values)
    (row,) = intrinsic_dim_rows(back, model="m", dataset="d", layer=0, site="attn_out", thresholds=(0.9,), level=0.9)
    ks = [intrinsic_dimension(s, 0.9) for s in spec.boot_singular_values]
    k_hat = intrinsic_dimension(spec.singular_values, 0.9)  # basic interval: replicate quantiles reflected
    assert row["fraction_lo"] == pytest.approx(max(1, 2 * k_hat - np.quantile(ks, 0.95)) / D)
    assert row["fraction_hi"] == pytest.approx(min(D, 2 * k_hat - np.quantile(ks, 0.05)) / D)
    assert row["fraction_lo"] < row["fraction_hi"]  # documents differ: the interval has width
    assert row["fraction_lo"] <= row["fraction"] <= row["fraction_hi"]
    assert (row["resamples"], row["n_groups"], row["level"]) == (50, 20, 0.9)


def test_gram_memory_flat_in_rows():
    import tracemalloc

    d, rows = 256, 256
    block = np.random.default_rng(0).standard_normal((rows, d)).astype(np.float32)
    b64 = block.astype(np.float64)
    peaks = []
    for n_blocks in (16, 256):
        x = da.concatenate([da.from_array(block, chunks=(rows, d))] * n_blocks)  # no memory per block
        keep = np.ones(n_blocks * rows, bool)
        tracemalloc.start()
        G, _, n = gram(x, keep, threads=2)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert n == n_blocks * rows
        np.testing.assert_allclose(G, n_blocks * (b64.T @ b64), rtol=1e-10)
    # 16x the rows may cost a few partial sums more, not a growing tree of them
    # (one dask tree over all 256 blocks adds about 14 of them here).
    moment_bytes = (d + 1) ** 2 * 8
    assert peaks[1] - peaks[0] < 8 * moment_bytes, (peaks, moment_bytes)


def test_bootstrap_interval_covers_the_population_value():
    """Coverage on planted data: documents drawn from a population whose intrinsic dimension is known
    (from 20,000 documents). A sample of 40 documents underestimates it, and a resample (repeated
    documents) underestimates it further; the basic interval reflects that shift and contains the
    population value in most of 40 samples, where the replicates' own percentiles almost never do.
    Moments are built here with numpy ([x, 1]^T [x, 1] per document), not by the store pass."""
    rng = np.random.default_rng(3)
    d, per_doc, tau, trials = 48, 8, 0.9, 40
    base = np.linspace(1.0, 0.1, d)

    def docs(n):  # each document stretches its own directions: a heavy-tailed mix
        scales = base * np.exp(rng.normal(0, 1.0, size=(n, d)))
        return rng.standard_normal((n, per_doc, d)) * scales[:, None, :]

    def k_of(rows):
        return intrinsic_dimension(np.linalg.svd(rows - rows.mean(0), compute_uv=False), tau)

    k_true = k_of(docs(20000).reshape(-1, d))
    basic = percentile = 0
    for trial in range(trials):
        x = docs(40)
        z = np.concatenate([x, np.ones(x.shape[:2] + (1,))], axis=2)
        boot = bootstrap_singular_values(np.einsum("gni,gnj->gij", z, z), resamples=200, seed=trial)
        lo, hi = bootstrap_interval(boot, tau, 0.9, estimate=k_of(x.reshape(-1, d)))
        basic += lo <= k_true <= hi
        q_lo, q_hi = np.quantile([intrinsic_dimension(s, tau) for s in boot], [0.05, 0.95])
        percentile += q_lo <= k_true <= q_hi
    assert basic >= 0.65 * trials, f"basic interval covered the population value in {basic} of {trials}"
    assert percentile <= 0.2 * trials, f"percentile interval covered it in {percentile} of {trials}"
