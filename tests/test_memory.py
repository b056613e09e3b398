"""The memory measurement (attnspace.memory) against independent accounts, and the memory model
(attnspace.sae.group.training_bytes) against the measurement."""

from __future__ import annotations

import pytest
import torch

from attnspace.memory import GIB, PAPER_MODELS, LiveBytes, WorstCase, allocator_peak, check_sae_job, fake_measure, sae_job_peak
from attnspace.sae.config import SAETrainConfig
from attnspace.sae.group import training_bytes


def test_live_bytes_counts_storages_once_and_frees_them():
    """Closed form: 4 MiB, a view of it (no storage of its own), a 1 MiB result; freeing drops them."""
    with LiveBytes() as t:
        a = torch.zeros(1024, 1024)
        view = a[:10]
        b = a[:256] * 2
        assert t.live == 4 * 2**20 + 2**20
        del a, view, b
        assert t.live == 0
        c = torch.ones(512, 512)
    assert t.peak == 5 * 2**20 and t.live == 2**20
    del c


def test_live_bytes_matches_the_allocator_on_real_tensors():
    """The tracker's peak on real CPU tensors against the allocator's own account (torch profiler)."""
    def work():
        x = torch.randn(300, 200)
        y = (x @ x.T).relu()  # a [300, 300] temporary
        z = y.topk(7, dim=1)
        del y
        return z.values.sum()

    real = allocator_peak(work)
    with LiveBytes() as t:
        work()
    assert t.peak == real


def test_worst_case_answers_data_dependent_sizes():
    with fake_measure(max_nonzero=5) as t:
        mask = torch.rand(4, 3) > 0.5
        assert int(mask.sum()) == 12  # a boolean sum read back: every entry true
        assert mask.nonzero().shape == (5, 2)  # min(elements, max_nonzero) rows
        assert torch.randn(4, 3)[mask].shape == (5,)
        assert bool(torch.isfinite(torch.randn(3)).all())
        assert not bool((torch.as_tensor([0.5, 1.0]) <= 0).any())  # small tensors of Python data keep their values
        assert torch.bincount(torch.zeros(9, dtype=torch.long), minlength=11).shape == (11,)
    assert t.peak > 0
    with pytest.raises(NotImplementedError, match="minlength"), fake_measure(1):
        torch.bincount(torch.zeros(9, dtype=torch.long))
    assert WorstCase(3).max_nonzero == 3


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
def test_fake_measurement_bounds_real_allocation(optimizer):
    """The method's check: a small SAE job (train_runs: setup, 3 steps with AuxK, release, evaluation)
    run for real on the CPU in the CUDA configuration, its peak by the allocator's account, against
    the tracker on the real tensors (the same to 1%) and the fake measurement (an upper bound: the
    worst case of the touched latents and active entries; within 20% at these shapes)."""
    r = check_sae_job(optimizer)
    assert abs(r["tracked"] - r["allocator"]) <= 0.01 * r["allocator"]
    assert r["allocator"] <= r["fake"] <= 1.2 * r["allocator"]


@pytest.mark.parametrize("optimizer, auxk", [("adam", True), ("sparse_adam", False), ("masked_adam", True)])
def test_memory_model_agrees_with_the_measurement(tmp_path, optimizer, auxk):
    """training_bytes within 10% of the measured peak of the steps (fake tensors, d 4096, B 4096, k 50,
    k_aux 512: the paper's shapes at 65,536 latents; every paper size is in bench/results/memory_paper.csv)."""
    config = SAETrainConfig(d_sae=65536, k=50, optimizer=optimizer, batch_size=4096, auxk=auxk, k_aux=512,
                            buffer_rows=8192, train_tokens=4096)
    measured = sae_job_peak(config, 4096, tmp_path)
    peak = max(measured["step"], measured["evaluate"])
    model = training_bytes(4096, 65536, 4096, optimizer=optimizer, auxk=auxk, k=50, k_aux=512)
    assert abs(model - peak) <= 0.1 * peak, (model / GIB, peak / GIB)


def test_paper_models_have_their_published_sizes():
    """The configurations built here give the published parameter counts (8.03B, 8.19B, 9.24B, 2.78B)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    published = {"llama": 8.03e9, "qwen3": 8.19e9, "gemma2": 9.24e9, "gpt_neox": 2.78e9}
    for architecture, fields in PAPER_MODELS.items():
        fields = dict(fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - published[architecture]) <= 0.01 * published[architecture], (architecture, count)
