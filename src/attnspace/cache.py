"""Fill the activation cache: one forward pass per document fills every site of
every configured layer of a (model, dataset), for both splits.

The forward stops after the deepest layer needed (``sites.capture``); each
(layer, split) gets one ``StoreWriter`` (one writer per array, whole shards).
Stores appear, with their manifests, only when complete.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attnspace.corpora import SPLITS, TokenSplit, keep_mask
from attnspace.sites import capture, site_width
from attnspace.store import StoreWriter


def store_path(out_dir: Path | str, layer: int, split: str) -> Path:
    """results/activations/{model}/{dataset}/L{layer}.zarr (train) or .../heldout/L{layer}.zarr."""
    out_dir = Path(out_dir)
    return (out_dir if split == "train" else out_dir / split) / f"L{layer}.zarr"


def cache_split(model, tokens: TokenSplit, writers: dict[int, StoreWriter], sites: list[str],
                special_ids: set[int], desc: str = "") -> None:
    """Run every document of ``tokens`` through ``model`` and append its sites to ``writers``."""
    device = next(model.parameters()).device
    layers = sorted(writers)
    bar = tqdm(total=tokens.n_tokens, desc=desc, unit="tok", mininterval=5, smoothing=0.1)
    for doc_i, (start, ids) in enumerate(zip(tokens.doc_starts[:-1], tokens.documents())):
        acts = capture(model, torch.as_tensor(ids, dtype=torch.long, device=device)[None], layers, sites)
        n = ids.shape[0]
        meta = dict(token_id=ids.astype(np.int32), doc=np.full(n, doc_i, np.int32),
                    pos=np.arange(n, dtype=np.int32), keep=keep_mask(ids, special_ids))
        for layer in layers:
            writers[layer].append({s: acts[layer, s][0] for s in sites}, **meta)
        bar.update(n)
    bar.close()


def cache_activations(model, splits: dict[str, TokenSplit], out_dir: Path | str, *, model_name: str,
                      dataset: str, layers: list[int], sites: list[str], logical_dtype: str,
                      special_ids: set[int], chunk_rows: int, shard_rows: int,
                      config_hash: str = "") -> list[dict]:
    """Cache ``sites`` at ``layers`` for every split; returns the manifests written."""
    widths = {s: site_width(model, s) for s in sites}
    manifests = []
    for split in SPLITS:
        tokens = splits[split]
        with ExitStack() as stack:
            writers = {
                layer: stack.enter_context(StoreWriter(
                    store_path(out_dir, layer, split), model=model_name, dataset=dataset, layer=layer,
                    split=split, n_rows=tokens.n_tokens, sites=widths, logical_dtype=logical_dtype,
                    chunk_rows=chunk_rows, shard_rows=shard_rows, config_hash=config_hash))
                for layer in layers}
            cache_split(model, tokens, writers, sites, special_ids, desc=f"{model_name}/{dataset} {split}")
            manifests += [writers[layer].close() for layer in layers]
    return manifests
