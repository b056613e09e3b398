"""Train one TopK SAE: initialise, train with resumable checkpoints, evaluate, save.

:func:`train_sae` is the one entry point (the CLI's ``train-sae`` wraps it). The run:

1. normalisation: mean norm of the first ``asi_sample_tokens`` kept training rows;
2. init (``config.init``) on the first ``init_batch_tokens`` of them, normalised; ASI's
   basis from ``spectrum`` when given, else from that sample;
3. ``n_steps`` steps of NMSE (+ alpha AuxK) on shuffled batches, checkpointing every
   ``checkpoint_every`` steps to ``out_dir/train_state.safetensors``;
4. evaluation on held-out tokens and on the first ``eval_tokens`` training tokens (``train_nmse``,
   beside the held-out ``nmse``: their gap shows memorisation), the SAE folder (LlamaScope
   layout) and metrics.json; the checkpoint is removed once they are written.

The centred form (``config.centred``) starts b_dec at the mean of the normalisation sample
and subtracts it before the encoder (:class:`attnspace.sae.model.TopKSAE`), so b_dec's gradient
has an encoder share (both training paths, reference and fast, compute it).

A run whose loss becomes NaN or infinite stops there: metrics.json records
``status: failed`` with the step and the reason, the metric fields stay None, and no
SAE is saved; an earlier run's SAE files under the same name are deleted when the run is
created, so no reader takes them for this run's (a diverged run is reported as failed, never
dropped or replaced).
Finiteness is checked on the device every step and read back every ``log_every``
steps (and at the end), so the check adds no per-step synchronisation.

Resumption: if ``out_dir/train_state.safetensors`` exists (a killed run), training
continues from it: weights, both moments and step counts, dead-latent counters, the
shuffle buffer's rows, read cursor and RNG state. On one device with the same
settings, the result is bitwise that of an uninterrupted run (tested on CPU). The
checkpoint's record holds the settings that determine the weights
(``config.result_fields()``) and what the run reads (``info["inputs"]``: the training
store's :func:`attnspace.sae.io.store_identity`, or the live stream's model, tokens and
seeds); a checkpoint whose record differs in either, or that cannot be read, is deleted
when its run is created, with one line saying why, and the run starts over.

One SAE's state, step, checkpoint, evaluation and files are :class:`SAERun`; the loop over
batches is :func:`train_runs`, which feeds each batch of one stream to one or more runs.
:func:`train_sae` is that loop with one run; :func:`attnspace.sae.group.train_sae_group`
with several (runs that share the stream's settings).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from attnspace.errors import AttnspaceError
from attnspace.files import write_json
from attnspace.sae.config import SAETrainConfig
from attnspace.sae.data import StoreStream, heldout_batches, mean_norm
from attnspace.sae.evaluate import LMEval, evaluate
from attnspace.sae.fast import cuda_path, drop_mirror
from attnspace.sae.init import initialize
from attnspace.sae.io import checkpoint_record, load_checkpoint, remove_weights, save_checkpoint, save_sae
from attnspace.sae.losses import DeadLatentTracker
from attnspace.sae.model import TopKSAE, reconstruct
from attnspace.sae.optim import load_optimizer_tensors, make_optimizer, optimizer_tensors
from attnspace.spectrum import Spectrum
from attnspace.store import Store

log = logging.getLogger("attnspace.sae")

CHECKPOINT = "train_state.safetensors"
"""Checkpoint file name inside the output folder."""

CHECKPOINT_FORMAT = "attnspace-sae-train-state/2"
"""Tag of the checkpoint's record; /2 added what the run reads (``inputs``)."""

_PARAMS = ["W_enc", "b_enc", "W_dec", "b_dec"]


