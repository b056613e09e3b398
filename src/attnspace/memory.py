"""Peak memory of the project's own code, measured without the memory: fake tensors, live storages summed.

A GPU job's peak is read off the code it runs, not off a formula: under torch's
``FakeTensorMode`` every tensor has its shape, dtype and strides but no storage, so the real
code (forward, backward, optimizer step, evaluation) runs at the paper's shapes on a laptop in
seconds. Fake CPU tensors are used (fake CUDA tensors cannot run autograd on a CPU-only build);
the logical peak is the same on either device.

:class:`LiveBytes` (a ``TorchDispatchMode``) sees every tensor an operation returns, counts each
untyped storage once (views share theirs; a sparse tensor counts its index and value tensors) and
drops it when the storage is freed (a weakref finalizer), so ``live`` is the bytes alive at any
moment and ``peak`` its maximum; :meth:`LiveBytes.phase` records the peak of a named stretch.
What it counts is what the caching allocator is asked for, to the byte: not its rounding to
512-byte blocks, its fragmentation, CUDA's context (about 0.5 GiB) nor a kernel's private
workspace (cuBLAS, Triton), which a device's budget must leave room for.

Data-dependent operations cannot be answered by a fake tensor: a host sync (``int(x.sum())``,
``bool(finite)``, ``.item()``) and an output whose size depends on values (``nonzero``, a boolean
mask index). :class:`WorstCase` answers them from a stated size policy, the worst case the
shapes allow, so every peak it gives is an upper bound:

* a boolean ``sum`` read back is the number of its elements (every entry true: the SAE's
  active entries B K', its dead latents n);
* any other integer read back is 0 and a float 1.0 (a logged loss, a norm: no size depends on them);
  a boolean read back is True (losses finite, rows sorted);
* ``bincount`` has ``minlength`` bins (the code gives the number of ids as minlength);
* ``nonzero`` (and a boolean mask, which is ``nonzero`` under the hood) has
  min(elements, ``max_nonzero``) rows: with ``max_nonzero = B K'`` the SAE's touched latents are
  U = min(n, B K'), its active entries B K'.

``tests/test_memory.py`` checks the method against the CPU allocator's own account (torch's
profiler) of a real run of the same code on small shapes.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakTensorKeyDictionary

GIB = 1 << 30

CONSTANT_ELEMENTS = 4096
"""Tensors of up to this many elements made from Python data keep their values under the fake mode."""

aten = torch.ops.aten


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, and their peak, over everything run inside this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phases: dict[str, int] = {}
        """{name: peak bytes within that :meth:`phase`}, in order."""
        self._seen: dict[int, int] = {}  # id of a live storage -> its bytes
        self._phase_peak: list[int] = []

    def track(self, *tensors: torch.Tensor) -> None:
        """Count tensors made outside this mode (a batch, a model built before it)."""
        for t in tensors:
            self._add(t)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak of the enclosed code (from the bytes alive at its start) as ``phases[name]``."""
        self._phase_peak.append(self.live)
        try:
            yield
        finally:
            self.phases[name] = max(self.phases.get(name, 0), self._phase_peak.pop())

    def _add(self, t: torch.Tensor) -> None:
        if t.layout == torch.sparse_coo:
            parts = (t._indices(), t._values())
        elif t.layout == torch.sparse_csr:
            parts = (t.crow_indices(), t.col_indices(), t.values())
        else:
            parts = None
        if parts is not None:
            for part in parts:
                self._add(part)
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen[key] = size
        weakref.finalize(storage, self._free, key)
        self.live += size
        self.peak = max(self.peak, self.live)
        self._phase_peak[:] = [max(p, self.live) for p in self._phase_peak]

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._add, out)
        return out


