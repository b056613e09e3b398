"""Where the low rank of attention outputs comes from (Figure 3): the W^O decomposition.

The attention output is O = Z W^O + b, with Z [n, d_z] the concatenated head outputs
entering the output projection (site ``attn_z``), W^O = o_proj.weight^T [d_z, d] and
b the projection's bias where it has one (GPT-NeoX); d_z = n_heads * head_dim need not
equal d (Gemma 3 270M: 1024 against 640). The bias moves the mean only.

Along a unit direction e [d], with v = W^O e and v_hat = v / ||v||,

    Var(O e) = Var(Z v) = Var(Z v_hat) * ||v||^2,

the Z contribution times the W^O contribution. :func:`decompose` evaluates the three
terms along every right singular vector e_i of the centred O, so that
Var(O e_i) = s_i^2 / n. Variances are population variances (divided by n) over the
kept rows (no BOS/EOS) of the training split, the rows the spectra use.

Beyond the paper's figure, :func:`wo_spectrum` and :func:`layer_summary` describe
W^O itself: its singular values, how Z's variance spreads over its input directions
(weakest directions and null space included), the intrinsic dimension O would have
with either factor made isotropic, and how much the heads' output subspaces overlap.

Two sources give the same tables (to float64 rounding): the cached stores of attn_z and
attn_out (:func:`analyse`; spectrum.mode: stored), or the moments the caching job streamed
(:func:`analyse_moments`; spectrum.mode: streamed): attn_z's Gram matrix in one document group,
attn_out's from the spectrum moments, and the reconstruction check's maxima taken in the forward
(:func:`reconstruction_maxima`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from attnspace.spectrum import THRESHOLD, Spectrum, gram, intrinsic_dimension, spectrum_from_gram
from attnspace.store import Store


@dataclass
class Decomposition:
    """The three curves of Figure 3 for one layer, indexed by i (descending s_i)."""

    var_o: np.ndarray
    """[m] Var(O e_i) = s_i^2 / n."""
    wo_contrib: np.ndarray
    """[m] ||W^O e_i||^2."""
    z_contrib: np.ndarray
    """[m] Var(Z v_i), v_i = W^O e_i / ||W^O e_i||."""


def covariance(store: Store, site: str, threads: int = 1) -> np.ndarray:
    """Covariance [w, w] (float64, divided by n) of the kept rows of ``site``, in one pass."""
    return covariance_from_gram(*gram(store.dask(site), store.keep(), threads=threads))


def covariance_from_gram(G: np.ndarray, colsum: np.ndarray, n: int) -> np.ndarray:
    """Covariance [w, w] (float64, divided by n) from the uncentred moments X^T X, column sums and n."""
    cov = (G - np.outer(colsum, colsum / n)) / n
    return (cov + cov.T) / 2


def unpack_moments(total: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(X^T X [d, d], colsum [d], n) from packed moments [[X^T X, colsum], [colsum^T, n]] [d+1, d+1]."""
    d = total.shape[0] - 1
    return total[:d, :d], total[:d, d], int(round(total[d, d]))


def decompose(o_spec: Spectrum, cov_z: np.ndarray, w_o: np.ndarray) -> Decomposition:
    """Figure 3's terms along the right singular vectors of the centred O.

    o_spec: spectrum of O (its components e_i as rows [m, d], singular values, n);
    cov_z: [d_z, d_z] covariance of Z over the same rows; w_o: W^O [d_z, d].
    """
    e = np.asarray(o_spec.components, dtype=np.float64)
    v = e @ np.asarray(w_o, dtype=np.float64).T  # [m, d_z]: row i is W^O e_i
    wo = np.einsum("ij,ij->i", v, v)
    v_hat = v / np.sqrt(wo)[:, None]
    z = np.sum((v_hat @ cov_z) * v_hat, axis=1)
    var_o = o_spec.singular_values[: e.shape[0]] ** 2 / o_spec.n_tokens
    return Decomposition(var_o=var_o, wo_contrib=wo, z_contrib=z)


