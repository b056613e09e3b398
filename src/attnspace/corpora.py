"""Corpora -> token batches.

Embedded corpora need no network and were written by nobody here:

* ``python_docs``: English prose from the documentation that ships with every
  CPython (``pydoc_data.topics``), then module, class and function docstrings of
  the standard library (the analogue of SlimPajama's English);
* ``python_code``: the standard library's own source files (the analogue of
  RedPajama-GitHub).

Hub corpora (SlimPajama, RedPajama-GitHub, CCI3) stream through ``datasets``.

Every document becomes ``[BOS] + tokens`` truncated to ``max_doc_tokens``; the
documents are shuffled deterministically and dealt into a held-out part (first)
and a training part, each cut to an exact token count. ``keep`` marks the
rows that enter statistics: BOS and EOS never do.
"""

from __future__ import annotations

import ast
import functools
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from attnspace.files import write_npz

SPLITS = ("train", "heldout")


# ----------------------------------------------------------------------------- documents

def _stdlib_sources() -> list[Path]:
    """The standard library's .py files, sorted, without its test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel or "test" in rel:
            continue
        files.append(path)
    return files


def python_docs() -> Iterator[str]:
    """Topic pages of the Python documentation, then standard-library docstrings."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    for path in _stdlib_sources():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d and len(d) > 80)
        if text:
            yield text


def python_code() -> Iterator[str]:
    """The standard library's source files, one document each."""
    for path in _stdlib_sources():
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue


EMBEDDED = {"python_docs": python_docs, "python_code": python_code}


def hub_documents(source: dict, seed: int, buffer_size: int = 10_000) -> Iterator[str]:
    """Documents streamed from a hub dataset, shuffled in a buffer with ``seed``."""
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError("hub datasets need the `datasets` package. Fix: pip install 'attnspace[hub]'.") from e
    ds = datasets.load_dataset(source["path"], source.get("name"), split=source.get("split", "train"),
                               revision=source.get("revision"), streaming=True)
    ds = ds.shuffle(seed=seed, buffer_size=buffer_size)
    field = source.get("text_field", "text")
    for row in ds:
        yield row[field]


# ----------------------------------------------------------------------------- tokens

@dataclass
class TokenSplit:
    """Concatenated documents of one split.

    ids: int32 [n] token ids, each document starting with BOS;
    doc_starts: int64 [n_docs + 1] offsets into ids (document j is ids[doc_starts[j]:doc_starts[j+1]]).
    """

    ids: np.ndarray
    doc_starts: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.doc_starts.shape[0] - 1)

    def documents(self) -> Iterator[np.ndarray]:
        for a, b in zip(self.doc_starts[:-1], self.doc_starts[1:]):
            yield self.ids[a:b]

    def positions(self) -> np.ndarray:
        """int32 [n]: position of each token inside its document (BOS = 0)."""
        doc = self.doc_index()
        return (np.arange(self.n_tokens) - self.doc_starts[doc]).astype(np.int32)

    def doc_index(self) -> np.ndarray:
        """int32 [n]: index of each token's document."""
        return np.repeat(np.arange(self.n_docs, dtype=np.int32), np.diff(self.doc_starts))


def keep_mask(ids: np.ndarray, special_ids: set[int]) -> np.ndarray:
    """bool [n]: rows that enter statistics (not BOS, not EOS). The one definition."""
    return ~np.isin(ids, np.fromiter(special_ids, dtype=np.int64, count=len(special_ids)))


@functools.lru_cache(maxsize=None)
def _embedded(name: str) -> tuple[str, ...]:
    """An embedded corpus, read once per process (it is parsed from the standard library)."""
    return tuple(EMBEDDED[name]())


def documents(source: dict, seed: int) -> Iterator[str]:
    """The documents of a dataset's ``source`` config, in a deterministic shuffled order."""
    if source["kind"] == "embedded":
        docs = list(_embedded(source["name"]))
        random.Random(seed).shuffle(docs)
        return iter(docs)
    if source["kind"] == "hub":
        return hub_documents(source, seed)
    raise ValueError(f"unknown dataset source kind {source['kind']!r}")


def document_ids(documents: Iterator[str], tokenizer, max_doc_tokens: int) -> Iterator[np.ndarray]:
    """Token ids of each usable document: int32 [BOS, body...] cut at ``max_doc_tokens``.

    Documents with fewer than 8 body tokens are skipped (too short to carry context).
    The one tokenisation rule, shared by the tokens stage and live SAE training.
    """
    bos = tokenizer.bos_token_id
    for text in documents:
        body = tokenizer(text, add_special_tokens=False)["input_ids"][: max_doc_tokens - 1]
        if len(body) >= 8:
            yield np.asarray([bos, *body], dtype=np.int32)


def tokenize_documents(documents: Iterator[str], tokenizer, *, max_doc_tokens: int,
                       budgets: dict[str, int]) -> dict[str, TokenSplit]:
    """Tokenise documents (already shuffled) into splits of exact token budgets.

    Documents are dealt in order: held-out first, then train; the last document
    of a split is cut so that each split holds exactly its budget.
    """
    docs = document_ids(documents, tokenizer, max_doc_tokens)
    splits = {}
    for split in ("heldout", "train"):
        chunks, count = [], 0
        while count < budgets[split]:
            ids = next(docs, None)
            if ids is None:
                raise ValueError(f"the corpus ran out after {sum(s.n_tokens for s in splits.values()) + count} "
                                 f"tokens but {sum(budgets.values())} are configured ({budgets}). "
                                 "Fix: lower tokens.train_tokens / tokens.heldout_tokens.")
            # The split's last document is cut to fill the budget exactly (it may be a lone BOS,
            # which no statistic sees).
            doc = ids[: budgets[split] - count]
            chunks.append(doc)
            count += len(doc)
        starts = np.concatenate([[0], np.cumsum([len(d) for d in chunks])]).astype(np.int64)
        splits[split] = TokenSplit(np.concatenate(chunks), starts)
    return splits


def training_documents(source: dict, seed: int, tokenizer, *, max_doc_tokens: int,
                       heldout_tokens: int) -> Iterator[np.ndarray]:
    """Token ids of the documents the tokens stage deals to training, and every one after them.

    Same order and rule as :func:`tokenize_documents` with the same ``source`` and
    ``seed``: the documents that filled the held-out split are skipped, so a live run
    (``sae.source: live``) never trains on held-out text; it starts with the cached
    train split's documents (uncut) and continues past its budget into the corpus.
    """
    docs = document_ids(documents(source, seed), tokenizer, max_doc_tokens)
    count = 0
    while count < heldout_tokens:
        ids = next(docs, None)
        if ids is None:
            raise ValueError(f"the corpus ran out inside the held-out split ({count} of {heldout_tokens} tokens)")
        count += len(ids)
    yield from docs


def save_tokens(splits: dict[str, TokenSplit], path: Path | str, **meta) -> None:
    """One .npz with ids and doc_starts per split, written atomically."""
    arrays = {}
    for name, s in splits.items():
        arrays[f"{name}_ids"] = s.ids
        arrays[f"{name}_doc_starts"] = s.doc_starts
    for key, value in meta.items():
        arrays[f"meta_{key}"] = np.asarray(value)
    write_npz(path, **arrays)


def load_tokens(path: Path | str) -> tuple[dict[str, TokenSplit], dict]:
    with np.load(path) as z:
        splits = {s: TokenSplit(z[f"{s}_ids"], z[f"{s}_doc_starts"]) for s in SPLITS if f"{s}_ids" in z}
        meta = {k[5:]: z[k].tolist() for k in z.files if k.startswith("meta_")}
    return splits, meta
