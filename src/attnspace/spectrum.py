"""Covariance spectra of cached activations, in one pass with Dask.

Per block of rows (widened to float64, BOS/EOS rows dropped) we form the Gram
matrix X^T X, the column sums and the row count; blocks are summed in a tree
(``split_every``), so memory is O(d^2) whatever the number of tokens. The centred
scatter matrix C = G - n mu mu^T then gives the spectrum through ``eigh``: its
eigenvalues are the squared singular values of the mean-centred kept rows and its
eigenvectors their right singular vectors.

Definitions (one function each, used everywhere else):

* cumulative variance fraction: :func:`explained_fraction`;
* intrinsic dimension at tau: :func:`intrinsic_dimension`, the smallest k with
  sum_{i<=k} s_i^2 / sum_i s_i^2 >= tau;
* singular values above a fraction of the largest: :func:`n_above_fraction_of_max`.

Uncertainty: the same pass keeps the moments per *document group* (consecutive whole
documents dealt into groups of about equal kept rows, :func:`document_groups`). Resampling
the groups with replacement and summing their moments gives a bootstrap replicate of the
spectrum without a second pass over the store (:func:`bootstrap_singular_values`);
:func:`intrinsic_dim_rows` turns the replicates into a basic bootstrap interval per threshold
(:func:`bootstrap_interval`).

With ``spectrum.mode: streamed`` the caching job forms the same per-group moments while the model
runs (:mod:`attnspace.moments`) and :func:`streamed_spectrum` reads them instead of a store; group
moments from either source give the spectrum and its replicates through :func:`spectrum_from_moments`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from attnspace.defaults import schema_default
from attnspace.files import write_npz
from attnspace.store import Store

FORMAT = "attnspace-spectrum/1"
"""Tag stored in every spectrum ``.npz``."""

THRESHOLDS = tuple(schema_default("spectrum.thresholds"))
"""Intrinsic-dimension thresholds reported by default (the config's ``spectrum.thresholds``)."""
THRESHOLD = schema_default("spectrum.threshold")
"""The main threshold (``spectrum.threshold``; the paper's 0.99)."""
LEVEL = schema_default("spectrum.bootstrap.level")
"""Coverage of the bootstrap intervals (``spectrum.bootstrap.level``)."""


@dataclass
class Spectrum:
    """Spectrum of the mean-centred kept rows of one activation site."""

    singular_values: np.ndarray
    """[d] float64, descending, >= 0."""
    mean: np.ndarray
    """[d] float64, mean of the kept rows."""
    components: np.ndarray
    """[n_vec, d] float64, right singular vectors as rows, matching singular_values[:n_vec]."""
    n_tokens: int
    """Kept rows used."""
    key: dict | None = None
    """{model, dataset, layer, site} of the cached site it was computed from (recorded in the file)."""
    boot_singular_values: np.ndarray | None = None
    """[R, d] float64: singular values of R bootstrap replicates (document groups resampled), or None."""
    n_groups: int = 0
    """Document groups the replicates resample (0: no bootstrap)."""

    @property
    def d(self) -> int:
        return int(self.singular_values.shape[0])


def _block_moments(x: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Moments of one block: x [r, d], keep bool [r] -> [1, d+1, d+1] float64.

    Packed as [[X^T X, colsum], [colsum^T, n]] over the kept rows, so that summing
    packed blocks sums all three at once.
    """
    x = np.array(x, dtype=np.float64)  # always a fresh copy: we write into it
    n = x.shape[0]
    if keep is not None:
        keep = np.asarray(keep, dtype=bool)
        # Zeroed rows add nothing to X^T X or the column sums; one copy instead of two.
        x[~keep] = 0.0
        n = int(keep.sum())
    d = x.shape[1]
    out = np.empty((1, d + 1, d + 1), dtype=np.float64)
    out[0, :d, :d] = x.T @ x  # numpy dispatches A^T A to BLAS syrk
    s = x.sum(axis=0)
    out[0, :d, d] = s
    out[0, d, :d] = s
    out[0, d, d] = n
    return out


def _moments(x, keep):
    """Lazy packed moments per row block: x [r, d] dask, keep [r] dask or None -> [blocks, d+1, d+1]."""
    import dask.array as da

    d = x.shape[1]
    args = [x, "ij"] + ([keep, "i"] if keep is not None else [])
    return da.blockwise(
        _block_moments,
        "ijk",
        *args,
        new_axes={"k": d + 1},
        adjust_chunks={"i": 1, "j": d + 1},
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
    )


def gram(
    x, keep=None, threads: int = 1, split_every: int = 4, blocks_per_step: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """One float64 pass over rows: (G [d, d], colsum [d], n) of the kept rows of x.

    x: dask array [n_rows, d] (any float dtype, any row blocks); keep: bool [n_rows]
    (numpy or dask) or None for all rows. Runs on the threaded scheduler with
    ``threads`` workers. Rows are consumed ``blocks_per_step`` blocks at a time
    (default 8 per thread), each step tree-reduced ``split_every`` at a time and added
    to one running total, so memory stays flat in the number of rows (a single tree
    over all blocks holds O(log blocks) partial sums of size d^2).
    """
    import dask.array as da

    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [rows, d], got shape {x.shape}")
    threads = max(1, int(threads))
    x = x.rechunk({1: -1})
    d = x.shape[1]
    if keep is not None:
        if keep.shape != (x.shape[0],):
            raise ValueError(f"keep has shape {keep.shape}, expected ({x.shape[0]},)")
        if isinstance(keep, da.Array):
            keep = keep.astype(bool).rechunk((x.chunks[0],))
        else:
            keep = da.from_array(np.asarray(keep, dtype=bool), chunks=(x.chunks[0],))
    step = blocks_per_step or 8 * threads
    total = np.zeros((d + 1, d + 1), dtype=np.float64)
    # Dask's workers already use the rule's threads; BLAS inside each block gets one, or
    # threads x threads would oversubscribe the machine.
    with threadpool_limits(limits=1 if threads > 1 else None):
        for b in range(0, x.numblocks[0], step):
            part = _moments(x.blocks[b : b + step], None if keep is None else keep.blocks[b : b + step])
            total += part.sum(axis=0, split_every=split_every).compute(scheduler="threads", num_workers=threads)
    return np.ascontiguousarray(total[:d, :d]), total[:d, d].copy(), int(round(total[d, d]))


def document_groups(doc: np.ndarray, keep: np.ndarray, n_groups: int) -> np.ndarray:
    """Group id [n_rows] (int64, 0 .. G-1) of each row: whole consecutive documents, dealt into at
    most ``n_groups`` groups of about equal kept rows (fewer when there are fewer documents).

    doc: int [n_rows] document index of each row, documents contiguous in row order;
    keep: bool [n_rows]. A document goes to group floor(n_groups * kept rows before it / kept rows).
    """
    doc, keep = np.asarray(doc), np.asarray(keep, dtype=bool)
    if doc.shape != keep.shape or doc.ndim != 1:
        raise ValueError(f"doc {doc.shape} and keep {keep.shape} must be the same 1-D shape")
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    if doc.size == 0:
        return np.zeros(0, dtype=np.int64)
    new_doc = np.r_[True, doc[1:] != doc[:-1]]  # first row of each document
    run = np.cumsum(new_doc) - 1  # [n_rows] document run of each row
    kept_before = np.cumsum(keep) - keep
    n_kept = max(int(keep.sum()), 1)
    group_of_run = np.minimum(kept_before[new_doc] * n_groups // n_kept, n_groups - 1)
    _, labels = np.unique(group_of_run, return_inverse=True)  # consecutive ids, no empty group
    return labels[run].astype(np.int64)


def group_moments(x, keep, groups: np.ndarray, threads: int = 1, blocks_per_step: int | None = None) -> np.ndarray:
    """One float64 pass over rows: packed moments per group, [G, d+1, d+1] (as :func:`gram` packs them).

    x: dask array [n_rows, d]; keep: bool [n_rows] numpy or None; groups: int [n_rows], each
    group a run of consecutive rows (:func:`document_groups`). Row blocks are split at group
    boundaries, so each block adds to exactly one group. Summing over groups gives :func:`gram`.
    """
    import dask.array as da

    groups = np.asarray(groups, dtype=np.int64)
    if x.ndim != 2 or groups.shape != (x.shape[0],):
        raise ValueError(f"groups {groups.shape} must give one id per row of x {x.shape}")
    if groups.size and np.any(np.diff(groups) < 0):
        raise ValueError("each group must be a run of consecutive rows (ids non-decreasing)")
    threads = max(1, int(threads))
    d = x.shape[1]
    n_groups = int(groups.max()) + 1 if groups.size else 0
    bounds = np.cumsum((0,) + x.chunks[0])
    cuts = np.union1d(bounds, np.r_[np.flatnonzero(np.diff(groups)) + 1, 0, x.shape[0]])
    x = x.rechunk({0: tuple(int(c) for c in np.diff(cuts)), 1: -1})
    keep_arr = None if keep is None else da.from_array(np.asarray(keep, dtype=bool), chunks=(x.chunks[0],))
    block_group = groups[cuts[:-1]]
    out = np.zeros((n_groups, d + 1, d + 1), dtype=np.float64)
    step = blocks_per_step or 8 * threads
    with threadpool_limits(limits=1 if threads > 1 else None):
        for b in range(0, x.numblocks[0], step):
            part = _moments(x.blocks[b : b + step], None if keep_arr is None else keep_arr.blocks[b : b + step])
            part = part.compute(scheduler="threads", num_workers=threads)
            np.add.at(out, block_group[b : b + step], part)
    return out


def bootstrap_singular_values(moments: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """[R, d] singular values of R bootstrap replicates: groups drawn with replacement, their moments summed.

    moments: [G, d+1, d+1] packed per-group moments (:func:`group_moments`). Replicate r
    weights group g by its count c_rg ~ Multinomial(G, 1/G); its spectrum is that of the
    weighted sum, exactly what a pass over the resampled documents would give.
    """
    G = moments.shape[0]
    if G < 2:
        raise ValueError(f"a bootstrap needs at least 2 document groups, got {G}")
    d = moments.shape[1] - 1
    counts = np.random.default_rng(seed).multinomial(G, np.full(G, 1.0 / G), size=int(resamples))  # [R, G]
    flat = moments.reshape(G, -1)
    out = np.empty((int(resamples), d), dtype=np.float64)
    for r in range(int(resamples)):
        m = (counts[r].astype(np.float64) @ flat).reshape(d + 1, d + 1)
        n = m[d, d]
        C = m[:d, :d] - np.outer(m[:d, d], m[:d, d] / n)
        out[r] = np.sqrt(np.clip(np.linalg.eigvalsh((C + C.T) / 2)[::-1], 0.0, None))
    return out


def spectrum_from_gram(G: np.ndarray, colsum: np.ndarray, n: int, n_vectors: int | None = None) -> Spectrum:
    """Spectrum from uncentred moments: G [d, d] = X^T X, colsum [d], n rows.

    C = G - colsum colsum^T / n (= G - n mu mu^T); singular values sqrt(eig(C))
    clamped at 0, descending; components are the top ``n_vectors`` (default all)
    eigenvectors as rows, each signed so that its largest-magnitude entry is positive.

    Precision: centring after the product cancels n |mu|^2 in float64, so singular
    values below about sqrt(eps * n) * |mu| (eps = 2.2e-16) are round-off, not signal.
    Variance fractions (intrinsic dimension up to tau = 0.9999) are unaffected.
    """
    if n < 1:
        raise ValueError("no kept rows: cannot form a spectrum")
    G = np.asarray(G, dtype=np.float64)
    colsum = np.asarray(colsum, dtype=np.float64)
    mean = colsum / n
    C = G - np.outer(colsum, mean)
    C = (C + C.T) / 2
    evals, evecs = np.linalg.eigh(C)  # ascending
    order = np.argsort(evals)[::-1]
    s = np.sqrt(np.clip(evals[order], 0.0, None))
    k = s.shape[0] if n_vectors is None else min(int(n_vectors), s.shape[0])
    comps = evecs[:, order[:k]].T.copy()
    flip = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps *= np.where(flip == 0, 1.0, flip)[:, None]
    return Spectrum(singular_values=s, mean=mean, components=comps, n_tokens=int(n))


def compute_spectrum(
    store: Store, site: str, threads: int = 1, n_vectors: int | None = None, max_tokens: int | None = None,
    resamples: int = 0, groups: int = 0, seed: int = 0,
) -> Spectrum:
    """Spectrum of the kept rows of ``site`` in ``store``, in one pass.

    max_tokens caps the kept rows used (the first ones, in store order). With ``resamples``
    > 0, the same pass keeps moments per document group (at most ``groups``) and the
    spectrum carries ``resamples`` bootstrap replicates drawn with ``seed``.
    """
    x = store.dask(site)
    keep = store.keep()
    stop = keep.shape[0]
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        stop = min(int(np.searchsorted(np.cumsum(keep), max_tokens)) + 1, keep.shape[0])
        x, keep = x[:stop], keep[:stop]
    key = {"model": store.model, "dataset": store.dataset, "layer": int(store.layer), "site": site}
    if resamples > 0:
        moments = group_moments(x, keep, document_groups(store.meta("doc")[:stop], keep, groups), threads=threads)
        return spectrum_from_moments(moments, n_vectors=n_vectors, resamples=resamples, seed=seed, key=key)
    G, colsum, n = gram(x, keep, threads=threads)
    spec = spectrum_from_gram(G, colsum, n, n_vectors=n_vectors)
    spec.key = key
    return spec


def spectrum_from_moments(moments: np.ndarray, n_vectors: int | None = None, resamples: int = 0, seed: int = 0,
                          key: dict | None = None) -> Spectrum:
    """Spectrum from packed per-group moments [G, d+1, d+1] (:func:`group_moments`, or streamed by
    :mod:`attnspace.moments`): the groups summed give :func:`spectrum_from_gram`'s moments; with
    ``resamples`` > 0, :func:`bootstrap_singular_values` adds that many replicates drawn with ``seed``
    (and n_groups = G; without replicates n_groups = 0)."""
    total = moments.sum(axis=0)
    d = moments.shape[1] - 1
    spec = spectrum_from_gram(total[:d, :d], total[:d, d], int(round(total[d, d])), n_vectors=n_vectors)
    spec.key = key
    if resamples > 0:
        spec.boot_singular_values = bootstrap_singular_values(moments, resamples, seed)
        spec.n_groups = int(moments.shape[0])
    return spec


def streamed_spectrum(record: Path | str, layer: int, site: str, n_vectors: int | None = None,
                      resamples: int = 0, seed: int = 0) -> Spectrum:
    """Spectrum of ``site`` at ``layer`` from the moments the caching job streamed (``moments.json``
    ``record``, :func:`attnspace.moments.load_moments`): the same Spectrum :func:`compute_spectrum`
    gives from a store of the same tokens with the same ``groups`` (to float64 rounding)."""
    from attnspace.moments import load_moments

    moments, rec = load_moments(record, layer, site)
    key = {"model": rec["model"], "dataset": rec["dataset"], "layer": int(layer), "site": site}
    return spectrum_from_moments(moments, n_vectors=n_vectors, resamples=resamples, seed=seed, key=key)


def save_spectrum(spec: Spectrum, path: Path) -> None:
    """Write ``spec`` to ``path`` (.npz, uncompressed, atomically)."""
    write_npz(path, format=np.array(FORMAT), singular_values=spec.singular_values.astype(np.float64),
              mean=spec.mean.astype(np.float64), components=spec.components.astype(np.float64),
              n_tokens=np.array(spec.n_tokens, dtype=np.int64), n_groups=np.array(spec.n_groups, dtype=np.int64),
              **({"boot_singular_values": spec.boot_singular_values.astype(np.float64)}
                 if spec.boot_singular_values is not None else {}),
              **({f"key_{k}": np.array(v) for k, v in spec.key.items()} if spec.key else {}))


def load_spectrum(path: Path) -> Spectrum:
    """Read a spectrum written by :func:`save_spectrum`."""
    with np.load(Path(path), allow_pickle=False) as z:
        if str(z["format"]) != FORMAT:
            raise ValueError(f"{path}: format {str(z['format'])!r}, expected {FORMAT!r}")
        return Spectrum(
            singular_values=z["singular_values"],
            mean=z["mean"],
            components=z["components"],
            n_tokens=int(z["n_tokens"]),
            key=_key(z),
            boot_singular_values=z["boot_singular_values"] if "boot_singular_values" in z else None,
            n_groups=int(z["n_groups"]) if "n_groups" in z else 0,
        )


KEY_FIELDS = ("model", "dataset", "layer", "site")


def _key(z) -> dict | None:
    if not all(f"key_{k}" in z for k in KEY_FIELDS):
        return None
    key = {k: str(z[f"key_{k}"]) for k in KEY_FIELDS}
    return {**key, "layer": int(key["layer"])}


def spectrum_key(spec: Spectrum, path) -> dict:
    """The (model, dataset, layer, site) a spectrum file records; a clear error if it has none."""
    if spec.key is None:
        raise ValueError(f"{path} records no (model, dataset, layer, site). Fix: rebuild it "
                         f"(snakemake --forcerun spectrum, or delete the file).")
    return spec.key


def load_keyed(paths) -> list[tuple[dict, Spectrum]]:
    """(key, spectrum) of each spectrum file, in order."""
    out = []
    for path in paths:
        spec = load_spectrum(path)
        out.append((spectrum_key(spec, path), spec))
    return out


def intrinsic_dim_frame(paths, thresholds=THRESHOLDS, level: float = LEVEL) -> pd.DataFrame:
    """results/tables/intrinsic_dim.csv: :func:`intrinsic_dim_rows` of every spectrum file."""
    rows = []
    for key, spec in load_keyed(paths):
        rows += intrinsic_dim_rows(spec, **key, thresholds=thresholds, level=level)
    return pd.DataFrame(rows)


def spectra_frame(paths, focus_layers: dict[str, int]) -> pd.DataFrame:
    """results/tables/spectra.csv: relative singular values of every spectrum file, one row per
    value, with the count above 5% of the largest and whether the layer is its model's focus."""
    frames = []
    for key, spec in load_keyed(paths):
        s = spec.singular_values
        frames.append(pd.DataFrame({
            **key, "i": np.arange(1, s.shape[0] + 1), "s": s, "rel_s": s / s[0],
            "n_above_5pct": n_above_fraction_of_max(s, 0.05),
            "focus": focus_layers.get(key["model"]) == key["layer"]}))
    return pd.concat(frames, ignore_index=True)


def explained_fraction(singular_values: np.ndarray) -> np.ndarray:
    """Cumulative variance fraction [d]: entry k-1 = sum_{i<=k} s_i^2 / sum_i s_i^2.

    Normalised by the last cumulative sum, so the final entry is exactly 1.
    """
    v = np.asarray(singular_values, dtype=np.float64) ** 2
    cum = np.cumsum(v)
    if cum.size == 0 or cum[-1] <= 0:
        raise ValueError("singular values are all zero: no variance to explain")
    return cum / cum[-1]


def intrinsic_dimension(singular_values: np.ndarray, tau: float) -> int:
    """Smallest k with sum_{i<=k} s_i^2 / sum_i s_i^2 >= tau, for 0 < tau < 1.

    s must be sorted descending (as in :class:`Spectrum`).
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must lie in (0, 1), got {tau}")
    frac = explained_fraction(singular_values)
    # The last entry is exactly 1 >= tau, so k never exceeds d.
    return int(np.searchsorted(frac, tau, side="left")) + 1


def n_above_fraction_of_max(singular_values: np.ndarray, frac: float = 0.05) -> int:
    """Count of singular values strictly above ``frac`` times the largest."""
    s = np.asarray(singular_values, dtype=np.float64)
    if s.size == 0:
        return 0
    return int(np.count_nonzero(s > frac * s.max()))


@dataclass
class IntrinsicDimRow:
    """One row of the intrinsic-dimension table (one site, one threshold)."""

    model: str
    dataset: str
    layer: int
    site: str
    d: int
    """Width of the site."""
    n_tokens: int
    """Kept rows the spectrum used."""
    threshold: float
    """tau: cumulative variance fraction asked for."""
    k: int
    """Intrinsic dimension at tau (:func:`intrinsic_dimension`)."""
    fraction: float
    """k / d."""
    fraction_lo: float
    """Lower end of the basic bootstrap interval of k / d (:func:`bootstrap_interval`; NaN without replicates)."""
    fraction_hi: float
    """Upper end of that interval (NaN without replicates)."""
    level: float
    """Coverage of the interval (e.g. 0.9: built from the 5th and 95th percentiles of the replicates)."""
    resamples: int
    """Bootstrap replicates behind the interval (0: none)."""
    n_groups: int
    """Document groups the replicates resample."""
    n_sv_above_5pct: int
    """Singular values above 5% of the largest (:func:`n_above_fraction_of_max`)."""


def bootstrap_interval(
    boot_singular_values: np.ndarray | None, tau: float, level: float, estimate: float | None = None,
) -> tuple[float, float]:
    """Basic bootstrap interval (lo, hi) of the intrinsic dimension k at ``tau`` over replicates [R, d];
    (nan, nan) when there are none.

    A resample repeats some document groups and drops others, so its variance is more concentrated
    than the sample's and its k is biased low (measured: the replicates' percentiles sat entirely
    below the estimate). The basic interval reflects the replicates' spread around the estimate
    k_hat: [2 k_hat - q_hi, 2 k_hat - q_lo] with q the replicates' quantiles at (1 -/+ level) / 2,
    which removes that bias; it is clipped to [1, d]. Callers pass the full-sample k as ``estimate``
    (without it, the replicates' median stands in).
    """
    if boot_singular_values is None or len(boot_singular_values) == 0:
        return float("nan"), float("nan")
    ks = np.array([intrinsic_dimension(s, tau) for s in boot_singular_values], dtype=np.float64)
    q_lo, q_hi = np.quantile(ks, [(1 - level) / 2, (1 + level) / 2])
    if estimate is None:
        estimate = float(np.median(ks))
    d = boot_singular_values.shape[1]
    lo, hi = np.clip([2 * estimate - q_hi, 2 * estimate - q_lo], 1, d)
    return float(lo), float(hi)


def intrinsic_dim_rows(
    spec: Spectrum, *, model: str, dataset: str, layer: int, site: str, thresholds=THRESHOLDS, level: float = LEVEL,
) -> list[dict]:
    """Table rows (dicts with the fields of :class:`IntrinsicDimRow`), one per threshold."""
    d = spec.d
    above = n_above_fraction_of_max(spec.singular_values, 0.05)
    boot = spec.boot_singular_values
    resamples = 0 if boot is None else int(boot.shape[0])
    rows = []
    for tau in thresholds:
        k = intrinsic_dimension(spec.singular_values, float(tau))
        lo, hi = bootstrap_interval(boot, float(tau), level, estimate=k)
        rows.append(
            asdict(
                IntrinsicDimRow(
                    model=model, dataset=dataset, layer=int(layer), site=site, d=d, n_tokens=spec.n_tokens,
                    threshold=float(tau), k=k, fraction=k / d, fraction_lo=lo / d, fraction_hi=hi / d,
                    level=float(level), resamples=resamples, n_groups=spec.n_groups, n_sv_above_5pct=above,
                )
            )
        )
    return rows
