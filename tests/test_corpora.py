"""Corpora -> tokens: BOS first, exact budgets, deterministic, disjoint splits, BOS/EOS masked."""

import numpy as np

from attnspace.corpora import (EMBEDDED, TokenSplit, documents, keep_mask, load_tokens, save_tokens,
                               tokenize_documents)

from conftest import build_tokenizer


TOK = build_tokenizer()
WORDS = "the value of a name is bound in a block of code and looked up at run time".split()


def synthetic_docs(seed):
    """Unique documents of varied length, shuffled like documents() shuffles a corpus."""
    rng = np.random.default_rng(1234)
    docs = [f"doc {i}: " + " ".join(rng.choice(WORDS, size=rng.integers(5, 60))) for i in range(200)]
    order = np.random.default_rng(seed).permutation(len(docs))
    return [docs[i] for i in order]


def _splits(seed=0, max_doc=64):
    return TOK, tokenize_documents(iter(synthetic_docs(seed)), TOK, max_doc_tokens=max_doc,
                                   budgets={"train": 1000, "heldout": 300})


def test_embedded_corpora_are_real_text():
    prose = next(EMBEDDED["python_docs"]())
    code = next(EMBEDDED["python_code"]())
    assert len(prose) > 200 and " the " in prose
    assert "def " in code or "import " in code


def test_exact_budgets_bos_first_and_truncation():
    tok, splits = _splits()
    assert splits["train"].n_tokens == 1000 and splits["heldout"].n_tokens == 300
    for split in splits.values():
        for doc in split.documents():
            assert doc[0] == tok.bos_token_id
            assert 1 <= len(doc) <= 64
            assert (doc[1:] != tok.bos_token_id).all()


def test_deterministic_and_seed_dependent():
    _, a = _splits(seed=0)
    _, b = _splits(seed=0)
    _, c = _splits(seed=1)
    assert np.array_equal(a["train"].ids, b["train"].ids)
    assert not np.array_equal(a["train"].ids, c["train"].ids)


def test_splits_hold_different_documents():
    tok, splits = _splits()
    held = {tok.decode(d[1:]).split(":")[0] for d in splits["heldout"].documents()}
    train = {tok.decode(d[1:]).split(":")[0] for d in splits["train"].documents()}
    assert held and train and not held & train


def test_embedded_documents_shuffle_deterministically():
    src = {"kind": "embedded", "name": "python_code"}
    a = [d[:50] for _, d in zip(range(5), documents(src, 0))]
    assert a == [d[:50] for _, d in zip(range(5), documents(src, 0))]
    assert a != [d[:50] for _, d in zip(range(5), documents(src, 1))]


def test_keep_mask_excludes_bos_and_eos():
    ids = np.array([1, 5, 6, 2, 1, 7], dtype=np.int32)
    assert keep_mask(ids, {1, 2}).tolist() == [False, True, True, False, False, True]


def test_positions_and_doc_index():
    s = TokenSplit(np.arange(7, dtype=np.int32), np.array([0, 3, 7]))
    assert s.positions().tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert s.doc_index().tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_token_file_round_trip(tmp_path):
    _, splits = _splits()
    save_tokens(splits, tmp_path / "t.npz", special_ids=[1, 2])
    back, meta = load_tokens(tmp_path / "t.npz")
    assert meta["special_ids"] == [1, 2]
    for name in splits:
        assert np.array_equal(back[name].ids, splits[name].ids)
        assert np.array_equal(back[name].doc_starts, splits[name].doc_starts)


def test_a_small_remainder_still_fills_the_budget_exactly():
    # budgets that leave a remainder of a few tokens for the last document
    for train in (1000, 1003, 1007, 1001):
        splits = tokenize_documents(iter(synthetic_docs(0)), TOK, max_doc_tokens=64,
                                    budgets={"train": train, "heldout": 301})
        assert splits["train"].n_tokens == train
        assert splits["heldout"].n_tokens == 301


def test_hub_documents_stream_shuffled_text(monkeypatch):
    """The hub path asks `datasets` for a streaming, shuffled split and reads the text field."""
    import sys
    import types

    calls = {}

    class FakeStream:
        def __init__(self, rows):
            self.rows = rows

        def shuffle(self, seed, buffer_size):
            calls["shuffle"] = (seed, buffer_size)
            return FakeStream(list(reversed(self.rows)))

        def __iter__(self):
            return iter(self.rows)

    def load_dataset(path, name, split, revision, streaming):
        calls["load"] = (path, name, split, revision, streaming)
        return FakeStream([{"content": f"row {i}"} for i in range(3)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = {"kind": "hub", "path": "org/corpus", "name": "github", "split": "train", "text_field": "content",
           "revision": "abc123"}
    assert list(documents(src, seed=7)) == ["row 2", "row 1", "row 0"]
    assert calls["load"] == ("org/corpus", "github", "train", "abc123", True)
    assert calls["shuffle"][0] == 7


def test_sae_split_extends_the_train_split_and_never_reaches_the_held_out_text():
    budgets = {"train": 1000, "heldout": 300}
    plain = tokenize_documents(iter(synthetic_docs(0)), TOK, max_doc_tokens=64, budgets=budgets)
    splits = tokenize_documents(iter(synthetic_docs(0)), TOK, max_doc_tokens=64, budgets={**budgets, "sae": 2500})
    # train and held-out exactly as without the SAE split
    for name in ("train", "heldout"):
        assert np.array_equal(splits[name].ids, plain[name].ids)
        assert np.array_equal(splits[name].doc_starts, plain[name].doc_starts)
    sae = splits["sae"]
    assert sae.n_tokens == 2500
    assert np.array_equal(sae.ids[:1000], splits["train"].ids)  # its first rows are the train split's
    assert np.array_equal(sae.doc_starts[:-1][sae.doc_starts[:-1] < 1000], splits["train"].doc_starts[:-1])
    assert np.array_equal(sae.positions()[:1000], splits["train"].positions())  # same contexts
    held = {TOK.decode(d[1:]).split(":")[0] for d in splits["heldout"].documents()}
    train = {TOK.decode(d[1:]).split(":")[0] for d in sae.documents()}
    assert train and not held & train
    for doc in sae.documents():
        assert doc[0] == TOK.bos_token_id and 1 <= len(doc) <= 64


def test_a_corpus_too_small_for_the_sae_split_is_refused_naming_the_key():
    import pytest

    with pytest.raises(ValueError, match="tokens.sae_train_tokens"):
        tokenize_documents(iter(synthetic_docs(0)), TOK, max_doc_tokens=64,
                           budgets={"train": 1000, "heldout": 300, "sae": 10**6})
