"""Settings of one SAE training run. Every setting that is a config key (``sae.*``) takes its
default from the config schema, the one source of defaults; the paper's values (Appendix E.3)
are in config/paper.yaml."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from attnspace.defaults import schema_default
from attnspace.sae.init import DEFAULT_NORM_GRID, INITS
from attnspace.sae.optim import OPTIMIZERS


@dataclass
class SAETrainConfig:
    site: str = "attn_out"
    """Site of the activation store to train on."""
    d_sae: int | None = None
    """Number of latents; None: expansion_factor x d_model."""
    expansion_factor: int = schema_default("sae.expansion")
    """Latents per input dimension when d_sae is None (LlamaScope 8x)."""
    k: int = schema_default("sae.k")
    """Active latents per token (TopK)."""
    init: str = "base"
    """Initialisation: 'base' (Appendix E.2), 'asi' (active subspace) or 'random_subspace' (Fig 5 control)."""
    d_init: int | None = None
    """Subspace dimension for 'asi' and 'random_subspace' (paper: 768 of 4096)."""
    centred: bool = False
    """The centred form: b_dec starts at the training mean and is subtracted before the encoder."""
    init_norm_grid: tuple[float, ...] = DEFAULT_NORM_GRID
    """Candidate global decoder norms for the initial grid search."""
    init_batch_tokens: int = 4096
    """Rows of the batch the norm search scores (the first kept rows of the training store)."""
    asi_sample_tokens: int = 65536
    """Rows for the sample SVD when ASI gets no spectrum (the first kept rows); also the normalisation sample."""
    optimizer: str = schema_default("sae.optimizer")
    """'adam' (torch.optim.Adam), 'sparse_adam' (torch.optim.SparseAdam semantics) or 'masked_adam'
    (the authors' masked dense rule, attnspace.sae.optim.MaskedAdam)."""
    lr: float | None = None
    """Learning rate; None: the config default for the optimizer (``sae.lr.<optimizer>``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    auxk: bool = False
    """Add the AuxK loss (Gao et al. 2024)."""
    auxk_alpha: float = schema_default("sae.auxk.alpha")
    """Weight of the AuxK loss."""
    k_aux: int = schema_default("sae.auxk.k_aux")
    """Dead latents used by AuxK per token (at most the number of dead latents)."""
    dead_threshold_tokens: int = schema_default("sae.auxk.dead_threshold_tokens")
    """A latent counts as dead for AuxK after this many training tokens without firing."""
    batch_size: int = schema_default("sae.batch_size")
    """Tokens per optimizer step."""
    train_tokens: int = schema_default("sae.train_tokens")
    """Training tokens (rounded down to whole batches); the store is cycled if smaller."""
    buffer_rows: int = schema_default("sae.buffer_rows")
    """Shuffle buffer capacity in rows (at least 2 x batch_size); refilled and reshuffled when half is used."""
    eval_tokens: int = schema_default("sae.eval_tokens")
    """Held-out tokens for evaluation: the window N of the dead-feature count (fewer if the store is smaller)."""
    checkpoint_every: int = 1000
    """Steps between training checkpoints (0: none)."""
    seed: int = schema_default("sae.seed")
    """Seed of the initialisation (and of the shuffle buffer when data_seed is None)."""
    data_seed: int | None = None
    """Seed of the shuffle buffer (the order of the training batches); None: ``seed``. Runs with one
    data seed see the same batches, so they can share one stream (:mod:`attnspace.sae.group`)."""
    device: str = "cpu"
    """Torch device to train on."""
    fast: bool | None = None
    """Fast training path (attnspace.sae.fast: sparse backward plan on every device; bf16 encoder GEMM and fused
    optimizer on CUDA); None: on. False: the reference path (same model and gradients, about 2x slower)."""
    log_every: int = 100
    """Steps between progress lines (0: silent)."""

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init != "base" and self.d_init is None:
            raise ValueError(f"init {self.init!r} needs d_init")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.buffer_rows < 2 * self.batch_size:
            raise ValueError(f"buffer_rows ({self.buffer_rows}) must be at least 2 x batch_size ({self.batch_size})")
        if self.train_tokens < self.batch_size:
            raise ValueError("train_tokens must be at least one batch")
        self.init_norm_grid = tuple(float(c) for c in self.init_norm_grid)
        self.betas = tuple(float(b) for b in self.betas)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return float(schema_default(f"sae.lr.{self.optimizer}"))

    @property
    def stream_seed(self) -> int:
        """The shuffle buffer's seed: data_seed, or seed when data_seed is None."""
        return int(self.seed if self.data_seed is None else self.data_seed)

    @property
    def n_steps(self) -> int:
        return self.train_tokens // self.batch_size

    def n_latents(self, d_model: int) -> int:
        return int(self.d_sae) if self.d_sae is not None else int(self.expansion_factor * d_model)

    def to_dict(self) -> dict:
        return asdict(self)

    def result_fields(self) -> dict:
        """The settings that determine the trained weights (a checkpoint must match them to be resumed)."""
        d = self.to_dict()
        for key in ("device", "fast", "log_every", "checkpoint_every", "eval_tokens"):
            d.pop(key)
        d["betas"] = list(d["betas"])
        d["init_norm_grid"] = list(d["init_norm_grid"])
        d["data_seed"] = self.stream_seed
        return d

