"""No silent CPU fallback: a job given a GPU that torch cannot use stops at once, on one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from attnspace import devices
from attnspace.errors import AttnspaceError


@pytest.fixture
def no_nvidia_smi(monkeypatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_GPUS": "0,1"}, "SLURM_JOB_GPUS"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE"),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"SLURM_STEP_GPUS": "(null)"}, None),
    ({"ATTNSPACE_DEVICE": "cuda"}, "ATTNSPACE_DEVICE"),
    ({"ATTNSPACE_DEVICE": "cpu", "SLURM_JOB_GPUS": "0"}, None),  # the explicit choice wins
])
def test_when_a_job_was_given_a_gpu(no_nvidia_smi, env, expected):
    why = devices.gpu_expected(env)
    assert (why is None) if expected is None else (expected in why)


def test_nvidia_smi_means_the_rules_asked_for_a_gpu(monkeypatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert "nvidia-smi" in devices.gpu_expected({})
    assert devices.gpu_expected({"ATTNSPACE_DEVICE": "cpu"}) is None


def test_a_cpu_job_runs_on_the_cpu(no_nvidia_smi, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.device({}) == "cpu"


def test_a_gpu_job_without_usable_cuda_is_refused_naming_the_build(no_nvidia_smi, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AttnspaceError) as err:
        devices.device({"SLURM_JOB_GPUS": "0"})
    line = err.value.line()
    assert "torch.cuda.is_available() is False" in line and f"CUDA {torch.version.cuda}" in line
    assert torch.__version__ in line and "Fix:" in line and "ATTNSPACE_DEVICE=cpu" in line


def test_the_model_job_stops_before_loading_anything(tmp_path):
    """The real command in a SLURM GPU job's environment, on this CPU-only torch: exit 1 with one line,
    before the (here missing) model folder is even looked at."""
    env = {k: v for k, v in os.environ.items() if k != "ATTNSPACE_DEVICE"}
    env["SLURM_JOB_GPUS"] = "0"
    script = ("import sys, torch\n"
              "from attnspace.errors import run_command\n"
              "from attnspace.models import load_model\n"
              f"sys.exit(run_command(lambda: load_model({str(tmp_path / 'absent')!r})))\n")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "given a GPU (SLURM allocated GPUs" in lines[0], res.stderr
    assert "holds no prepared model" not in res.stderr