def wo_spectrum(w_o: np.ndarray, cov_z: np.ndarray) -> pd.DataFrame:
    """W^O's singular values and the share of Z's variance along each of its input directions.

    w_o: [d_z, d]. One row per direction j of Z's space (d_z rows): ``sv`` (0 for the
    d_z - rank directions of the null space, which W^O discards), ``rel_sv`` = sv / sv_1,
    and ``z_var_fraction`` = u_j^T Cov(Z) u_j / tr Cov(Z) for the left singular vector u_j.
    """
    u, s, _ = np.linalg.svd(np.asarray(w_o, dtype=np.float64), full_matrices=True)
    sv = np.zeros(u.shape[0])
    sv[: s.shape[0]] = s
    share = np.sum(u * (cov_z @ u), axis=0) / np.trace(cov_z)
    return pd.DataFrame({"j": np.arange(1, sv.shape[0] + 1), "sv": sv, "rel_sv": sv / sv[0],
                         "z_var_fraction": share})


def head_overlap(w: np.ndarray, n_heads: int) -> float:
    """Mean over head pairs of ||Q_a^T Q_b||_F^2 / p: the mean squared cosine of the
    principal angles between two heads' output subspaces in R^d.

    w: o_proj.weight [d, d_z]; head a writes through columns a*p:(a+1)*p, p = d_z / n_heads;
    Q_a is an orthonormal basis of their span. 0: orthogonal heads; 1: one shared
    subspace; two random p-dimensional subspaces give about p / d.
    """
    w = np.asarray(w, dtype=np.float64)
    p = w.shape[1] // n_heads
    bases = []
    for a in range(n_heads):
        q, s, _ = np.linalg.svd(w[:, a * p : (a + 1) * p], full_matrices=False)
        bases.append(q[:, s > s[0] * 1e-10])
    if n_heads < 2:
        return float("nan")
    vals = [np.sum((bases[a].T @ bases[b]) ** 2) / min(bases[a].shape[1], bases[b].shape[1])
            for a in range(n_heads) for b in range(a + 1, n_heads)]
    return float(np.mean(vals))


@dataclass
class LayerSummary:
    """What one layer's W^O does to Z (one row of ``wo_summary.csv``)."""

    model: str
    dataset: str
    layer: int
    d_model: int
    d_z: int
    n_heads: int
    head_dim: int
    threshold: float
    """Variance threshold tau of the intrinsic dimensions below."""
    id_o: float
    """Intrinsic dimension of O at tau, / d_model."""
    id_z: float
    """Intrinsic dimension of Z at tau, / d_z."""
    id_o_white_z: float
    """O's, / d_model, if Z were white (Cov Z = I): the spectrum of W^O alone."""
    id_o_flat_wo: float
    """O's, / d_model, if W^O's singular values were all 1 (same singular vectors)."""
    wo_condition: float
    """sv_1 / sv_r of W^O over its rank r = min(d_z, d_model) directions."""
    wo_participation: float
    """(sum sv^2)^2 / sum sv^4 / r: W^O's effective rank as a fraction (1 = isotropic)."""
    z_var_weakest_half: float
    """Share of Z's variance along W^O's weakest half of input directions (null space included; 0.5 if Z were white)."""
    wo_below_5pct: float
    """Fraction of Z's d_z directions that W^O scales by less than 5% of its largest singular value (null space included)."""
    z_var_below_5pct: float
    """Share of Z's variance along those directions."""
    z_var_null: float
    """Share of Z's variance in W^O's null space (only when d_z > d_model)."""
    head_overlap: float
    """:func:`head_overlap`."""
    head_overlap_random: float
    """head_dim / d_model: the overlap of random subspaces of that size."""
    o_rel_error: float
    """max |Z W^O + b - O| / max |O| over the cached rows: the cache agrees with the weights."""
    identity_rel_error: float
    """max_i |Var(O e_i) - Var(Z v_i) ||v||^2| / max_i Var(O e_i)."""


def _id_fraction(eigenvalues: np.ndarray, tau: float, d: int) -> float:
    s = np.sqrt(np.clip(np.sort(np.asarray(eigenvalues))[::-1], 0.0, None))
    return intrinsic_dimension(s, tau) / d


def reconstruction_error(store: Store, w: np.ndarray, bias: np.ndarray | None, rows: int = 4096) -> float:
    """max |Z W^O + b - O| / max |O| over every row of the store (BOS/EOS included)."""
    w = np.asarray(w, dtype=np.float64)
    worst, scale = 0.0, 0.0
    for a in range(0, store.n_rows, rows):
        z = store.rows("attn_z", a, a + rows, kept_only=False).astype(np.float64)
        o = store.rows("attn_out", a, a + rows, kept_only=False).astype(np.float64)
        o_hat = z @ w.T + (0.0 if bias is None else bias)
        worst = max(worst, float(np.abs(o_hat - o).max()))
        scale = max(scale, float(np.abs(o).max()))
    return worst / scale