class WorstCase(TorchDispatchMode):
    """Answers the data-dependent operations of fake tensors by the worst case the shapes allow
    (the rules are the module's); enter it inside ``FakeTensorMode`` (and inside :class:`LiveBytes`)."""

    def __init__(self, max_nonzero: int) -> None:
        super().__init__()
        self.max_nonzero = int(max_nonzero)
        self._bool_sums = WeakTensorKeyDictionary()  # the sum of a bool tensor -> its elements

    def _nonzero(self, x: torch.Tensor) -> torch.Tensor:
        rows = min(x.numel(), self.max_nonzero)
        return torch.empty((rows, x.dim()), dtype=torch.long, device=x.device)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            (x,) = args
            if getattr(x, "constant", None) is not None:  # a value the fake mode knows (from Python data)
                return func(x)
            if x.dtype == torch.bool:
                return True
            if x.dtype.is_floating_point or x.dtype.is_complex:
                return 1.0
            return self._bool_sums.get(x, 0)
        if func in (aten.nonzero.default, aten.argwhere.default):
            return self._nonzero(args[0])
        if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            return func(args[0], self._long_indices(args[1]))
        if func in (aten.index_put.default, aten.index_put_.default) and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            return func(args[0], self._long_indices(args[1]), *args[2:], **kwargs)
        if func is aten.clone.default and args[0].layout == torch.sparse_coo:  # the fake clone drops the entries
            x = args[0]
            return aten._sparse_coo_tensor_with_dims_and_tensors(
                x.sparse_dim(), x.dense_dim(), x.shape, x._indices().clone(), x._values().clone(), dtype=x.dtype,
                layout=torch.sparse_coo, device=x.device, is_coalesced=x.is_coalesced())
        if func is aten.bincount.default:
            x, weights, minlength = (list(args) + [kwargs.get("weights"), kwargs.get("minlength", 0)])[:3]
            if not minlength:
                raise NotImplementedError("WorstCase sizes bincount by its minlength; give one")
            dtype = torch.long if weights is None else (torch.double if weights.dtype != torch.float else weights.dtype)
            return torch.zeros(minlength, dtype=dtype, device=x.device)
        if func is aten.masked_select.default:
            x, mask = torch.broadcast_tensors(*args)
            return x.new_empty(min(x.numel(), self.max_nonzero))
        out = func(*args, **kwargs)
        if func in (aten.sum.default, aten.sum.dim_IntList) and args[0].dtype == torch.bool and out.numel() == 1:
            self._bool_sums[out] = args[0].numel()
        return out

    def _long_indices(self, indices) -> list:
        """A boolean mask index as the long indices of its (worst-case) true entries."""
        out = []
        for i in indices:
            if i is not None and i.dtype == torch.bool:
                out.extend(self._nonzero(i).unbind(1))
            else:
                out.append(i)
        return out


@contextlib.contextmanager
def _modules_stay_put() -> Iterator[None]:
    """``Module.to`` a device and dtype every parameter and buffer already has returns the module
    untouched. (torch moves fake parameters by ``swap_tensors``, which refuses the weak reference
    the fake mode keeps to each; a move to where they are is a no-op anyway.)"""
    original = torch.nn.Module.to

    def to(module, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*module.parameters(), *module.buffers()]
        if all((device is None or t.device == torch.device(device)) and (dtype is None or t.dtype == dtype)
               for t in tensors):
            return module
        return original(module, *args, **kwargs)

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


@contextlib.contextmanager
def fake_measure(max_nonzero: int) -> Iterator[LiveBytes]:
    """Fake CPU tensors, their live bytes counted, data-dependent operations answered by
    :class:`WorstCase`. Everything made inside is fake; the tracker's ``peak`` is the answer."""
    from torch._subclasses import fake_tensor

    # Small tensors made from Python data (a grid of norms, a list of ids) keep their values, so
    # checks on them read the truth, not the worst case (torch keeps single values only).
    with (mock.patch.object(fake_tensor, "CONSTANT_NUMEL_LIMIT", CONSTANT_ELEMENTS), _modules_stay_put(),
          warnings.catch_warnings(), fake_tensor.FakeTensorMode(allow_non_fake_inputs=True),
          LiveBytes() as tracker, WorstCase(max_nonzero)):
        # attnspace.sae.fast keys its mirror on data_ptr(), which a fake tensor answers with a warning
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        yield tracker