def train_sae(
    config: SAETrainConfig,
    train_store: Store | StoreStream,
    heldout_store: Store | Iterable[Tensor] | None,
    out_dir: Path,
    spectrum: Spectrum | None = None,
    *,
    lm_eval: LMEval | None = None,
    info: dict | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train, evaluate and save one SAE; return its metrics (also written to ``out_dir/metrics.json``).

    train_store: a Store (read through a shuffle buffer seeded ``config.stream_seed``) or a ready
    stream (StoreStream, or :class:`attnspace.sae.data.LiveStream` for activations from a live model).
    heldout_store: a Store (its first ``eval_tokens`` kept rows), raw batches [b, d], or None (no evaluation).
    spectrum: the spectrum stage's output for ``config.site``; ASI's basis (else a sample SVD).
    lm_eval: downstream LM loss with the site replaced, see :data:`attnspace.sae.evaluate.LMEval`.
    info: extra hyperparams for the saved SAE (model, dataset, layer, ...).
    on_step: called with the number of completed steps after each step (progress, tests).
    """
    stream = (StoreStream(train_store, config.site, config.batch_size, config.buffer_rows, config.stream_seed)
              if isinstance(train_store, Store) else train_store)
    run = SAERun(config, out_dir, spectrum, lm_eval=lm_eval, info=info)
    return train_runs([run], stream, heldout_store, on_step=on_step)[0]


class SAERun:
    """One SAE in training: its model, optimizer, AuxK dead-latent tracker, checkpoint and outputs.

    :meth:`setup` initialises it (or resumes it from ``out_dir``'s checkpoint), :meth:`step`
    trains it on one batch, :meth:`checkpoint` saves it with the stream's state, and
    :meth:`finish` evaluates it and writes its SAE folder and metrics.json.
    """

    def __init__(self, config: SAETrainConfig, out_dir: Path, spectrum: Spectrum | None = None, *,
                 lm_eval: LMEval | None = None, info: dict | None = None) -> None:
        self.config, self.out_dir, self.spectrum = config, Path(out_dir), spectrum
        self.lm_eval, self.info = lm_eval, info
        self.device = torch.device(config.device)
        self.ckpt_path = self.out_dir / CHECKPOINT
        self.start = 0
        """Steps already done when this process began (from the checkpoint; 0 for a fresh run)."""
        self.stream_state: dict[str, Tensor] | None = None
        """The stream's state saved with the checkpoint resumed from (None for a fresh run)."""
        self.failure: str | None = None
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)  # all losses so far finite (on the device)
        self.clear_earlier_run()

    def setup(self, sample: Tensor, resume: bool) -> None:
        """Build the SAE on the normalisation sample [N, d] (raw; the first ``asi_sample_tokens`` rows)
        and initialise it, or, when ``resume`` and a checkpoint exists, restore it from there."""
        config, device = self.config, self.device
        d = sample.shape[1]
        sae = TopKSAE(d, config.n_latents(d), config.k, dataset_norm=mean_norm(sample)).to(device)
        sae.sparse_grad = config.optimizer in ("sparse_adam", "masked_adam")  # row-sparse gradients; Adam's are dense
        sae.centred = bool(config.centred)
        sae.fast = True if config.fast is None else config.fast  # attnspace.sae.fast: same model, about 2x faster on CPU too
        sae.matmul_dtype = torch.bfloat16 if sae.fast and cuda_path(device) else None
        self.sae, self.d = sae, d
        self.opt = make_optimizer(config.optimizer, [getattr(sae, p) for p in _PARAMS], config.learning_rate,
                                  config.betas, config.eps)
        self.tracker = DeadLatentTracker(sae.d_sae, config.dead_threshold_tokens, device)
        if resume and self.ckpt_path.exists():
            self._resume()
            log.info("resuming %s at step %d of %d", self.out_dir, self.start, config.n_steps)
            return
        generator = torch.Generator().manual_seed(config.seed + 1)
        x0 = sample[: config.init_batch_tokens].to(device) * sae.norm_factor
        spectrum = self.spectrum
        if spectrum is not None and spectrum.components.shape[1] != d:
            raise ValueError(f"spectrum width {spectrum.components.shape[1]} != site width {d}")
        bias = sample.double().mean(0).float().to(device) * sae.norm_factor if sae.centred else None
        init = initialize(sae, config.init, x0, generator, d_init=config.d_init,
                          source=spectrum if spectrum is not None else sample, grid=config.init_norm_grid,
                          decoder_bias=bias)
        self.init_norm = init.norm

    def step(self, x: Tensor, done: int) -> None:
        """One optimizer step on the raw batch x [B, d] (on the device), the ``done``-th of the run.

        Finiteness is read back every ``log_every`` steps and at the last: a non-finite loss by
        then records the failure (:attr:`failure`) and skips this step; the run takes no more.
        """
        config, sae, tracker = self.config, self.sae, self.tracker
        out = sae(x * sae.norm_factor, dead=tracker.dead() if config.auxk else None, k_aux=config.k_aux)
        loss = out.nmse + config.auxk_alpha * out.auxk_loss if config.auxk else out.nmse
        self.finite &= torch.isfinite(loss.detach())
        check_every = config.log_every or 100
        if (done % check_every == 0 or done == config.n_steps) and not bool(self.finite):
            self.failure = f"loss not finite (NaN or inf) by step {done} of {config.n_steps}"
            log.error("%s: %s; the run is recorded as failed", self.out_dir.name, self.failure)
            return
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # no gradient lives into the next forward (1M latents: 16 GiB each)
        tracker.update(out.values.detach(), out.indices)
        if config.log_every and done % config.log_every == 0:
            log.info("%s: step %d/%d nmse %.4f auxk %.4f dead %d", self.out_dir.name, done, config.n_steps,
                     float(out.nmse.detach()), float(out.auxk_loss.detach()), int(tracker.dead().sum()))

    def wants_checkpoint(self, done: int) -> bool:
        """Whether a checkpoint is due after step ``done`` (every ``checkpoint_every`` steps, not the last)."""
        every = self.config.checkpoint_every
        return self.failure is None and bool(every) and done % every == 0 and done < self.config.n_steps

    def checkpoint(self, stream_state: dict[str, Tensor], done: int) -> None:
        """Save weights, optimizer state, dead-latent counters and ``stream_state`` after step ``done``."""
        tensors = {f"sae.{p}": getattr(self.sae, p).detach() for p in _PARAMS}
        tensors.update(optimizer_tensors(self.opt, _PARAMS))
        tensors["dead.tokens_since_fired"] = self.tracker.tokens_since_fired
        tensors.update(stream_state)
        record = dict(format=CHECKPOINT_FORMAT, config=self.config.result_fields(), inputs=self.inputs, step=done,
                      dataset_norm=self.sae.dataset_norm, init_norm=self.init_norm)
        save_checkpoint(self.ckpt_path, tensors, record)

    @property
    def inputs(self):
        """What the run reads (``info["inputs"]``, set by the CLI), as a checkpoint records it (JSON)."""
        return json.loads(json.dumps((self.info or {}).get("inputs"), sort_keys=True))

    def stale_reason(self) -> str | None:
        """Why the checkpoint in ``out_dir`` cannot be resumed by this run, or None when it can (or there is none)."""
        try:
            record = checkpoint_record(self.ckpt_path)
        except FileNotFoundError:
            return None
        except Exception as err:  # safetensors, JSON or key errors alike: the file is damaged
            return f"it cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        if record.get("format") != CHECKPOINT_FORMAT:
            return f"its format is {record.get('format')!r}, this code writes {CHECKPOINT_FORMAT!r}"
        fields, saved = self.config.result_fields(), record.get("config")
        if not isinstance(saved, dict) or saved != fields:
            saved = saved if isinstance(saved, dict) else {}
            changed = sorted(k for k in fields.keys() | saved.keys() if saved.get(k) != fields.get(k))
            return f"it was written with other settings ({', '.join(changed)})"
        if record.get("inputs") != self.inputs:
            now, then = self.inputs, record.get("inputs")
            changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k)) \
                if isinstance(now, dict) and isinstance(then, dict) else []
            return f"it was computed from other inputs ({', '.join(changed) or 'inputs'})"
        return None

    def drop_stale_checkpoint(self) -> None:
        """Delete the checkpoint in ``out_dir`` if it cannot be resumed (:meth:`stale_reason`), logging why."""
        reason = self.stale_reason()
        if reason is not None:
            log.warning("%s: discarding the training checkpoint %s: %s; this run starts over",
                        self.out_dir, self.ckpt_path.name, reason)
            self.ckpt_path.unlink(missing_ok=True)

    def clear_earlier_run(self) -> None:
        """Delete what an earlier run left in ``out_dir``: a checkpoint this run cannot resume
        (:meth:`drop_stale_checkpoint`), and the SAE files and metrics.json of a finished one, so that
        the folder holds this run's result or nothing (a killed run leaves only its checkpoint)."""
        self.drop_stale_checkpoint()
        remove_weights(self.out_dir)
        (self.out_dir / "metrics.json").unlink(missing_ok=True)

    def _resume(self) -> None:
        path, sae = self.ckpt_path, self.sae
        reason = self.stale_reason()  # drop_stale_checkpoint ran when the run was created; this guards a change since
        if reason is not None:
            raise ValueError(f"{path}: cannot resume: {reason}; delete it to start over")
        tensors, record = load_checkpoint(path)
        with torch.no_grad():
            for p in _PARAMS:
                getattr(sae, p).copy_(tensors[f"sae.{p}"])
        sae.dataset_norm = record["dataset_norm"]
        load_optimizer_tensors(self.opt, _PARAMS, tensors)
        self.tracker.tokens_since_fired.copy_(tensors["dead.tokens_since_fired"])
        self.stream_state = {k: v for k, v in tensors.items() if k.startswith("data.")}
        self.start, self.init_norm = int(record["step"]), float(record["init_norm"])

    def release_training_state(self) -> None:
        """Free the gradients, the optimizer's moments and the encoder's low-precision mirror (after
        the last step and checkpoint: evaluation reads the weights only)."""
        self.opt.zero_grad(set_to_none=True)
        self.opt.state.clear()
        drop_mirror(self.sae.W_enc)

    def finish(self, stream, heldout_store: Store | Iterable[Tensor] | None, train_seconds: float) -> dict:
        """Evaluate (unless failed), write the SAE folder and metrics.json, remove the checkpoint; the metrics."""
        config, sae, out_dir = self.config, self.sae, self.out_dir
        metrics = dict(
            d_model=self.d, d_sae=sae.d_sae, k=config.k, init=config.init, d_init=config.d_init,
            init_norm=self.init_norm, centred=sae.centred,
            optimizer=config.optimizer, lr=config.learning_rate, auxk=config.auxk, k_aux=config.k_aux,
            auxk_alpha=config.auxk_alpha, batch_size=config.batch_size,
            tokens_trained=config.n_steps * config.batch_size,
            seed=config.seed, data_seed=config.stream_seed, site=config.site,
            dataset_average_activation_norm=sae.dataset_norm,
            dead_for_auxk_at_end=int(self.tracker.dead().sum()), train_seconds_this_run=round(train_seconds, 3),
            tokens_per_second=round((config.n_steps - self.start) * config.batch_size / max(train_seconds, 1e-9), 1),
            nmse=None, explained_variance=None, l0=None, dead_fraction=None, dead_window_tokens=None, n_dead=None,
            train_nmse=None, train_eval_tokens=None,
            delta_lm_loss=None, status="ok" if self.failure is None else "failed", failure=self.failure,
        )
        if self.failure is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json(metrics, out_dir / "metrics.json")
            if self.ckpt_path.exists():
                self.ckpt_path.unlink()
            return metrics
        sae.eval()
        if heldout_store is not None:
            batches = (heldout_batches(heldout_store, config.site, config.batch_size, config.eval_tokens)
                       if isinstance(heldout_store, Store) else heldout_store)
            metrics.update(evaluate(sae, batches)._asdict())
        train_rows = getattr(stream, "store", None)  # a cached training store: score its first eval_tokens rows
        if train_rows is not None:
            seen = evaluate(sae, heldout_batches(train_rows, config.site, config.batch_size,
                                                 min(config.eval_tokens, config.n_steps * config.batch_size)))
            metrics.update(train_nmse=seen.nmse, train_eval_tokens=seen.dead_window_tokens)
        if self.lm_eval is not None:
            metrics.update(self.lm_eval(lambda x: reconstruct(sae, x)))
        self.save(metrics)
        if self.ckpt_path.exists():
            self.ckpt_path.unlink()
        return metrics

    def save(self, metrics: dict) -> None:
        """Write the SAE folder (LlamaScope layout) with ``metrics`` (a sharded run merges its shards here)."""
        save_sae(self.sae, self.out_dir, metrics=metrics, **{"site": self.config.site, **(self.info or {})})


