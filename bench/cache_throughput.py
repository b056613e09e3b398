"""Caching throughput vs a bare forward to the same layer, in the same process.

Both paths run the same documents through the same model and stop after the
deepest cached layer; the cache path also captures every site of every layer and
writes the Zarr stores. Target: ratio >= 0.9.

    python bench/cache_throughput.py                      # SmolLM2 from `make run`
    python bench/cache_throughput.py --model-dir DIR --layers 2 8 15 --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from attnspace import SITES
from attnspace.cache import cache_split, store_path
from attnspace.corpora import documents, tokenize_documents
from attnspace.models import load_model
from attnspace.sites import capture, site_width
from attnspace.store import StoreWriter, configure_io


def bare_forward(model, tokens, layer: int) -> float:
    t0 = time.perf_counter()
    for ids in tokens.documents():
        capture(model, torch.as_tensor(ids, dtype=torch.long)[None], [layer], ["resid_post"])
    return time.perf_counter() - t0


def cached_forward(model, tokens, layers, special, out: Path, chunk_rows: int, shard_rows: int) -> float:
    widths = {s: site_width(model, s) for s in SITES}
    t0 = time.perf_counter()
    writers = {layer: StoreWriter(store_path(out, layer, "train"), model="bench", dataset="bench", layer=layer,
                                  split="train", n_rows=tokens.n_tokens, sites=widths, logical_dtype="float32",
                                  chunk_rows=chunk_rows, shard_rows=shard_rows) for layer in layers}
    cache_split(model, tokens, writers, list(SITES), special)
    for w in writers.values():
        w.close()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="resources/models/smollm2-135m/hf")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 15])
    p.add_argument("--tokens", type=int, default=6144)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--chunk-rows", type=int, default=1024)
    p.add_argument("--shard-rows", type=int, default=4096, help="as in config.yaml's cache block")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    configure_io(a.threads)
    model, tok = load_model(a.model_dir)
    splits = tokenize_documents(documents({"kind": "embedded", "name": "python_docs"}, 0), tok,
                                max_doc_tokens=512, budgets={"train": a.tokens, "heldout": 16})
    tokens = splits["train"]
    special = {t for t in (tok.bos_token_id, tok.eos_token_id) if t is not None}
    bare_forward(model, splits["heldout"], max(a.layers))  # warm-up
    best_bare, best_cache = float("inf"), float("inf")
    for _ in range(a.repeats):  # alternate, keep the best of each
        best_bare = min(best_bare, bare_forward(model, tokens, max(a.layers)))
        with tempfile.TemporaryDirectory() as tmp:
            best_cache = min(best_cache, cached_forward(model, tokens, a.layers, special, Path(tmp), a.chunk_rows,
                                                      a.shard_rows))
    n = tokens.n_tokens
    record = {
        "what": "cache_vs_bare_forward", "model": a.model_dir, "layers": a.layers, "sites": list(SITES),
        "tokens": n, "threads": a.threads, "chunk_rows": a.chunk_rows, "shard_rows": a.shard_rows, "bare_tok_s": round(n / best_bare, 1),
        "cache_tok_s": round(n / best_cache, 1), "ratio": round(best_bare / best_cache, 3),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "torch": torch.__version__,
    }
    print(json.dumps(record))
    print(f"cache {record['cache_tok_s']} tok/s vs bare forward {record['bare_tok_s']} tok/s to layer "
          f"{max(a.layers)}: ratio {record['ratio']} (target >= 0.9)")


if __name__ == "__main__":
    main()
