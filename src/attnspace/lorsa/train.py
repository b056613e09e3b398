"""Training one Lorsa (:func:`train_lorsa`) and evaluating it on held-out documents.

MSE of the reconstruction on dataset-wise normalised activations (input and target
each scaled by sqrt(d) / mean row norm, separate factors, from kept training rows),
BOS/EOS rows excluded from the loss but kept as context, Adam, batches of whole
documents rebuilt from the activation cache (rows of a store are in corpus order with
``doc``/``pos``/``keep``), optional linear k annealing. The data order depends only on
the seed.

A run whose loss turns NaN or infinite (checked on the device every step, read back every
``log_every`` steps and at the last) stops there and is recorded as failed, as SAE runs are:
metrics.json holds ``status: failed`` and the reason, its measurements are None, and no Lorsa
is saved. An earlier run's Lorsa files and metrics.json in ``out_dir`` are deleted when a run
starts, so no reader takes them for this run's.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from attnspace.files import write_json
from attnspace.lorsa.config import LorsaConfig
from attnspace.lorsa.data import SequenceBatch, SequenceData, _scaled, normalisation_norms
from attnspace.lorsa.evaluation import evaluate
from attnspace.lorsa.init import initialize
from attnspace.lorsa.io import remove_lorsa, save_lorsa
from attnspace.lorsa.model import TOPK_VARIANT, Lorsa, causal_document_mask, dead_heads, dead_param_fraction
from attnspace.lorsa.rope import rope_from_config
from attnspace.spectrum import Spectrum
from attnspace.store import Store

log = logging.getLogger("attnspace.lorsa")


StepCallback = Callable[[int, SequenceBatch, float], None]
"""on_step(step, batch, loss): called after every optimiser step."""


def train_lorsa(
    config: LorsaConfig,
    train_store: Store,
    heldout_store: Store,
    spectrum: Spectrum | None,
    init: str,
    seed: int,
    *,
    model_config,
    out_dir: Path | None = None,
    on_step: StepCallback | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train one Lorsa on ``train_store`` and evaluate it on ``heldout_store``; return its metrics.

    model_config: the target model's HF config (for RoPE). spectrum: of attn_out at this
    layer (needed by 'asi'). The data order depends only on ``seed``. Returns a dict with
    the :data:`~attnspace.lorsa.table.TABLE1_COLUMNS` plus training details; with ``out_dir`` the Lorsa is saved
    there (:func:`save_lorsa`) with the metrics.
    """
    t0 = time.perf_counter()
    if train_store.layer != heldout_store.layer:
        raise ValueError(f"train layer {train_store.layer} != held-out layer {heldout_store.layer}")
    if out_dir is not None:  # the folder holds this run's result or nothing
        remove_lorsa(out_dir)
        (Path(out_dir) / "metrics.json").unlink(missing_ok=True)
    train, heldout = SequenceData(train_store), SequenceData(heldout_store)
    d = train_store.width("attn_in")
    lorsa = Lorsa(config, d, rope_from_config(model_config, config.d_qk, train_store.layer))
    initialize(lorsa, init, seed, spectrum)
    lorsa.norm_in, lorsa.norm_out = normalisation_norms(train, config.norm_sample_tokens)
    if config.b_D_at_mean:
        sample = train.kept_sample("attn_out", config.norm_sample_tokens).double()
        with torch.no_grad():
            lorsa.b_D.copy_(sample.mean(0) * math.sqrt(d) / lorsa.norm_out)
    lorsa.to(device)
    opt = torch.optim.Adam(lorsa.parameters(), lr=config.lr, betas=config.betas, eps=config.eps, fused=True)

    plans = [train.groups(train.order(seed, ep), config.batch_tokens) for ep in range(config.n_epochs)]
    n_steps = sum(len(p) for p in plans)
    step, train_tokens = 0, 0
    finite = torch.ones((), dtype=torch.bool, device=device)  # every loss so far finite (on the device)
    for docs in itertools.chain.from_iterable(plans):
        batch = train.batch(docs).to(device)
        x, y = _scaled(lorsa, batch)
        out = lorsa(x, batch.pos, causal_document_mask(batch.seg), k=config.k_at(step, n_steps))
        loss = F.mse_loss(out.output[batch.keep], y[batch.keep])
        finite &= torch.isfinite(loss.detach())
        if (step % (config.log_every or 100) == 0 or step == n_steps - 1) and not bool(finite):
            failure = f"loss not finite (NaN or inf) by step {step + 1} of {n_steps}"
            log.error("lorsa %s: %s; the run is recorded as failed", init, failure)
            return _failed(train_store, config, init, seed, n_steps, failure, out_dir)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_tokens += int(batch.keep.sum())
        if on_step is not None:
            on_step(step, batch, float(loss.detach()))
        if config.log_every and step % config.log_every == 0:
            log.info("step %d/%d  loss %.4f  k %d", step, n_steps, float(loss.detach()), config.k_at(step, n_steps))
        step += 1
    train_s = time.perf_counter() - t0

    batches = (b.to(device) for b in heldout.epoch_batches(config.batch_tokens, seed=None))
    result = evaluate(lorsa, batches, config.eval_tokens)
    lorsa.cpu()
    dead = dead_heads(result.counts)
    metrics = dict(
        model=train_store.model, dataset=train_store.dataset, layer=train_store.layer, init=init,
        n_ov_heads=config.n_ov_heads, n_qk_heads=config.n_qk_heads, k=config.k,
        dead_heads=int(dead.sum()), dead_param_fraction=dead_param_fraction(dead, config, d),
        nmse=result.nmse, n_eval_tokens=result.n_tokens,
        dead_qk_heads=int(dead.reshape(config.n_qk_heads, -1).all(axis=1).sum()),
        d_init=config.d_init if init == "asi" else None, seed=int(seed), n_steps=n_steps,
        train_tokens=train_tokens, train_seconds=round(train_s, 2),
        wall_seconds=round(time.perf_counter() - t0, 2), topk_variant=TOPK_VARIANT, status="ok", failure=None,
    )
    if out_dir is not None:
        save_lorsa(lorsa, out_dir, metrics=metrics, model=train_store.model, dataset=train_store.dataset,
                   layer=train_store.layer, init=init, seed=int(seed))
    return metrics


def _failed(train_store: Store, config: LorsaConfig, init: str, seed: int, n_steps: int, failure: str,
            out_dir: Path | None) -> dict:
    """The metrics of a failed run (every measurement None), written to ``out_dir/metrics.json``."""
    metrics = dict(
        model=train_store.model, dataset=train_store.dataset, layer=train_store.layer, init=init,
        n_ov_heads=config.n_ov_heads, n_qk_heads=config.n_qk_heads, k=config.k, dead_heads=None,
        dead_param_fraction=None, nmse=None, n_eval_tokens=None, dead_qk_heads=None,
        d_init=config.d_init if init == "asi" else None, seed=int(seed), n_steps=n_steps, train_tokens=None,
        train_seconds=None, wall_seconds=None, topk_variant=TOPK_VARIANT, status="failed", failure=failure,
    )
    if out_dir is not None:
        write_json(metrics, Path(out_dir) / "metrics.json")
    return metrics