def reconstruction_maxima(model, layers: list[int]) -> dict:
    """Figure 3's reconstruction check, taken in the caching forward (spectrum.mode: streamed).

    Per layer L, two functions of one document's activations ``acts[(L, site)]`` [1, rows, width]:
    ``L{L}/o_error`` = max |Z W^O + b - O| and ``L{L}/o_scale`` = max |O| over every row (BOS/EOS
    included), in float64 on the model's device. Their maxima over a split's documents, divided,
    are :func:`reconstruction_error` of that split's store (:class:`attnspace.moments.MomentsAccumulator`
    keeps them).
    """
    from attnspace.sites import output_projection

    out = {}
    for layer in layers:
        w, bias = output_projection(model, layer)
        w = w.detach().double()
        bias = None if bias is None else bias.detach().double()

        def error(acts, layer=layer, w=w, bias=bias):
            z, o = acts[layer, "attn_z"][0].double(), acts[layer, "attn_out"][0].double()
            o_hat = z @ w.T + (0.0 if bias is None else bias)
            return float((o_hat - o).abs().max())

        def scale(acts, layer=layer):
            return float(acts[layer, "attn_out"][0].double().abs().max())

        out[f"L{layer}/o_error"], out[f"L{layer}/o_scale"] = error, scale
    return out


