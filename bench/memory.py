"""Peak GPU memory of the paper's jobs, measured on the CPU with fake tensors (attnspace.memory).

    python bench/memory.py                    # every row of bench/results/memory_paper.csv for this tree's code
    python bench/memory.py --code before      # the same, labelled as another version of the code
    python bench/memory.py --only check       # one kind of row (sae, forward, lorsa, check)

Rows, each by the project's own code at config/paper.yaml's shapes:

* ``sae``: one SAE job (``attnspace.memory.sae_job_peak``: setup, three optimizer steps, release,
  evaluation) per paper size (16,384 .. 1,048,576 latents at d 4,096; batch 4,096, k 50), per
  optimizer, without and with AuxK (k_aux 512), in the CUDA configuration; beside it the same
  job with the live model resident: its bf16 weights plus the peak of its live forward
  (``sae.live_batch_docs`` documents of ``tokens.max_doc_tokens``), summed because the prefetch
  thread can run that forward while a step is at its peak; and the memory model
  (``attnspace.sae.group.training_bytes``) against the measurement;
* ``forward``: each paper model's caching forward with its hooks (one document of
  ``tokens.max_doc_tokens`` tokens, every cached site at every configured layer) and the live
  forward of the focus model;
* ``lorsa``: Lorsa training steps at the paper's size;
* ``check``: the method against the CPU allocator's own account of a real run of the same code
  (small shapes; attnspace.memory.allocator_peak): the fake peak is an upper bound and must stay
  within a few percent of the real one.

Data-dependent sizes take their worst case (attnspace.memory.WorstCase): every peak is an upper
bound. Rows of other ``--code`` labels already in the CSV are kept, so one file holds the code
before and after a change.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "memory_paper.csv"
GIB = 1 << 30
DEVICE_GIB = 139.0
"""An H200's memory usable by tensors (of its 140.4 GiB, less CUDA's context)."""
BOUND = "upper bound: AuxK on every step with all latents dead, B(K+k_aux) active entries, min(n, B(K+k_aux)) touched latents"
COLUMNS = ["kind", "code", "model", "optimizer", "auxk", "d_model", "n_latents", "batch", "k", "k_aux",
           "setup_gib", "step_gib", "evaluate_gib", "peak_gib", "model_gib", "model_vs_measured",
           "live_gib", "peak_with_live_gib", "device_gib", "fits", "fits_with_live",
           "real_allocator_mib", "real_tracked_mib", "fake_mib", "fake_vs_real", "seconds", "note"]


def gib(n: float) -> float:
    return round(n / GIB, 3)


def sae_rows(paper: dict, code: str, live_gib: float) -> list[dict]:
    from attnspace.memory import sae_job_peak
    from attnspace.sae.config import SAETrainConfig
    from attnspace.sae.group import training_bytes

    sae, d = paper["sae"], paper["models"][paper["focus"]["model"]]["d_model"]
    rows = []
    for expansion in paper["fig7"]["expansion"]:
        n = expansion * d
        for optimizer in ("adam", "sparse_adam", "masked_adam"):
            for auxk in (False, True):
                config = SAETrainConfig(d_sae=n, k=sae["k"], optimizer=optimizer, batch_size=sae["batch_size"],
                                        auxk=auxk, k_aux=sae["auxk"]["k_aux"], buffer_rows=sae["buffer_rows"],
                                        train_tokens=sae["train_tokens"])
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    r = sae_job_peak(config, d, tmp)
                peak = max(r["step"], r["evaluate"])
                model = training_bytes(d, n, config.batch_size, optimizer=optimizer, auxk=auxk, k=config.k,
                                       k_aux=config.k_aux) if code == "after" else None  # a model of this code
                with_live = gib(peak) + live_gib
                rows.append(dict(kind="sae", code=code, optimizer=optimizer, auxk=auxk, d_model=d, n_latents=n,
                                 batch=config.batch_size, k=config.k, k_aux=config.k_aux if auxk else 0,
                                 setup_gib=gib(r["setup"]), step_gib=gib(r["step"]), evaluate_gib=gib(r["evaluate"]),
                                 peak_gib=gib(peak), model_gib=model and gib(model), model_vs_measured=model and round(model / peak, 3),
                                 live_gib=live_gib, peak_with_live_gib=round(with_live, 3), device_gib=DEVICE_GIB,
                                 fits=gib(peak) <= DEVICE_GIB, fits_with_live=with_live <= DEVICE_GIB,
                                 seconds=round(time.perf_counter() - t0, 1),
                                 note=BOUND + "; peak = max(step, evaluate); setup also counts the host's "
                                      "normalisation sample and init directions"))
                print(rows[-1], flush=True)
    return rows


def forward_rows(paper: dict, code: str) -> tuple[list[dict], float]:
    """Each model's caching forward, and the focus model's live forward; the live model's GiB."""
    from attnspace.memory import forward_peak

    seq, rows, live_gib = paper["tokens"]["max_doc_tokens"], [], 0.0
    focus = paper["focus"]["model"]
    runs = [(name, 1, m["layers"], paper["cache"]["sites"], "caching forward: one document, every cached "
             "site at every configured layer") for name, m in paper["models"].items()]
    runs.append((focus, paper["sae"]["live_batch_docs"], [paper["focus"]["layer"]], [paper["fig7"]["site"]],
                 "live forward of SAE training (sae.live_batch_docs documents, the focus layer's site)"))
    for name, batch, layers, sites, note in runs:
        m = paper["models"][name]
        t0 = time.perf_counter()
        r = forward_peak(m["architecture"], m["dtype"], layers, sites, batch, seq)
        rows.append(dict(kind="forward", code=code, model=name, d_model=m["d_model"], batch=batch * seq,
                         model_gib=gib(r["weights"]), peak_gib=gib(r["peak"]), device_gib=DEVICE_GIB,
                         fits=gib(r["peak"]) <= DEVICE_GIB, seconds=round(time.perf_counter() - t0, 1),
                         note=f"{note}; model_gib = its weights"))
        print(rows[-1], flush=True)
        if batch > 1:
            live_gib = gib(r["peak"])
    return rows, live_gib