def measure(fn: Callable[[LiveBytes], object], max_nonzero: int) -> LiveBytes:
    """Run ``fn(tracker)`` under :func:`fake_measure`; the tracker (``peak``, ``phases``)."""
    with fake_measure(max_nonzero) as tracker:
        fn(tracker)
    return tracker


def allocator_peak(fn: Callable[[], object]) -> int:
    """Peak bytes the CPU allocator handed out while ``fn()`` ran for real, from its own account
    (torch's profiler records every allocation and free): the independent check of
    :class:`LiveBytes`. Counted from zero at the start, so what ``fn`` frees of older tensors
    lowers the running total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# The paper's models, from their published configurations (the hub is not reachable from every
# machine that plans a run); parameter counts: 8.03B, 8.19B, 9.24B, 2.78B (tests/test_memory.py).
PAPER_MODELS = {
    "llama": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                  rope_theta=500000.0, tie_word_embeddings=False,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192)),
    "qwen3": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                  max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False),
    "gemma2": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                   max_position_embeddings=8192, tie_word_embeddings=True),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                     num_attention_heads=32, vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
                     tie_word_embeddings=False),
}
"""transformers config fields of each paper architecture (config/paper.yaml's ``architecture``)."""

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_model(architecture: str, dtype: str):
    """The paper's model of ``architecture`` with random weights in ``dtype`` (call under :func:`fake_measure`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(PAPER_MODELS[architecture])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype]).eval()


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (tied weights once)."""
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()]}
    return sum(storages.values())


def forward_peak(architecture: str, dtype: str, layers: list[int], sites: list[str], batch: int,
                 seq: int) -> dict:
    """Caching forward (:func:`attnspace.sites.capture`, hooks on ``sites`` at ``layers``) of
    ``batch`` x ``seq`` tokens: {weights, peak} bytes, the peak with the weights and the captured
    activations (the caching job holds one document at a time: batch 1; a live stream holds
    ``sae.live_batch_docs``)."""
    from attnspace.sites import capture

    with fake_measure(batch * seq) as tracker:
        model = build_model(architecture, dtype)
        weights = tracker.live
        with torch.no_grad():
            acts = capture(model, torch.zeros(batch, seq, dtype=torch.long), layers, sites,
                           attention_mask=torch.ones(batch, seq, dtype=torch.long))
        del acts
    return dict(weights=weights, peak=tracker.peak)


class _Stream:
    """A training stream of fake batches [batch, d] (nothing to resume: like a live stream)."""

    resumable = False

    def __init__(self, d: int, batch_size: int) -> None:
        self.d, self.batch_size = d, batch_size

    def sample(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.d)

    def next_batch(self) -> torch.Tensor:
        return torch.randn(self.batch_size, self.d)


def _sae_job(config, d: int, out_dir, phase: Callable[[str], contextlib.AbstractContextManager],
             eval_batches: int, steps: int) -> None:
    """One SAE job by :func:`attnspace.sae.train.train_runs` on random batches, in the CUDA configuration,
    each of SAERun.setup, SAERun.step and evaluate inside ``phase(name)``; its files are not written."""
    from dataclasses import replace

    from attnspace.sae import fast, train

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)
        return wrapped

    config = replace(config, train_tokens=steps * config.batch_size, log_every=0, checkpoint_every=0)
    heldout = [torch.randn(config.batch_size, d) for _ in range(eval_batches)]
    with (fast.force_cuda_path(), mock.patch.object(train, "save_sae"),
          mock.patch.object(train.SAERun, "setup", in_phase("setup", train.SAERun.setup)),
          mock.patch.object(train.SAERun, "step", in_phase("step", train.SAERun.step)),
          mock.patch.object(train, "evaluate", in_phase("evaluate", train.evaluate))):
        train.train_runs([train.SAERun(config, out_dir)], _Stream(d, config.batch_size), heldout)


