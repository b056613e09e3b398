"""SAE training step on one GPU: attnspace's fast path against the encoder GEMM, a naive
dense TopK SAE and EleutherAI sparsify's SparseCoder, in one process on one device.

The anchor's setting (its measurements: bench/anchor/h200.jsonl): d 4096, k 50, batch 4096
tokens, random data, bf16 (autocast for naive and sparsify, the fast path's bf16 GEMM),
features in {32768, 131072, 262144, 524288, 1048576}. Per size it measures

* ``encoder_gemm``: x @ W_enc^T in bf16 alone, the speed of light of any TopK SAE;
* ``naive_dense``: dense latent, dense decoder, Adam (the anchor's NaiveTopK);
* ``sparsify``: sparsify's SparseCoder with fused Adam (the anchor's step);
* ``attnspace_adam`` / ``attnspace_sparseadam``: :class:`attnspace.sae.TopKSAE` with
  ``fast = True`` (what ``train_sae`` picks on CUDA) and the optimizer of
  :func:`attnspace.sae.optim.make_optimizer`;

and first checks, on the same device, that the fast path's loss, gradients and one Adam /
SparseAdam update match the reference path (``what: check``; fp32 GEMM: tight; bf16 GEMM:
the agreement bf16 allows). One JSON line per measurement, on stdout and in
``bench/results/sae_gpu_<device>.jsonl``; ``model_gb`` is the memory the step should need
(computed by :func:`memory_model`, not measured), ``peak_gb`` what it used (GiB, 2^30 bytes,
as the anchor). A run out of memory reports ``oom: true``.

    python bench/sae_gpu.py                                   # on an H100 / H200, under 5 minutes
    python bench/sae_gpu.py --device cpu --sizes 512,1024 --d 64 --batch 128 --k 8 --out /tmp/s.jsonl

sparsify is for the benchmark only: an installed ``sparsify`` (pip install eai-sparsify),
else the wheel in ``bench/.wheels/`` (``pip download eai-sparsify --no-deps -d bench/.wheels``,
for machines without network), else ``what: sparsify, skipped: "not installed"``. Its
SparseCoder needs torch and triton (for its Triton decoder); the modules it imports but does
not use in a training step (huggingface_hub, natsort, einops, simple_parsing, accelerate,
transformers) are stubbed when absent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import glob
import importlib.util
import json
import math
import os
import re
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

from attnspace.sae import fast, optim
from attnspace.sae.fast import lowp_mirror
from attnspace.sae.model import TopKSAE
from attnspace.sae.optim import make_optimizer

ROOT = Path(__file__).resolve().parent
SIZES = [32768, 131072, 262144, 524288, 1048576]
GIB = 2**30


# ---------------------------------------------------------------- memory model (computed)

def expected_touched(n: int, entries: int) -> float:
    """Expected distinct latents among ``entries`` uniform draws (random data): n (1 - exp(-entries / n))."""
    return n * -math.expm1(-entries / n)


def memory_model(n: int, d: int, batch: int, k: int, optimizer: str, k_aux: int = 0) -> dict:
    """Bytes the fast training step holds at its peak, by part (GiB), on random data.

    Parameters fp32 (W_enc, W_dec [n, d], biases); the bf16 mirror of W_enc; Adam and
    SparseAdam keep two fp32 moments per parameter; gradients: dense [n, d] per weight for
    Adam, [U, d] row blocks for SparseAdam (U touched latents, expected under uniform firing;
    at most min(n, batch (k + k_aux))); pre [batch, n] bf16 exists in the forward only, the
    gradients in the backward and step, so the peak is the larger of the two phases. Small
    parts (plan, [batch, d] activations, top-k outputs, cuBLAS workspace) are one term.
    """
    nd = n * d
    entries = batch * (k + k_aux)
    U = expected_touched(n, batch * k) if not k_aux else min(n, entries)
    params = 4 * (2 * nd + n + d)
    mirror = 2 * nd
    moments = 2 * params
    grads = 4 * (2 * nd + n + d) if optimizer == "adam" else 4 * (2 * U * d + U + d)
    row_sums = 4 * U * d  # one [U, d] block before it is densified (Adam) or handed over (SparseAdam)
    pre = 2 * batch * n
    small = 24 * entries * 8 + 8 * batch * d * 4 + 64 * 2**20
    forward = params + mirror + moments + pre + small
    backward = params + mirror + moments + grads + (row_sums if optimizer == "adam" else 0) + small
    parts = dict(params=params, mirror=mirror, moments=moments, grads=grads, pre=pre, small=small)
    return dict(total=max(forward, backward) / GIB, touched=U, **{k_: v / GIB for k_, v in parts.items()})


# ---------------------------------------------------------------- sparsify, local only

_STUBS = {
    "huggingface_hub": dict(snapshot_download=None),
    "natsort": dict(natsorted=sorted),
    "einops": dict(einsum=None, rearrange=None),
    "accelerate": {},
    "accelerate.utils": dict(send_to_device=None),
    "transformers": dict(PreTrainedModel=object),
}


def _simple_parsing_stub() -> types.ModuleType:
    mod = types.ModuleType("simple_parsing")

    class Serializable:
        pass

    def list_field(*default, **kw):
        return dataclasses.field(default_factory=lambda: list(default))

    mod.Serializable, mod.list_field = Serializable, list_field
    return mod


def load_sparsify(wheels: Path):
    """(SparseCoderConfig, SparseCoder, source) from an installed sparsify or a local wheel; None if neither."""
    root = source = None
    spec = importlib.util.find_spec("sparsify")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if os.path.exists(os.path.join(loc, "sparse_coder.py")):  # not the other PyPI "sparsify"
                root, source = loc, "installed"
    if root is None:
        found = sorted(glob.glob(str(wheels / "eai_sparsify-*.whl")))
        if found:
            sys.path.insert(0, found[-1])  # a wheel is a zip archive: importable as it is
            root, source = found[-1] + "/sparsify", Path(found[-1]).name
    if root is None:
        return None
    for name, attrs in _STUBS.items():
        if name not in sys.modules and importlib.util.find_spec(name.split(".")[0]) is None:
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__dict__.update(attrs)
    if importlib.util.find_spec("simple_parsing") is None:
        sys.modules["simple_parsing"] = _simple_parsing_stub()
    pkg = types.ModuleType("sparsify")  # skip sparsify/__init__ (its trainer pulls in datasets, ...)
    pkg.__path__ = [root]
    sys.modules["sparsify"] = pkg
    with contextlib.redirect_stdout(sys.stderr):  # it prints which decoder it uses
        import sparsify.utils as su
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder
    return SparseCoderConfig, SparseCoder, f"{source} ({su.decoder_impl.__name__})"


# ---------------------------------------------------------------- the steps

class NaiveTopK(nn.Module):
    """The anchor's naive dense TopK SAE (SAELens / dictionary_learning style)."""

    def __init__(self, W: torch.Tensor, k: int, autocast: bool) -> None:
        super().__init__()
        n, d = W.shape
        self.W_enc = nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(n, device=W.device))
        self.W_dec = nn.Parameter(W.clone())
        self.b_dec = nn.Parameter(torch.zeros(d, device=W.device))
        self.k, self.autocast = k, autocast

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pre = torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)
            v, i = pre.topk(self.k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, i, v)
            xh = z @ self.W_dec + self.b_dec
        return (xh.float() - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def init_weights(n: int, d: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, d, device=device, generator=g) / math.sqrt(d)


def make_sae(W: torch.Tensor, k: int, optimizer: str, fast: bool, bf16: bool) -> TopKSAE:
    n, d = W.shape
    sae = TopKSAE(d, n, k).to(W.device)
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W)
    sae.sparse_grad = optimizer == "sparse_adam"
    sae.fast = fast
    sae.matmul_dtype = torch.bfloat16 if fast and bf16 else None
    return sae


