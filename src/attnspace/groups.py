"""Document groups: the unit that the spectra's intervals resample and that the streamed moments are kept by.

Whole consecutive documents are dealt into groups of about equal kept rows, so resampling groups keeps
the correlation of rows within a document (:mod:`attnspace.spectrum`); the caching job knows each
row's group before the forward, from the token file (:mod:`attnspace.moments`).
"""

from __future__ import annotations

import numpy as np


def document_groups(doc: np.ndarray, keep: np.ndarray, n_groups: int) -> np.ndarray:
    """Group id [n_rows] (int64, 0 .. G-1) of each row: whole consecutive documents, dealt into at
    most ``n_groups`` groups of about equal kept rows (fewer when there are fewer documents).

    doc: int [n_rows] document index of each row, documents contiguous in row order;
    keep: bool [n_rows]. A document goes to group floor(n_groups * kept rows before it / kept rows).
    """
    doc, keep = np.asarray(doc), np.asarray(keep, dtype=bool)
    if doc.shape != keep.shape or doc.ndim != 1:
        raise ValueError(f"doc {doc.shape} and keep {keep.shape} must be the same 1-D shape")
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    if doc.size == 0:
        return np.zeros(0, dtype=np.int64)
    new_doc = np.r_[True, doc[1:] != doc[:-1]]  # first row of each document
    run = np.cumsum(new_doc) - 1  # [n_rows] document run of each row
    kept_before = np.cumsum(keep) - keep
    n_kept = max(int(keep.sum()), 1)
    group_of_run = np.minimum(kept_before[new_doc] * n_groups // n_kept, n_groups - 1)
    _, labels = np.unique(group_of_run, return_inverse=True)  # consecutive ids, no empty group
    return labels[run].astype(np.int64)
