"""The branches taken only where CUDA is usable, forced on this CPU machine: each is driven with torch's
CUDA queries answered as on a GPU node, and what it does is compared with the CPU branch. (The CUDA
configuration of SAE training itself, bf16 mirror, decoder branch and fused step, is forced and
compared in tests/test_sae_cuda_path.py; its memory is measured under FakeTensorMode in
tests/test_memory.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attnspace import devices
from attnspace.errors import AttnspaceError


def test_a_job_where_torch_can_use_cuda_runs_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.device({"SLURM_JOB_GPUS": "0"}) == "cuda" and devices.device({}) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    assert devices.device({}) == "cpu"


@pytest.mark.parametrize("where", ["cuda", "cpu"])
def test_load_model_moves_the_model_only_on_cuda(tiny_llama, monkeypatch, where):
    from attnspace import models

    moved = []
    monkeypatch.setattr(models, "device", lambda: where)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    model, _ = models.load_model(tiny_llama)
    assert moved == ([("cuda",)] if where == "cuda" else [])
    assert next(model.parameters()).device.type == "cpu"


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    from attnspace.sae.sharded import rank_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device("cuda") == torch.device("cuda", 3)
    assert rank_device("cpu") == torch.device("cpu")  # the CPU branch: the job's device as given


def test_the_fused_kernel_launches_on_its_parameters_gpu(monkeypatch):
    from attnspace.sae.optim import launch_device

    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)
    with launch_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))):
        pass
    with launch_device(torch.zeros(2)):  # the CPU branch: no device guard
        pass
    assert entered == [torch.device("cuda", 1)]


def test_more_ranks_than_the_job_has_gpus_is_refused_before_any_rank_starts(monkeypatch, tmp_path):
    from attnspace.cli import dictionaries

    monkeypatch.setattr(dictionaries, "device", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    started = []
    monkeypatch.setattr("attnspace.sae.sharded.launch", lambda *a, **k: started.append(a))
    members = [(SimpleNamespace(d_sae=64), SimpleNamespace(out_dir=str(tmp_path / "sae"), run="base-d0-adam-n64-k4"))]
    with pytest.raises(AttnspaceError, match="--ranks 2 needs 2 GPUs, this job sees 1"):
        dictionaries._launch_ranks(SimpleNamespace(ranks=2, rank_logs=None), members)
    assert not started


RANK = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist
    from attnspace.sae import sharded

    out, cuda = sys.argv[1], sys.argv[2] == "cuda"
    calls = {}
    torch.cuda.is_available = lambda: cuda
    torch.cuda.set_device = lambda i: calls.setdefault("set_device", i)
    dist.init_process_group = lambda backend, **kw: calls.update(backend=backend, rank=kw["rank"])
    dist.destroy_process_group = lambda: None
    sharded._rank_main(1, 2, 29999, out + ".log", lambda: calls.update(ran=True), ())
    open(out, "w").write(json.dumps(calls))
''')


@pytest.mark.parametrize("where", ["cuda", "cpu"])
def test_a_rank_sets_its_gpu_before_nccl_and_a_cpu_rank_uses_gloo(tmp_path, where):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    out = tmp_path / "calls.json"
    res = subprocess.run([sys.executable, str(script), str(out), where], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:] + (tmp_path / "calls.json.log").read_text()[-2000:]
    calls = json.loads(out.read_text())
    if where == "cuda":
        assert calls == {"set_device": 1, "backend": "nccl", "rank": 1, "ran": True}
    else:
        assert calls == {"backend": "gloo", "rank": 1, "ran": True}
