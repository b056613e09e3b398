"""TopK sparse autoencoders: model, initialisations, losses, optimizers, data, training, evaluation, files.

Modules: ``model`` (TopKSAE, reconstruct), ``sparse`` (sparse encoder/decoder autograd),
``init`` (base, ASI, random subspace), ``losses`` (NMSE, AuxK, dead latents),
``optim`` (Adam, SparseAdam), ``data`` (shuffle buffer over a store, live prefetch),
``evaluate``, ``io`` (LlamaScope layout, checkpoints), ``train`` (train_sae), ``config``.
"""

from attnspace.sae.config import SAETrainConfig
from attnspace.sae.data import LiveStream, PrefetchIterator, StoreStream
from attnspace.sae.evaluate import EvalResult, evaluate
from attnspace.sae.init import initialize
from attnspace.sae.io import load_sae, save_sae
from attnspace.sae.model import ForwardOutput, TopKSAE, reconstruct
from attnspace.sae.optim import SparseAdam
from attnspace.sae.train import train_sae

__all__ = [
    "EvalResult", "ForwardOutput", "LiveStream", "PrefetchIterator", "SAETrainConfig", "SparseAdam",
    "StoreStream", "TopKSAE", "evaluate", "initialize", "load_sae", "reconstruct", "save_sae", "train_sae",
]
