"""Where a job computes: the GPU it was given, or the CPU, never the CPU by accident.

A job runs on CUDA when torch can use it. When torch cannot, the job runs on the CPU only if it was not
given a GPU: a GPU job on a node whose driver does not match the installed torch build would otherwise
grind on the CPU until its time limit. A job was given a GPU when

* ``ATTNSPACE_DEVICE`` is ``cuda`` (``cpu`` says the opposite and wins over everything below);
* SLURM allocated it GPUs (``SLURM_JOB_GPUS``, ``SLURM_STEP_GPUS`` or ``SLURM_GPUS_ON_NODE``);
* or the machine has ``nvidia-smi``: the rules ask for the ``gpu`` resource exactly then
  (``rules/common.smk``), so a rule that asked for a GPU and a job that finds none agree.

The embedded default on a CPU machine sets none of these and runs on the CPU as before.
"""

from __future__ import annotations

import os
import shutil

from attnspace.errors import AttnspaceError

SLURM_GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")


def gpu_expected(environ: dict[str, str] | None = None) -> str | None:
    """Why this job should have a GPU (a short phrase), or None when it should not."""
    env = os.environ if environ is None else environ
    asked = env.get("ATTNSPACE_DEVICE", "").strip().lower()
    if asked == "cpu":
        return None
    if asked == "cuda":
        return "ATTNSPACE_DEVICE=cuda"
    for name in SLURM_GPU_VARIABLES:  # GPU indices, or (SLURM_GPUS_ON_NODE) a count
        value = env.get(name, "").strip()
        if value and value != "(null)" and not (name == "SLURM_GPUS_ON_NODE" and value == "0"):
            return f"SLURM allocated GPUs ({name}={value})"
    if shutil.which("nvidia-smi"):
        return "nvidia-smi is installed, so the rules asked for a GPU"
    return None


def device(environ: dict[str, str] | None = None) -> str:
    """``cuda`` where torch can use a GPU; ``cpu`` where the job was not given one; otherwise one
    error line naming the torch build, what torch sees and the fix."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    why = gpu_expected(environ)
    if why is None:
        return "cpu"
    raise AttnspaceError(
        f"this job was given a GPU ({why}) but torch cannot use CUDA: torch {torch.__version__} built for "
        f"CUDA {torch.version.cuda}, torch.cuda.is_available() is False",
        fix="install a torch build that matches the node's NVIDIA driver (nvidia-smi prints the CUDA version "
            "the driver supports), or run the job on the CPU on purpose with ATTNSPACE_DEVICE=cpu")
