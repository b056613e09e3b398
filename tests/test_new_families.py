"""The pipeline on two families outside the site table, whose sites are found from the models:
a dense OLMo 2 (norms after attention and MLP, so attn_in is what the attention receives) and
a Mixtral MoE, tiny and random, saved as local folders. Cache -> spectra -> SAE -> Figures 1,
2 and 5 -> the claims (Lorsa's Table 1 on the Mixtral), and ``attnspace plan`` sizes the run.

Several minutes on 2 cores: marked ``families`` (``pytest -m families tests/test_new_families.py``), not
run by make test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, build_tokenizer, tiny_config
from test_end_to_end import copy_project, snakemake_cli

pytestmark = pytest.mark.families

FAMILIES = {"olmo2": "olmo2", "mixtral": "mixtral"}
"""Model name in the configuration -> its model_type (neither in attnspace.sites' table)."""

FIGURES = ("fig1", "fig2a", "fig2b", "fig5")


def save_tiny(model_type: str, folder: Path, seed: int) -> Path:
    """A random 4-layer, d_model 48 causal LM of ``model_type`` with the tests' tokenizer, saved as a
    transformers folder (no ``architecture`` is written in the configuration: it is read from here)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_local_experts=4,
        num_experts_per_tok=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def families_config(models: Path) -> dict:
    cfg = tiny_config(models / "unused")
    base = cfg["models"].pop("tiny")
    del base["architecture"]
    for i, (name, model_type) in enumerate(FAMILIES.items()):
        cfg["models"][name] = {**base, "source": {"kind": "local",
                                                  "path": str(save_tiny(model_type, models / name, seed=i))}}
    cfg["focus"]["model"] = "mixtral"
    cfg["figures"] = {name: {} for name in (*FIGURES, "fig9")}  # the rules read fig9's thresholds
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families-run")
    copy_project(folder)
    cfg = families_config(tmp_path_factory.mktemp("models"))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    targets = [f"results/figures/{name}.pdf" for name in FIGURES] + ["results/claims.csv"]
    plan = subprocess.run([str(Path(sys.executable).parent / "attnspace"), "plan", *targets, "--configfile",
                           "config.yaml", "--directory", str(folder), "--csv", "plan.csv"],
                          cwd=folder, capture_output=True, text=True, timeout=600)
    assert plan.returncode == 0, plan.stderr[-3000:]
    r = snakemake_cli(*targets, "--cores", "2", "--configfile", "config.yaml", cwd=folder, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return folder


def test_models_prepared_with_their_sites_verified(run):
    import json

    for name, model_type in FAMILIES.items():
        record = json.loads((run / f"resources/models/{name}/prepared.json").read_text())
        assert record["architecture"] == model_type
        assert record["attention_layers"] == [0, 1, 2, 3] and record["block_form"].startswith("sequential")


def test_figures_and_spectra(run):
    for name in FIGURES:
        assert (run / f"results/figures/{name}.csv").stat().st_size > 0
    idim = pd.read_csv(run / "results/tables/intrinsic_dim.csv")
    assert set(idim["model"]) == set(FAMILIES) and (idim["d"] == 48).all()
    assert set(idim["site"]) == {"attn_out", "mlp_out", "resid_post"}
    # the MoE block's output is the mlp_out site; loss recovered at k = d is the clean model
    lr = pd.read_csv(run / "results/tables/loss_recovered.csv")
    full = lr[lr["k"] == 48]
    assert set(full["site"]) == {"attn_out", "mlp_out", "resid_post"}
    assert ((full["loss"] - full["loss_clean"]).abs() < 1e-5 * full["loss_clean"]).all()


def test_sae_and_claims(run):
    fig5 = pd.read_csv(run / "results/figures/fig5.csv")
    assert len(fig5) > 0 and fig5["nmse"].notna().all() if "nmse" in fig5 else len(fig5) > 0
    claims = pd.read_csv(run / "results/claims.csv")
    assert set(claims["verdict"]) <= {"holds", "does not hold", "inconclusive", "not run"}
    assert claims.loc[claims["claim"] == "C1", "verdict"].iloc[0] != "not run"


def test_plan_sized_the_run_before_it_started(run):
    plan = pd.read_csv(run / "plan.csv")
    cache = plan[plan["stage"] == "cache_activations"]
    assert {job.split("/")[0] for job in cache["job"]} == set(FAMILIES)
    assert (cache["disk_bytes"] > 0).all() and (cache["forward_tokens"] > 0).all()