def train_runs(runs: Sequence[SAERun], stream, heldout_store: Store | Iterable[Tensor] | None, *,
               on_step: Callable[[int], None] | None = None, desc: str = "sae") -> list[dict]:
    """Train ``runs`` on one stream, each batch fed to every run in turn; their metrics, in order.

    The runs share the number of steps; each may sit on its own device (the GPUs of a node sharing
    one stream), and each batch is copied once to every device the runs use. The normalisation sample is the stream's
    first rows (each run takes its own ``asi_sample_tokens`` of them). A run resumed from a
    checkpoint at step s skips the batches before s; the stream restarts from the state saved
    with the earliest checkpoint (or from the beginning when a run has none), so every run sees
    the batches it would see alone. A failed run takes no more steps; the others go on.
    Every run is evaluated and saved once all have trained.
    """
    resumable = getattr(stream, "resumable", hasattr(stream, "state_tensors"))  # a live stream needs its restart
    n_steps = runs[0].config.n_steps
    sample = stream.sample(max(r.config.asi_sample_tokens for r in runs))  # [N, d] raw
    for r in runs:
        r.setup(sample[: r.config.asi_sample_tokens], resume=resumable)
    del sample
    start = min(r.start for r in runs)
    if start > 0:
        stream.load_state(next(r for r in runs if r.start == start).stream_state)
    for r in runs:
        r.stream_state = None
    if len(runs) > 1 and heldout_store is not None and not isinstance(heldout_store, Store) \
            and iter(heldout_store) is heldout_store:
        heldout_store = list(heldout_store)  # an iterator of batches, read by every run

    t0 = time.perf_counter()
    with StopSignals() as stop:
        for step in tqdm(range(start, n_steps), desc=desc, unit="step", initial=start, total=n_steps, mininterval=10):
            raw = stream.next_batch()  # [B, d]
            x = {d: raw.to(d, non_blocking=True) for d in dict.fromkeys(r.device for r in runs)}
            done = step + 1
            for r in runs:
                if r.failure is None and step >= r.start:
                    r.step(x[r.device], done)
            if all(r.failure is not None for r in runs):
                break
            if resumable:
                due = [r for r in runs if step >= r.start and r.wants_checkpoint(done)]
                state = stream.state_tensors() if due else None
                for r in due:
                    r.checkpoint(state, done)
            if on_step is not None:
                on_step(done)
            if stop.signal is not None:
                _stop(runs, stream, resumable, done, stop.signal)
    train_seconds = time.perf_counter() - t0
    if hasattr(stream, "close"):  # a live stream's prefetch thread must not run the model during evaluation
        stream.close()
    for r in runs:  # evaluation needs none of the training state (1M latents with Adam: 96 GiB)
        r.release_training_state()
    return [r.finish(stream, heldout_store, train_seconds) for r in runs]


