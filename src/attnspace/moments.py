"""Streamed spectrum moments: the per-document-group packed moments of each spectrum site at each
layer, accumulated while the caching job runs the model, so the spectra need no activation store.

For the train split, each (layer, site) gets the [G, d+1, d+1] float64 array that
:func:`attnspace.spectrum.group_moments` computes from a store: group g holds the Gram matrix
of [x, 1] over the kept rows (BOS/EOS excluded, :func:`attnspace.corpora.keep_mask`) of its
documents, i.e. [[X^T X, colsum], [colsum^T, n]]. The groups are those of
:func:`attnspace.groups.document_groups`, known before the forward from the token file
(:func:`document_group_of_docs`). Sums are formed on the model's device in float64, one
product per document, into the current group's running total; a finished group is written to
its row of the output and the total restarts at zero.

Layout under ``results/moments/{model}/{dataset}/``: ``L{layer}/{site}.npy`` (uncompressed
[G, d+1, d+1] float64) for every layer and spectrum site, and ``moments.json``, the record,
written last. The record lists every file with a SHA-256 digest of each group's bytes, taken
from memory as the group is written; :func:`load_moments` refuses a file without a record
(a killed job), a missing or resized file, or a group whose bytes no longer match.

Running maxima (``maxima``): named functions of a document's activations whose largest value over
the split is kept beside the moments and published in the record (Figure 3's check that the cached
Z and the weights give O, :func:`attnspace.wo_decomposition.reconstruction_maxima`).

Resuming: every ``checkpoint_docs`` documents the accumulator flushes its finished groups,
saves the running totals of the current group and then, last, a state record holding the
index of the next document and a digest of each running total (in ``.partial/``). A job
restarted on the same inputs continues from that document; documents before it add nothing
again, so the result is bitwise that of an uninterrupted run. The state's key names the
inputs: the token ids (:func:`tokens_digest`), the model (``inputs``: the prepared folder's
identity), the sites, layers, widths, document groups and the config hash. A checkpoint whose
key differs, or whose files are missing, unreadable or do not match their digests, is
discarded with one line saying why, and the accumulator starts from the first document.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from attnspace.corpora import TokenSplit, keep_mask
from attnspace.errors import AttnspaceError
from attnspace.files import atomic_path, write_json, write_npz
from attnspace.groups import document_groups

FORMAT = "attnspace-moments/1"
"""Tag of the record (``moments.json``); bump when the layout changes."""

RECORD = "moments.json"
"""The record's file name inside a moments folder (the caching rule's output)."""

CHECKPOINT_DOCS = 1000
"""Documents between checkpoints by default: at most this many are run again after a kill."""

log = logging.getLogger("attnspace.moments")


class MomentsError(AttnspaceError, RuntimeError):
    """A moments file is missing, incomplete or damaged."""


def moments_file(out_dir: Path | str, layer: int, site: str) -> Path:
    """``{out_dir}/L{layer}/{site}.npy``: the [G, d+1, d+1] moments of one site at one layer."""
    return Path(out_dir) / f"L{int(layer)}" / f"{site}.npy"


def group_digest(block: np.ndarray) -> str:
    """Digest of one group's [d+1, d+1] float64 moments: 16 hex digits of SHA-256 of its bytes."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(block, dtype=np.float64)).cast("B")).hexdigest()[:16]