def sae_job_peak(config, d: int, out_dir, eval_batches: int = 2, steps: int = 3) -> dict:
    """Peak bytes of one SAE job, by the project's own loop (:func:`attnspace.sae.train.train_runs`:
    setup, ``steps`` optimizer steps, release, evaluation on ``eval_batches`` held-out batches) in the
    CUDA configuration (:func:`attnspace.sae.fast.force_cuda_path`), with fake tensors.

    config: an :class:`attnspace.sae.config.SAETrainConfig` (its train_tokens are cut to ``steps``
    batches). Returns {setup, step, evaluate, peak} in bytes: each phase's peak, and the whole run's.
    Data-dependent sizes are :class:`WorstCase`'s: AuxK on at every step (every latent dead),
    B (K + k_aux) active entries and min(n, B (K + k_aux)) touched latents. Evaluation's peak is
    per batch, so a few batches show it.
    """
    entries = config.batch_size * (config.k + (config.k_aux if config.auxk else 0))
    with fake_measure(entries) as tracker:
        _sae_job(config, d, out_dir, tracker.phase, eval_batches, steps)
    return {**tracker.phases, "peak": tracker.peak}


def check_sae_job(optimizer: str, d: int = 64, n: int = 2048, batch: int = 256, k: int = 8, k_aux: int = 64) -> dict:
    """The method against real allocation: one small SAE job (AuxK on, every latent that did not
    fire in the last step dead) run for real on the CPU, its peak by the allocator's own account
    (:func:`allocator_peak`) and by :class:`LiveBytes` on the real tensors, and measured with fake
    tensors (:func:`sae_job_peak`). Returns the shapes and {allocator, tracked, fake} in bytes."""
    import tempfile

    from attnspace.sae.config import SAETrainConfig

    config = SAETrainConfig(d_sae=n, k=k, optimizer=optimizer, batch_size=batch, auxk=True, k_aux=k_aux,
                            dead_threshold_tokens=1, buffer_rows=2 * batch, train_tokens=batch,
                            init_batch_tokens=batch, asi_sample_tokens=batch)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        real = allocator_peak(lambda: _sae_job(config, d, tmp, lambda _: contextlib.nullcontext(), 2, 3))
        torch.manual_seed(0)
        with LiveBytes() as tracker:
            _sae_job(config, d, tmp, tracker.phase, 2, 3)
        fake = sae_job_peak(config, d, tmp)["peak"]
    return dict(d=d, n=n, batch=batch, k=k, k_aux=k_aux, allocator=real, tracked=tracker.peak, fake=fake)


def lorsa_step_peak(config, architecture: str, batch_docs: int, seq: int, steps: int = 2) -> int:
    """Peak bytes of Lorsa training steps as :func:`attnspace.lorsa.train.train_lorsa` takes them
    (forward on ``batch_docs`` whole documents of ``seq`` tokens, MSE on the kept rows, backward,
    fused Adam), with the target model's RoPE, fake tensors; the loop is restated here because
    train_lorsa reads its batches from activation stores."""
    import torch.nn.functional as F
    from transformers import AutoConfig

    from attnspace.lorsa.model import Lorsa, causal_document_mask
    from attnspace.lorsa.rope import rope_from_config

    fields = dict(PAPER_MODELS[architecture])
    model_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with fake_measure(batch_docs * seq) as tracker:
        d = model_config.hidden_size
        lorsa = Lorsa(config, d, rope_from_config(model_config, config.d_qk))
        opt = torch.optim.Adam(lorsa.parameters(), lr=config.lr, fused=True)
        pos = torch.arange(seq).expand(batch_docs, seq)
        seg = torch.arange(batch_docs)[:, None].expand(batch_docs, seq)
        keep = torch.ones(batch_docs, seq, dtype=torch.bool)
        for _ in range(steps):
            x, y = torch.randn(batch_docs, seq, d), torch.randn(batch_docs, seq, d)
            out = lorsa(x, pos, causal_document_mask(seg), k=config.k)
            loss = F.mse_loss(out.output[keep], y[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            del out, loss
    return tracker.peak