class TrainingStopped(AttnspaceError):
    """Training ended early by a signal (SLURM's time limit); the checkpoint to resume from is written."""


class StopSignals:
    """SIGTERM and SIGUSR1 (what SLURM sends at the end of a job's time limit, or earlier with
    ``--signal``) noted while training, to be acted on between steps: :func:`train_runs` then
    checkpoints every run and stops, so a resubmitted job resumes instead of starting over.
    Installed only in the main thread; outside it, signals keep their handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def _note(self, signum, frame) -> None:
        self.signal = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _stop(runs: Sequence[SAERun], stream, resumable: bool, done: int, signum: int) -> None:
    """Checkpoint every run still training after step ``done`` and stop (:class:`TrainingStopped`)."""
    name = signal.Signals(signum).name
    if not resumable:
        raise TrainingStopped(f"SAE training stopped by {name} after step {done}; this stream cannot be "
                              "checkpointed, so a rerun starts over", fix="rerun the job")
    state = stream.state_tensors()
    live = [r for r in runs if r.failure is None and done > r.start]
    for r in live:
        r.checkpoint(state, done)
    log.warning("stopped by %s after step %d of %d; checkpoints written for %d runs", name, done,
                runs[0].config.n_steps, len(live))
    raise TrainingStopped(f"SAE training stopped by {name} after step {done} of {runs[0].config.n_steps}; "
                          f"the checkpoints to resume from are written ({len(live)} runs)",
                          fix="rerun the job (Snakemake's retries do): it resumes at that step")