def lorsa_rows(paper: dict, code: str) -> list[dict]:
    from attnspace.lorsa.config import LorsaConfig
    from attnspace.memory import lorsa_step_peak

    lo, rows = paper["lorsa"], []
    for name in lo["models"]:
        m = paper["models"][name]
        config = LorsaConfig(n_ov_heads=lo["expansion"] * m["d_model"], n_qk_heads=lo["n_qk_heads"], d_qk=lo["d_qk"],
                             k=lo["k"], d_init=lo["d_init"], lr=lo["lr"], batch_tokens=lo["batch_tokens"])
        seq = paper["tokens"]["max_doc_tokens"]
        t0 = time.perf_counter()
        peak = lorsa_step_peak(config, m["architecture"], lo["batch_tokens"] // seq, seq)
        rows.append(dict(kind="lorsa", code=code, model=name, optimizer="adam", d_model=m["d_model"],
                         n_latents=config.n_ov_heads, batch=lo["batch_tokens"], k=lo["k"], peak_gib=gib(peak),
                         device_gib=DEVICE_GIB, fits=gib(peak) <= DEVICE_GIB, seconds=round(time.perf_counter() - t0, 1),
                         note="training steps: forward, backward, fused Adam, whole documents"))
        print(rows[-1], flush=True)
    return rows


def check_rows(code: str) -> list[dict]:
    """Small SAE jobs run for real (allocator's account, LiveBytes on real tensors) and with fake tensors."""
    from attnspace.memory import check_sae_job

    rows = []
    for optimizer in ("adam", "sparse_adam", "masked_adam"):
        t0 = time.perf_counter()
        r = check_sae_job(optimizer)
        rows.append(dict(kind="check", code=code, optimizer=optimizer, auxk=True, d_model=r["d"], n_latents=r["n"],
                         batch=r["batch"], k=r["k"], k_aux=r["k_aux"], real_allocator_mib=round(r["allocator"] / 2**20, 3),
                         real_tracked_mib=round(r["tracked"] / 2**20, 3), fake_mib=round(r["fake"] / 2**20, 3),
                         fake_vs_real=round(r["fake"] / r["allocator"], 3), seconds=round(time.perf_counter() - t0, 1),
                         note="the same SAE job (attnspace.memory.check_sae_job) on real CPU tensors: the allocator's "
                              "peak (torch profiler), the tracker's on real tensors, and the fake measurement"))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", default="after", help="label of the code measured (kept apart from other labels)")
    parser.add_argument("--only", choices=["sae", "forward", "lorsa", "check"], help="measure one kind of row")
    parser.add_argument("--out", type=Path, default=OUT)
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    rows: list[dict] = []
    live_gib = None
    if a.only in (None, "forward", "sae"):
        forward, live_gib = forward_rows(paper, a.code)
        rows += forward if a.only != "sae" else []
    if a.only in (None, "sae"):
        rows += sae_rows(paper, a.code, live_gib)
    if a.only in (None, "lorsa"):
        rows += lorsa_rows(paper, a.code)
    if a.only in (None, "check"):
        rows += check_rows(a.code)
    kinds = {r["kind"] for r in rows}
    kept = []
    if a.out.exists():
        with a.out.open() as f:
            kept = [r for r in csv.DictReader(f) if not (r["code"] == a.code and r["kind"] in kinds)]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(kept + rows)
    print(f"wrote {len(rows)} rows ({a.code}) to {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