def tokens_digest(tokens: TokenSplit) -> str:
    """16 hex digits of SHA-256 of a split's token ids and document boundaries: what the moments are of."""
    h = hashlib.sha256(np.ascontiguousarray(tokens.ids, dtype=np.int32).tobytes())
    h.update(np.ascontiguousarray(tokens.doc_starts, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def document_group_of_docs(tokens: TokenSplit, special_ids: set[int], n_groups: int) -> np.ndarray:
    """int64 [n_docs]: the document group of each document of ``tokens``, exactly the grouping
    :func:`attnspace.groups.document_groups` gives the rows of a store of these tokens (whole
    consecutive documents, about equal kept rows, at most ``n_groups`` groups)."""
    if np.any(np.diff(tokens.doc_starts) < 1):
        raise ValueError("every document must have at least one token")
    rows = document_groups(tokens.doc_index(), keep_mask(tokens.ids, special_ids), n_groups)
    return rows[tokens.doc_starts[:-1]] if rows.size else np.zeros(tokens.n_docs, dtype=np.int64)


def _fix(record: Path) -> str:
    return f"rm -f {record} && snakemake --cores all (the cache rule rebuilds the moments)"


class MomentsAccumulator:
    """Accumulate the packed moments of ``sites`` at ``layers`` over the documents of one split.

    Usage: ``acc = MomentsAccumulator(...)``; for each document i in order,
    ``acc.add(i, acts, keep)`` with ``acts[layer, site]`` of shape [1, rows, width] (any float
    dtype, on any device) and ``keep`` bool [rows]; then ``acc.close()`` publishes the files and
    the record and returns the record. ``acc.next_doc`` is the first document not yet counted
    (non-zero after a resume: ``add`` ignores earlier documents).
    """

    def __init__(self, out_dir: Path | str, *, model: str, dataset: str, layers: list[int],
                 widths: dict[str, int], doc_group: np.ndarray, n_tokens: int, n_kept: int,
                 device: torch.device | str = "cpu", config_hash: str = "",
                 checkpoint_docs: int = CHECKPOINT_DOCS, maxima: dict | None = None,
                 inputs: dict | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.record_file = self.out_dir / RECORD
        self.partial = self.out_dir / ".partial"
        self.layers = sorted(int(layer) for layer in layers)
        self.widths = {str(s): int(w) for s, w in widths.items()}
        self.sites = list(self.widths)
        self.doc_group = np.asarray(doc_group, dtype=np.int64)
        self.n_docs = int(self.doc_group.shape[0])
        if self.n_docs < 1 or np.any(np.diff(self.doc_group) < 0):
            raise ValueError("doc_group must give every document a group, groups in document order")
        self.n_groups = int(self.doc_group[-1]) + 1
        self.device = torch.device(device)
        self.checkpoint_docs = max(1, int(checkpoint_docs))
        self.max_functions = dict(maxima or {})
        self.key = dict(format=FORMAT, model=model, dataset=dataset, split="train", layers=self.layers,
                        widths=self.widths, n_groups=self.n_groups, n_docs=self.n_docs, n_tokens=int(n_tokens),
                        n_kept=int(n_kept), config_hash=config_hash,
                        doc_group=hashlib.sha256(self.doc_group.tobytes()).hexdigest()[:16])
        if self.max_functions:  # absent otherwise: records and checkpoints without maxima stay as they were
            self.key["maxima"] = sorted(self.max_functions)
        if inputs:  # what the moments are computed from (token ids, model): checkpoints only, not the record
            self.key["inputs"] = dict(inputs)
        # Unpublish first: from here on no stale record can pass for this run's.
        self.record_file.unlink(missing_ok=True)
        self._sums = {(layer, site): torch.zeros((w + 1, w + 1), dtype=torch.float64, device=self.device)
                      for layer in self.layers for site, w in self.widths.items()}
        state, why = self._resumable_state()
        if why is not None:
            log.warning("%s: discarding the moments checkpoint in .partial: %s; starting from the first document",
                        self.out_dir, why)
        if state is None:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            self.next_doc = 0
            self.digests = {self._name(layer, site): [None] * self.n_groups for layer, site in self._sums}
            self.maxima = {name: 0.0 for name in self.max_functions}
        else:
            self.next_doc = int(state["next_doc"])
            self.digests = state["digests"]
            self.maxima = {name: float(state["maxima"][name]) for name in self.max_functions}
            for (layer, site), acc in self._sums.items():
                acc.copy_(torch.from_numpy(state["sums"][self._name(layer, site)]))
        # One .npy per (layer, site) with its header written up front; a finished group is written
        # straight to its place in the file (no mapping: at d = 4096 a file is G x 134 MB).
        self._out, self._offset = {}, {}
        for layer in self.layers:
            for site, w in self.widths.items():
                path = self.partial / f"{self._name(layer, site)}.npy"
                if state is None:
                    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64,
                                                       shape=(self.n_groups, w + 1, w + 1))
                    self._offset[layer, site] = header.offset
                    del header
                else:
                    self._offset[layer, site] = np.load(path, mmap_mode="r").offset
                self._out[layer, site] = open(path, "r+b")

    @staticmethod
    def _name(layer: int, site: str) -> str:
        return f"L{layer}-{site}"

    def _resumable_state(self) -> tuple[dict | None, str | None]:
        """(the checkpoint's state with its running totals under "sums", None) when one was left by a
        run of exactly this key and its files are whole; else (None, why not), why None when there
        is no checkpoint at all."""
        if not (self.partial / "state.json").exists():
            return None, None
        try:
            state = json.loads((self.partial / "state.json").read_text())
            if state.get("key") != json.loads(json.dumps(self.key)):
                then, now = state.get("key") or {}, json.loads(json.dumps(self.key))
                changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
                return None, f"it was computed from other inputs or settings ({', '.join(changed)})"
            if not 0 < int(state["next_doc"]) < self.n_docs:
                return None, f"its next document {state['next_doc']} is outside 1..{self.n_docs - 1}"
            state["sums"] = self._checked_sums(state["sums_digests"])
            for (layer, site), w in ((ls, self.widths[ls[1]]) for ls in self._sums):
                m = np.load(self.partial / f"{self._name(layer, site)}.npy", mmap_mode="r")
                if m.shape != (self.n_groups, w + 1, w + 1) or m.dtype != np.float64:
                    return None, f"{self._name(layer, site)}.npy has shape {m.shape} {m.dtype}"
        except Exception as e:  # a missing, truncated or overwritten file, whatever numpy or json raises
            return None, f"it cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        return state, None

    def _checked_sums(self, digests: dict[str, str]) -> dict[str, np.ndarray]:
        """The running totals in .partial/sums.npz, each checked against the digest the state holds."""
        with np.load(self.partial / "sums.npz", allow_pickle=False) as z:
            sums = {self._name(layer, site): z[self._name(layer, site)] for layer, site in self._sums}
        for name, block in sums.items():
            if group_digest(block) != digests[name]:
                raise ValueError(f"sums.npz: {name} does not match its digest")
        return sums

    def add(self, doc_i: int, acts: dict, keep: np.ndarray) -> None:
        """Add document ``doc_i`` (documents in order; those already counted are ignored)."""
        if doc_i < self.next_doc:
            return
        if doc_i != self.next_doc:
            raise ValueError(f"document {doc_i} given, expected {self.next_doc} (documents go in order)")
        keep_t = torch.as_tensor(np.asarray(keep, dtype=bool), device=self.device).to(torch.float64)[:, None]
        for (layer, site), acc in self._sums.items():
            x = acts[layer, site][0].to(device=self.device, dtype=torch.float64)
            # [x, 1] with dropped rows zeroed: (x_a^T x_a) packs X^T X, the column sums and n at once.
            xa = torch.cat([x, torch.ones_like(x[:, :1])], dim=1) * keep_t
            acc.addmm_(xa.T, xa)
        for name, f in self.max_functions.items():
            self.maxima[name] = max(self.maxima[name], float(f(acts)))
        self.next_doc += 1
        g = int(self.doc_group[doc_i])
        if self.next_doc == self.n_docs or self.doc_group[self.next_doc] != g:
            self._finish_group(g)
        if self.next_doc % self.checkpoint_docs == 0 and self.next_doc < self.n_docs:
            self.checkpoint()

    def _finish_group(self, g: int) -> None:
        for (layer, site), acc in self._sums.items():
            block = np.ascontiguousarray(acc.cpu().numpy())
            f = self._out[layer, site]
            f.seek(self._offset[layer, site] + g * block.nbytes)
            f.write(memoryview(block).cast("B"))
            self.digests[self._name(layer, site)][g] = group_digest(block)
            acc.zero_()

    def checkpoint(self) -> None:
        """Flush the finished groups, save the running totals, then the state (next document)."""
        for f in self._out.values():
            f.flush()
            os.fsync(f.fileno())
        sums = {self._name(layer, site): acc.cpu().numpy() for (layer, site), acc in self._sums.items()}
        write_npz(self.partial / "sums.npz", **sums)
        state = {"key": self.key, "next_doc": self.next_doc, "digests": self.digests,
                 "sums_digests": {name: group_digest(block) for name, block in sums.items()}}
        if self.max_functions:
            state["maxima"] = self.maxima
        write_json(state, self.partial / "state.json")

    def close(self) -> dict:
        """Publish every (layer, site) file, then the record (returned); remove the checkpoint."""
        if self.next_doc != self.n_docs:
            raise MomentsError(f"{self.out_dir}: close() after {self.next_doc} of {self.n_docs} documents")
        files = {}
        for (layer, site), f in self._out.items():
            f.close()
            src = Path(f.name)
            final = moments_file(self.out_dir, layer, site)
            with atomic_path(final) as tmp:
                os.replace(src, tmp)
            files.setdefault(str(layer), {})[site] = dict(
                file=final.relative_to(self.out_dir).as_posix(), width=self.widths[site],
                digests=self.digests[self._name(layer, site)])
        self._out = {}
        record = {k: v for k, v in self.key.items() if k not in ("doc_group", "maxima", "inputs")} | {"files": files}
        if self.max_functions:
            record["maxima"] = self.maxima
        write_json(record, self.record_file)
        shutil.rmtree(self.partial, ignore_errors=True)
        return record


def drop_incomplete_moments(record: Path | str) -> list[str]:
    """Remove a moments record whose files are not all there (deleted, resized); return what is wrong.

    Without the record, the next plain ``snakemake`` run rebuilds the moments instead of
    reporting nothing to do and failing in the spectrum jobs. Called when the workflow loads.
    """
    record = Path(record)
    if not record.is_file():
        return []
    try:
        rec = json.loads(record.read_text())
        wrong = []
        for sites in rec["files"].values():
            for entry in sites.values():
                path, w = record.parent / entry["file"], int(entry["width"])
                size = rec["n_groups"] * (w + 1) ** 2 * 8
                if not path.is_file() or path.stat().st_size < size:
                    wrong.append(str(path))
    except (OSError, ValueError, KeyError, TypeError):
        wrong = ["unreadable record"]
    if wrong:
        record.unlink()
    return wrong


def load_moments(record: Path | str, layer: int, site: str) -> tuple[np.ndarray, dict]:
    """([G, d+1, d+1] float64 moments, the record) of ``site`` at ``layer``, every group checked
    against the record's digest."""
    record = Path(record)
    m, digests, rec, path = _open_moments(record, layer, site)
    out = np.empty(m.shape, dtype=np.float64)
    for g, block in enumerate(_checked_groups(record, path, m, digests)):
        out[g] = block
    return out, rec


def _open_moments(record: Path, layer: int, site: str) -> tuple[np.ndarray, list[str], dict, Path]:
    """(the [G, d+1, d+1] file mapped read-only, its groups' digests, the record, its path), checked
    against the record's format, shape and dtype."""
    try:
        rec = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        raise MomentsError(f"{record}: no readable moments record ({e}). Fix: {_fix(record)}") from None
    if rec.get("format") != FORMAT:
        raise MomentsError(f"{record}: format {rec.get('format')!r}, expected {FORMAT!r}. Fix: {_fix(record)}")
    entry = rec["files"].get(str(int(layer)), {}).get(site)
    if entry is None:
        raise MomentsError(f"{record} holds no moments of {site} at layer {layer}. Fix: {_fix(record)}")
    path = record.parent / entry["file"]
    w = int(entry["width"])
    try:
        m = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise MomentsError(f"{path}: unreadable ({e}). Fix: {_fix(record)}") from None
    if m.shape != (rec["n_groups"], w + 1, w + 1) or m.dtype != np.float64:
        raise MomentsError(f"{path}: shape {m.shape} {m.dtype}, the record says "
                           f"({rec['n_groups']}, {w + 1}, {w + 1}) float64. Fix: {_fix(record)}")
    return m, entry["digests"], rec, path


def _checked_groups(record: Path, path: Path, m: np.ndarray, digests: list[str]):
    """Each group of ``m`` in order, read into memory and checked against its digest."""
    for g, digest in enumerate(digests):
        block = np.array(m[g], dtype=np.float64)
        if group_digest(block) != digest:
            raise MomentsError(f"{path}: group {g} does not match the record's digest. Fix: {_fix(record)}")
        yield block


def record_holds(record: Path | str, layer: int, site: str) -> bool:
    """Whether the moments record lists ``site`` at ``layer`` (False when there is no readable record)."""
    try:
        rec = json.loads(Path(record).read_text())
    except (OSError, ValueError):
        return False
    return site in rec.get("files", {}).get(str(int(layer)), {})


def summed_moments(record: Path | str, layer: int, site: str) -> tuple[np.ndarray, dict]:
    """([d+1, d+1] float64 moments of ``site`` at ``layer`` summed over the document groups, the
    record): the packed [[X^T X, colsum], [colsum^T, n]] of every kept row, read one group at a
    time (memory of one group), each group checked against its digest."""
    record = Path(record)
    m, digests, rec, path = _open_moments(record, layer, site)
    total = np.zeros(m.shape[1:], dtype=np.float64)
    for block in _checked_groups(record, path, m, digests):
        total += block
    return total, rec
