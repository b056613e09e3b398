"""Training activations from a live model, for runs longer than any cache (``sae.source: live``).

The paper trains each SAE on 2.5B tokens; no activation cache holds that. A live run
reads documents in the tokens stage's order (:func:`attnspace.corpora.training_documents`:
held-out documents skipped), runs ``batch_docs`` of them at a time through the model
(right-padded, stopped after the layer), and hands the kept rows (not BOS/EOS, not
padding) of one site to :class:`attnspace.sae.data.LiveStream`, whose background thread
keeps the next chunks ready while the SAE trains on the current batch.

The rows are those the cache would hold for the same documents (tested against the
cache), so a live run and a cached run see the same activations, only more of them.
A live run checkpoints like a cached one and resumes to the same batches: the stream restarts
the model after the documents of the chunks it had already taken (:class:`LiveStream`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from attnspace.corpora import keep_mask
from attnspace.sites import capture


def live_producer(model, docs: Iterator[np.ndarray], layer: int, site: str, special_ids: set[int],
                  batch_docs: int = 8) -> Callable[[], Tensor | None]:
    """A producer for LiveStream: each call runs up to ``batch_docs`` documents and returns
    their kept rows of ``site`` at ``layer`` as float32 [rows, d] on the CPU, or None when
    the documents are exhausted.

    docs: int32 token-id arrays, one per document (each starting with BOS).
    """
    device = next(model.parameters()).device
    docs = iter(docs)

    def produce() -> Tensor | None:
        batch = [d for _, d in zip(range(batch_docs), docs)]
        if not batch:
            return None
        width = max(len(d) for d in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        real = np.zeros((len(batch), width), dtype=bool)
        for i, d in enumerate(batch):  # right padding: real positions keep their ids 0..len-1
            ids[i, : len(d)] = d
            real[i, : len(d)] = True
        acts = capture(model, torch.as_tensor(ids, device=device), [layer], [site],
                       attention_mask=torch.as_tensor(real, dtype=torch.long, device=device))[(layer, site)]
        keep = torch.as_tensor(real & keep_mask(ids, special_ids), device=acts.device)
        return acts[keep].float().cpu()  # [rows, d], documents in order

    return produce


def live_stream(model, *, tokens_path: str, model_dir: str, source: dict, source_seed: int, layer: int, site: str,
                batch_docs: int, d: int, batch_size: int, buffer_rows: int, seed: int):
    """Training batches from the live model: the documents after the held-out split of
    ``source`` (in the tokens stage's order, ``source_seed``), prefetched in a background
    thread. Close it when done."""
    from transformers import AutoTokenizer

    from attnspace.corpora import load_tokens, training_documents
    from attnspace.sae.data import LiveStream

    splits, meta = load_tokens(tokens_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def producer_after(chunks: int):
        """The producer from chunk ``chunks`` on: the documents of the first chunks are read, not run."""
        docs = training_documents(source, source_seed, tokenizer, max_doc_tokens=int(meta["max_doc_tokens"]),
                                  heldout_tokens=splits["heldout"].n_tokens)
        return live_producer(model, itertools.islice(docs, chunks * batch_docs, None), layer, site,
                             set(meta["special_ids"]), batch_docs=batch_docs)

    return LiveStream(producer_after(0), d, batch_size, buffer_rows, seed, restart=producer_after)
