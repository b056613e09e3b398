"""profiles/slurm on a real one-node SLURM cluster (scripts/slurm-cluster.sh up; make test-cluster).

The paper configuration's structure on the offline hub fixture (tests/hub_fixture.py) runs twice:
locally, then through ``--workflow-profile profiles/slurm`` with the profile's own partitions,
GPU requests, memory and runtimes. Every job of the SLURM run must have been a SLURM job
(its SLURM job id in Snakemake's log, the job known to slurmctld under its rule's name, a GPU
requested exactly when the profile gives the rule one), one job is cancelled while it runs and
must be reported with its log and retried, and the outputs must equal the local run's: arrays,
tensors and numbers bitwise (the CPU path is deterministic), timings excepted.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from test_hub import check_hub_run, hub_env, run_hub_config

pytestmark = pytest.mark.cluster

PROFILE = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
GPU_RULES = {rule for rule, res in PROFILE["set-resources"].items() if res.get("gpu")}

FOCUS = "llama-3.1-8b/slimpajama"
SLURM_TARGETS = (
    *(f"results/spectra/{FOCUS}/L2/{site}.npz" for site in ("attn_out", "mlp_out", "resid_post")),
    f"results/interventions/{FOCUS}/L2/loss_recovered.csv",
    f"results/wo/{FOCUS}/decomposition.csv",
    f"results/saes/{FOCUS}/L2/attn_out/base-d0-adam-n64-k4/metrics.json",
    *(f"results/lorsa/{FOCUS}/L2/{init}-r0/metrics.json" for init in ("vanilla", "asi")),
)
"""Every rule that runs as a SLURM job: prepare_model, tokenize, cache_activations, spectrum,
loss_recovered, wo_decomposition, train_sae (from the live model) and train_lorsa."""

CANCEL_RULE = "cache_activations"
"""The rule whose first job is cancelled while it runs (it runs longest: a model forward)."""

TIMING_KEYS = re.compile(r"second|time|per_s|throughput|elapsed|date|created", re.I)
"""JSON keys and table columns that measure wall time: they differ between any two runs."""


def stage_rule(rule: str) -> str:
    """The rule's name, the SAE group rules (train_sae_<figures>_<n>) as train_sae: the profile's train_sae
    settings apply to each of them."""
    return "train_sae" if rule.startswith("train_sae_") else rule


def slurm_up() -> None:
    if shutil.which("sbatch") is None or subprocess.run(["scontrol", "ping"], capture_output=True,
                                                        text=True).stdout.find("UP") < 0:
        pytest.fail("no SLURM controller answers. Fix: run `scripts/slurm-cluster.sh up` as root "
                    "(or `make test-cluster`, which does).")


def cancel_first_running(rule: str, done: threading.Event, cancelled: list) -> None:
    """Cancel the first job of ``rule`` that SLURM reports RUNNING, once."""
    while not done.is_set():
        out = subprocess.run(["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            jobid, comment, state = line.split("|")
            if comment.startswith(f"rule_{rule}") and state == "RUNNING":
                time.sleep(1.0)  # let the job start its work, then kill it mid-way
                subprocess.run(["scancel", jobid], check=True)
                cancelled.append(jobid)
                return
        time.sleep(0.2)


def scontrol_job(jobid: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", jobid], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def same_json(a, b, path="") -> list[str]:
    """Differences between two JSON values, timing keys excepted."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{path}: keys {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
        for k in set(a) & set(b):
            if not TIMING_KEYS.search(k):
                diffs += same_json(a[k], b[k], f"{path}.{k}")
        return diffs
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same_json(x, y, f"{path}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{path}: {a!r} != {b!r}"]


