"""Live SAE training data: the documents after the held-out split, run through the model in
right-padded batches, give exactly the rows the cache holds for the same documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnspace.cache import cache_activations, store_path
from attnspace.corpora import documents, save_tokens, tokenize_documents, training_documents
from attnspace.models import load_model
from attnspace.sae.data import LiveStream
from attnspace.sae.live import live_producer
from attnspace.store import open_store

SOURCE = {"kind": "embedded", "name": "python_docs"}
LAYER, SITE = 2, "attn_out"


@pytest.fixture(scope="module")
def cached(tiny_llama, tmp_path_factory):
    model, tok = load_model(tiny_llama)
    splits = tokenize_documents(documents(SOURCE, 3), tok, max_doc_tokens=40, budgets={"train": 400, "heldout": 90})
    out = tmp_path_factory.mktemp("live_cache")
    special = sorted({tok.bos_token_id, tok.eos_token_id})
    save_tokens(splits, out / "tokens.npz", special_ids=special, max_doc_tokens=40)
    cache_activations(model, splits, out, model_name="tiny", dataset="pydocs", layers=[LAYER], sites=[SITE],
                      logical_dtype="float32", special_ids=set(special), chunk_rows=64, shard_rows=128)
    return model, tok, splits, open_store(store_path(out, LAYER, "train"))


def test_training_documents_start_where_the_heldout_split_ends(cached):
    _, tok, splits, _ = cached
    live = training_documents(SOURCE, 3, tok, max_doc_tokens=40, heldout_tokens=90)
    train_docs = list(splits["train"].documents())
    for cached_doc in train_docs[:-1]:  # the split's last document is cut to the budget
        assert np.array_equal(next(live), cached_doc)
    assert np.array_equal(next(live)[: len(train_docs[-1])], train_docs[-1])
    assert next(live, None) is not None  # and the corpus goes on past the budget


@pytest.mark.parametrize("batch_docs", [1, 3])
def test_live_rows_equal_the_cached_rows(cached, batch_docs):
    model, tok, splits, store = cached
    docs = training_documents(SOURCE, 3, tok, max_doc_tokens=40, heldout_tokens=90)
    produce = live_producer(model, docs, LAYER, SITE, {tok.bos_token_id, tok.eos_token_id}, batch_docs=batch_docs)
    expected = store.rows(SITE, 0, store.n_rows, kept_only=True)  # [kept rows, d]
    got = []
    while sum(len(g) for g in got) < len(expected):
        got.append(produce())
    got = torch.cat(got)[: len(expected)].numpy()
    # Right padding changes nothing for real tokens (causal attention), up to summation order.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_live_stream_serves_batches_and_reports_exhaustion(cached):
    model, tok, _, _ = cached
    docs = iter(list(training_documents(SOURCE, 3, tok, max_doc_tokens=40, heldout_tokens=90))[:6])
    produce = live_producer(model, docs, LAYER, SITE, {tok.bos_token_id, tok.eos_token_id}, batch_docs=4)
    stream = LiveStream(produce, d=48, batch_size=32, buffer_rows=64, seed=0)
    sample = stream.sample(16)
    assert sample.shape == (16, 48)
    n = 0
    with pytest.raises(StopIteration, match="exhausted"):
        while True:
            assert stream.next_batch().shape == (32, 48)
            n += 1
    assert n >= 1
    stream.close()


def test_train_sae_command_trains_from_the_live_model(cached, tiny_llama, tmp_path):
    """The CLI path the paper config takes (sae.source: live): more tokens than the cache holds, and no
    train store (a streamed cache stores only the held-out rows an evaluation reads)."""
    import json

    from attnspace.cli import main

    *_, store = cached
    root = store.path.parent
    out = tmp_path / "run"
    absent = tmp_path / "not-stored" / f"L{LAYER}.manifest.json"
    main(["train-sae", "--store", str(absent), "--heldout", str(store_path(root, LAYER, "heldout")),
          "--site", SITE, "--run", "base-d0-sparse_adam-n96-k4", "--batch-size", "64", "--buffer-rows", "128",
          "--train-tokens", "1024", "--eval-tokens", "64", "--lr", "0.001", "--model-dir", str(tiny_llama),
          "--tokens", str(root / "tokens.npz"), "--layer", str(LAYER), "--live-source", json.dumps(SOURCE),
          "--live-seed", "3", "--live-batch-docs", "4", "--out-dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["tokens_trained"] == 1024 > store.n_rows
    assert json.loads((out / "hyperparams.json").read_text())["source"] == "live"


def test_a_live_stream_restored_from_its_state_serves_the_same_batches(cached, tiny_llama):
    """live_stream's restart runs the model again from the chunk after the ones taken: a stream
    restored from another's state continues it bitwise (what a resumed live SAE run reads)."""
    from attnspace.sae.live import live_stream

    *_, store = cached
    root = store.path.parent
    model = cached[0]

    def make():
        return live_stream(model, tokens_path=str(root / "tokens.npz"), model_dir=str(tiny_llama), source=SOURCE,
                           source_seed=3, layer=LAYER, site=SITE, batch_docs=2, d=48, batch_size=16,
                           buffer_rows=48, seed=7)

    first = make()  # one stream at a time: two prefetch threads would hook the same model at once
    try:
        assert first.resumable
        first.sample(20)
        for _ in range(5):
            first.next_batch()
        state = first.state_tensors()
        expected = [first.next_batch() for _ in range(6)]
    finally:
        first.close()
    second = make()
    try:
        second.sample(20)
        second.load_state(state)
        for want in expected:
            assert torch.equal(second.next_batch(), want)
    finally:
        second.close()
