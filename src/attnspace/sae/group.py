"""Several SAEs trained on one stream of activations: a group.

SAEs that read the same site of the same (model, dataset, layer) with the same stream
settings (batch size, shuffle buffer, training tokens, data seed, source) see the same
batches; a group reads them once and feeds each batch to every member in turn. With a live
source this runs the model once for the whole group instead of once per SAE.

Each member keeps its own everything else (:class:`attnspace.sae.train.SAERun`): init and its
seed, size, k, optimizer and learning rate, AuxK and its dead-latent counters, centred form,
checkpoint, metrics.json and SAE folder. On CPU each member's result is bitwise that of
:func:`attnspace.sae.train.train_sae` run alone on the same batches (tested), resumption after a
kill included; a member whose loss turns non-finite is recorded failed and the others go on.

The workflow sizes groups with :func:`training_bytes` and :func:`pack`. This module imports
torch only to train, so that the workflow can size groups without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from attnspace.errors import AttnspaceError

STREAM_FIELDS = ("site", "batch_size", "buffer_rows", "train_tokens", "stream_seed", "device")
"""Settings every member of a group shares: they fix the batches (and where they go)."""


class Member(NamedTuple):
    """One SAE of a group: its settings, output folder, and what train_sae takes beside them."""

    config: object
    """Its :class:`attnspace.sae.config.SAETrainConfig`."""
    out_dir: Path
    spectrum: object | None = None
    """The site's spectrum (ASI's basis), or None."""
    lm_eval: Callable | None = None
    """The LM loss with the SAE spliced in (:data:`attnspace.sae.evaluate.LMEval`), or None."""
    info: dict | None = None
    """Extra hyperparams for the saved SAE (model, dataset, layer, run, ...)."""


def training_bytes(d_model: int, d_sae: int, batch_size: int, *, optimizer: str = "adam", auxk: bool = False,
                   k: int = 50, k_aux: int = 512) -> int:
    """Device memory of training one SAE, in bytes: the peak of its steps in the CUDA configuration.

    A model of what the code allocates, checked against the measurement of the code itself
    (:func:`attnspace.memory.sae_job_peak`, fake tensors at the paper's shapes; within 10% in
    ``tests/test_memory.py``, every paper size in ``bench/results/memory_paper.csv``). With
    P = 4 n d (one float32 [n, d] matrix) and G = 4 U d (the rows of the U = min(n, B K')
    latents a batch can touch, K' = k + k_aux with AuxK, else k):

    * resident between steps: weights 2P, Adam's two moments 4P, the encoder's bf16 mirror P/2;
    * the backward's weight gradients, which peak at the encoder's: Adam's are dense
      (P each, built from a [U, d] block: 2P + G), SparseAdam's and MaskedAdam's row-sparse (each
      [U, d] block and the copy of it the fake-tensor measurement sees autograd make: 3G; on real
      tensors autograd takes the gradient without a copy, so this errs high). Their updates work
      in chunks of :data:`attnspace.sae.optim.CHUNK_ROWS` touched rows, so they add no [U, d]
      temporaries (:data:`_TRANSIENT_G`);
    * the step's [B, d] float32 tensors (input, reconstruction, residual, their gradients: 20 B d
      bytes) and :data:`_BYTES_PER_ENTRY` bytes per selected entry of the B K' (indices, values, the
      plan's sorted ids). The [B, n] pre-activations are freed before the backward, so they are not
      in the peak.

    It leaves out the stream and a live source's model, which the budget must leave room for
    (``sae.group.memory_gb``). Evaluation (weights and one block of pre-activations) stays below it.
    """
    if optimizer not in _TRANSIENT_G:
        raise AttnspaceError(f"no memory model for optimizer {optimizer!r}", fix=f"use one of {sorted(_TRANSIENT_G)}")
    entries = batch_size * (k + (k_aux if auxk else 0))
    P = 4 * d_sae * d_model
    G = 4 * min(d_sae, entries) * d_model
    dense = 2 * P if optimizer == "adam" else 0
    return int(6.5 * P + dense + _TRANSIENT_G[optimizer] * G + 20 * batch_size * d_model + _BYTES_PER_ENTRY * entries)


_TRANSIENT_G = {"adam": 1, "sparse_adam": 3, "masked_adam": 3}
"""[U, d] float32 blocks alive at the peak of the backward and optimizer step, by optimizer."""

_BYTES_PER_ENTRY = 56
"""Bytes per selected entry (b, j) of a step: int64 indices, float values, the plan's sorted ids."""


def rank_bytes(d_model: int, d_sae: int, batch_size: int, ranks: int, **run) -> int:
    """Device memory of one rank of an SAE feature-sharded over ``ranks`` ranks (:mod:`attnspace.sae.sharded`):
    :func:`training_bytes` of its shard of d_sae / ranks latents (``run``: its optimizer, auxk, k, k_aux),
    plus what every rank holds whole: the partial and the summed reconstructions (TopK and AuxK) and
    the broadcast batch, 5 x 4 x batch_size x d_model bytes."""
    if ranks == 1:
        return training_bytes(d_model, d_sae, batch_size, **run)
    return training_bytes(d_model, d_sae // ranks, batch_size, **run) + 20 * batch_size * d_model


def shard_ranks(d_model: int, d_sae: int, batch_size: int, budget_bytes: float, max_ranks: int, **run) -> int:
    """The ranks (GPUs of one node) an SAE trains on: 1 when :func:`training_bytes` fits ``budget_bytes``,
    else the fewest R, a power of two dividing d_sae and at most ``max_ranks``, whose :func:`rank_bytes`
    fits; 1 when none does (the job is then too large for its devices, which the plan reports)."""
    ranks = 1
    while rank_bytes(d_model, d_sae, batch_size, ranks, **run) > budget_bytes:
        ranks *= 2
        if ranks > max_ranks or d_sae % ranks:
            return 1
    return ranks


def pack(items: Sequence[tuple[str, int]], budget_bytes: float, max_members: int) -> list[list[str]]:
    """Groups of the names in ``items`` ((name, bytes) pairs) on one device each: :func:`pack_devices`
    with one device."""
    return [[name for name, _ in group] for group in pack_devices(items, budget_bytes, max_members, 1)]


def pack_devices(items: Sequence[tuple[str, int]], budget_bytes: float, max_members: int,
                 devices: int) -> list[list[tuple[str, int]]]:
    """Groups of (name, device index) for the names in ``items`` ((name, bytes) pairs), each group
    one job whose ``devices`` devices share one stream.

    Largest first (ties by name): an item joins the current group on its first device that has
    fewer than ``max_members`` members and whose bytes stay within ``budget_bytes``; else it starts
    the next group, on device 0. (A device steps its members one after another, so ``max_members``
    bounds a job's time per device.) An item larger than the budget fits no device: it is refused
    (AttnspaceError naming it and the numbers), before any job starts, not sent to run out of memory."""
    too_big = [(name, size) for name, size in items if size > budget_bytes]
    if too_big:
        name, size = max(too_big, key=lambda item: item[1])
        raise AttnspaceError(
            f"SAE run {name} needs {size / 2**30:.1f} GiB of device memory (attnspace.sae.group.training_bytes), "
            f"more than a device's budget of {budget_bytes / 2**30:.1f} GiB (sae.group.memory_gb)"
            + (f"; {len(too_big) - 1} more runs too" if len(too_big) > 1 else ""),
            fix="shard it over several GPUs, or train it with sparse_adam, or leave that size out of the sweep")
    groups: list[list[tuple[str, int]]] = []
    used: list[float] = []
    count: list[int] = []
    for name, size in sorted(items, key=lambda item: (-item[1], item[0])):
        room = next((d for d in range(devices) if used[d] + size <= budget_bytes and count[d] < max_members),
                    None) if groups else None
        if room is not None:
            groups[-1].append((name, room))
            used[room] += size
            count[room] += 1
        else:
            groups.append([(name, 0)])
            used, count = [size] + [0.0] * (devices - 1), [1] + [0] * (devices - 1)
    return groups


def stream_settings(config) -> dict:
    """The settings of ``config`` (an SAETrainConfig) that a group's members must share."""
    return {field: getattr(config, field) for field in STREAM_FIELDS}


def train_sae_group(members: Sequence[Member], train_store, heldout_store: object | Iterable | None, *,
                    on_step: Callable[[int], None] | None = None, run_class=None) -> list[dict]:
    """Train, evaluate and save every member on one stream; their metrics, in order (each also
    written to its ``out_dir/metrics.json``, as :func:`attnspace.sae.train.train_sae` writes it).

    train_store: a Store (read through one shuffle buffer seeded the members' ``stream_seed``) or
    a ready stream (StoreStream, LiveStream). heldout_store: a Store, batches, or None, as for
    train_sae. run_class: the members' run (default :class:`attnspace.sae.train.SAERun`; on every rank of
    a feature-sharded job, :class:`attnspace.sae.sharded.ShardedRun`). Raises AttnspaceError when the
    members' stream settings differ or two share a folder.
    """
    from attnspace.sae.data import StoreStream
    from attnspace.sae.train import SAERun, train_runs
    from attnspace.store import Store

    if not members:
        raise AttnspaceError("an SAE group needs at least one member", fix="give one --member per SAE")
    shared = stream_settings(members[0].config)
    for m in members[1:]:
        other = stream_settings(m.config)
        if other != shared:
            keys = ", ".join(f"{k} {shared[k]} vs {other[k]}" for k in STREAM_FIELDS if other[k] != shared[k])
            raise AttnspaceError(f"SAE group member {m.out_dir} reads another stream than {members[0].out_dir} "
                                 f"({keys})", fix="train it in a group of its own, or give it the same settings")
    folders = [Path(m.out_dir).resolve() for m in members]
    if len(set(folders)) != len(folders):
        raise AttnspaceError("two SAE group members write the same folder", fix="give each member its own --out-dir")
    c = members[0].config
    stream = (StoreStream(train_store, c.site, c.batch_size, c.buffer_rows, c.stream_seed)
              if isinstance(train_store, Store) else train_store)
    runs = [(run_class or SAERun)(m.config, m.out_dir, m.spectrum, lm_eval=m.lm_eval, info=m.info) for m in members]
    return train_runs(runs, stream, heldout_store, on_step=on_step, desc=f"{len(runs)} SAEs")
