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
documents dealt into groups of about equal kept rows, :func:`document_groups`). Weighting the
groups and summing their moments gives a replicate of the spectrum without a second pass over
the store (:func:`weighted_singular_values`): groups drawn with replacement (a bootstrap,
:func:`bootstrap_singular_values`) or half of them without (a subsample). :data:`METHOD`, the
interval rule of :mod:`attnspace.intervals` whose coverage of a planted population's value came
closest to nominal (``docs/coverage.md``), decides which; :func:`intrinsic_dim_rows` turns the
replicates into an interval and a bias-corrected estimate per threshold, and
:func:`intrinsic_dim_frame` adds paired intervals of attention's fraction minus each other site's,
from the same replicates (every site of a layer draws the same groups).

Convergence in tokens: the first 1/16, 1/8, 1/4, 1/2 and all of the groups (documents in their
shuffled order) are nested subsamples; their spectra (:func:`nested_singular_values`) show how far
the intrinsic dimension still moves with the number of tokens (:func:`convergence_frame`).

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
from attnspace.errors import AttnspaceError
from attnspace.files import write_npz
from attnspace.groups import document_groups
from attnspace.intervals import NO_INTERVAL, RESAMPLING, Interval, check_method, interval
from attnspace.store import Store

FORMAT = "attnspace-spectrum/1"
"""Tag stored in every spectrum ``.npz``."""

THRESHOLDS = tuple(schema_default("spectrum.thresholds"))
"""Intrinsic-dimension thresholds reported by default (the config's ``spectrum.thresholds``)."""
THRESHOLD = schema_default("spectrum.threshold")
"""The main threshold (``spectrum.threshold``; the paper's 0.99)."""
LEVEL = schema_default("spectrum.bootstrap.level")
"""Coverage of the bootstrap intervals (``spectrum.bootstrap.level``)."""
METHOD = "subsampling"
"""The interval rule of the spectra: of :data:`attnspace.intervals.METHODS`, the one whose measured
coverage of a planted population's intrinsic dimension came closest to nominal without falling short by
more than the stated margin (``bench/interval_coverage.py``, ``docs/coverage.md``)."""
SUBSAMPLE_SHARE = 0.5
"""A subsample replicate holds this share of the document groups, drawn without replacement."""
NESTED = (16, 8, 4, 2, 1)
"""Nested subsamples: the first 1/16, 1/8, 1/4, 1/2 and all of the document groups."""


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
    interval_method: str = "basic"
    """The interval rule the replicates serve (:data:`attnspace.intervals.METHODS`)."""
    boot_weights: np.ndarray | None = None
    """[R, G] float64: each replicate's weight of each group (counts drawn with replacement, or 0/1 for a
    subsample), or None. Sites of one layer drawn with the same weights give paired replicates."""
    group_tokens: np.ndarray | None = None
    """[G] float64: kept rows of each document group, or None."""
    jack_singular_values: np.ndarray | None = None
    """[G, d] float64: singular values with each group left out in turn (for ``bca``), or None."""
    nested_singular_values: np.ndarray | None = None
    """[m, d] float64: singular values of the nested subsamples (:data:`NESTED`), fewest tokens first, or None."""
    nested_n_tokens: np.ndarray | None = None
    """[m] int64: kept rows of each nested subsample."""

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


def replicate_weights(n_groups: int, resamples: int, seed: int = 0, method: str = "basic") -> np.ndarray:
    """[R, G] float64 weights of the groups in R replicates for the interval ``method``: counts
    c_r ~ Multinomial(G, 1/G) (groups drawn with replacement), or for ``subsampling`` 1 on
    round(G x :data:`SUBSAMPLE_SHARE`) groups drawn without replacement and 0 elsewhere."""
    G, R = int(n_groups), int(resamples)
    if G < 2:
        raise ValueError(f"replicates need at least 2 document groups, got {G}")
    rng = np.random.default_rng(seed)
    if RESAMPLING[check_method(method)] == "bootstrap":
        return rng.multinomial(G, np.full(G, 1.0 / G), size=R).astype(np.float64)
    b = min(max(1, int(round(G * SUBSAMPLE_SHARE))), G - 1)
    out = np.zeros((R, G), dtype=np.float64)
    for r in range(R):
        out[r, rng.choice(G, size=b, replace=False)] = 1.0
    return out


