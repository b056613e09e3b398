"""Feature-sharded TopK SAE training on ``torch.distributed``: R ranks, each holding n/R latents.

The model, its loss and its optimizers are those of one process (:class:`TopKSAE`, :mod:`attnspace.sae.fast`,
:mod:`attnspace.sae.optim`); only where the latents live changes. The rule, per step:

* Rank r holds latents [r n/R, (r + 1) n/R): its rows of W_enc, b_enc and W_dec (n divisible by R).
  b_dec is replicated: every rank computes the same loss from the same reconstruction, so every
  rank computes the same b_dec gradient and takes the same step (no collective).
* Forward: pre_r = W_enc_r x + b_enc_r [B, n/R]; a local top-min(k, n/R) and, with AuxK, a local top
  over the rank's dead latents; one all-gather of these candidates (values and global ids) per row;
  every rank selects the same global top-k (and top-k_aux of the dead) from them: the global top-k
  lies in the union of the local ones, so the selection is the one-process selection (up to the
  order among exact ties). Each rank decodes its own selected latents (:class:`~attnspace.sae.fast.Plan`
  over its shard: other ranks' entries are inactive), and one all-reduce sums the partial
  reconstructions [B, d] (with AuxK [B, 2, d]: both bags in that one all-reduce). Its backward is
  the identity (every rank holds the same loss of the same sum); the one backward collective is an
  all-reduce of the encoder input's gradient in the centred form (b_dec's encoder share).
* The number of dead latents AuxK takes (min(k_aux, #dead)) is one all-reduce of the shards' counts.
* Optimizers: Adam and SparseAdam act per element and per row, so their shards are exact. MaskedAdam
  skips a step of a tensor whose whole gradient is zero: the shards agree on "whole" through one
  all-reduce per parameter (:class:`ShardedMaskedAdam`).
* Initialisation: every rank builds the one-process init from the same seed
  (:func:`attnspace.sae.init.initial_weights`: directions, ASI or random subspace, norm search) and
  keeps its rows, so R does not change the directions; the ranks take turns, so that the node's host
  holds one whole init at a time (n x d in float64 and float32: 48 GiB at 1M x 4096).
* Dead-latent statistics per shard (:class:`ShardTracker`); evaluation, ``reconstruct`` and the
  LM-loss splice run through the same collectives on every rank (:meth:`ShardedSAE.encode`, ``decode``).

Data: one reader, broadcast (:class:`BroadcastStream`): rank 0 reads the stream (the store through
the shuffle buffer, or the live model) and broadcasts every batch [B, d]. A live model so runs once
per job, on rank 0's GPU, and every rank trains on the very same bits, which the shared selection
and the replicated b_dec need (R model forwards on R GPUs need not agree to the bit). The cost is one
broadcast of 64 MiB per step at the paper's B 4096, d 4096 (about 0.07 ms over NVLink).

Bytes sent per step and rank (ring collectives), :func:`bytes_per_step`: the batch B d x 4, the
all-gather (R - 1) x B (k + k_aux') x 12 (float32 values and int64 ids; 10 with the bf16 values of
CUDA) and the all-reduce 2 (R - 1)/R x B G d x 4 (G = 2 with AuxK). At the paper's B 4096, d 4096,
k 50, k_aux 512 (bf16 values): 214 MiB at R = 2 and 442 MiB at R = 8, 0.25 / 0.52 ms over NVLink
(900 GB/s) and 4.5 / 9.3 ms over InfiniBand (50 GB/s), against a one-GPU step of about 75 ms at 1M
latents (``bench/sae_sharded.py``).

Checkpoints (:func:`checkpoint_files`): each rank writes ``train_state.rank<r>-of-<R>.step<s>.safetensors``
(its shard, its moments, its dead counters and the stream's state) and, after a barrier (all ranks have
written step s), removes its older ones; a restarted job resumes every rank from the latest step that
all ranks wrote, with the same R. At the end each rank writes its shard and rank 0 merges them
(:func:`merge_shards`) into the one LlamaScope folder (:func:`attnspace.sae.io.save_sae`) a one-process
run writes.

Launch (:func:`launch`): one process per rank on this node (one per GPU), the device set from
``LOCAL_RANK`` before any CUDA work, NCCL on CUDA and gloo on CPU; each rank's output goes to
``<log_dir>/rank<r>.log``. A rank that dies ends the job within about 10 s: within :data:`POLL_SECONDS`
the launcher sees it, stops the others (SIGTERM, then SIGKILL after :data:`GRACE_SECONDS`; a rank blocked
in a collective is ended with them) and raises one line naming the rank, its exit status and its log.
SLURM's stop signals (SIGTERM, SIGUSR1) reaching the launcher are forwarded to the ranks, which agree
on the step after which they all checkpoint and stop (:meth:`ShardedRun.step`); the launcher then
raises :class:`attnspace.sae.train.TrainingStopped`, and the rerun resumes.

Tested on CPU (``tests/test_sae_sharded.py``, gloo): 1, 2 and 4 ranks against one process for every
optimizer with ASI and AuxK (weights within 1e-4 relative, measured 2e-6; same dead counts), reruns,
SIGTERM, kill -9 and resumption bitwise. NCCL on GPUs is the same code with CUDA tensors; it has not
run on a GPU yet.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from attnspace.errors import AttnspaceError, one_line
from attnspace.files import read_safetensors
from attnspace.sae.data import mean_norm
from attnspace.sae.fast import DecodeFast, EncodeFast, cuda_path, lowp_weight, make_plan
from attnspace.sae.init import initial_weights
from attnspace.sae.io import save_checkpoint, save_sae
from attnspace.sae.losses import DeadLatentTracker, auxk_loss, nmse
from attnspace.sae.model import EncoderOutput, ForwardOutput, TopKSAE
from attnspace.sae.optim import MaskedAdam, make_optimizer, optimizer_tensors
from attnspace.sae.train import CHECKPOINT_FORMAT, SAERun, StopSignals, TrainingStopped, _PARAMS

log = logging.getLogger("attnspace.sae")

POLL_SECONDS = 0.2
"""How often the launcher checks its ranks."""

GRACE_SECONDS = 10.0
"""How long the other ranks get to end after SIGTERM before SIGKILL, once one rank has failed."""

STOPPED = 75
"""Exit status of a rank stopped by a signal after its checkpoint (:class:`attnspace.sae.train.TrainingStopped`)."""

COLLECTIVE_TIMEOUT = timedelta(minutes=30)
"""The process group's timeout: a collective that waits longer (a rank hung, not dead) raises."""


