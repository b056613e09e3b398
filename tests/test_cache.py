"""The cache driver: stores hold exactly what a direct capture of each document
gives, BOS rows are flagged, both splits are written, and a job killed midway
leaves nothing that open_store accepts; rerunning completes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnspace.cache as cache_mod
from attnspace import SITES
from attnspace.cache import cache_activations, layer_sites, store_path
from attnspace.corpora import tokenize_documents
from attnspace.models import load_model
from attnspace.sites import capture
from attnspace.store import StoreError, open_store

from test_corpora import synthetic_docs

LAYERS = [1, 3]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    model, tok = load_model(tiny_llama)
    splits = tokenize_documents(iter(synthetic_docs(0)), tok, max_doc_tokens=40,
                                budgets={"train": 300, "heldout": 90})
    return model, tok, splits


def run(model, tok, splits, out):
    return cache_activations(model, splits, out, model_name="tiny", dataset="synthetic", layers=LAYERS,
                             sites=list(SITES), logical_dtype="float32",
                             special_ids={tok.bos_token_id, tok.eos_token_id}, chunk_rows=64, shard_rows=128,
                             config_hash="abc")


def test_stores_equal_a_direct_capture(tiny, tmp_path):
    model, tok, splits = tiny
    manifests = run(model, tok, splits, tmp_path)
    assert len(manifests) == 2 * len(LAYERS)
    for split, tokens in splits.items():
        direct = [capture(model, torch.as_tensor(d, dtype=torch.long)[None], LAYERS, list(SITES))
                  for d in tokens.documents()]
        for layer in LAYERS:
            store = open_store(store_path(tmp_path, layer, split), expect_hash="abc")
            assert store.n_rows == tokens.n_tokens
            assert np.array_equal(store.meta("token_id"), tokens.ids)
            assert np.array_equal(store.meta("pos"), tokens.positions())
            assert np.array_equal(store.meta("doc"), tokens.doc_index())
            assert np.array_equal(store.keep(), tokens.ids != tok.bos_token_id)
            for site in SITES:
                expected = np.concatenate([acts[layer, site][0].numpy() for acts in direct])
                got = store.rows(site, 0, store.n_rows, kept_only=False)
                assert np.array_equal(got, expected), (split, layer, site)


def test_killed_job_leaves_nothing_accepted_and_rerun_completes(tiny, tmp_path, monkeypatch):
    model, tok, splits = tiny
    real, _ = kill_capture_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(model, tok, splits, tmp_path)
    for split in splits:
        for layer in LAYERS:
            with pytest.raises(StoreError):
                open_store(store_path(tmp_path, layer, split))
    monkeypatch.setattr(cache_mod, "capture", real)
    run(model, tok, splits, tmp_path)
    for split in splits:
        for layer in LAYERS:
            assert open_store(store_path(tmp_path, layer, split)).n_rows == splits[split].n_tokens
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_each_site_is_written_only_at_its_own_layers(tiny, tmp_path):
    model, tok, splits = tiny
    only = {"attn_in": [3], "attn_z": [1]}
    manifests = cache_activations(model, splits, tmp_path, model_name="tiny", dataset="synthetic", layers=LAYERS,
                                  sites=list(SITES), logical_dtype="float32",
                                  special_ids={tok.bos_token_id, tok.eos_token_id}, chunk_rows=64, shard_rows=128,
                                  site_layers=only)
    want = {1: {"attn_out", "mlp_out", "resid_post", "attn_z"}, 3: {"attn_out", "mlp_out", "resid_post", "attn_in"}}
    assert {(m["layer"], m["split"]): set(m["sites"]) for m in manifests} == {
        (layer, split): sites for layer, sites in want.items() for split in ("train", "heldout")}
    for split, tokens in splits.items():
        direct = [capture(model, torch.as_tensor(d, dtype=torch.long)[None], LAYERS, list(SITES))
                  for d in tokens.documents()]
        for layer, sites in want.items():
            store = open_store(store_path(tmp_path, layer, split))
            assert set(store.sites) == sites
            for site in sites:
                expected = np.concatenate([acts[layer, site][0].numpy() for acts in direct])
                assert np.array_equal(store.rows(site, 0, store.n_rows, kept_only=False), expected)
            absent = ({"attn_in"} if layer == 1 else {"attn_z"})
            assert not (store_path(tmp_path, layer, split) / absent.pop()).exists()
    # a layer none of whose sites is cached gets no store
    assert layer_sites([1, 2, 3], ["attn_in"], {"attn_in": [3]}) == {3: ["attn_in"]}


def test_the_sae_store_starts_with_the_train_rows(tiny_llama, tmp_path):
    model, tok = load_model(tiny_llama)
    splits = tokenize_documents(iter(synthetic_docs(0)), tok, max_doc_tokens=40,
                                budgets={"train": 300, "heldout": 90, "sae": 700})
    kwargs = dict(model_name="tiny", dataset="synthetic", layers=[2], logical_dtype="float32",
                  special_ids={tok.bos_token_id, tok.eos_token_id}, chunk_rows=64, shard_rows=128)
    cache_activations(model, splits, tmp_path, sites=list(SITES), **kwargs)
    (manifest,) = cache_activations(model, splits, tmp_path, sites=["attn_out"], split_names=("sae",), **kwargs)
    assert manifest["split"] == "sae" and list(manifest["sites"]) == ["attn_out"]
    sae, train = open_store(tmp_path / "sae" / "L2.zarr"), open_store(store_path(tmp_path, 2, "train"))
    assert sae.n_rows == 700 and sae.sites == ("attn_out",)
    assert np.array_equal(sae.meta("token_id"), splits["sae"].ids)
    # the same tokens in the same contexts: the train split's whole documents give the same bits; its
    # last document, cut at 300 tokens, runs longer here (other kernel shapes: float rounding only)
    cut = int(splits["train"].doc_starts[-2])
    first, again = train.rows("attn_out", 0, 300, kept_only=False), sae.rows("attn_out", 0, 300, kept_only=False)
    assert np.array_equal(again[:cut], first[:cut])
    np.testing.assert_allclose(again[cut:], first[cut:], rtol=1e-4, atol=1e-6)
    direct = np.concatenate([capture(model, torch.as_tensor(d, dtype=torch.long)[None], [2], ["attn_out"])[2, "attn_out"][0]
                             .numpy() for d in splits["sae"].documents()])
    assert np.array_equal(sae.rows("attn_out", 0, 700, kept_only=False), direct)


def kill_capture_at(monkeypatch, n: int) -> tuple:
    """Make the caching forward raise KeyboardInterrupt (a kill) on its n-th document; returns the
    real capture and the call counter ({"n": calls so far})."""
    real, calls = cache_mod.capture, {"n": 0}

    def dying_capture(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "capture", dying_capture)
    return real, calls
