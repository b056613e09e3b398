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
SAE is saved (a diverged run is reported as failed, never dropped or replaced).
Finiteness is checked on the device every step and read back every ``log_every``
steps (and at the end), so the check adds no per-step synchronisation.

Resumption: if ``out_dir/train_state.safetensors`` exists (a killed run), training
continues from it: weights, both moments and step counts, dead-latent counters, the
shuffle buffer's rows, read cursor and RNG state. On one device with the same
settings, the result is bitwise that of an uninterrupted run (tested on CPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from attnspace.files import write_json
from attnspace.sae.config import SAETrainConfig
from attnspace.sae.data import StoreStream, heldout_batches, mean_norm
from attnspace.sae.evaluate import LMEval, evaluate
from attnspace.sae.init import initialize
from attnspace.sae.io import load_checkpoint, save_checkpoint, save_sae
from attnspace.sae.losses import DeadLatentTracker
from attnspace.sae.model import TopKSAE, reconstruct
from attnspace.sae.optim import load_optimizer_tensors, make_optimizer, optimizer_tensors
from attnspace.spectrum import Spectrum
from attnspace.store import Store

log = logging.getLogger("attnspace.sae")

CHECKPOINT = "train_state.safetensors"
"""Checkpoint file name inside the output folder."""

CHECKPOINT_FORMAT = "attnspace-sae-train-state/1"

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

    train_store: a Store (read through a shuffle buffer) or a ready stream (StoreStream,
    or :class:`attnspace.sae.data.LiveStream` for activations from a live model).
    heldout_store: a Store (its first ``eval_tokens`` kept rows), raw batches [b, d], or None (no evaluation).
    spectrum: the spectrum stage's output for ``config.site``; ASI's basis (else a sample SVD).
    lm_eval: downstream LM loss with the site replaced, see :data:`attnspace.sae.evaluate.LMEval`.
    info: extra hyperparams for the saved SAE (model, dataset, layer, ...).
    on_step: called with the number of completed steps after each step (progress, tests).
    """
    out_dir = Path(out_dir)
    device = torch.device(config.device)
    stream = (StoreStream(train_store, config.site, config.batch_size, config.buffer_rows, config.seed)
              if isinstance(train_store, Store) else train_store)
    resumable = hasattr(stream, "state_tensors")
    ckpt_path = out_dir / CHECKPOINT

    sample = stream.sample(config.asi_sample_tokens)  # [N, d] raw
    d = sample.shape[1]
    sae = TopKSAE(d, config.n_latents(d), config.k, dataset_norm=mean_norm(sample)).to(device)
    sae.sparse_grad = config.optimizer in ("sparse_adam", "masked_adam")  # row-sparse gradients; Adam's are dense
    sae.centred = bool(config.centred)
    sae.fast = True if config.fast is None else config.fast  # attnspace.sae.fast: same model, about 2x faster on CPU too
    sae.matmul_dtype = torch.bfloat16 if sae.fast and device.type == "cuda" else None
    opt = make_optimizer(config.optimizer, [getattr(sae, p) for p in _PARAMS], config.learning_rate,
                         config.betas, config.eps)
    tracker = DeadLatentTracker(sae.d_sae, config.dead_threshold_tokens, device)

    if resumable and ckpt_path.exists():
        start, init_norm = _resume(ckpt_path, config, sae, opt, tracker, stream)
        log.info("resuming %s at step %d of %d", out_dir, start, config.n_steps)
    else:
        start = 0
        generator = torch.Generator().manual_seed(config.seed + 1)
        x0 = sample[: config.init_batch_tokens].to(device) * sae.norm_factor
        if spectrum is not None and spectrum.components.shape[1] != d:
            raise ValueError(f"spectrum width {spectrum.components.shape[1]} != site width {d}")
        bias = sample.double().mean(0).float().to(device) * sae.norm_factor if sae.centred else None
        init = initialize(sae, config.init, x0, generator, d_init=config.d_init,
                          source=spectrum if spectrum is not None else sample, grid=config.init_norm_grid,
                          decoder_bias=bias)
        init_norm = init.norm
    del sample

    f = sae.norm_factor
    t0 = time.perf_counter()
    finite = torch.ones((), dtype=torch.bool, device=device)  # all losses so far finite (stays on the device)
    failure = None
    check_every = config.log_every or 100
    for step in range(start, config.n_steps):
        x = stream.next_batch().to(device, non_blocking=True) * f  # [B, d]
        out = sae(x, dead=tracker.dead() if config.auxk else None, k_aux=config.k_aux)
        loss = out.nmse + config.auxk_alpha * out.auxk_loss if config.auxk else out.nmse
        finite &= torch.isfinite(loss.detach())
        done = step + 1
        if (done % check_every == 0 or done == config.n_steps) and not bool(finite):
            failure = f"loss not finite (NaN or inf) by step {done} of {config.n_steps}"
            log.error("%s: %s; the run is recorded as failed", out_dir.name, failure)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tracker.update(out.values.detach(), out.indices)
        if config.log_every and done % config.log_every == 0:
            log.info("step %d/%d nmse %.4f auxk %.4f dead %d", done, config.n_steps, float(out.nmse.detach()),
                     float(out.auxk_loss.detach()), int(tracker.dead().sum()))
        if resumable and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.n_steps:
            _checkpoint(ckpt_path, config, sae, opt, tracker, stream, done, init_norm)
        if on_step is not None:
            on_step(done)
    train_seconds = time.perf_counter() - t0
    opt.zero_grad(set_to_none=True)  # free the last gradients before evaluation (1M latents: GiBs)

    metrics = dict(
        d_model=d, d_sae=sae.d_sae, k=config.k, init=config.init, d_init=config.d_init, init_norm=init_norm,
        centred=sae.centred,
        optimizer=config.optimizer, lr=config.learning_rate, auxk=config.auxk, k_aux=config.k_aux,
        auxk_alpha=config.auxk_alpha, batch_size=config.batch_size, tokens_trained=config.n_steps * config.batch_size,
        seed=config.seed, site=config.site, dataset_average_activation_norm=sae.dataset_norm,
        dead_for_auxk_at_end=int(tracker.dead().sum()), train_seconds_this_run=round(train_seconds, 3),
        tokens_per_second=round((config.n_steps - start) * config.batch_size / max(train_seconds, 1e-9), 1),
        nmse=None, explained_variance=None, l0=None, dead_fraction=None, dead_window_tokens=None, n_dead=None,
        train_nmse=None, train_eval_tokens=None,
        delta_lm_loss=None, status="ok" if failure is None else "failed", failure=failure,
    )
    if failure is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(metrics, out_dir / "metrics.json")
        if ckpt_path.exists():
            ckpt_path.unlink()
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
    if lm_eval is not None:
        metrics.update(lm_eval(lambda x: reconstruct(sae, x)))
    save_sae(sae, out_dir, metrics=metrics, **{"site": config.site, **(info or {})})
    if ckpt_path.exists():
        ckpt_path.unlink()
    return metrics


def _checkpoint(path: Path, config, sae: TopKSAE, opt, tracker, stream, step: int, init_norm: float) -> None:
    tensors = {f"sae.{p}": getattr(sae, p).detach() for p in _PARAMS}
    tensors.update(optimizer_tensors(opt, _PARAMS))
    tensors["dead.tokens_since_fired"] = tracker.tokens_since_fired
    tensors.update(stream.state_tensors())
    record = dict(format=CHECKPOINT_FORMAT, config=config.result_fields(), step=step,
                  dataset_norm=sae.dataset_norm, init_norm=init_norm)
    save_checkpoint(path, tensors, record)


def _resume(path: Path, config, sae: TopKSAE, opt, tracker, stream) -> tuple[int, float]:
    tensors, record = load_checkpoint(path)
    if record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an SAE training checkpoint ({record.get('format')!r})")
    if record["config"] != config.result_fields():
        changed = sorted(k for k, v in config.result_fields().items() if record["config"].get(k) != v)
        raise ValueError(f"{path}: checkpoint was written with other settings ({', '.join(changed)}); "
                         "delete it to start over")
    with torch.no_grad():
        for p in _PARAMS:
            getattr(sae, p).copy_(tensors[f"sae.{p}"])
    sae.dataset_norm = record["dataset_norm"]
    load_optimizer_tensors(opt, _PARAMS, tensors)
    tracker.tokens_since_fired.copy_(tensors["dead.tokens_since_fired"])
    stream.load_state(tensors)
    return int(record["step"]), float(record["init_norm"])
