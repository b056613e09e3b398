"""TopK sparse autoencoders: model, initialisations, losses, optimizers, data, training, evaluation, files.

Modules: ``model`` (TopKSAE, reconstruct), ``sparse`` (sparse encoder/decoder autograd),
``fast`` (the training path), ``init`` (base, ASI, random subspace), ``losses`` (NMSE,
AuxK, dead latents), ``optim`` (Adam, SparseAdam, MaskedAdam), ``data`` (shuffle buffer over a store, live
prefetch), ``live``, ``evaluate``, ``io`` (LlamaScope layout, checkpoints), ``train``
(train_sae), ``group`` (several SAEs on one stream), ``config``, ``runs`` (run names, the runs table).

The names below are imported on first use, so that the model and optimizer modules load
with torch alone (the GPU benchmark runs where zarr and dask are not installed).
"""

import importlib

_EXPORTS = {
    "SAETrainConfig": "config", "LiveStream": "data", "PrefetchIterator": "data", "StoreStream": "data",
    "EvalResult": "evaluate", "evaluate": "evaluate", "initialize": "init", "load_sae": "io", "save_sae": "io",
    "ForwardOutput": "model", "TopKSAE": "model", "reconstruct": "model", "SparseAdam": "optim", "MaskedAdam": "optim",
    "train_sae": "train", "train_sae_group": "group",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"attnspace.sae.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'attnspace.sae' has no attribute {name!r}")
