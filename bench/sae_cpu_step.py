"""An SAE training step on the CPU: the two kernels the fast path replaced, each against its baseline.

In one process, one thread, at the embedded default's sizes (d 576, B 1,024, K 32, K_aux 512,
latents 4,608 and 9,216), on random data with half the latents dead (AuxK at full width):

* ``entry_dots``: the decoder's entry gradients <grad_out, W_dec[latent]>, by embedding_bag's
  per-sample-weight backward (every entry; the baseline) and by :func:`attnspace.sae.fast._entry_dots`
  (a sampled product over the active entries); their largest difference is printed too;
* ``adam``: torch's Adam step over the SAE's four parameters, per-tensor loop (the baseline)
  against the fused kernel (what :func:`attnspace.sae.optim.make_optimizer` builds);
* ``step``: the whole training step as ``train_sae`` runs it now (ms, for scale).

One JSON line per measurement (``ms`` of the candidate, ``baseline_ms``, ``ratio`` = baseline / candidate).

    python bench/sae_cpu_step.py
    python bench/sae_cpu_step.py --latents 4608 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from attnspace.sae.fast import _entry_dots, make_plan
from attnspace.sae.model import TopKSAE
from attnspace.sae.optim import make_optimizer


def best_ms(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` calls after one warm-up, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def entry_dots(n: int, d: int, B: int, K: int, K_aux: int, repeats: int) -> dict:
    """embedding_bag's per-sample-weight backward vs the sampled product, on one step's plan."""
    g = torch.Generator().manual_seed(0)
    W_dec, pre = torch.randn(n, d, generator=g), torch.randn(B, n, generator=g)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[: n // 2] = True
    top = pre.topk(K, 1).indices
    aux = pre.masked_fill(~dead, -float("inf")).topk(K_aux, 1).indices
    idx = torch.cat([top, aux], 1)
    raw = pre.gather(1, idx)
    plan = make_plan(idx, raw > 0, K, n)
    grad_out = torch.randn(2 * B, d, generator=g)
    v = raw.relu().reshape(-1).requires_grad_()

    def baseline():
        out = F.embedding_bag(plan.gather_ids.reshape(-1), W_dec, plan.out_offsets, mode="sum", per_sample_weights=v)
        return torch.autograd.grad(out, v, grad_out)[0]

    def candidate():
        return _entry_dots(plan, W_dec, grad_out)

    diff = float((baseline() * plan.active.reshape(-1) - candidate()).abs().max())
    base, cand = best_ms(baseline, repeats), best_ms(candidate, repeats)
    return dict(what="entry_dots", n=n, active_entries=int(plan.entries.numel()), ms=round(cand, 2),
                baseline_ms=round(base, 2), ratio=round(base / cand, 2), max_abs_diff=diff)


def adam(n: int, d: int, repeats: int) -> dict:
    """torch's Adam, per-tensor loop vs fused, over W_enc, b_enc, W_dec, b_dec."""
    def optimizer(fused):
        params = [torch.randn(n, d), torch.randn(n), torch.randn(n, d), torch.randn(d)]
        for p in params:
            p.requires_grad_()
            p.grad = torch.randn_like(p)
        return torch.optim.Adam(params, lr=1e-3, fused=fused)

    loop, fused = optimizer(None), optimizer(True)
    base, cand = best_ms(loop.step, repeats), best_ms(fused.step, repeats)
    return dict(what="adam", n=n, ms=round(cand, 2), baseline_ms=round(base, 2), ratio=round(base / cand, 2))


def step(n: int, d: int, B: int, K: int, K_aux: int, repeats: int) -> dict:
    """The whole step as train_sae runs it (fast path, Adam, AuxK with half the latents dead)."""
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(d, n, K, dataset_norm=1.0)
    sae.fast, sae.sparse_grad, sae.centred, sae.matmul_dtype = True, False, False, None
    opt = make_optimizer("adam", [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], 1e-3, (0.9, 0.999), 1e-8)
    x = torch.randn(B, d, generator=g)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[: n // 2] = True

    def one():
        out = sae(x, dead=dead, k_aux=K_aux)
        loss = out.nmse + out.auxk_loss / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return dict(what="step", n=n, ms=round(best_ms(one, repeats), 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", type=int, nargs="+", default=[4608, 9216])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-aux", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for n in a.latents:
        for row in (entry_dots(n, a.d, a.batch, a.k, a.k_aux, a.repeats), adam(n, a.d, a.repeats),
                    step(n, a.d, a.batch, a.k, a.k_aux, a.repeats)):
            print(json.dumps(dict(row, threads=a.threads)), flush=True)


if __name__ == "__main__":
    main()
