"""Streamed spectrum moments: the groups fixed from the token file are the store's document
groups, the moments are the store's group moments, the spectra (bootstrap replicates included)
equal those of the stored mode, a killed job resumes to a bitwise-equal result, and a damaged or
unpublished file is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_cache import kill_capture_at

from attnspace import SITES
from attnspace.cache import cache_activations, store_path
from attnspace.corpora import keep_mask, tokenize_documents
from attnspace.models import load_model
from attnspace.moments import RECORD, MomentsError, document_group_of_docs, load_moments, moments_file
from attnspace.spectrum import compute_spectrum, document_groups, group_moments, streamed_spectrum
from attnspace.store import open_store

from test_corpora import synthetic_docs

LAYERS = [1, 3]
GROUPS = 5
SPECTRUM_SITES = ["attn_out", "attn_z", "resid_post"]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    model, tok = load_model(tiny_llama)
    splits = tokenize_documents(iter(synthetic_docs(0)), tok, max_doc_tokens=40,
                                budgets={"train": 300, "heldout": 90})
    return model, tok, splits


def run(model, tok, splits, out, sites=tuple(SITES), checkpoint_docs=1000, wo=False):
    return cache_activations(model, splits, out / "activations", model_name="tiny", dataset="synthetic",
                             layers=LAYERS, sites=list(sites), logical_dtype="float32",
                             special_ids={tok.bos_token_id, tok.eos_token_id}, chunk_rows=64, shard_rows=128,
                             config_hash="abc", moments_dir=out / "moments", moment_sites=SPECTRUM_SITES,
                             groups=GROUPS, checkpoint_docs=checkpoint_docs,
                             wo_moments_dir=out / "moments" / "wo" if wo else None)


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    model, tok, splits = tiny
    out = tmp_path_factory.mktemp("cache")
    run(model, tok, splits, out)
    return out


def test_groups_from_tokens_are_the_stores_document_groups(tiny, cached):
    _, tok, splits = tiny
    special = {tok.bos_token_id, tok.eos_token_id}
    store = open_store(store_path(cached / "activations", 1, "train"))
    doc = store.meta("doc")
    for n_groups in (2, GROUPS, 7, 1000):
        by_row = document_groups(doc, store.keep(), n_groups)
        by_doc = document_group_of_docs(splits["train"], special, n_groups)
        assert np.array_equal(by_doc[doc], by_row), n_groups
    # and, computed independently: group of a document = floor(G * kept rows before it / kept rows)
    tokens = splits["train"]
    kept = np.array([keep_mask(d, special).sum() for d in tokens.documents()])
    before = np.r_[0, np.cumsum(kept)[:-1]]
    raw = np.minimum(before * GROUPS // kept.sum(), GROUPS - 1)
    assert np.array_equal(document_group_of_docs(tokens, special, GROUPS), np.unique(raw, return_inverse=True)[1])


def test_streamed_moments_are_the_stores_group_moments(tiny, cached):
    record = cached / "moments" / RECORD
    rec = json.loads(record.read_text())
    assert rec["n_groups"] == GROUPS and sorted(rec["files"]) == ["1", "3"]
    for layer in LAYERS:
        store = open_store(store_path(cached / "activations", layer, "train"))
        keep = store.keep()
        groups = document_groups(store.meta("doc"), keep, GROUPS)
        for site in SPECTRUM_SITES:
            streamed, _ = load_moments(record, layer, site)
            x = store.rows(site, 0, store.n_rows, kept_only=False).astype(np.float64)
            for g in range(GROUPS):  # plain numpy, group by group
                xa = np.c_[x, np.ones(len(x))][(groups == g) & keep]
                np.testing.assert_allclose(streamed[g], xa.T @ xa, rtol=1e-12, atol=1e-9)
            np.testing.assert_allclose(streamed, group_moments(store.dask(site), keep, groups), rtol=1e-12, atol=1e-9)


def test_streamed_spectra_equal_stored_spectra(cached):
    record = cached / "moments" / RECORD
    for layer in LAYERS:
        store = open_store(store_path(cached / "activations", layer, "train"))
        for site in SPECTRUM_SITES:
            for resamples in (0, 20):
                stored = compute_spectrum(store, site, n_vectors=6, resamples=resamples, groups=GROUPS, seed=3)
                streamed = streamed_spectrum(record, layer, site, n_vectors=6, resamples=resamples, seed=3)
                assert streamed.key == stored.key
                assert (streamed.n_tokens, streamed.n_groups) == (stored.n_tokens, stored.n_groups)
                s = stored.singular_values
                np.testing.assert_allclose(streamed.singular_values, s, rtol=1e-10, atol=1e-10 * s[0])
                np.testing.assert_allclose(streamed.mean, stored.mean, rtol=1e-12, atol=1e-12)
                np.testing.assert_allclose(streamed.components, stored.components, atol=1e-8)
                if resamples:
                    b = stored.boot_singular_values
                    assert b.shape == (resamples, s.shape[0])
                    np.testing.assert_allclose(streamed.boot_singular_values, b, rtol=1e-10, atol=1e-10 * s[0])
                else:
                    assert streamed.boot_singular_values is None and stored.boot_singular_values is None


@pytest.mark.parametrize("stored_sites", [(), ("attn_out",)])
def test_killed_job_resumes_to_the_same_bytes(tiny, cached, tmp_path, monkeypatch, stored_sites):
    """A kill after 7 documents, checkpoints every 3: the rerun adds only the documents after the
    last checkpoint and ends bitwise equal. With moments only, it runs only those through the
    model; with a store too, every document (the store starts over)."""
    model, tok, splits = tiny
    _, calls = kill_capture_at(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        run(model, tok, splits, tmp_path, sites=stored_sites, checkpoint_docs=3)
    record = tmp_path / "moments" / RECORD
    assert not record.exists()
    with pytest.raises(MomentsError):
        load_moments(record, 1, "attn_out")
    state = json.loads((tmp_path / "moments" / ".partial" / "state.json").read_text())
    assert state["next_doc"] == 6

    calls["n"] = -10**9  # no more kills; count the forwards of the rerun
    run(model, tok, splits, tmp_path, sites=stored_sites, checkpoint_docs=3)
    if stored_sites:
        assert calls["n"] + 10**9 == splits["train"].n_docs + splits["heldout"].n_docs
        assert open_store(store_path(tmp_path / "activations", 3, "train")).sites == ("attn_out",)
    else:
        assert calls["n"] + 10**9 == splits["train"].n_docs - 6
        assert not (tmp_path / "activations").exists()  # no store was asked for
    assert not (tmp_path / "moments" / ".partial").exists()
    for layer in LAYERS:
        for site in SPECTRUM_SITES:
            resumed = np.load(moments_file(tmp_path / "moments", layer, site))
            whole = np.load(moments_file(cached / "moments", layer, site))
            assert np.array_equal(resumed, whole), (layer, site)
    assert json.loads(record.read_text())["files"] == json.loads((cached / "moments" / RECORD).read_text())["files"]


def test_figure3_moments_and_their_check_resume_to_the_same_values(tiny, tmp_path, monkeypatch):
    """Figure 3's moments (one group) and the running maxima of its reconstruction check survive a
    kill: the rerun ends with the bytes and maxima of an uninterrupted run."""
    model, tok, splits = tiny
    run(model, tok, splits, tmp_path / "whole", sites=(), wo=True)
    _, calls = kill_capture_at(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        run(model, tok, splits, tmp_path / "killed", sites=(), checkpoint_docs=3, wo=True)
    calls["n"] = -10**9
    run(model, tok, splits, tmp_path / "killed", sites=(), checkpoint_docs=3, wo=True)
    whole, resumed = (json.loads((tmp_path / name / "moments" / "wo" / RECORD).read_text())
                      for name in ("whole", "killed"))
    assert whole["n_groups"] == 1 and sorted(whole["files"]["1"]) == ["attn_z"]  # attn_out: a spectrum site
    assert sorted(whole["maxima"]) == [f"L{layer}/{name}" for layer in LAYERS for name in ("o_error", "o_scale")]
    assert resumed == whole and all(v > 0 for v in whole["maxima"].values())
    for layer in LAYERS:
        assert np.array_equal(np.load(moments_file(tmp_path / "killed" / "moments" / "wo", layer, "attn_z")),
                              np.load(moments_file(tmp_path / "whole" / "moments" / "wo", layer, "attn_z")))


def test_damaged_moments_are_refused(tiny, tmp_path):
    model, tok, splits = tiny
    run(model, tok, splits, tmp_path, sites=())
    record = tmp_path / "moments" / RECORD
    path = moments_file(tmp_path / "moments", 3, "attn_out")
    m = np.load(path, mmap_mode="r+")
    m[2, 0, 0] += 1.0
    m.flush()
    del m
    with pytest.raises(MomentsError, match="group 2"):
        load_moments(record, 3, "attn_out")
    with pytest.raises(MomentsError, match="no moments of mlp_out"):
        load_moments(record, 3, "mlp_out")


def test_record_of_missing_files_is_dropped(tiny, tmp_path):
    from attnspace.moments import drop_incomplete_moments

    model, tok, splits = tiny
    run(model, tok, splits, tmp_path, sites=())
    record = tmp_path / "moments" / RECORD
    assert drop_incomplete_moments(record) == [] and record.is_file()
    moments_file(tmp_path / "moments", 1, "attn_z").unlink()
    assert drop_incomplete_moments(record) == [str(moments_file(tmp_path / "moments", 1, "attn_z"))]
    assert not record.exists()


def test_spectrum_command_reads_either_source(cached, tmp_path):
    from attnspace.cli import build_parser
    from attnspace.spectrum import load_spectrum
    from attnspace.store import manifest_path

    store = manifest_path(store_path(cached / "activations", 3, "train"))
    common = ["--sites", "attn_out", "resid_post", "--resamples", "10", "--groups", str(GROUPS), "--seed", "1"]
    for name, source in (("stored", ["--store", str(store)]),
                         ("streamed", ["--moments", str(cached / "moments" / RECORD), "--layer", "3"])):
        a = build_parser().parse_args(["spectrum", *source, *common, "--out", str(tmp_path / f"{name}-attn_out.npz"),
                                       str(tmp_path / f"{name}-resid_post.npz")])
        a.func(a)
    for site in ("attn_out", "resid_post"):
        stored, streamed = (load_spectrum(tmp_path / f"{name}-{site}.npz") for name in ("stored", "streamed"))
        assert streamed.key == stored.key and streamed.n_groups == stored.n_groups == GROUPS
        # The two sources sum the same float64 moments in another order: each eigenvalue moves by about
        # eps x the largest, so a small singular value s moves by about eps x largest^2 / (2 s), not by
        # eps x s. Tolerance: 1e-10 relative, or 1e-10 of the largest singular value (measured: 4e-13).
        top = float(stored.singular_values[0])
        np.testing.assert_allclose(streamed.singular_values, stored.singular_values, rtol=1e-10, atol=1e-10 * top)
        np.testing.assert_allclose(streamed.boot_singular_values, stored.boot_singular_values, rtol=1e-10,
                                   atol=1e-10 * top)