# --- collectives with autograd ---------------------------------------------------------------------


class _SumShards(torch.autograd.Function):
    """Forward: the sum over ranks (all-reduce). Backward: the identity, since every rank computes the
    same loss of the same sum, so each already holds the gradient of its own term."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _CopyToShards(torch.autograd.Function):
    """Forward: the identity (a replicated input read by every shard). Backward: the sum over ranks of
    the shards' gradients (all-reduce)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def _all_gather_cat(t: Tensor) -> Tensor:
    """[B, c] on every rank -> [B, R c], the ranks' columns in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 1)


def global_count(n: Tensor | int, device: torch.device) -> int:
    """The sum over ranks of an integer (one all-reduce)."""
    t = torch.as_tensor(n, dtype=torch.int64, device=device).reshape(1).clone()
    dist.all_reduce(t)
    return int(t)


# --- the sharded model -------------------------------------------------------------------------------


class ShardedSAE(TopKSAE):
    """This rank's shard of a TopK SAE of ``d_sae`` latents: W_enc, b_enc, W_dec hold latents
    [offset, offset + n_local); b_dec is whole. ``d_sae`` and ``k`` are the whole SAE's; the forward,
    :meth:`encode` and :meth:`decode` take and return global latent ids and must run on every rank.
    Training always takes the fast path's step (:mod:`attnspace.sae.fast`; ``SAETrainConfig.fast`` has
    no reference-path counterpart here)."""

    def __init__(self, d_model: int, d_sae: int, k: int, rank: int, ranks: int,
                 dataset_norm: float | None = None) -> None:
        if d_sae % ranks:
            raise AttnspaceError(f"an SAE of {d_sae} latents cannot be split evenly over {ranks} ranks",
                                 fix="give a number of ranks that divides the number of latents")
        n_local = d_sae // ranks
        super().__init__(d_model, n_local, min(k, n_local), dataset_norm=dataset_norm)
        if not 0 < k <= d_sae:
            raise ValueError(f"k must lie in [1, d_sae={d_sae}], got {k}")
        self.d_sae, self.k, self.n_local = int(d_sae), int(k), n_local
        self.rank, self.ranks, self.offset = int(rank), int(ranks), int(rank) * n_local

    def _select(self, x_in: Tensor, dtype: torch.dtype, dead: Tensor | None, k_aux: int):
        """The global selection: (ids [B, K'] global, values [B, K'] pre-activations, in ``dtype``), the
        first ``k`` columns the TopK latents, the rest (k_aux' = min(k_aux, #dead)) the AuxK ones."""
        with torch.no_grad():
            pre = F.linear(x_in.detach().to(dtype), lowp_weight(self.W_enc, dtype), self.b_enc.detach().to(dtype))
            n_local = self.n_local
            top = pre.topk(min(self.k, n_local), dim=1, sorted=False)
            vals, ids, k_aux_all = [top.values], [top.indices], 0
            if dead is not None and k_aux > 0:
                k_aux_all = min(k_aux, global_count(dead.sum(), pre.device))
            if k_aux_all:
                # In place, as one process: the TopK candidates are taken, AuxK reads only dead entries.
                aux = pre.masked_fill_(~dead, -math.inf).topk(min(k_aux_all, n_local), dim=1, sorted=False)
                vals.append(aux.values)
                ids.append(aux.indices)
            del pre
            c_main = vals[0].shape[1]
            cand_v = _all_gather_cat(torch.cat(vals, 1))  # [B, R (c_main + c_aux)]
            cand_i = _all_gather_cat(torch.cat(ids, 1) + self.offset)
            per_rank = cand_v.shape[1] // self.ranks
            is_main = torch.arange(cand_v.shape[1], device=cand_v.device) % per_rank < c_main
            out_i, out_v = [], []
            for part, k in ((is_main, self.k), (~is_main, k_aux_all)):
                if k:
                    v, i = cand_v[:, part], cand_i[:, part]
                    pos = v.topk(k, dim=1, sorted=False).indices
                    out_v.append(v.gather(1, pos))
                    out_i.append(i.gather(1, pos))
            return torch.cat(out_i, 1), torch.cat(out_v, 1)

    def _mine(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Global ids -> (bool: held here, local ids; 0 where not held here)."""
        local = ids - self.offset
        mine = (local >= 0) & (local < self.n_local)
        return mine, torch.where(mine, local, 0)

    def forward(self, x: Tensor, dead: Tensor | None = None, k_aux: int = 0) -> ForwardOutput:
        """:meth:`TopKSAE.forward` on x [B, d] (normalised, the same on every rank); ``dead``: this rank's
        dead latents (bool [n_local]). Values and indices are the global selection's (no gradient)."""
        if not torch.is_grad_enabled():
            enc = self.encode(x)
            x_hat = self.decode(enc.values, enc.indices)
            return ForwardOutput(x_hat, enc.values, enc.indices, nmse(x, x_hat), x_hat.new_zeros(()))
        K = self.k
        x_in = self.encoder_input(x)  # x, or x - b_dec in the centred form (a graph to b_dec)
        dtype = self.matmul_dtype or self.W_enc.dtype
        ids, vals = self._select(x_in, dtype, dead, k_aux)
        with torch.no_grad():
            mine, local = self._mine(ids)
            raw = torch.where(mine, vals, 0).to(x.dtype)  # other ranks' entries are inactive here
            plan = make_plan(local, raw > 0, K, self.n_local)
        enc_in = _CopyToShards.apply(x_in) if x_in.requires_grad else x_in
        values = EncodeFast.apply(enc_in, self.W_enc, self.b_enc, raw, plan, self.sparse_grad)  # [B, K']
        out = _SumShards.apply(DecodeFast.apply(values, self.W_dec, plan, self.sparse_grad))  # [B G, d]
        if ids.shape[1] > K:
            out = out.view(x.shape[0], 2, -1)
            x_hat = out[:, 0] + self.b_dec
            aux = auxk_loss(x - x_hat, out[:, 1])
        else:
            x_hat = out + self.b_dec
            aux = x_hat.new_zeros(())
        return ForwardOutput(x_hat, vals[:, :K].to(x.dtype).relu(), ids[:, :K], nmse(x, x_hat), aux)

    @torch.no_grad()
    def encode(self, x: Tensor) -> EncoderOutput:
        """x [B, d] (normalised) -> the global top-k (values, global ids), in float32 as one process's
        evaluation; ``pre`` is None (it is split over the ranks)."""
        ids, vals = self._select(self.encoder_input(x), self.W_enc.dtype, None, 0)
        return EncoderOutput(vals.relu(), ids, None)

    @torch.no_grad()
    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """[B, k] activations at global latent ids -> x_hat [B, d] (each rank its own latents, one all-reduce)."""
        mine, local = self._mine(indices)
        part = F.embedding_bag(local, self.W_dec, per_sample_weights=torch.where(mine, values, 0), mode="sum")
        return _SumShards.apply(part) + self.b_dec


class ShardTracker(DeadLatentTracker):
    """The dead-latent counters of this rank's latents, updated from the global selection."""

    def __init__(self, sae: ShardedSAE, threshold_tokens: int, device: torch.device | str) -> None:
        super().__init__(sae.n_local, threshold_tokens, device)
        self.sae = sae

    def update(self, values: Tensor, indices: Tensor) -> None:
        """values, indices: [B, K] of the global selection (global ids)."""
        mine, local = self.sae._mine(indices)
        super().update(torch.where(mine, values, 0), local)


class ShardedMaskedAdam(MaskedAdam):
    """:class:`MaskedAdam` on shards: a step counts when the whole tensor's gradient (all shards) has
    a non-zero entry."""

    def _counts(self, g: Tensor) -> bool:
        return global_count(int(super()._counts(g)), g.device) > 0


def make_sharded_optimizer(name: str, params, lr: float, betas: tuple[float, float], eps: float):
    """:func:`attnspace.sae.optim.make_optimizer` for a shard's parameters."""
    if name == "masked_adam":
        return ShardedMaskedAdam(params, lr=lr, betas=tuple(betas), eps=eps)
    return make_optimizer(name, params, lr, betas, eps)


# --- the run: init, checkpoints, merge -----------------------------------------------------------------

_SHARD_FILE = re.compile(r"train_state\.rank(\d+)-of-(\d+)\.step(\d+)\.safetensors$")


def checkpoint_files(out_dir: Path) -> list[tuple[int, int, int, Path]]:
    """(rank, ranks, step, path) of the sharded checkpoints in ``out_dir``."""
    found = []
    for path in sorted(Path(out_dir).glob("train_state.rank*.safetensors")):
        m = _SHARD_FILE.search(path.name)
        if m:
            found.append((int(m[1]), int(m[2]), int(m[3]), path))
    return found


def rank_device(device: str) -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` for a CUDA run, else ``device``."""
    d = torch.device(device)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if d.type == "cuda" else d


_STOP = {"pending": 0, "loop": None}
"""This rank's stop signal not yet agreed on (0: none) and the training loop's StopSignals."""


def _note_signal(signum, frame) -> None:
    _STOP["pending"] = int(signum)


class ShardedRun(SAERun):
    """:class:`attnspace.sae.train.SAERun` for this rank's shard; :func:`attnspace.sae.train.train_runs`
    drives it unchanged (every rank runs the same loop on the same batches)."""

    def __init__(self, config, out_dir: Path, spectrum=None, *, lm_eval=None, info=None) -> None:
        super().__init__(config, out_dir, spectrum, lm_eval=lm_eval, info=info)
        self.rank, self.ranks = dist.get_rank(), dist.get_world_size()
        self.device = rank_device(config.device)
        self.finite = self.finite.to(self.device)

    def setup(self, sample: Tensor, resume: bool) -> None:
        config, device = self.config, self.device
        d = sample.shape[1]
        sae = ShardedSAE(d, config.n_latents(d), config.k, self.rank, self.ranks,
                         dataset_norm=mean_norm(sample)).to(device)
        sae.sparse_grad = config.optimizer in ("sparse_adam", "masked_adam")
        sae.centred = bool(config.centred)
        sae.matmul_dtype = torch.bfloat16 if cuda_path(device) else None
        self.sae, self.d = sae, d
        self.opt = make_sharded_optimizer(config.optimizer, [getattr(sae, p) for p in _PARAMS],
                                          config.learning_rate, config.betas, config.eps)
        self.tracker = ShardTracker(sae, config.dead_threshold_tokens, device)
        step = self._resume_step() if resume else None
        if step is not None:
            self.ckpt_path = self._path(step)
            self._resume()  # SAERun's: this rank's file of that step
            log.info("resuming %s at step %d of %d (%d ranks)", self.out_dir, self.start, config.n_steps, self.ranks)
            return
        x0 = sample[: config.init_batch_tokens].to(device) * sae.norm_factor
        spectrum = self.spectrum
        if spectrum is not None and spectrum.components.shape[1] != d:
            raise ValueError(f"spectrum width {spectrum.components.shape[1]} != site width {d}")
        bias = sample.double().mean(0).float().to(device) * sae.norm_factor if sae.centred else None
        for turn in range(self.ranks):  # in turn: one whole init (1M x 4096: 48 GiB) on the node's host at a time
            if turn == self.rank:
                W, bias, init = initial_weights(config.n_latents(d), d, config.k, config.init, x0,
                                                torch.Generator().manual_seed(config.seed + 1), d_init=config.d_init,
                                                source=spectrum if spectrum is not None else sample,
                                                grid=config.init_norm_grid, decoder_bias=bias)
                rows = W[sae.offset : sae.offset + sae.n_local].clone()
                del W
            dist.barrier()
        with torch.no_grad():
            sae.W_dec.copy_(rows)
            sae.W_enc.copy_(rows)
            if bias is not None:
                sae.b_dec.copy_(bias)
        self.init_norm = init.norm

    def step(self, x: Tensor, done: int) -> None:
        super().step(x, done)
        self._agree_on_stop()

    def _agree_on_stop(self) -> None:
        """Stop signals (SIGTERM, SIGUSR1: :class:`attnspace.sae.train.StopSignals`) acted on by every rank
        after the same step: this rank's handler only records them (:data:`_STOP`), and after each step
        one all-reduce tells every rank whether any rank got one; only then is the loop's stop flag set."""
        stop = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if isinstance(stop, StopSignals):  # the first step inside train_runs: take its handlers over
            for s in StopSignals.SIGNALS:
                signal.signal(s, _note_signal)
            _STOP.update(pending=0, loop=stop)
        flag = torch.tensor([_STOP["pending"]], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) and _STOP["loop"] is not None:
            _STOP["loop"].signal = int(flag)

    def _path(self, step: int) -> Path:
        return self.out_dir / f"train_state.rank{self.rank}-of-{self.ranks}.step{step}.safetensors"

    def _resume_step(self) -> int | None:
        """The latest step every rank has a checkpoint of (None: none), after checking that the
        checkpoints in the folder were written by as many ranks as this job has."""
        files = checkpoint_files(self.out_dir)
        other = sorted({r for _, r, _, _ in files if r != self.ranks})
        if other:
            raise AttnspaceError(f"{self.out_dir}: sharded checkpoints of {other[0]} ranks, this job has {self.ranks}",
                                 fix=f"resume with {other[0]} ranks, or delete {self.out_dir}/train_state.* to start over")
        mine = [s for r, _, s, _ in files if r == self.rank]
        if mine:
            self.ckpt_path = self._path(max(mine))
            reason = self.stale_reason()  # other settings or inputs, or a damaged file: every rank starts over
            if reason is not None:
                log.warning("%s: discarding the sharded checkpoints of rank %d: %s; this run starts over",
                            self.out_dir, self.rank, reason)
                self._remove_checkpoints()
                mine = []
        latest = torch.tensor([max(mine, default=-1)], device=self.device)
        dist.all_reduce(latest, op=dist.ReduceOp.MIN)
        return None if int(latest) < 0 else int(latest)

    def checkpoint(self, stream_state: dict[str, Tensor], done: int) -> None:
        """This rank's shard, moments, dead counters and the stream's state after step ``done``; the
        older files go once every rank has written this one."""
        tensors = {f"sae.{p}": getattr(self.sae, p).detach() for p in _PARAMS}
        tensors.update(optimizer_tensors(self.opt, _PARAMS))
        tensors["dead.tokens_since_fired"] = self.tracker.tokens_since_fired
        tensors.update(stream_state)
        record = dict(format=CHECKPOINT_FORMAT, config=self.config.result_fields(), inputs=self.inputs, step=done,
                      dataset_norm=self.sae.dataset_norm, init_norm=self.init_norm, rank=self.rank, ranks=self.ranks)
        save_checkpoint(self._path(done), tensors, record)
        dist.barrier()
        self._remove_checkpoints(keep=done)

    def _remove_checkpoints(self, keep: int | None = None) -> None:
        for rank, _, step, path in checkpoint_files(self.out_dir):
            if rank == self.rank and step != keep:
                path.unlink(missing_ok=True)

    def save(self, metrics: dict) -> None:
        """Every rank writes its shard; rank 0 merges them into the SAE folder (:func:`merge_shards`)."""
        shard_dir = self.out_dir / "shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(shard_dir / f"rank{self.rank}.safetensors",
                        {f"sae.{p}": getattr(self.sae, p).detach().cpu() for p in _PARAMS},
                        dict(rank=self.rank, ranks=self.ranks, offset=self.sae.offset))
        dist.barrier()
        if self.rank == 0:
            merge_shards(shard_dir, self.ranks, self.sae, self.out_dir, metrics=metrics,
                         **{"site": self.config.site, **(self.info or {})})
        dist.barrier()

    def finish(self, stream, heldout_store, train_seconds: float) -> dict:
        tracker = DeadLatentTracker(self.sae.d_sae, self.tracker.threshold_tokens, self.device)
        tracker.tokens_since_fired.copy_(_all_gather_cat(self.tracker.tokens_since_fired[None])[0])
        self.tracker = tracker  # the whole SAE's counters, for its metrics
        metrics = super().finish(stream, heldout_store, train_seconds)
        dist.barrier()
        self._remove_checkpoints()
        return metrics


def merge_shards(shard_dir: Path, ranks: int, like: TopKSAE, out_dir: Path, *, metrics: dict | None = None,
                 **info) -> Path:
    """The SAE folder of ``ranks`` shard files in ``shard_dir`` (each rank's W_enc, b_enc, W_dec rows and
    b_dec, in rank order), written by :func:`attnspace.sae.io.save_sae` as one process writes it;
    ``like`` gives d_model, d_sae, k, the norm and the centred form. The shard files are removed after."""
    paths = [Path(shard_dir) / f"rank{r}.safetensors" for r in range(ranks)]
    parts = [read_safetensors(p)[0] for p in paths]
    sae = TopKSAE(like.d_model, like.d_sae, like.k, dataset_norm=like.dataset_norm)
    sae.centred = like.centred
    with torch.no_grad():
        for p in ("W_enc", "b_enc", "W_dec"):
            getattr(sae, p).copy_(torch.cat([part[f"sae.{p}"] for part in parts]))
        sae.b_dec.copy_(parts[0]["sae.b_dec"])
    save_sae(sae, out_dir, metrics=metrics, **info)
    for p in paths:
        p.unlink()
    Path(shard_dir).rmdir()
    return Path(out_dir)


def bytes_per_step(batch: int, d: int, k: int, ranks: int, k_aux: int = 0, value_bytes: int = 4) -> int:
    """Bytes each rank sends per training step with Adam or SparseAdam, ring collectives: the broadcast
    batch [B, d] float32 (each rank forwards it once), the all-gather of the candidates (``k`` and
    ``k_aux`` per row and rank, values of ``value_bytes``: 2 for the bf16 product on CUDA, and int64
    ids), the all-reduce of the partial reconstructions [B, G, d] float32 (G = 2 with AuxK) and, with
    AuxK, of the dead count. (MaskedAdam adds one 8-byte all-reduce per parameter.)"""
    if ranks == 1:
        return 0
    groups = 2 if k_aux else 1
    reduce = 2 * (ranks - 1) * (batch * groups * d * 4 + (8 if k_aux else 0)) // ranks
    return batch * d * 4 + (ranks - 1) * batch * (k + k_aux) * (value_bytes + 8) + reduce


# --- launch ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, ranks: int, port: int, log_path: str, fn: Callable, args: tuple) -> None:
    """One rank: its log, its device (from LOCAL_RANK, before any CUDA work), the process group (NCCL where
    CUDA is available, unless ATTNSPACE_SHARDED_BACKEND=gloo, which CPU tensors need), then fn."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and os.environ.get("ATTNSPACE_SHARDED_BACKEND") != "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=ranks, timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(*args)
    except TrainingStopped as err:  # every rank stops after the same step, checkpoints written
        log.warning("%s", err.line())
        sys.exit(STOPPED)
    except AttnspaceError as err:  # bad input or state: its one line, last in the log, for the launcher
        print(one_line(err), file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        dist.destroy_process_group()


def _wait(procs) -> int | None:
    """Wait until every process ended (None) or one failed: its index, a rank killed by a signal first
    (the others fail after it, in their collectives), else the lowest. Stopped ranks are waited for."""
    while any(p.exitcode is None for p in procs):
        time.sleep(POLL_SECONDS)
        ended = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0, STOPPED)]
        if ended:
            return min(ended, key=lambda r: (procs[r].exitcode >= 0, r))
    return next((r for r, p in enumerate(procs) if p.exitcode != 0), None)


def launch(ranks: int, fn: Callable, args: Sequence = (), *, log_dir: Path) -> None:
    """Run ``fn(*args)`` on ``ranks`` processes of this node (a picklable top-level function), each
    rank's output in ``log_dir/rank<r>.log``; return once all ranks ended well.

    Raises AttnspaceError naming the first rank that failed, its exit status and its log, after
    stopping the others (see the module's docstring for the timeouts)."""
    import multiprocessing as mp

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = _free_port()
    logs = [log_dir / f"rank{r}.log" for r in range(ranks)]
    procs = [ctx.Process(target=_rank_main, args=(r, ranks, port, str(logs[r]), fn, tuple(args)), daemon=False)
             for r in range(ranks)]
    for p in procs:
        p.start()

    def forward(signum, frame):  # SLURM's stop signal reaches the ranks, which agree on when to stop
        for p in procs:
            if p.exitcode is None:
                os.kill(p.pid, signum)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in StopSignals.SIGNALS} if main else {}
    try:
        failed = _wait(procs)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if failed is None:
        return
    if all(p.exitcode == STOPPED for p in procs):
        raise TrainingStopped(f"sharded SAE training stopped by a signal on all {ranks} ranks; the checkpoints "
                              f"to resume from are written (logs: {log_dir})", fix="rerun the job: it resumes")
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()
    code = procs[failed].exitcode
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    lines = logs[failed].read_text(errors="replace").splitlines() if logs[failed].exists() else []
    said = lines[-1].removeprefix("error: ") if lines and lines[-1].startswith("error: ") else None
    if said is not None:  # the rank's own one line (bad input or state)
        raise AttnspaceError(f"rank {failed} of {ranks}: {said} (its log: {logs[failed]})")
    raise AttnspaceError(f"rank {failed} of {ranks} failed ({how}); its log: {logs[failed]}",
                         fix="read that log; rerun the job to resume from the last sharded checkpoint")


class BroadcastStream:
    """Rank 0's training stream, its every batch (and the normalisation sample) broadcast to all ranks.

    ``stream``: the stream on rank 0, None on the others. ``store``: the cached training store (every
    rank opens it: the training-rows evaluation reads it on every rank), None for a live stream.
    ``resumable`` must be the same on every rank; the stream's state lives in rank 0's checkpoints."""

    def __init__(self, stream, device: torch.device, *, store=None, resumable: bool) -> None:
        self.stream, self.device, self.store, self.resumable = stream, device, store, resumable
        self.rank = dist.get_rank()

    def _broadcast(self, rows: Tensor | None) -> Tensor:
        shape = torch.zeros(2, dtype=torch.int64, device=self.device)
        if self.rank == 0:
            shape.copy_(torch.tensor(rows.shape))
        dist.broadcast(shape, 0)
        out = (rows.to(self.device, torch.float32).contiguous() if self.rank == 0
               else torch.empty(*shape.tolist(), device=self.device))
        dist.broadcast(out, 0)
        return out

    def sample(self, n: int) -> Tensor:
        return self._broadcast(self.stream.sample(n) if self.rank == 0 else None).cpu()

    def next_batch(self) -> Tensor:
        return self._broadcast(self.stream.next_batch() if self.rank == 0 else None)

    def state_tensors(self) -> dict[str, Tensor]:
        return self.stream.state_tensors() if self.rank == 0 else {}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        if self.rank == 0:
            self.stream.load_state(tensors)


def train_sharded(members: Sequence, train, heldout_store, *, on_step: Callable[[int], None] | None = None
                  ) -> list[dict]:
    """:func:`attnspace.sae.group.train_sae_group` with every member feature-sharded over this job's
    ranks; call it on every rank (inside :func:`launch`); every rank returns the same metrics.

    train: a Store (every rank; rank 0 reads it through the members' shuffle buffer), or a ready stream
    on rank 0 (a live stream) and None on the other ranks. Rank 0 reads and broadcasts every batch:
    a live model then runs once, on rank 0, and every rank trains on the very same bits (a selection
    and a replicated b_dec shared by all ranks need that); a batch costs one broadcast of [B, d]
    (64 MiB at the paper's B 4096, d 4096)."""
    from attnspace.sae.data import StoreStream
    from attnspace.sae.group import train_sae_group
    from attnspace.store import Store

    c = members[0].config
    store = train if isinstance(train, Store) else None
    stream = train
    if store is not None:
        stream = StoreStream(store, c.site, c.batch_size, c.buffer_rows, c.stream_seed) if dist.get_rank() == 0 else None
    device = rank_device(c.device)
    resumable = torch.tensor([int(getattr(stream, "resumable", hasattr(stream, "state_tensors")))], device=device)
    dist.broadcast(resumable, 0)  # rank 0's stream decides
    shared = BroadcastStream(stream, device, store=store, resumable=bool(resumable))
    return train_sae_group(members, shared, heldout_store, on_step=on_step, run_class=ShardedRun)
