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
and a training part, each cut to an exact token count. An optional longer
training part for the SAEs (``sae``) continues the training documents: its first
rows are the training part's, and it never reaches into the held-out documents.
``keep`` marks the rows that enter statistics: BOS and EOS never do.
"""

from __future__ import annotations

import ast
import functools
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from attnspace.errors import AttnspaceError
from attnspace.files import write_npz

SPLITS = ("train", "heldout")
"""The splits every tokens file and every activation cache has."""
SAE_SPLIT = "sae"
"""The SAE training split (tokens.sae_train_tokens rows), where one is configured."""


# ----------------------------------------------------------------------------- documents

def _stdlib_sources() -> list[Path]:
    """The standard library's .py files, sorted, without its test suites (nor site-packages,
    idlelib and lib2to3), found without descending into the folders left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        top = Path(folder) == root
        subfolders[:] = [s for s in subfolders if s not in ("test", "tests")
                         and not (top and s in ("site-packages", "idlelib", "lib2to3"))]
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(files)


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


def token_supply(source: dict, max_doc_tokens: int) -> int | None:
    """At most how many tokens a dataset ``source`` gives with documents cut at ``max_doc_tokens``,
    counted without reading or tokenising it; None where that is unknown (hub datasets).

    A token covers at least one byte of UTF-8 text and each document gains a BOS, so a document of
    b bytes gives at most min(b + 1, max_doc_tokens) tokens. python_code's documents are the files
    (their sizes); python_docs' are the documentation topics and, per file, docstrings that are
    shorter than the file.
    """
    if source["kind"] != "embedded":
        return None
    sizes = [path.stat().st_size for path in _stdlib_sources()]
    if source["name"] == "python_docs":
        from pydoc_data.topics import topics

        sizes += [len(text.encode("utf-8")) for text in topics.values()]
    return sum(min(size + 1, max_doc_tokens) for size in sizes)


class CorpusError(AttnspaceError, ValueError):
    """A corpus the run cannot read or that cannot fill its budget; names the file or dataset and the fix."""


def _first_non_utf8(folder: Path) -> str:
    """'<file> (byte N)' of the first data file under ``folder`` that is not UTF-8, or the folder."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        offset = 0
        with open(path, "rb") as f:
            for line in f:
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{path} (byte {offset + e.start})"
                offset += len(line)
    return str(folder)


def _local_folder(source: dict) -> Path | None:
    path = Path(source["path"])
    return path if path.is_dir() else None


def hub_documents(source: dict, seed: int, buffer_size: int = 10_000) -> Iterator[str]:
    """Documents streamed from a hub dataset or a local folder of data files, shuffled in a buffer
    with ``seed``. A local folder with no data, bytes that are not UTF-8, or a row whose text field
    is missing, null or not text is refused naming the file or row and the fix."""
    try:
        import datasets
    except ImportError as e:
        raise AttnspaceError("hub datasets need the `datasets` package.", fix="pip install 'attnspace[hub]'.") from e
    folder, where = _local_folder(source), source["path"]
    if folder is not None and not any(p.is_file() and p.stat().st_size for p in folder.rglob("*")):
        raise CorpusError(f"{folder}: the corpus folder holds no data (no file, or only empty files).",
                          fix="put the corpus's data files (JSONL with one text per row) there.")
    field = source.get("text_field", "text")
    try:
        ds = datasets.load_dataset(source["path"], source.get("name"), split=source.get("split", "train"),
                                   revision=source.get("revision"), streaming=True)
        for i, row in enumerate(ds.shuffle(seed=seed, buffer_size=buffer_size)):
            text = row.get(field)
            if not isinstance(text, str):
                state = ("has no field" if field not in row else "has null in" if text is None
                         else f"has a {type(text).__name__}, not text, in")
                raise CorpusError(f"{where}: a row {state} {field!r} (columns {sorted(row)}).",
                                  fix=f"set source.text_field to the column holding the text, or remove rows "
                                      f"without text.")
            yield text
    except UnicodeDecodeError as e:
        found = _first_non_utf8(folder) if folder is not None else where
        raise CorpusError(f"{found}: not UTF-8 text ({e.reason}).", fix="convert the file to UTF-8.") from None
    except (RuntimeError, ValueError) as e:
        if folder is None or isinstance(e, CorpusError):
            raise
        raise CorpusError(f"{folder}: datasets cannot read the corpus folder ({' '.join(str(e).split())[:300]}).",
                          fix="give it JSONL, CSV, Parquet or text files, one document per row.") from None


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
    of a split is cut so that each split holds exactly its budget. A ``sae`` budget
    (at least the train budget) cuts the same training documents, dealt on past the
    train budget, at its own count: its first ``budgets["train"]`` tokens are the
    train split's, document for document.
    """
    docs = document_ids(documents, tokenizer, max_doc_tokens)
    total = budgets["heldout"] + max(budgets["train"], budgets.get(SAE_SPLIT, 0))

    def deal(budget: int, dealt: int) -> list[np.ndarray]:
        """Whole documents from the stream until they hold ``budget`` tokens (the last one uncut)."""
        out, count = [], 0
        while count < budget:
            ids = next(docs, None)
            if ids is None:
                raise CorpusError(f"the corpus ran out after {dealt + count} tokens but {total} are configured "
                                 f"({budgets}). Fix: lower tokens.train_tokens / tokens.heldout_tokens / "
                                 "tokens.sae_train_tokens, or use a larger corpus.")
            out.append(ids)
            count += len(ids)
        return out

    def cut(chunks: list[np.ndarray], budget: int) -> TokenSplit:
        # The split's last document is cut to fill the budget exactly (it may be a lone BOS,
        # which no statistic sees).
        kept, count = [], 0
        for ids in chunks:
            if count >= budget:
                break
            kept.append(ids[: budget - count])
            count += len(kept[-1])
        starts = np.concatenate([[0], np.cumsum([len(d) for d in kept])]).astype(np.int64)
        return TokenSplit(np.concatenate(kept), starts)

    heldout = deal(budgets["heldout"], 0)
    splits = {"heldout": cut(heldout, budgets["heldout"])}
    training = deal(max(budgets["train"], budgets.get(SAE_SPLIT, 0)), budgets["heldout"])
    splits["train"] = cut(training, budgets["train"])
    if budgets.get(SAE_SPLIT):
        if budgets[SAE_SPLIT] < budgets["train"]:
            raise ValueError(f"the SAE split ({budgets[SAE_SPLIT]} tokens) must extend the train split "
                             f"({budgets['train']}). Fix: raise tokens.sae_train_tokens to at least train_tokens.")
        splits[SAE_SPLIT] = cut(training, budgets[SAE_SPLIT])
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
            raise CorpusError(f"the corpus ran out inside the held-out split ({count} of {heldout_tokens} tokens).",
                              fix="lower tokens.heldout_tokens, or use a larger corpus.")
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
        splits = {s: TokenSplit(z[f"{s}_ids"], z[f"{s}_doc_starts"]) for s in (*SPLITS, SAE_SPLIT)
                  if f"{s}_ids" in z}
        meta = {k[5:]: z[k].tolist() for k in z.files if k.startswith("meta_")}
    return splits, meta
