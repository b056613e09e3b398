"""The profiles, read as Snakemake reads them: rule names that exist, a GPU request exactly on the
rules that run a model, partitions named once. (tests/test_cluster.py submits them to SLURM.)"""

from __future__ import annotations

import re

import yaml

from conftest import REPO

SLURM = REPO / "profiles" / "slurm" / "config.yaml"


def rules_and_gpu_rules() -> tuple[set[str], set[str]]:
    """Every rule of rules/*.smk, and those whose resources take the `gpu` resource. The SAE group
    rules (generated names train_sae_*, resources from sae_group_resources, which gives gpu=GPU and
    the profile's train_sae settings) count as the one rule train_sae."""
    rules, gpu = set(), set()
    for path in (REPO / "rules").glob("*.smk"):
        for block in re.split(r"^(?=\s*rule(?: \w+)?:)", path.read_text(), flags=re.M):
            m = re.match(r"\s*rule (\w+):", block)
            if m:
                rules.add(m.group(1))
                if re.search(r"^\s+gpu=GPU,", block, re.M):
                    gpu.add(m.group(1))
            elif re.match(r"\s*rule:", block) and re.search(r'name:\s+group\["rule"\]', block):
                rules.add("train_sae")
                if re.search(r"^\s+\*\*sae_group_resources\(group\),", block, re.M):
                    gpu.add("train_sae")
    return rules, gpu


def test_slurm_profile_names_only_existing_rules():
    profile = yaml.safe_load(SLURM.read_text())
    rules, _ = rules_and_gpu_rules()
    assert set(profile["set-resources"]) <= rules, set(profile["set-resources"]) - rules
    assert set(profile["set-threads"]) <= rules, set(profile["set-threads"]) - rules


def test_slurm_profile_requests_a_gpu_exactly_for_the_rules_that_use_one():
    profile = yaml.safe_load(SLURM.read_text())
    _, gpu_rules = rules_and_gpu_rules()
    assert gpu_rules == {"cache_activations", "cache_sae", "loss_recovered", "train_sae", "train_lorsa"}
    requested = {rule for rule, res in profile["set-resources"].items() if res.get("gpu")}
    assert requested == gpu_rules
    for rule, res in profile["set-resources"].items():
        gpu_keys = {"gpu", "gpu_model", "cpus_per_gpu"} & set(res)
        assert not gpu_keys or rule in gpu_rules, (rule, gpu_keys)
        if rule in gpu_rules:  # the GPU partition, and CPUs per GPU rather than per task
            assert res["slurm_partition"] != profile["default-resources"]["slurm_partition"]
            assert res["cpus_per_gpu"] >= 1 and res["gpu"] == 1
        assert res.get("mem_mb", 1) > 0 and res.get("runtime", 1) > 0


def test_slurm_partitions_are_named_once():
    text = SLURM.read_text()
    profile = yaml.safe_load(text)
    partitions = {profile["default-resources"]["slurm_partition"]} | {
        res["slurm_partition"] for res in profile["set-resources"].values() if "slurm_partition" in res}
    assert len(partitions) == 2
    for name in partitions:
        assert len(re.findall(rf'slurm_partition:.*"{name}"', text)) == 1, name
    assert profile["retries"] >= 1 and profile["rerun-incomplete"] is True