def sae_step(sae: TopKSAE, opt, x: torch.Tensor, dead=None, k_aux: int = 0):
    """One training step in :meth:`attnspace.sae.train.SAERun.step`'s order: the gradients are freed
    right after the optimizer step, so none is alive during the next forward."""
    out = sae(x, dead=dead, k_aux=k_aux)
    loss = out.nmse + out.auxk_loss / 32 if dead is not None else out.nmse
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def mirror_steps(device, n: int, d: int, batch: int, k: int, optimizer: str, steps: int = 40) -> dict:
    """``steps`` training steps on the CUDA fast path: at every forward the bf16 mirror must equal
    bf16(W_enc) of the current weights (a stale mirror was the failure of the version-counter cache
    under fused Adam), and the forward's TopK selection is compared with the fp32 selection of the
    same weights (agreement; about 0.5-0.75 with a stale mirror, near 1 with a current one)."""
    sae = make_sae(init_weights(n, d, device, seed=3), k, optimizer, fast=True, bf16=True)
    opt = make_optimizer(optimizer, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], 4e-4, (0.9, 0.999), 1e-8)
    g = torch.Generator(device=device).manual_seed(4)
    basis = torch.randn(d // 8, d, device=device, generator=g)  # low-rank data, so training moves the weights
    mismatches, agree, losses = 0, [], []
    real = fast.lowp_weight

    def checked(W, dtype):
        nonlocal mismatches
        out = real(W, dtype)
        mismatches += int(not torch.equal(out, W.detach().to(dtype)))
        return out

    fast.lowp_weight = checked
    try:
        for _ in range(steps):
            x = torch.randn(batch, d // 8, device=device, generator=g) @ basis / math.sqrt(d)
            with torch.no_grad():
                want = (x @ sae.W_enc.T + sae.b_enc).topk(k, dim=1).indices
            out = sae(x)
            agree.append(overlap(out.indices, want, n))
            losses.append(float(out.nmse.detach()))
            out.nmse.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        fast.lowp_weight = real
    return dict(what="mirror_steps", optimizer=optimizer, n=n, steps=steps, mirror_mismatches=mismatches,
                agree_mean=sum(agree) / len(agree), agree_min=min(agree), loss_first=losses[0], loss_last=losses[-1],
                ok=mismatches == 0 and min(agree) > 0.9)


def step_beside_a_model(device, n: int, d: int, batch: int, k: int, held_gib: float) -> dict:
    """One SparseAdam training step at n latents with ``held_gib`` GiB held by a dummy tensor (the live
    model's share of the GPU): whether it fits, and the peak."""
    release(device)
    held = torch.empty(int(held_gib * GIB), dtype=torch.uint8, device=device)
    row = dict(what="sparseadam_beside_model", n=n, held_gb=held_gib)
    try:
        sae = make_sae(init_weights(n, d, device), k, "sparse_adam", fast=True, bf16=True)
        opt = make_optimizer("sparse_adam", [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], 6e-5, (0.9, 0.999), 1e-8)
        x = torch.randn(batch, d, device=device)
        for _ in range(2):  # the second step has the optimizer's moments allocated
            sae_step(sae, opt, x)
        sync(device)
        row.update(oom=False, peak_gb=peak_gb(device))
    except torch.OutOfMemoryError:
        row.update(oom=True, peak_gb=peak_gb(device))
    del held
    release(device)
    return row


# ---------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, iters: int, warm: int) -> float:
    for _ in range(warm):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters


def release(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # the last measurement's tensors, also those an out-of-memory traceback held
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def overlap(a: torch.Tensor, b: torch.Tensor, n: int) -> float:
    """Fraction of the selected (token, latent) pairs [B, K] that both selections contain."""
    ma = torch.zeros(a.shape[0], n, dtype=torch.bool, device=a.device).scatter_(1, a, True)
    mb = torch.zeros_like(ma).scatter_(1, b, True)
    return float((ma & mb).sum() / a.numel())


def check(device, n: int, d: int, batch: int, k: int, bf16: bool) -> dict:
    """Fast path vs reference path on one batch: loss, gradients, one Adam and one SparseAdam update.

    With TF32 off and the GEMM in fp32 the two differ only by summation order (tight);
    with the bf16 GEMM (what training uses on CUDA) the selection follows the bf16 product,
    so a few latents at the K-th value differ: reported as index agreement, loose gates.
    """
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(batch, d, device=device, generator=g)
        W = init_weights(n, d, device, seed=2)
        dead = torch.arange(n, device=device) % 4 == 0
        row = dict(what="check", precision="bf16" if bf16 else "fp32", n=n, d=d, k=k, batch=batch, k_aux=2 * k)
        for name in ("sparse_adam", "adam"):
            results = {}
            for fast in (False, True):
                sae = make_sae(W, k, name, fast, bf16)
                params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
                opt = make_optimizer(name, params, 1e-3, (0.9, 0.999), 1e-8)
                optim.FUSED = None if fast else False  # the reference path's optimizer: eager SparseAdam
                out = sae(x, dead=dead, k_aux=2 * k)
                loss = out.nmse + out.auxk_loss / 32
                loss.backward()
                grads = [p.grad.to_dense().clone() for p in params]
                before = [p.detach().clone() for p in params]
                opt.step()
                updates = [p.detach() - b for p, b in zip(params, before)]
                mirror = lowp_mirror(sae.W_enc)
                results[fast] = (out, loss.detach(), grads, updates, mirror, sae)
            optim.FUSED = None
            (ref, ref_loss, ref_g, ref_u, _, _), (fst, fst_loss, fst_g, fst_u, mirror, sae) = results[False], results[True]
            tag = "sparseadam" if name == "sparse_adam" else "adam"
            row["loss_rel_diff"] = rel(fst_loss, ref_loss)
            row["aux_rel_diff"] = rel(fst.auxk_loss, ref.auxk_loss)
            row["index_agreement"] = overlap(fst.indices, ref.indices, n)
            row[f"grad_rel_diff_{tag}"] = max(rel(a, b) for a, b in zip(fst_g, ref_g))
            row[f"update_rel_diff_{tag}"] = max(rel(a, b) for a, b in zip(fst_u, ref_u))
            if name == "sparse_adam" and bf16:
                row["mirror_max_abs_diff"] = (None if mirror is None else
                                              float((mirror.float() - sae.W_enc.detach().bfloat16().float()).abs().max()))
        if bf16:
            row["ok"] = row["loss_rel_diff"] < 2e-2 and row["index_agreement"] > 0.9
        else:
            row["ok"] = row["loss_rel_diff"] < 1e-5 and row["index_agreement"] == 1.0 and all(
                row[f"{w}_rel_diff_{t}"] < 1e-4 for w in ("grad", "update") for t in ("adam", "sparseadam"))
        return row
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def measure(what: str, n: int, build, device, iters: int, warm: int, batch: int) -> dict:
    release(device)
    row = dict(what=what, n=n)
    try:
        step = build()
        t = timeit(step, device, iters, warm)
        row.update(ms=t * 1e3, tok_s=batch / t, peak_gb=peak_gb(device), oom=False)
    except torch.OutOfMemoryError:
        row.update(ms=None, tok_s=None, peak_gb=peak_gb(device), oom=True)
    except Exception as err:  # noqa: BLE001 - recorded; the other cases still run
        row.update(ms=None, tok_s=None, peak_gb=peak_gb(device), oom=False,
                   error=f"{type(err).__name__}: {' '.join(str(err).split())[:500]}")
    step = None
    release(device)
    return row


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated feature counts")
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--check-n", type=int, default=32768, help="features of the fast-vs-reference check")
    p.add_argument("--skip", default="", help="comma-separated `what`s not to run (e.g. naive_dense)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".wheels")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/sae_gpu_<device>.jsonl")
    p.add_argument("--model-gib", type=float, default=15.0, help="GiB held beside the largest SparseAdam step "
                   "(the live 8B model's share)")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the anchor
    sizes = [int(s) for s in a.sizes.split(",") if s]
    skip = set(filter(None, a.skip.split(",")))
    bf16 = device.type == "cuda"  # bf16 autocast / GEMM on the GPU, as the anchor; fp32 on CPU (tests)
    out_path = a.out or ROOT / "results" / f"sae_gpu_{device_slug(device)}.jsonl"
    rows: list[dict] = []
    common = dict(device=device_slug(device), d=a.d, k=a.k, batch=a.batch)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("")

    def emit(row: dict) -> None:  # appended as measured: an exception later loses nothing
        row = {**row, **{k_: v for k_, v in common.items() if k_ not in row}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with out_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def guarded(what: str, n: int | None, fn) -> dict | None:
        """fn()'s row, or a row naming the exception: one failing case does not end the run."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - recorded, and the next case runs
            emit(dict(what=what, n=n, error=f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"))
            release(device)
            return None

    sp = load_sparsify(a.wheels) if "sparsify" not in skip else None
    triton = importlib.util.find_spec("triton") is not None
    emit(dict(what="env", device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              torch=torch.__version__, triton=triton, sparsify=None if sp is None else sp[2], bf16=bf16,
              total_gb=torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None,
              measured=True))
    t_start = time.perf_counter()

    if "check" not in skip:
        for precision in ([False, True] if bf16 else [False]):
            row = guarded("check", a.check_n, lambda p=precision: check(device, min(a.check_n, max(sizes)), a.d, a.batch,
                                                                         a.k, p))
            if row is not None:
                emit(row)
        release(device)
    if "mirror_steps" not in skip and bf16:
        for name in ("adam", "sparse_adam", "masked_adam"):
            row = guarded("mirror_steps", a.check_n, lambda name=name: mirror_steps(device, a.check_n, a.d, a.batch,
                                                                                     a.k, name))
            if row is not None:
                emit(row)
            release(device)
    if "sparseadam_beside_model" not in skip and bf16:
        row = guarded("sparseadam_beside_model", max(sizes),
                      lambda: step_beside_a_model(device, max(sizes), a.d, a.batch, a.k, a.model_gib))
        if row is not None:
            emit(row)

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(a.batch, a.d, device=device, generator=g)
    for n in sizes:
        base: dict[str, float | None] = {}

        def finish(row: dict, model: dict | None = None, base=base) -> None:
            row["model_gb"] = None if model is None else round(model["total"], 2)
            row["ratio_gemm"] = (row["tok_s"] / base["encoder_gemm"]
                                 if row["tok_s"] and base.get("encoder_gemm") else None)
            row["ratio_sparsify"] = (row["tok_s"] / base["sparsify"] if row["tok_s"] and base.get("sparsify") else None)
            emit(row)

        if "encoder_gemm" not in skip:
            def build_gemm(n=n):
                W = torch.randn(n, a.d, device=device, dtype=torch.bfloat16)
                xb = x.bfloat16()
                return lambda: xb @ W.T

            row = measure("encoder_gemm", n, build_gemm, device, a.iters, a.warmup, a.batch)
            row["tflops"] = 2 * a.batch * a.d * n / (row["ms"] / 1e3) / 1e12 if row["ms"] else None
            base["encoder_gemm"] = row["tok_s"]
            finish(row, dict(total=(2 * n * a.d + 2 * a.batch * a.d + 2 * a.batch * n) / GIB))

        if "naive_dense" not in skip:
            def build_naive(n=n):
                m = NaiveTopK(init_weights(n, a.d, device), a.k, autocast=bf16)
                opt = torch.optim.Adam(m.parameters(), lr=1e-4, fused=device.type == "cuda" or None)

                def step():
                    opt.zero_grad(set_to_none=True)
                    m(x).backward()
                    opt.step()
                return step

            finish(measure("naive_dense", n, build_naive, device, a.iters, a.warmup, a.batch))

        if "sparsify" not in skip:
            if sp is None:
                emit(dict(what="sparsify", n=n, skipped="not installed", tok_s=None, peak_gb=None, oom=None,
                          model_gb=None, ratio_gemm=None, ratio_sparsify=None))
            else:
                def build_sparsify(n=n):
                    SCC, SC, _ = sp
                    m = SC(a.d, SCC(num_latents=n, k=a.k), device=device)
                    opt = torch.optim.Adam(m.parameters(), lr=1e-4, fused=device.type == "cuda" or None)

                    def step():
                        opt.zero_grad(set_to_none=True)
                        m(x).fvu.backward()
                        opt.step()
                    return step

                row = measure("sparsify", n, build_sparsify, device, a.iters, a.warmup, a.batch)
                base["sparsify"] = row["tok_s"]
                finish(row)

        for what, name in (("attnspace_adam", "adam"), ("attnspace_sparseadam", "sparse_adam")):
            if what in skip:
                continue

            def build_ours(name=name, n=n):
                sae = make_sae(init_weights(n, a.d, device), a.k, name, fast=True, bf16=bf16)
                opt = make_optimizer(name, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], 1e-4, (0.9, 0.999), 1e-8)
                return lambda: sae_step(sae, opt, x)

            row = measure(what, n, build_ours, device, a.iters, a.warmup, a.batch)
            model = memory_model(n, a.d, a.batch, a.k, name)
            row["touched_expected"] = round(model["touched"])
            finish(row, model)

    emit(dict(what="total", seconds=time.perf_counter() - t_start))
    print(f"wrote {out_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
