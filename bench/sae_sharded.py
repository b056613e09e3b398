"""Feature-sharded SAE training (attnspace.sae.sharded): bytes communicated per step and tokens/s per rank count.

Two parts, one JSON line per result:

* ``measured``: R = 1, 2, 4 gloo ranks on this machine's CPU, random activations, a TopK SAE with AuxK
  (every other latent dead, so AuxK runs at full width) and Adam; each rank counts the bytes its
  collectives carry (broadcast: the payload; ring all-gather: (R - 1) x payload sent; ring all-reduce:
  2 (R - 1)/R x payload) and rank 0 times ``--steps`` steps after two warm-up steps (one thread per
  rank: on a 2-core machine R = 4 oversubscribes the cores, so tokens/s there says nothing of scaling). ``model_bytes`` is
  :func:`attnspace.sae.sharded.bytes_per_step` for the same shapes (the formula the paper rows use).
* ``paper``: the communication per step at the paper's shapes (k 50, B 4096, d 4096; with AuxK k_aux 512
  and without) for R = 2..8, and its time at NVLink (~900 GB/s per direction) and InfiniBand (~50 GB/s
  per direction, one NDR port): a lower bound on the time a step spends communicating, to set against
  the one-GPU step (bench/anchor: about 75 ms at 1M latents). The bytes do not depend on n: the
  candidates and the reconstruction are per token, not per latent.

    python bench/sae_sharded.py                       # both parts
    python bench/sae_sharded.py --paper-only
    python bench/sae_sharded.py --latents 8192 --d 256 --batch 512 --steps 10
    python bench/sae_sharded.py --device cuda --ranks 1 2 4 8 --latents 1048576 --d 4096 --batch 4096 \
        --k 50 --k-aux 512                                # on a GPU node (not run yet)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

NVLINK = 900e9
"""Bytes per second per direction, NVLink 4 (H100 / H200 SXM)."""

INFINIBAND = 50e9
"""Bytes per second per direction, one InfiniBand NDR port (400 Gb/s)."""


class _Counting:
    """torch.distributed with its all_gather and all_reduce counted (bytes this rank sends in a ring)."""

    def __init__(self, dist) -> None:
        self._dist, self.sent = dist, 0

    def __getattr__(self, name):
        return getattr(self._dist, name)

    def all_gather(self, parts, t, *args, **kw):
        self.sent += (self._dist.get_world_size() - 1) * t.numel() * t.element_size()
        return self._dist.all_gather(parts, t, *args, **kw)

    def broadcast(self, t, *args, **kw):
        if self._dist.get_world_size() > 1:
            self.sent += t.numel() * t.element_size()
        return self._dist.broadcast(t, *args, **kw)

    def all_reduce(self, t, *args, **kw):
        R = self._dist.get_world_size()
        self.sent += 2 * (R - 1) * t.numel() * t.element_size() // R
        return self._dist.all_reduce(t, *args, **kw)


def _rank_bench(n: int, d: int, batch: int, k: int, k_aux: int, steps: int, out: str, device: str) -> None:
    import torch

    import attnspace.sae.sharded as sharded

    torch.set_num_threads(1)
    counting = _Counting(sharded.dist)
    sharded.dist = counting
    rank, ranks = counting.get_rank(), counting.get_world_size()
    dev = sharded.rank_device(device)
    sae = sharded.ShardedSAE(d, n, k, rank, ranks)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(sae.n_local, d, generator=torch.Generator().manual_seed(rank)) / d**0.5  # this rank's rows
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W)
    del W
    cuda = dev.type == "cuda"
    sae.to(dev).matmul_dtype = torch.bfloat16 if cuda else None  # as train_sae on CUDA
    opt = sharded.make_sharded_optimizer("adam", sae.parameters(), 1e-4, (0.9, 0.999), 1e-8)
    dead = (torch.arange(sae.offset, sae.offset + sae.n_local) % 2 == 0).to(dev)
    xs = [torch.randn(batch, d, generator=g).to(dev) for _ in range(steps + 2)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(x):
        counting.broadcast(x, 0)  # rank 0's batch, as train_sharded feeds it
        out = sae(x, dead=dead, k_aux=k_aux)
        (out.nmse + out.auxk_loss / 32).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for x in xs[:2]:
        step(x)
    sync()
    counting.barrier()
    counting.sent = 0
    t0 = time.perf_counter()
    for x in xs[2:]:
        step(x)
    sync()
    seconds = time.perf_counter() - t0
    if rank == 0:
        row = dict(part="measured", device="cuda (nccl)" if cuda else "cpu (gloo)", ranks=ranks, latents=n, d=d, batch=batch, k=k, k_aux=k_aux,
                   steps=steps, bytes_per_step=counting.sent // steps,
                   model_bytes=sharded.bytes_per_step(batch, d, min(k, n // ranks), ranks,
                                                      min(k_aux, n // ranks) if k_aux else 0, 2 if cuda else 4),
                   ms_per_step=round(1000 * seconds / steps, 2), tokens_per_second=round(batch * steps / seconds, 1))
        Path(out).write_text(json.dumps(row))


def paper_rows() -> list[dict]:
    from attnspace.sae.sharded import bytes_per_step

    rows = []
    for k_aux in (0, 512):
        for R in range(2, 9):
            b = bytes_per_step(4096, 4096, 50, R, k_aux, value_bytes=2)  # the bf16 product on CUDA
            rows.append(dict(part="paper", ranks=R, d=4096, batch=4096, k=50, k_aux=k_aux, bytes_per_step=b,
                             mib_per_step=round(b / 2**20, 1), nvlink_ms=round(1000 * b / NVLINK, 3),
                             infiniband_ms=round(1000 * b / INFINIBAND, 2)))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-aux", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--paper-only", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: one GPU a rank, NCCL, the bf16 encoder product (not run yet: no GPU here)")
    a = p.parse_args(argv)
    for row in paper_rows():
        print(json.dumps(row))
    if a.paper_only:
        return
    from attnspace.sae.sharded import launch

    if a.device == "cpu":
        os.environ["ATTNSPACE_SHARDED_BACKEND"] = "gloo"  # the CPU measurement, also where a GPU is present
    with tempfile.TemporaryDirectory() as tmp:
        for R in a.ranks:
            out = Path(tmp) / f"r{R}.json"
            launch(R, _rank_bench, (a.latents, a.d, a.batch, a.k, a.k_aux, a.steps, str(out), a.device),
                   log_dir=Path(tmp))
            print(json.dumps(json.loads(out.read_text())))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
