"""Size and training settings of one Lorsa run (:class:`LorsaConfig`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from attnspace.defaults import schema_default


@dataclass
class LorsaConfig:
    """Lorsa size and training settings.

    Defaults are sized for SmolLM2-135M layer 15 (d = 576) on 2 CPU cores: 4d OV heads
    in 36 QK groups of 64 (the authors' Pythia-160M layer 6 setting has 8d heads in
    groups of 128 and k = 64). Every field that is a config key takes the schema's default
    (``lorsa.*`` in schemas/config.schema.yaml, where n_ov_heads = expansion x d). Four epochs over the
    embedded cache (16k tokens, 167 steps of 512 tokens) took 165-170 s per run on 2
    cores shared with other jobs (about 400 tokens/s, forward, backward and Adam); the
    default two run half as many steps.
    """

    n_ov_heads: int = 2304
    """Rank-1 OV heads (4 x d for d = 576)."""
    n_qk_heads: int = schema_default("lorsa.n_qk_heads")
    """QK heads; each is shared by n_ov_heads / n_qk_heads consecutive OV heads."""
    d_qk: int = schema_default("lorsa.d_qk")
    """Width of each QK head (the target model's head_dim, so its RoPE applies unchanged)."""
    k: int = schema_default("lorsa.k")
    """OV heads kept per token (after annealing)."""
    k_start: int | None = None
    """If set, k starts here and falls linearly to ``k`` (None: no annealing)."""
    k_anneal_fraction: float = 0.5
    """Fraction of all steps over which k anneals from k_start to k."""
    qk_norm: bool = False
    """Per-head RMS norm of q and k before RoPE (Qwen3-style models)."""
    qk_norm_eps: float = 1e-6
    """Epsilon of that RMS norm."""
    b_D_at_mean: bool = True
    """Start b_D at the mean of the normalised target (the authors start at 0; a short run cannot learn it first)."""
    d_init: int = schema_default("lorsa.d_init")
    """ASI: W_O rows lie in the top d_init right singular vectors of attn_out (22% of d=576)."""
    lr: float = schema_default("lorsa.lr")
    """Adam learning rate (authors: 2e-4 to 4e-4 over far more steps; a two-epoch run here has ~84)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    n_epochs: int = schema_default("lorsa.epochs")
    """Passes over the training documents (reshuffled each epoch)."""
    batch_tokens: int = schema_default("lorsa.batch_tokens")
    """Token budget per batch: consecutive shuffled documents up to this many rows (at least one document)."""
    norm_sample_tokens: int = 65536
    """Kept training rows (the first ones) used for the dataset-wise norms."""
    eval_tokens: int | None = None
    """Cap on kept held-out rows evaluated (None: the whole held-out store; whole documents are read)."""
    log_every: int = 10
    """Steps between progress lines (0: silent)."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if self.n_ov_heads < 1 or self.n_qk_heads < 1 or self.n_ov_heads % self.n_qk_heads:
            raise ValueError(f"n_ov_heads ({self.n_ov_heads}) must be a positive multiple of n_qk_heads "
                             f"({self.n_qk_heads})")
        if not 0 < self.k <= self.n_ov_heads:
            raise ValueError(f"k must lie in [1, n_ov_heads={self.n_ov_heads}], got {self.k}")
        if self.k_start is not None and not self.k <= self.k_start <= self.n_ov_heads:
            raise ValueError(f"k_start must lie in [k={self.k}, n_ov_heads], got {self.k_start}")
        if self.d_qk < 2 or self.d_qk % 2:
            raise ValueError(f"d_qk must be even and >= 2, got {self.d_qk}")
        if not 0.0 < self.k_anneal_fraction <= 1.0:
            raise ValueError(f"k_anneal_fraction must lie in (0, 1], got {self.k_anneal_fraction}")

    @property
    def group_size(self) -> int:
        """G: OV heads per QK head."""
        return self.n_ov_heads // self.n_qk_heads

    def k_at(self, step: int, n_steps: int) -> int:
        """k used at training step ``step`` (0-based) of ``n_steps``."""
        if self.k_start is None:
            return self.k
        span = max(1, int(round(self.k_anneal_fraction * n_steps)))
        t = min(1.0, step / span)
        return int(round(self.k_start + t * (self.k - self.k_start)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LorsaConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown LorsaConfig fields {sorted(unknown)}")
        return cls(**d)
