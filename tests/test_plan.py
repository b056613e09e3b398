"""The resource plan against figures computed here by hand from the configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from conftest import REPO
from test_workflow import all_run_folders, expected_members, expected_sae_groups


def plan(tmp_path: Path, configfile: str) -> pd.DataFrame:
    out = tmp_path / "plan.csv"
    exe = Path(sys.executable).parent / "attnspace"
    r = subprocess.run([str(exe), "plan", "--configfile", str(REPO / configfile), "--csv", str(out),
                        "--directory", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| total |" in r.stdout
    return pd.read_csv(out)


def test_default_plan_by_hand(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    jobs = plan(tmp_path, "config.yaml")
    rows = cfg["tokens"]["train_tokens"] + cfg["tokens"]["heldout_tokens"]  # 20,480 per (model, dataset)
    cache = jobs[jobs["stage"] == "cache_activations"].set_index("job")
    # SmolLM2: 4 sites of 576 float32 values (its 9 heads x 64 make Z 576 wide) + 13 bytes of row
    # metadata at 5 layers, and attn_in (576) at the focus layer only; Gemma 3: 640 wide (Z assumed
    # 640 until the model is prepared)
    assert cfg["cache"]["layers"] == {"attn_in": "focus"}
    smol = rows * (5 * (4 * 576 * 4 + 13) + 576 * 4)
    gemma = rows * (5 * (4 * 640 * 4 + 13) + 640 * 4)
    for dataset in ("pydocs", "pycode"):
        assert cache.loc[f"smollm2-135m/{dataset}", "disk_bytes"] == smol
        assert cache.loc[f"gemma3-270m/{dataset}", "disk_bytes"] == gemma
        assert "attn_z width assumed" in cache.loc[f"gemma3-270m/{dataset}", "note"]
    assert (cache["rows_per_site"] == rows).all() and (cache["forward_tokens"] == rows).all()
    # the SAE store: the focus pair only, 131,072 rows of the three SAE sites at layer 15
    sae_store = jobs[jobs["stage"] == "cache_sae"]
    assert list(sae_store["job"]) == ["smollm2-135m/pydocs"]
    assert sae_store["disk_bytes"].iloc[0] == 131072 * (3 * 576 * 4 + 13)
    assert sae_store["rows_per_site"].iloc[0] == sae_store["forward_tokens"].iloc[0] == 131072
    assert "stops at layer 15 of 30" in sae_store["note"].iloc[0]
    # loss recovered: 512 held-out tokens, clean + 3 sites x (zero + 22 values of k) passes, per model
    lr = jobs[jobs["stage"] == "loss_recovered"]
    assert len(lr) == 2 and (lr["forward_tokens"] == 512 * (1 + 3 * (1 + 22))).all()
    # SAEs, one row each: 64 steps each (65,536 tokens / 1,024); the LM loss (3 passes of 512) for Figure 6's
    # runs only; cached activations: no model forward for training
    sae = jobs[jobs["stage"] == "train_sae"]
    assert len(sae) == len(all_run_folders(cfg, 576)) and (sae["optimizer_steps"] == 64).all()
    assert sae["forward_tokens"].sum() == expected_members(cfg, "fig6", 576) * 3 * 512 and sae["gpu_hours"].isna().all()
    # each SAE's files: weights, and a checkpoint holding weights and Adam's two moments, in float32
    one = sae[sae["job"].str.endswith("/base-d0-adam-n4608-k32")].iloc[0]
    assert one["disk_bytes"] == 3 * 4 * (2 * 4608 * 576 + 4608 + 576)
    from attnspace.defaults import schema_default

    lorsa = jobs[jobs["stage"] == "train_lorsa"]  # vanilla and ASI, each in every seed
    seeds = cfg["lorsa"].get("seeds", schema_default("lorsa.seeds"))
    assert len(lorsa) == 2 * seeds and (lorsa["optimizer_steps"] == 2 * 16384 // 512).all()


def test_paper_plan_shows_the_scale(tmp_path):
    cfg = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    jobs = plan(tmp_path, "config/paper.yaml")
    cache = jobs[jobs["stage"] == "cache_activations"].set_index("job")
    assert len(cache) == 12 and cfg["spectrum"]["bootstrap"]["groups"] == 16
    # spectrum.mode: streamed: every pair streams the float64 moments of the 3 spectrum sites at each of its
    # layers in at most 16 document groups, each (d + 1)^2, and Figure 3's: attn_z (width assumed d_model until
    # the model is prepared) in one group; attn_out's come from the spectrum moments
    def moments(layers: int, d: int) -> int:
        return layers * 3 * 16 * (d + 1) ** 2 * 8 + layers * (d + 1) ** 2 * 8

    # the focus pair alone stores anything (bfloat16, 13 bytes of row metadata per store and row): train rows
    # of attn_out and attn_in at layer 15 (Lorsa; the SAEs train on the live model), held-out rows of the
    # suite's 3 sites at the 8 layers (Figure 4's dead features, the SAEs' evaluation) and of attn_in at 15
    llama = cache.loc["llama-3.1-8b/slimpajama"]
    assert llama["disk_bytes"] == (10_000_000 * (2 * 4096 * 2 + 13) + 1_000_000 * (8 * (3 * 4096 * 2 + 13) + 4096 * 2)
                                   + moments(8, 4096))
    assert (llama["rows_per_site"], llama["forward_tokens"]) == (11_000_000, 11_000_000)
    # every other pair stores nothing: its job runs the train split through the model for the moments only
    for job in ("llama-3.1-8b/cci3", "pythia-2.8b/slimpajama", "qwen3-8b/redpajama-github"):
        model = job.split("/")[0]
        m = cfg["models"][model]
        assert cache.loc[job, "disk_bytes"] == moments(len(m["layers"]), m["d_model"]), job
        assert (cache.loc[job, "rows_per_site"], cache.loc[job, "forward_tokens"]) == (0, 10_000_000)
        assert "stores: none" in cache.loc[job, "note"]
    # in all, about 1/20 of the 35 TB the paper configuration first planned
    assert jobs["disk_bytes"].sum() < 3.5e12
    assert not (jobs["stage"] == "cache_sae").any()  # the SAEs train on the live model
    sae = jobs[jobs["stage"] == "train_sae"]
    whole_batches = 2_500_000_000 // 4096 * 4096
    assert len(sae) == len(all_run_folders(cfg, 4096)) and (sae["optimizer_steps"] == 2_500_000_000 // 4096).all()
    # the 8B model runs live once per SAE group (its members share the stream), not once per SAE; the LM
    # loss (3 passes of 65,536 tokens) for each of Figure 6's runs
    groups = len(expected_sae_groups(cfg, 4096))
    assert groups < len(sae) and (sae["forward_tokens"] >= whole_batches).sum() == groups
    assert sae["forward_tokens"].sum() == groups * whole_batches + expected_members(cfg, "fig6", 4096) * 3 * 65536
    # peaks: every GPU job fits an H200's 139 GiB; the 1M-latent SparseAdam run trains alone on one GPU with
    # the live model: the memory model of its step (6.5 P + 3 G + 20 B d + 56 B k bytes, P = G = 4 x 1M x 4096
    # with U = min(n, B k) = 204,800 latents touched: G = 4 x 204,800 x 4096) plus the measured live model
    measured = pd.read_csv(REPO / "bench/results/memory_paper.csv")
    measured = measured[measured["code"] == "after"]
    live = measured[measured["note"].str.contains("live forward")]["peak_gib"].iloc[0] * 2**30
    assert 16 < live / 2**30 < 18  # bf16 weights of Llama-3.1-8B (14.96 GiB) and its live forward
    P, G = 4 * 2**20 * 4096, 4 * 204_800 * 4096
    big = sae[sae["job"].str.endswith("/asi-d768-sparse_adam-n1048576-k50")]["peak_bytes"].iloc[0]
    assert big == int(6.5 * P + 3 * G + 20 * 4096 * 4096 + 56 * 4096 * 50) + int(live)
    gpu = jobs[jobs["peak_bytes"].notna()]
    assert set(gpu["stage"]) == {"train_sae", "cache_activations", "train_lorsa"}
    assert gpu["peak_bytes"].max() <= 139 * 2**30
    # a caching job's peak is its model's measured forward: Gemma-2-9B's bf16 weights (17.2 GiB) and more
    assert cache.loc["gemma-2-9b/cci3", "peak_bytes"] / 2**30 > 17.2


def test_a_job_too_large_for_its_gpu_is_refused_in_one_line(tmp_path):
    """The paper's configuration on 100 GiB GPUs: its fullest SAE GPU (133.7 GiB with the live model) cannot
    fit; attnspace plan says so in one line with the numbers and the fix, before anything runs."""
    text = (REPO / "config/paper.yaml").read_text()
    assert "gpu: {memory_gib: 139}" in text
    configfile = tmp_path / "small_gpus.yaml"
    configfile.write_text(text.replace("gpu: {memory_gib: 139}", "gpu: {memory_gib: 100}"))
    exe = Path(sys.executable).parent / "attnspace"
    r = subprocess.run([str(exe), "plan", "--configfile", str(configfile), "--directory", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: train_sae job llama-3.1-8b/slimpajama/L15/attn_out/")
    assert "needs 133.7 GiB of GPU memory at its peak, more than the 100 GiB of one GPU (gpu.memory_gib)" in line
    assert "more jobs too" in line and "Fix: lower sae.group.memory_gb" in line
    assert not (tmp_path / "results").exists()


def test_a_real_run_prints_its_plan_before_its_jobs_and_a_dry_run_does_not(tiny_llama, tmp_path):
    from conftest import tiny_config

    cfg = tiny_config(tiny_llama)
    del cfg["datasets"]["pycode"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    target = "results/activations/tiny/pydocs/cache.json"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def snakemake(*args):
        r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile",
                            "config.yaml", *args, target], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout + r.stderr

    assert "The plan of this run's jobs" not in snakemake("-n")
    out = snakemake("--cores", "1")
    head = out.index("The plan of this run's jobs")
    assert head < out.index("rule cache_activations") and head < out.index("rule tokenize")
    # 1,536 + 384 rows of 5 sites 48 float32 values wide (Z: 4 heads x 12) + 13 bytes, at layers 1 and 2
    rows = 1536 + 384
    assert f"| cache_activations | 1 | {rows * 2 * (5 * 48 * 4 + 13) / 1e6:.3g} MB | 1.92 K | 1.92 K |" in out[head:]
    assert "| total | 1 |" in out[head:]
