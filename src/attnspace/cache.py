"""Fill the activation cache: one forward pass per document fills every site of
every configured layer of a (model, dataset), for both splits.

Each site is written at its own layers (``cache.layers``: e.g. attn_in only at the
focus layer), so a layer's store holds the sites cached there and its manifest lists
them. The forward stops after the deepest layer needed (``sites.capture``); each
(layer, split) gets one ``StoreWriter`` (one writer per array, whole shards).
Stores appear, with their manifests, only when complete. The SAE store is the same
driver on the ``sae`` split, at the focus layer only. With spectrum sites streamed
(``moment_sites``), the same forward of the train split also feeds a
:class:`attnspace.moments.MomentsAccumulator`, which keeps their per-document-group moments in
place of stores, and (``wo_moments_dir``) Figure 3's: attn_z's moments in one document group and the
check that Z and the weights give O (:func:`attnspace.wo_decomposition.reconstruction_maxima`).

Which stores a job writes: ``sites`` at ``layers`` (``site_layers`` narrowing some sites) in every
split of ``split_names``; or, given ``store_sites`` (spectrum.mode: streamed, where the config
decides per (model, dataset) what some stage reads: :func:`attnspace.config.stored_sites`), exactly
the sites and layers it names per split, a split it does not name storing nothing.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attnspace.corpora import SPLITS, TokenSplit, keep_mask
from attnspace.moments import CHECKPOINT_DOCS, MomentsAccumulator, document_group_of_docs, tokens_digest
from attnspace.sites import capture, site_width
from attnspace.store import StoreWriter


def store_path(out_dir: Path | str, layer: int, split: str) -> Path:
    """results/activations/{model}/{dataset}/L{layer}.zarr (train) or .../{split}/L{layer}.zarr
    (heldout, sae)."""
    out_dir = Path(out_dir)
    return (out_dir if split == "train" else out_dir / split) / f"L{layer}.zarr"


def cache_split(model, tokens: TokenSplit, writers: dict[int, StoreWriter], sites: list[str],
                special_ids: set[int], desc: str = "",
                moments: MomentsAccumulator | list[MomentsAccumulator] | None = None) -> None:
    """Run every document of ``tokens`` through ``model`` and append to each writer its own sites
    (those of ``sites`` it was opened with); add the moments of each accumulator's sites to it."""
    device = next(model.parameters()).device
    accumulators = [moments] if isinstance(moments, MomentsAccumulator) else list(moments or [])
    layers = sorted(set(writers).union(*(a.layers for a in accumulators)))
    captured = list(dict.fromkeys(list(sites) + [s for a in accumulators for s in a.sites]))
    bar = tqdm(total=tokens.n_tokens, desc=desc, unit="tok", mininterval=5, smoothing=0.1)
    for doc_i, (start, ids) in enumerate(zip(tokens.doc_starts[:-1], tokens.documents())):
        n = ids.shape[0]
        if not writers and accumulators and doc_i < min(a.next_doc for a in accumulators):
            bar.update(n)  # counted before a restart, and no store needs it
            continue
        acts = capture(model, torch.as_tensor(ids, dtype=torch.long, device=device)[None], layers, captured)
        meta = dict(token_id=ids.astype(np.int32), doc=np.full(n, doc_i, np.int32),
                    pos=np.arange(n, dtype=np.int32), keep=keep_mask(ids, special_ids))
        for layer in sorted(writers):
            writers[layer].append({s: acts[layer, s][0] for s in writers[layer].sites}, **meta)
        for a in accumulators:
            a.add(doc_i, acts, meta["keep"])
        bar.update(n)
    bar.close()


def layer_sites(layers: list[int], sites: list[str],
                site_layers: dict[str, list[int]] | None = None) -> dict[int, list[str]]:
    """{layer: the sites cached there}: every site at every layer of ``layers``, except that a
    site of ``site_layers`` is cached only at its own layers (among ``layers``). Layers left
    with no site get no store."""
    site_layers = site_layers or {}
    out = {layer: [s for s in sites if s not in site_layers or layer in site_layers[s]] for layer in layers}
    return {layer: chosen for layer, chosen in out.items() if chosen}