def weighted_singular_values(moments: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[R, d] singular values of the centred sum of the groups' moments [G, d+1, d+1] weighted by each
    row of ``weights`` [R, G]: exactly what a pass over the documents repeated (or left out) that
    often would give."""
    G, d = moments.shape[0], moments.shape[1] - 1
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if weights.shape[1] != G:
        raise ValueError(f"weights {weights.shape} do not match {G} document groups")
    flat = moments.reshape(G, -1)
    out = np.empty((weights.shape[0], d), dtype=np.float64)
    step = max(1, BATCH_FLOATS // (d + 1) ** 2)  # replicates per batched eigvalsh, memory bounded
    for r in range(0, weights.shape[0], step):
        m = (weights[r : r + step] @ flat).reshape(-1, d + 1, d + 1)
        col = m[:, :d, d]
        C = m[:, :d, :d] - col[:, :, None] * (col / m[:, d, d][:, None])[:, None, :]
        C = (C + C.transpose(0, 2, 1)) / 2
        out[r : r + step] = np.sqrt(np.clip(np.linalg.eigvalsh(C)[:, ::-1], 0.0, None))
    return out


BATCH_FLOATS = 1 << 24
"""Most float64 entries (128 MiB) of replicate matrices held at once by :func:`weighted_singular_values`."""


def bootstrap_singular_values(moments: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """[R, d] singular values of R bootstrap replicates: groups drawn with replacement, their moments summed.

    moments: [G, d+1, d+1] packed per-group moments (:func:`group_moments`). Replicate r
    weights group g by its count c_rg ~ Multinomial(G, 1/G); its spectrum is that of the
    weighted sum, exactly what a pass over the resampled documents would give.
    """
    return weighted_singular_values(moments, replicate_weights(moments.shape[0], resamples, seed, "basic"))


def jackknife_singular_values(moments: np.ndarray) -> np.ndarray:
    """[G, d] singular values with each document group left out in turn."""
    G = moments.shape[0]
    return weighted_singular_values(moments, 1.0 - np.eye(G))


def nested_singular_values(moments: np.ndarray, divisors=NESTED) -> tuple[np.ndarray, np.ndarray]:
    """Singular values [m, d] and kept rows [m] of nested subsamples: the first ceil(G / q) groups for each
    divisor q (distinct sizes only, fewest first). Groups are consecutive documents in shuffled order, so
    each prefix is a sample of whole documents, and each holds the one before it."""
    G = moments.shape[0]
    sizes = sorted({min(G, -(-G // int(q))) for q in divisors})
    weights = np.array([np.arange(G) < s for s in sizes], dtype=np.float64)
    tokens = np.rint(weights @ moments[:, -1, -1]).astype(np.int64)
    return weighted_singular_values(moments, weights), tokens


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
                          key: dict | None = None, method: str = METHOD) -> Spectrum:
    """Spectrum from packed per-group moments [G, d+1, d+1] (:func:`group_moments`, or streamed by
    :mod:`attnspace.moments`): the groups summed give :func:`spectrum_from_gram`'s moments; with
    ``resamples`` > 0, that many replicates for the interval ``method`` drawn with ``seed``
    (:func:`replicate_weights`; the same for every site of a layer, so their replicates pair), the
    leave-one-group-out spectra where ``method`` needs them, and the nested subsamples' spectra
    (n_groups = G; without replicates n_groups = 0)."""
    total = moments.sum(axis=0)
    d = moments.shape[1] - 1
    spec = spectrum_from_gram(total[:d, :d], total[:d, d], int(round(total[d, d])), n_vectors=n_vectors)
    spec.key = key
    if resamples > 0:
        G = int(moments.shape[0])
        spec.boot_weights = replicate_weights(G, resamples, seed, method)
        spec.boot_singular_values = weighted_singular_values(moments, spec.boot_weights)
        spec.interval_method, spec.n_groups = method, G
        spec.group_tokens = moments[:, d, d].copy()
        if method == "bca":
            spec.jack_singular_values = jackknife_singular_values(moments)
        spec.nested_singular_values, spec.nested_n_tokens = nested_singular_values(moments)
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
    optional = {name: getattr(spec, name) for name in OPTIONAL_ARRAYS if getattr(spec, name) is not None}
    write_npz(path, format=np.array(FORMAT), singular_values=spec.singular_values.astype(np.float64),
              mean=spec.mean.astype(np.float64), components=spec.components.astype(np.float64),
              n_tokens=np.array(spec.n_tokens, dtype=np.int64), n_groups=np.array(spec.n_groups, dtype=np.int64),
              interval_method=np.array(spec.interval_method), **optional,
              **({f"key_{k}": np.array(v) for k, v in spec.key.items()} if spec.key else {}))


OPTIONAL_ARRAYS = ("boot_singular_values", "boot_weights", "group_tokens", "jack_singular_values",
                   "nested_singular_values", "nested_n_tokens")
"""Arrays a spectrum file holds only when the spectrum has them (replicates, nested subsamples)."""


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
            n_groups=int(z["n_groups"]) if "n_groups" in z else 0,
            interval_method=str(z["interval_method"]) if "interval_method" in z else "basic",
            **{name: z[name] if name in z else None for name in OPTIONAL_ARRAYS},
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
    """Lower end of the interval of k / d by ``method`` (:func:`fraction_interval`; NaN without replicates)."""
    fraction_hi: float
    """Upper end of that interval (NaN without replicates)."""
    level: float
    """Coverage of the interval (e.g. 0.9: built from the 5th and 95th percentiles of the replicates)."""
    resamples: int
    """Replicates behind the interval (0: none)."""
    n_groups: int
    """Document groups the replicates resample."""
    n_sv_above_5pct: int
    """Singular values above 5% of the largest (:func:`n_above_fraction_of_max`)."""
    method: str
    """The interval rule (:data:`attnspace.intervals.METHODS`; empty without replicates)."""
    fraction_corrected: float
    """The fraction corrected for bias by ``method`` (the centre its interval is built around; equal to
    ``fraction`` for a rule that corrects none; NaN without replicates)."""
    fraction_half: float
    """The fraction on the nested subsample of the first half of the document groups (NaN without)."""
    tokens_half: float
    """Kept rows of that subsample (NaN without)."""
    last_doubling_change: float
    """fraction - fraction_half: how far the estimate moved in the last doubling of tokens."""
    attn_minus_site: float
    """attn_out's fraction minus this site's at the same (model, dataset, layer, threshold), filled by
    :func:`intrinsic_dim_frame` (NaN for attn_out itself, or without attn_out)."""
    attn_minus_site_lo: float
    """Lower end of the paired interval of that difference (same replicates for both sites; NaN without)."""
    attn_minus_site_hi: float
    """Upper end of that paired interval."""


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
    ks = _ks(boot_singular_values, tau)
    if estimate is None:
        estimate = float(np.median(ks))
    got = interval(estimate, ks, level, "basic", bounds=(1, boot_singular_values.shape[1]))
    return got.lo, got.hi


def _ks(singular_values: np.ndarray, tau: float) -> np.ndarray:
    """[R] float64 intrinsic dimension at ``tau`` of each row of singular values [R, d]."""
    return np.array([intrinsic_dimension(s, tau) for s in singular_values], dtype=np.float64)


def _share(spec: Spectrum) -> float | None:
    """Mean share of the kept rows in a replicate (what ``subsampling`` rescales by); None without weights."""
    if spec.boot_weights is None or spec.group_tokens is None:
        return None
    return float(np.mean(spec.boot_weights @ spec.group_tokens) / spec.group_tokens.sum())


def _replicate_fractions(spec: Spectrum, tau: float) -> tuple[np.ndarray, np.ndarray | None]:
    """(fraction k/d of each replicate, of each leave-one-group-out spectrum or None)."""
    jack = None if spec.jack_singular_values is None else _ks(spec.jack_singular_values, tau) / spec.d
    return _ks(spec.boot_singular_values, tau) / spec.d, jack


def fraction_interval(spec: Spectrum, tau: float, level: float = LEVEL) -> Interval:
    """Interval and bias-corrected value of k/d at ``tau`` by the rule the spectrum's replicates serve
    (``spec.interval_method``), clipped to [1/d, 1]; :data:`NO_INTERVAL` without replicates."""
    if spec.boot_singular_values is None or len(spec.boot_singular_values) == 0:
        return NO_INTERVAL
    reps, jack = _replicate_fractions(spec, tau)
    estimate = intrinsic_dimension(spec.singular_values, tau) / spec.d
    return interval(estimate, reps, level, spec.interval_method, jackknife=jack, share=_share(spec),
                    bounds=(1 / spec.d, 1.0))


def paired_interval(a: Spectrum, b: Spectrum, tau: float, level: float = LEVEL) -> tuple[float, Interval]:
    """(k_a/d_a - k_b/d_b, its interval) at ``tau``: the rule applied to the differences of the two sites'
    replicates drawn with the same group weights (sites of one layer, one spectrum job), within [-1, 1].

    Raises AttnspaceError when the two were not resampled together (different weights or rules)."""
    diff = intrinsic_dimension(a.singular_values, tau) / a.d - intrinsic_dimension(b.singular_values, tau) / b.d
    if a.boot_weights is None or b.boot_weights is None:
        return diff, NO_INTERVAL
    if a.interval_method != b.interval_method or not np.array_equal(a.boot_weights, b.boot_weights):
        raise AttnspaceError(f"{a.key} and {b.key} were not resampled with the same document groups, so their "
                             "replicates do not pair", fix="recompute both spectra with the same spectrum.bootstrap "
                             "settings (snakemake --forcerun spectrum)")
    (ra, ja), (rb, jb) = _replicate_fractions(a, tau), _replicate_fractions(b, tau)
    jack = None if ja is None or jb is None else ja - jb
    return diff, interval(diff, ra - rb, level, a.interval_method, jackknife=jack, share=_share(a), bounds=(-1, 1))


def intrinsic_dim_rows(
    spec: Spectrum, *, model: str, dataset: str, layer: int, site: str, thresholds=THRESHOLDS, level: float = LEVEL,
) -> list[dict]:
    """Table rows (dicts with the fields of :class:`IntrinsicDimRow`), one per threshold; the paired
    columns are NaN here (:func:`intrinsic_dim_frame` fills them)."""
    d = spec.d
    above = n_above_fraction_of_max(spec.singular_values, 0.05)
    boot = spec.boot_singular_values
    resamples = 0 if boot is None else int(boot.shape[0])
    nested = spec.nested_singular_values
    half = nested is not None and len(nested) >= 2
    nan = float("nan")
    rows = []
    for tau in thresholds:
        k = intrinsic_dimension(spec.singular_values, float(tau))
        got = fraction_interval(spec, float(tau), level)
        f_half = intrinsic_dimension(nested[-2], float(tau)) / d if half else nan
        rows.append(
            asdict(
                IntrinsicDimRow(
                    model=model, dataset=dataset, layer=int(layer), site=site, d=d, n_tokens=spec.n_tokens,
                    threshold=float(tau), k=k, fraction=k / d, fraction_lo=got.lo, fraction_hi=got.hi,
                    level=float(level), resamples=resamples, n_groups=spec.n_groups, n_sv_above_5pct=above,
                    method=spec.interval_method if resamples else "", fraction_corrected=got.corrected,
                    fraction_half=f_half, tokens_half=float(spec.nested_n_tokens[-2]) if half else nan,
                    last_doubling_change=k / d - f_half, attn_minus_site=nan, attn_minus_site_lo=nan,
                    attn_minus_site_hi=nan,
                )
            )
        )
    return rows


def intrinsic_dim_frame(paths, thresholds=THRESHOLDS, level: float = LEVEL) -> pd.DataFrame:
    """results/tables/intrinsic_dim.csv: :func:`intrinsic_dim_rows` of every spectrum file, with the paired
    difference attn_out minus each other site of the same (model, dataset, layer) and its interval."""
    keyed = load_keyed(paths)
    attn = {(k["model"], k["dataset"], k["layer"]): s for k, s in keyed if k["site"] == "attn_out"}
    rows = []
    for key, spec in keyed:
        new = intrinsic_dim_rows(spec, **key, thresholds=thresholds, level=level)
        a = attn.get((key["model"], key["dataset"], key["layer"]))
        if a is not None and key["site"] != "attn_out":
            for row in new:
                diff, got = paired_interval(a, spec, row["threshold"], level)
                row.update(attn_minus_site=diff, attn_minus_site_lo=got.lo, attn_minus_site_hi=got.hi)
        rows += new
    return pd.DataFrame(rows)


def convergence_frame(paths, thresholds=THRESHOLDS) -> pd.DataFrame:
    """results/tables/id_convergence.csv: the intrinsic dimension of every spectrum file at each nested
    subsample (:func:`nested_singular_values`), one row per (model, dataset, layer, site, threshold,
    n_tokens): ``k``, ``fraction`` = k/d and ``share`` of the full sample's kept rows."""
    rows = []
    for key, spec in load_keyed(paths):
        if spec.nested_singular_values is None:
            continue
        for s, n in zip(spec.nested_singular_values, spec.nested_n_tokens):
            for tau in thresholds:
                k = intrinsic_dimension(s, float(tau))
                rows.append({**key, "d": spec.d, "threshold": float(tau), "n_tokens": int(n),
                             "share": int(n) / spec.n_tokens, "k": k, "fraction": k / spec.d})
    return pd.DataFrame(rows, columns=[*KEY_FIELDS, "d", "threshold", "n_tokens", "share", "k", "fraction"])