def analyse_layer(store: Store, w: np.ndarray, bias: np.ndarray | None, n_heads: int, *, threads: int = 1,
                  tau: float = THRESHOLD) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Decomposition, W^O spectrum and summary of one cached layer.

    w: o_proj.weight [d_model, d_z] (W^O = w^T); bias: [d_model] or None.
    Returns (decomposition rows: i, var_o, wo_contrib, z_contrib; W^O spectrum rows
    (:func:`wo_spectrum`); summary fields of :class:`LayerSummary` without the keys).
    """
    o_spec = spectrum_from_gram(*gram(store.dask("attn_out"), store.keep(), threads=threads))
    cov_z = covariance(store, "attn_z", threads)
    return layer_tables(o_spec, cov_z, w, n_heads, reconstruction_error(store, w, bias), tau=tau)


def layer_tables(o_spec: Spectrum, cov_z: np.ndarray, w: np.ndarray, n_heads: int, o_rel_error: float, *,
                 tau: float = THRESHOLD) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """:func:`analyse_layer`'s tables from O's spectrum, Z's covariance over the same rows, the
    weights w = o_proj.weight [d_model, d_z] and the reconstruction check's value."""
    w = np.asarray(w, dtype=np.float64)
    d, d_z = w.shape
    w_o = w.T
    dec = decompose(o_spec, cov_z, w_o)
    decomposition = pd.DataFrame({"i": np.arange(1, dec.var_o.shape[0] + 1), "var_o": dec.var_o,
                                  "wo_contrib": dec.wo_contrib, "z_contrib": dec.z_contrib})
    spec = wo_spectrum(w_o, cov_z)
    r = min(d, d_z)
    sv = spec["sv"].to_numpy()[:r]
    u = np.linalg.svd(w_o, full_matrices=False)[0]  # u [d_z, r]: W^O's input directions
    flat = np.linalg.eigvalsh(u.T @ cov_z @ u)  # Cov of Z u: O's spectrum with W^O's gains set to 1
    z_share = spec["z_var_fraction"].to_numpy()
    weak = spec["sv"].to_numpy() < 0.05 * sv[0]
    summary = dict(
        d_model=d, d_z=d_z, n_heads=n_heads, head_dim=d_z // n_heads, threshold=tau,
        id_o=intrinsic_dimension(o_spec.singular_values, tau) / d,
        id_z=_id_fraction(np.linalg.eigvalsh(cov_z), tau, d_z),
        id_o_white_z=_id_fraction(sv**2, tau, d),
        id_o_flat_wo=_id_fraction(flat, tau, d),
        wo_condition=float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf"),
        wo_participation=float((sv**2).sum() ** 2 / (sv**4).sum() / r),
        z_var_weakest_half=float(z_share[d_z - d_z // 2 :].sum()),
        wo_below_5pct=float(np.mean(weak)),
        z_var_below_5pct=float(z_share[weak].sum()),
        z_var_null=float(z_share[r:].sum()),
        head_overlap=head_overlap(w, n_heads),
        head_overlap_random=(d_z // n_heads) / d,
        o_rel_error=o_rel_error,
        identity_rel_error=float(np.abs(dec.var_o - dec.z_contrib * dec.wo_contrib).max() / dec.var_o.max()),
    )
    return decomposition, spec, summary


def analyse(model, stores: list[Store], *, model_name: str, dataset: str, threads: int = 1,
            tau: float = THRESHOLD) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """:func:`analyse_layer` for every store of one (model, dataset), with the model's weights.

    Returns three tables: decomposition (model, dataset, layer, i, var_o, wo_contrib,
    z_contrib), W^O spectrum (model, dataset, layer, j, sv, rel_sv, z_var_fraction) and
    summary (:class:`LayerSummary`).
    """
    n_heads = model.config.get_text_config().num_attention_heads
    layers = []
    for store in stores:
        w, bias = _weights(model, store.layer)
        layers.append((store.layer, analyse_layer(store, w, bias, n_heads, threads=threads, tau=tau)))
    return _tables(layers, model_name, dataset)


def analyse_moments(model, records: list[Path | str], layers: list[int], *, model_name: str, dataset: str,
                    tau: float = THRESHOLD) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """:func:`analyse`'s three tables from streamed moments (spectrum.mode: streamed), at ``layers``.

    ``records``: moments records (moments.json) of the (model, dataset); each site's moments come
    from the first record that holds them, summed over its document groups. One of them must carry
    the reconstruction check's maxima (``maxima``, :func:`reconstruction_maxima`).
    """
    from attnspace.moments import MomentsError, record_holds, summed_moments

    n_heads = model.config.get_text_config().num_attention_heads

    def moments_of(layer: int, site: str) -> tuple[np.ndarray, dict]:
        for record in records:
            if record_holds(record, layer, site):
                return summed_moments(record, layer, site)
        raise MomentsError(f"none of the moments records {[str(r) for r in records]} holds {site} at layer "
                           f"{layer}. Fix: rm -f {' '.join(map(str, records))} and rerun snakemake "
                           "(the cache rule streams Figure 3's moments)")

    tables = []
    for layer in layers:
        w, _ = _weights(model, layer)
        o_total, _ = moments_of(layer, "attn_out")
        z_total, rec = moments_of(layer, "attn_z")
        maxima = rec.get("maxima") or {}
        if f"L{layer}/o_error" not in maxima:
            raise MomentsError(f"{records}: no reconstruction check recorded at layer {layer}. "
                               f"Fix: rm -f {' '.join(map(str, records))} and rerun snakemake")
        o_rel_error = maxima[f"L{layer}/o_error"] / maxima[f"L{layer}/o_scale"]
        o_spec = spectrum_from_gram(*unpack_moments(o_total))
        cov_z = covariance_from_gram(*unpack_moments(z_total))
        tables.append((layer, layer_tables(o_spec, cov_z, w, n_heads, o_rel_error, tau=tau)))
    return _tables(tables, model_name, dataset)


def _weights(model, layer: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(o_proj.weight [d_model, d_z], its bias or None) of ``layer``, in float64."""
    from attnspace.sites import output_projection

    w, bias = output_projection(model, layer)  # a Conv1D's weight comes transposed
    return w.detach().double().cpu().numpy(), None if bias is None else bias.detach().double().cpu().numpy()


def _tables(layers: list, model_name: str, dataset: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The three tables from [(layer, (decomposition, W^O spectrum, summary fields))], keyed by
    model, dataset and layer."""
    decs, specs, sums = [], [], []
    for layer, (dec, spec, summary) in layers:
        key = dict(model=model_name, dataset=dataset, layer=layer)
        decs.append(dec.assign(**key)[list(key) + list(dec.columns)])
        specs.append(spec.assign(**key)[list(key) + list(spec.columns)])
        sums.append(asdict(LayerSummary(**key, **summary)))
    return (pd.concat(decs, ignore_index=True), pd.concat(specs, ignore_index=True), pd.DataFrame(sums))