def split_layer_sites(layers: list[int], sites: list[str], site_layers: dict[str, list[int]] | None = None,
                      split_names: tuple[str, ...] = SPLITS,
                      store_sites: dict[str, dict[str, list[int]]] | None = None) -> dict[str, dict[int, list[str]]]:
    """{split: {layer: the sites stored there}} for each split of ``split_names``.

    Without ``store_sites``, every split stores :func:`layer_sites` of ``sites``. With it
    ({split: {site: [layers]}}), a split stores exactly its sites at their layers (among
    ``layers``), and a split it does not name stores nothing.
    """
    if store_sites is None:
        by_layer = layer_sites(layers, sites, site_layers) if sites else {}
        return {split: by_layer for split in split_names}
    chosen = {split: store_sites.get(split, {}) for split in split_names}
    return {split: layer_sites(layers, list(own), own) if own else {} for split, own in chosen.items()}


def wo_moment_sites(moment_sites: list[str]) -> list[str]:
    """The sites Figure 3's moments keep in their single group: attn_z, and attn_out unless the
    spectrum moments already have it (its groups are summed)."""
    return ["attn_z"] + ([] if "attn_out" in moment_sites else ["attn_out"])


def cache_activations(model, splits: dict[str, TokenSplit], out_dir: Path | str, *, model_name: str,
                      dataset: str, layers: list[int], sites: list[str], logical_dtype: str,
                      special_ids: set[int], chunk_rows: int, shard_rows: int,
                      config_hash: str = "", site_layers: dict[str, list[int]] | None = None,
                      split_names: tuple[str, ...] = SPLITS, moments_dir: Path | str | None = None,
                      moment_sites: list[str] = (), groups: int = 1,
                      checkpoint_docs: int = CHECKPOINT_DOCS,
                      store_sites: dict[str, dict[str, list[int]]] | None = None,
                      wo_moments_dir: Path | str | None = None, model_identity: str | None = None) -> list[dict]:
    """Cache ``sites`` at ``layers`` (a site of ``site_layers`` only at its own layers) for each
    split of ``split_names``, or exactly ``store_sites`` (:func:`split_layer_sites`); returns the
    manifests written.

    With ``moment_sites``, the train split's forward also accumulates their moments at every
    layer in at most ``groups`` document groups under ``moments_dir`` (:mod:`attnspace.moments`),
    checkpointed every ``checkpoint_docs`` documents. With ``wo_moments_dir``, it also keeps
    Figure 3's moments there (:func:`wo_moment_sites` in one group, and the reconstruction check).
    Their checkpoints name the token ids and ``model_identity`` (the prepared folder's,
    :func:`attnspace.models.recorded_identity`): a checkpoint of other tokens or another model is discarded.
    """
    by_split = split_layer_sites(layers, sites, site_layers, split_names, store_sites)
    widths = {s: site_width(model, s) for by_layer in by_split.values() for c in by_layer.values() for s in c}
    manifests = []
    for split in split_names:
        tokens = splits[split]
        by_layer = by_split[split]
        moments = []
        if split == "train" and (moment_sites or wo_moments_dir):
            keep = keep_mask(tokens.ids, special_ids)
            common = dict(model=model_name, dataset=dataset, layers=layers, n_tokens=tokens.n_tokens,
                          n_kept=int(keep.sum()), device=next(model.parameters()).device, config_hash=config_hash,
                          checkpoint_docs=checkpoint_docs,
                          inputs={"tokens": tokens_digest(tokens), "model": model_identity})
            if moment_sites:
                moments.append(MomentsAccumulator(
                    moments_dir, widths={s: site_width(model, s) for s in moment_sites},
                    doc_group=document_group_of_docs(tokens, special_ids, groups), **common))
            if wo_moments_dir:
                from attnspace.wo_decomposition import reconstruction_maxima

                moments.append(MomentsAccumulator(
                    wo_moments_dir, widths={s: site_width(model, s) for s in wo_moment_sites(list(moment_sites))},
                    doc_group=np.zeros(tokens.n_docs, dtype=np.int64),
                    maxima=reconstruction_maxima(model, layers), **common))
        if not by_layer and not moments:
            continue  # nothing of this split is asked for
        with ExitStack() as stack:
            writers = {
                layer: stack.enter_context(StoreWriter(
                    store_path(out_dir, layer, split), model=model_name, dataset=dataset, layer=layer,
                    split=split, n_rows=tokens.n_tokens, sites={s: widths[s] for s in chosen},
                    logical_dtype=logical_dtype, chunk_rows=chunk_rows, shard_rows=shard_rows,
                    config_hash=config_hash))
                for layer, chosen in by_layer.items()}  # none: moments only
            cache_split(model, tokens, writers, sorted({s for c in by_layer.values() for s in c}), special_ids,
                        desc=f"{model_name}/{dataset} {split}", moments=moments)
            manifests += [writers[layer].close() for layer in sorted(writers)]
        for accumulator in moments:
            accumulator.close()
    return manifests
