"""The resource plan against figures computed here by hand from the configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from conftest import REPO


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
    # SmolLM2: 5 sites of 576 float32 values (its 9 heads x 64 make Z 576 wide) + 13 bytes of row
    # metadata, at 5 layers; Gemma 3: 640 wide (Z assumed 640 until the model is prepared)
    smol = 5 * rows * (5 * 576 * 4 + 13)
    gemma = 5 * rows * (5 * 640 * 4 + 13)
    for dataset in ("pydocs", "pycode"):
        assert cache.loc[f"smollm2-135m/{dataset}", "disk_bytes"] == smol
        assert cache.loc[f"gemma3-270m/{dataset}", "disk_bytes"] == gemma
        assert "attn_z width assumed" in cache.loc[f"gemma3-270m/{dataset}", "note"]
    assert (cache["rows_per_site"] == rows).all() and (cache["forward_tokens"] == rows).all()
    # loss recovered: 512 held-out tokens, clean + 3 sites x (zero + 22 values of k) passes, per model
    lr = jobs[jobs["stage"] == "loss_recovered"]
    assert len(lr) == 2 and (lr["forward_tokens"] == 512 * (1 + 3 * (1 + 22))).all()
    # SAEs: 64 steps each (65,536 tokens / 1,024); the LM loss (3 passes of 512) for Figure 6's 12 runs only
    sae = jobs[jobs["stage"] == "train_sae"]
    assert len(sae) == 46 and (sae["optimizer_steps"] == 64).all()
    assert sae["forward_tokens"].sum() == 12 * 3 * 512 and sae["gpu_hours"].isna().all()
    # each SAE's files: weights, and a checkpoint holding weights and Adam's two moments, in float32
    one = sae[sae["job"].str.endswith("/base-d0-adam-n4608-k32")].iloc[0]
    assert one["disk_bytes"] == 3 * 4 * (2 * 4608 * 576 + 4608 + 576)
    lorsa = jobs[jobs["stage"] == "train_lorsa"]
    assert len(lorsa) == 2 and (lorsa["optimizer_steps"] == 2 * 16384 // 512).all()


def test_paper_plan_shows_the_scale(tmp_path):
    jobs = plan(tmp_path, "config/paper.yaml")
    cache = jobs[jobs["stage"] == "cache_activations"]
    assert len(cache) == 12 and (cache["rows_per_site"] == 11_000_000).all()
    llama = cache[cache["job"] == "llama-3.1-8b/slimpajama"].iloc[0]
    layers = len(yaml.safe_load((REPO / "config/paper.yaml").read_text())["models"]["llama-3.1-8b"]["layers"])
    # stores of the 5 cached sites in bfloat16, and (spectrum.mode: streamed) the float64 moments of
    # the 3 spectrum sites in at most 64 document groups, each (4096 + 1)^2
    assert llama["disk_bytes"] == layers * (11_000_000 * (5 * 4096 * 2 + 13) + 3 * 64 * 4097**2 * 8)
    sae = jobs[jobs["stage"] == "train_sae"]
    whole_batches = 2_500_000_000 // 4096 * 4096
    assert len(sae) == 49 and (sae["forward_tokens"] >= whole_batches).all()  # every SAE runs the 8B model live
    assert (sae["optimizer_steps"] == 2_500_000_000 // 4096).all()
