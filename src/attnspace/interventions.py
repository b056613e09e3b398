"""Loss recovered by principal components (Figure 2B).

For one site of one layer (``attn_out``, ``mlp_out`` or ``resid_post``), the site's
output x is replaced during the forward pass by its projection onto the top-k
principal directions around its mean (:func:`project`):

    x_k = mu + (x - mu) V_k^T V_k,

with mu [d] the site's mean and V_k [k, d] its top-k right singular vectors, both
from the spectrum stage (training split). Next-token loss is then measured on
held-out tokens, and the fraction of loss recovered (:func:`fraction_recovered`) is

    recovered(k) = (L_zero - L_k) / (L_zero - L_clean),

L_zero the loss with the site's output replaced by zeros (zero ablation, the
paper's baseline) and L_clean the unmodified model's loss. k = 0 is mean ablation;
k = d reproduces the clean model up to float round-off.

Positions. The replacement touches the rows the spectrum describes: every
position except BOS/EOS (``corpora.keep_mask``); BOS rows carry the model's
attention sink and are left as they are. The loss is the mean next-token
cross-entropy over positions t whose input token and target token t+1 are both
kept, pooled over all scored documents (nats per token).

Batching. All variants of one document (the clean model; per site, zero ablation
and every k) share the forward pass up to layer L: per group of ``batch`` variants
the prefix runs once with batch size 1, its hidden state is repeated ``batch``
times at the input of layer L, and each copy gets its own replacement at its site.
The forward stops at the output head's input; the head runs only on scored
positions, in row chunks, so no [batch, seq, vocab] logits tensor is ever formed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from attnspace.corpora import TokenSplit, keep_mask
from attnspace.sites import StopForward, decoder_layers, first_tensor, hooked_forward, site_module

SITES = ("attn_out", "mlp_out", "resid_post")
"""Sites that can be replaced (each is a module's output in ``attnspace.sites``)."""

_LOGIT_ELEMENTS = 2**25
"""Logits formed at once by the head (rows x vocab; 128 MiB in float32)."""


class SiteBasis(NamedTuple):
    """Principal directions of one site, from its spectrum."""

    mean: torch.Tensor
    """[d] mean of the site's kept rows."""
    components: torch.Tensor
    """[n_vec, d] right singular vectors as rows, by descending singular value."""


@dataclass(frozen=True)
class Variant:
    """One forward pass to score: the clean model, or one site replaced."""

    site: str | None = None
    """The replaced site; None for the clean model."""
    k: int | None = None
    """Principal directions kept; None with a site (and no ``replace``) means zero ablation."""
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Any replacement of the site's rows [T, d] -> [T, d] (e.g. an SAE's reconstruction); overrides k."""


@dataclass
class LossRecoveredRow:
    """One point of the Figure 2B curve (one site, one k)."""

    model: str
    dataset: str
    layer: int
    site: str
    k: int
    """Principal directions kept (0 = mean ablation)."""
    k_fraction: float
    """k / d."""
    loss: float
    """Mean next-token loss (nats) with the site projected onto k directions."""
    loss_clean: float
    """Same tokens, unmodified model."""
    loss_zero: float
    """Same tokens, the site zeroed (zero ablation)."""
    recovered: float
    """(loss_zero - loss) / (loss_zero - loss_clean): :func:`fraction_recovered`."""


def fraction_recovered(loss, loss_clean, loss_zero):
    """(L_zero - L) / (L_zero - L_clean): 1 = clean model, 0 = zero ablation. The one definition."""
    return (np.asarray(loss_zero) - np.asarray(loss)) / (np.asarray(loss_zero) - np.asarray(loss_clean))


def k_grid(d: int, dense: int = 4, log_points: int = 8, linear_points: int = 10) -> list[int]:
    """Sorted distinct k in [0, d]: every k up to ``dense``, then ``log_points`` log-spaced
    up to d / linear_points, then ``linear_points`` evenly spaced (d/n, 2d/n, ..., d), which
    resolve the upper range where MLP outputs and residual streams cross 95%.
    Always holds 0 and d.
    """
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    ks = set(range(min(dense, d) + 1)) | {d}
    top = d / linear_points if linear_points > 0 else d
    if log_points > 0 and dense + 1 < top:
        ks |= {int(round(k)) for k in np.geomspace(dense + 1, top, log_points)}
    if linear_points > 0:
        ks |= {int(round(d * j / linear_points)) for j in range(1, linear_points + 1)}
    return sorted(ks)


def project(x: torch.Tensor, basis: SiteBasis, k: int) -> torch.Tensor:
    """mu + (x - mu) V_k^T V_k for x [..., d]: the replacement of one site (float64 inside)."""
    mean = basis.mean.to(x.device, torch.float64)
    v = basis.components[:k].to(x.device, torch.float64)
    y = mean + ((x.to(torch.float64) - mean) @ v.T) @ v
    return y.to(x.dtype)


def basis_from_spectrum(spec) -> SiteBasis:
    """The :class:`SiteBasis` of a ``spectrum.Spectrum`` (mean and right singular vectors)."""
    return SiteBasis(torch.from_numpy(np.asarray(spec.mean, dtype=np.float64)),
                     torch.from_numpy(np.asarray(spec.components, dtype=np.float64)))


def heldout_documents(split: TokenSplit, n_tokens: int) -> list[np.ndarray]:
    """The first documents of ``split`` holding ``n_tokens`` tokens (the last one cut to fit)."""
    docs, count = [], 0
    for ids in split.documents():
        if count >= n_tokens:
            break
        ids = ids[: n_tokens - count]
        if ids.shape[0] >= 2:  # a lone token predicts nothing
            docs.append(ids)
        count += ids.shape[0]
    return docs


def scored_positions(ids: np.ndarray, special_ids: set[int]) -> np.ndarray:
    """Positions t [n_scored] whose input ids[t] and target ids[t+1] are both kept (not BOS/EOS)."""
    keep = keep_mask(ids, special_ids)
    return np.flatnonzero(keep[:-1] & keep[1:])


def _replace(x: torch.Tensor, variants: Sequence[Variant], basis: SiteBasis | None,
             keep: torch.Tensor) -> torch.Tensor:
    """x [g, T, d] with copy j, at kept positions, replaced as variants[j] says.

    A ``replace`` function, else a projection onto k directions, else zeros.
    """
    def one(x_j: torch.Tensor, v: Variant) -> torch.Tensor:
        if v.replace is not None:
            return v.replace(x_j).to(x_j.dtype)
        return torch.zeros_like(x_j) if v.k is None else project(x_j, basis, v.k)

    y = torch.stack([one(x[j], v) for j, v in enumerate(variants)])
    return torch.where(keep[None, :, None], y, x)


def _final_hidden(model, input_ids: torch.Tensor, layer: int, group: Sequence[Variant],
                  bases: dict[str, SiteBasis], keep: torch.Tensor) -> torch.Tensor:
    """Hidden states entering the output head [len(group), T, d], one copy per variant.

    input_ids: [1, T]; keep: bool [T]. The layers before ``layer`` run once (batch 1).
    """
    blocks = decoder_layers(model)
    size = len(group)
    found: dict[str, torch.Tensor] = {}

    def fan_out(module, args, kwargs):
        if args:
            return (args[0].expand(size, *args[0].shape[1:]).contiguous(), *args[1:]), kwargs
        h = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": h.expand(size, *h.shape[1:]).contiguous()}

    def replace(site: str):
        rows = [j for j, v in enumerate(group) if v.site == site]
        index = torch.tensor(rows, device=input_ids.device)
        chosen = [group[j] for j in rows]

        def hook(module, args, output):
            x = first_tensor(output).clone()
            x[index] = _replace(x[index], chosen, bases.get(site), keep)
            return (x, *output[1:]) if isinstance(output, tuple) else x

        return hook

    def stop(module, args):
        found["h"] = args[0]
        raise StopForward

    hooks = [(blocks[layer], fan_out, "pre_kwargs")]
    for site in dict.fromkeys(v.site for v in group if v.site is not None):
        hooks.append((site_module(model, layer, site), replace(site), "forward"))
    hooks.append((model.get_output_embeddings(), stop, "pre"))
    hooked_forward(model, hooks, input_ids=input_ids)
    if "h" not in found:
        raise RuntimeError("the forward pass never reached the output head")
    return found["h"]


def _loss_sums(model, hidden: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Summed next-token cross-entropy per copy: hidden [g, P, d], targets [P] -> float64 [g].

    Applies the output head and, where the model has one, its final logit soft-capping
    (Gemma 2), as the model's own forward does.
    """
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    g, p, d = hidden.shape
    rows = hidden.reshape(g * p, d)
    tgt = targets.repeat(g)
    step = max(1, _LOGIT_ELEMENTS // head.weight.shape[0])
    losses = torch.empty(g * p, dtype=torch.float64)
    with torch.no_grad():
        for a in range(0, g * p, step):
            logits = head(rows[a : a + step]).float()
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            losses[a : a + step] = F.cross_entropy(logits, tgt[a : a + step], reduction="none").double().cpu()
    return losses.view(g, p).sum(dim=1).numpy()


def variant_losses(model, documents: Sequence[np.ndarray], layer: int, variants: Sequence[Variant],
                   bases: dict[str, SiteBasis], special_ids: set[int], batch: int = 16) -> tuple[np.ndarray, int]:
    """Mean next-token loss (nats) of each variant over the scored positions of ``documents``.

    documents: int token ids [T_j], each starting with BOS; bases: a :class:`SiteBasis` per
    replaced site. Returns (losses [len(variants)] float64, scored positions). Call
    ``model.eval()`` first.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    for v in variants:
        if v.site is not None:
            if v.site not in SITES:
                raise ValueError(f"cannot replace site {v.site!r}; replaceable sites: {list(SITES)}")
            if v.k is not None and v.replace is None and v.site not in bases:
                raise ValueError(f"no principal directions given for site {v.site!r}")
            if v.k is not None and v.replace is None and not 0 <= v.k <= bases[v.site].components.shape[0]:
                raise ValueError(f"k = {v.k} for {v.site!r} outside [0, {bases[v.site].components.shape[0]}] "
                                 "(the spectrum's vectors; set spectrum.n_vectors: null to keep all d)")
    device = next(model.parameters()).device
    bases = {s: SiteBasis(b.mean.to(device, torch.float64), b.components.to(device, torch.float64))
             for s, b in bases.items()}
    sums = np.zeros(len(variants), dtype=np.float64)
    n_scored = 0
    for ids in documents:
        pos = scored_positions(ids, special_ids)
        if pos.size == 0:
            continue
        input_ids = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=device)[None]
        keep = torch.as_tensor(keep_mask(ids, special_ids), device=device)
        pos_t = torch.as_tensor(pos, device=device)
        targets = input_ids[0, pos_t + 1]
        for a in range(0, len(variants), batch):
            group = variants[a : a + batch]
            hidden = _final_hidden(model, input_ids, layer, group, bases, keep)
            sums[a : a + len(group)] += _loss_sums(model, hidden[:, pos_t], targets)
        n_scored += int(pos.size)
    if n_scored == 0:
        raise ValueError("no scored positions: every document is shorter than two kept tokens")
    return sums / n_scored, n_scored


def loss_recovered(model, documents: Sequence[np.ndarray], layer: int, bases: dict[str, SiteBasis],
                   ks: dict[str, Sequence[int]], special_ids: set[int], *, model_name: str, dataset: str,
                   batch: int = 16) -> tuple[list[dict], int]:
    """Figure 2B's curve for every site of ``bases`` at ``layer``.

    ks: the k grid per site. Returns (rows with the fields of :class:`LossRecoveredRow`,
    scored positions). The clean loss is computed once and shared by every site.
    """
    sites = list(bases)
    variants = [Variant()] + [Variant(s) for s in sites] + [Variant(s, int(k)) for s in sites for k in ks[s]]
    losses, n_scored = variant_losses(model, documents, layer, variants, bases, special_ids, batch=batch)
    clean = float(losses[0])
    zero = {s: float(losses[1 + i]) for i, s in enumerate(sites)}
    rows = []
    for v, loss in zip(variants[1 + len(sites):], losses[1 + len(sites):]):
        d = int(bases[v.site].mean.shape[0])
        rows.append(asdict(LossRecoveredRow(
            model=model_name, dataset=dataset, layer=int(layer), site=v.site, k=v.k, k_fraction=v.k / d,
            loss=float(loss), loss_clean=clean, loss_zero=zero[v.site],
            recovered=float(fraction_recovered(loss, clean, zero[v.site])))))
    return rows, n_scored


def k_at_recovery(k: np.ndarray, recovered: np.ndarray, target: float = 0.95) -> float:
    """Smallest k at which the curve reaches ``target``, linearly interpolated between grid points.

    k: sorted grid [m]; recovered: [m]. The first grid point at or above ``target`` and
    the one before it bracket the crossing. NaN if the curve never reaches it.
    """
    k = np.asarray(k, dtype=np.float64)
    r = np.asarray(recovered, dtype=np.float64)
    hit = np.flatnonzero(r >= target)
    if hit.size == 0:
        return float("nan")
    j = int(hit[0])
    if j == 0:
        return float(k[0])
    k0, k1, r0, r1 = k[j - 1], k[j], r[j - 1], r[j]
    return float(k0 + (target - r0) * (k1 - k0) / (r1 - r0))


def recovery_summary(curves: pd.DataFrame, target: float = 0.95) -> pd.DataFrame:
    """Per (model, dataset, layer, site): the fraction of dimensions that recovers ``target``.

    curves: rows of :class:`LossRecoveredRow`. Columns: model, dataset, layer, site, d,
    target, k (interpolated, :func:`k_at_recovery`), k_fraction (= k / d), loss_clean,
    loss_zero.
    """
    out = []
    for (model, dataset, layer, site), g in curves.groupby(["model", "dataset", "layer", "site"], sort=False):
        g = g.sort_values("k")
        d = int(round(g["k"].iloc[-1] / g["k_fraction"].iloc[-1]))
        k = k_at_recovery(g["k"].to_numpy(), g["recovered"].to_numpy(), target)
        out.append(dict(model=model, dataset=dataset, layer=int(layer), site=site, d=d, target=target,
                        k=k, k_fraction=k / d, loss_clean=float(g["loss_clean"].iloc[0]),
                        loss_zero=float(g["loss_zero"].iloc[0])))
    return pd.DataFrame(out)


def run_loss_recovered(model, split: TokenSplit, special_ids: set[int], layer: int, bases: dict[str, SiteBasis],
                       *, model_name: str, dataset: str, n_tokens: int, grid: dict | None = None,
                       batch: int = 16, log=None) -> pd.DataFrame:
    """The whole stage for one (model, dataset, layer): held-out documents, k grids
    (:func:`k_grid` with ``grid`` as keywords), curves as a table of :class:`LossRecoveredRow`."""
    docs = heldout_documents(split, n_tokens)
    ks = {s: k_grid(int(b.mean.shape[0]), **(grid or {})) for s, b in bases.items()}
    t0 = time.time()
    rows, n_scored = loss_recovered(model, docs, layer, bases, ks, special_ids, model_name=model_name,
                                    dataset=dataset, batch=batch)
    if log is not None:
        n_var = 1 + sum(len(k) + 1 for k in ks.values())
        log.info("%d variants x %d scored tokens (%d documents, %d of %d tokens asked for) in %.0f s", n_var,
                 n_scored, len(docs), sum(map(len, docs)), n_tokens, time.time() - t0)
    return pd.DataFrame(rows)


def spliced_lm_eval(model, tokens_path: str, layer: int, site: str, n_tokens: int):
    """An SAE's ``lm_eval`` hook: LM loss on held-out tokens with ``site`` replaced.

    Returns a callable taking the SAE's raw-scale reconstruction function and returning
    delta_lm_loss (spliced - clean, nats) and lm_loss_recovered (vs zero ablation).
    """
    from attnspace.corpora import load_tokens

    splits, meta = load_tokens(tokens_path)
    documents = heldout_documents(splits["heldout"], n_tokens)
    special = set(meta["special_ids"])

    def lm_eval(reconstruct) -> dict:
        variants = [Variant(), Variant(site), Variant(site, replace=reconstruct)]
        (clean, zero, spliced), n_scored = variant_losses(model, documents, layer, variants, {}, special, batch=3)
        return dict(lm_loss_clean=float(clean), lm_loss_zero=float(zero), lm_loss_spliced=float(spliced),
                    delta_lm_loss=float(spliced - clean),
                    lm_loss_recovered=float(fraction_recovered(spliced, clean, zero)), lm_eval_tokens=n_scored)

    return lm_eval
