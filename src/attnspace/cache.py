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
place of stores.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attnspace.corpora import SPLITS, TokenSplit, keep_mask
from attnspace.moments import CHECKPOINT_DOCS, MomentsAccumulator, document_group_of_docs
from attnspace.sites import capture, site_width
from attnspace.store import StoreWriter


def store_path(out_dir: Path | str, layer: int, split: str) -> Path:
    """results/activations/{model}/{dataset}/L{layer}.zarr (train) or .../{split}/L{layer}.zarr
    (heldout, sae)."""
    out_dir = Path(out_dir)
    return (out_dir if split == "train" else out_dir / split) / f"L{layer}.zarr"


def cache_split(model, tokens: TokenSplit, writers: dict[int, StoreWriter], sites: list[str],
                special_ids: set[int], desc: str = "", moments: MomentsAccumulator | None = None) -> None:
    """Run every document of ``tokens`` through ``model`` and append to each writer its own sites
    (those of ``sites`` it was opened with); add the moments of ``moments.sites`` to ``moments``."""
    device = next(model.parameters()).device
    layers = sorted(set(writers) | set(moments.layers if moments else ()))
    captured = list(dict.fromkeys(list(sites) + (moments.sites if moments else [])))
    bar = tqdm(total=tokens.n_tokens, desc=desc, unit="tok", mininterval=5, smoothing=0.1)
    for doc_i, (start, ids) in enumerate(zip(tokens.doc_starts[:-1], tokens.documents())):
        n = ids.shape[0]
        if not writers and moments is not None and doc_i < moments.next_doc:
            bar.update(n)  # counted before a restart, and no store needs it
            continue
        acts = capture(model, torch.as_tensor(ids, dtype=torch.long, device=device)[None], layers, captured)
        meta = dict(token_id=ids.astype(np.int32), doc=np.full(n, doc_i, np.int32),
                    pos=np.arange(n, dtype=np.int32), keep=keep_mask(ids, special_ids))
        for layer in sorted(writers):
            writers[layer].append({s: acts[layer, s][0] for s in writers[layer].sites}, **meta)
        if moments is not None:
            moments.add(doc_i, acts, meta["keep"])
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


def cache_activations(model, splits: dict[str, TokenSplit], out_dir: Path | str, *, model_name: str,
                      dataset: str, layers: list[int], sites: list[str], logical_dtype: str,
                      special_ids: set[int], chunk_rows: int, shard_rows: int,
                      config_hash: str = "", site_layers: dict[str, list[int]] | None = None,
                      split_names: tuple[str, ...] = SPLITS, moments_dir: Path | str | None = None,
                      moment_sites: list[str] = (), groups: int = 1,
                      checkpoint_docs: int = CHECKPOINT_DOCS) -> list[dict]:
    """Cache ``sites`` at ``layers`` (a site of ``site_layers`` only at its own layers) for each
    split of ``split_names``; returns the manifests written.

    With ``moment_sites``, the train split's forward also accumulates their moments at every
    layer in at most ``groups`` document groups under ``moments_dir`` (:mod:`attnspace.moments`),
    checkpointed every ``checkpoint_docs`` documents.
    """
    by_layer = layer_sites(layers, sites, site_layers) if sites else {}
    widths = {s: site_width(model, s) for s in sites}
    manifests = []
    for split in split_names:
        tokens = splits[split]
        moments = None
        if moment_sites and split == "train":
            keep = keep_mask(tokens.ids, special_ids)
            moments = MomentsAccumulator(
                moments_dir, model=model_name, dataset=dataset, layers=layers,
                widths={s: site_width(model, s) for s in moment_sites},
                doc_group=document_group_of_docs(tokens, special_ids, groups), n_tokens=tokens.n_tokens,
                n_kept=int(keep.sum()), device=next(model.parameters()).device, config_hash=config_hash,
                checkpoint_docs=checkpoint_docs)
        if not sites and moments is None:
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
        if moments is not None:
            moments.close()
    return manifests