def compare_outputs(local: Path, slurm: Path) -> tuple[int, list[str]]:
    """(files compared, differences) between the SLURM run's outputs and the local run's."""
    from safetensors.numpy import load_file

    compared, diffs = 0, []
    for f in sorted(p for top in ("results", "resources") for p in (slurm / top).rglob("*") if p.is_file()):
        rel = f.relative_to(slurm)
        if rel.parts[1] in ("logs", "benchmarks"):
            continue
        other = local / rel
        if not other.is_file():
            diffs.append(f"{rel}: not in the local run")
            continue
        if f.suffix == ".npz":
            with np.load(f) as x, np.load(other) as y:
                bad = [k for k in x.files if k not in y.files or x[k].dtype != y[k].dtype
                       or not np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f")]
        elif f.suffix == ".safetensors":
            x, y = load_file(f), load_file(other)
            bad = [k for k in x if k not in y or x[k].dtype != y[k].dtype or not np.array_equal(x[k], y[k])]
        elif f.suffix == ".json":
            bad = same_json(json.loads(f.read_text()), json.loads(other.read_text()))
        elif f.suffix == ".csv":
            x, y = pd.read_csv(f), pd.read_csv(other)
            keep = [c for c in x.columns if not TIMING_KEYS.search(c)]
            bad = [] if list(x.columns) == list(y.columns) and x[keep].equals(y[keep]) else ["table differs"]
        elif f.suffix in (".pdf", ".png"):
            continue  # drawn from the tables compared above; PDF carries a creation date
        else:  # zarr chunks and metadata, token ids, tokenizer files: bytes
            bad = [] if f.read_bytes() == other.read_bytes() else ["bytes differ"]
        compared += 1
        diffs += [f"{rel}: {b}" for b in bad]
    return compared, diffs


def test_pipeline_on_slurm_equals_the_local_run_and_retries_a_failed_job(tmp_path):
    from hub_fixture import build

    slurm_up()
    root = tmp_path / "hub"
    build(root)
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    local.mkdir()
    cluster.mkdir()

    # The local run: the paper configuration's structure, offline, through the real hub loaders;
    # the profile's thread counts (capped at 2 by --cores), so that both runs use the same threads.
    threads = [f"{rule}={n}" for rule, n in PROFILE["set-threads"].items()]
    t0 = time.time()
    r = run_hub_config(root, local, "--cores", "2", "--set-threads", *threads)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    check_hub_run(root, local)
    local_seconds = time.time() - t0

    # The SLURM run, submitted detached from any terminal (setsid), as from a login node.
    done, cancelled = threading.Event(), []
    watcher = threading.Thread(target=cancel_first_running, args=(CANCEL_RULE, done, cancelled), daemon=True)
    watcher.start()
    t0 = time.time()
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *SLURM_TARGETS,
           "--configfile", str(root / "config.yaml"), "--workflow-profile", str(REPO / "profiles/slurm"), "--slurm-status-command", "squeue",
           "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs",
           "--max-threads", "2", "--jobs", "4", "--latency-wait", "5"]
    # The local node declares GPUs it does not have (scripts/slurm-cluster.sh) and torch here is a CPU build: the
    # jobs SLURM gives "GPUs" would refuse to fall back to the CPU (attnspace.devices) unless told to, as here.
    proc = subprocess.run(cmd, cwd=cluster, env=hub_env(root, ATTNSPACE_DEVICE="cpu"), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=1500, start_new_session=True)
    done.set()
    slurm_seconds = time.time() - t0
    out = proc.stdout + proc.stderr
    (tmp_path / "slurm-run.log").write_text(out)
    print(f"local run {local_seconds:.0f} s, SLURM run {slurm_seconds:.0f} s")
    assert proc.returncode == 0, out[-8000:]

    # Every job was a SLURM job: one submission per job, each known to slurmctld under its rule.
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.", out)
    stats = re.search(r"Job stats:\n(.*?)\n\n", out, re.S).group(1)
    counts = {}
    for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M):  # the SAE group rules count as train_sae
        name = stage_rule(m.group(1))
        counts[name] = counts.get(name, 0) + int(m.group(2))
    n_jobs = counts.pop("total")
    assert "localrule" not in out
    assert len(submitted) == n_jobs + len(cancelled), (len(submitted), counts)
    rules_run = {}
    for _, slurm_id, log in submitted:
        job = scontrol_job(slurm_id)
        rule = stage_rule(re.match(r"rule_(\w+?)(_wildcards_.*)?$", job["Comment"]).group(1))
        rules_run.setdefault(rule, []).append(job["JobState"])
        expected_partition = PROFILE["set-resources"].get(rule, {}).get(
            "slurm_partition", PROFILE["default-resources"]["slurm_partition"])
        assert job["Partition"] == expected_partition, (rule, job["Partition"])
        wants_gpu = "gres/gpu" in job.get("TRES", "") or "gpu" in job.get("TresPerJob", "")
        assert wants_gpu == (rule in GPU_RULES), (rule, job.get("TRES"), job.get("TresPerJob"))
        assert Path(log).is_file(), log
    assert set(rules_run) == set(counts), (rules_run, counts)
    assert rules_run.keys() >= GPU_RULES - {"fetch_gguf", "cache_sae"}  # no SAE store: these SAEs train live

    # The cancelled job: reported with its logs, then retried to completion as the profile allows.
    assert len(cancelled) == 1 and PROFILE["retries"] >= 1
    report = re.search(rf"SLURM-job '{cancelled[0]}' failed.*?(?=\n\[|\Z)", out, re.S)
    assert report, out[-4000:]
    assert f"results/logs/{CANCEL_RULE}/" in out[report.start():]
    assert scontrol_job(cancelled[0])["JobState"] == "CANCELLED"
    assert rules_run[CANCEL_RULE].count("COMPLETED") == counts[CANCEL_RULE]
    assert rules_run[CANCEL_RULE].count("CANCELLED") == 1

    # The same results as the local run.
    compared, diffs = compare_outputs(local, cluster)
    assert not diffs, "\n".join(diffs)
    assert compared >= 20, compared
