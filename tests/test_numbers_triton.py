"""The fused SparseAdam kernel (attnspace.sae.optim's Triton kernel, written for CUDA) run on CPU
tensors by Triton's interpreter, against torch.optim.SparseAdam: parameters and both moments after
steps on random row subsets, for a width below one block (masked lanes) and one spanning two
blocks. Triton reads TRITON_INTERPRET when it is imported, so the check runs in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from attnspace.sae import optim
    from attnspace.sae.optim import SparseAdam

    optim.FUSED = True  # the kernel, on CPU tensors
    g = torch.Generator().manual_seed(0)
    for n, d in ((37, 48), (9, 1500)):  # 48 < one block of 64 lanes; 1500 spans two blocks of 1024
        start = torch.randn(n, d, generator=g)
        ref = torch.nn.Parameter(start.clone())
        fused = torch.nn.Parameter(start.clone())
        settings = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6)
        o_ref, o_fused = torch.optim.SparseAdam([ref], **settings), SparseAdam([fused], **settings)
        for step in range(6):
            rows = torch.randperm(n, generator=g)[: n // 2 + step % 3].sort().values
            vals = torch.randn(len(rows), d, generator=g) * (1 + step)
            ref.grad = torch.sparse_coo_tensor(rows[None], vals, (n, d))
            fused.grad = torch.sparse_coo_tensor(rows[None], vals.clone(), (n, d))
            o_ref.step()
            o_fused.step()
            torch.testing.assert_close(fused.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(o_fused.state[fused][key], o_ref.state[ref][key], rtol=1e-6, atol=1e-9)
        assert not torch.equal(fused.detach(), start)  # it moved
    print("kernel matches torch.optim.SparseAdam")
""")


def test_fused_kernel_in_the_interpreter_equals_torch_sparse_adam(tmp_path):
    pytest.importorskip("triton", reason="Triton is in the test extras (pip install -e '.[test]')")
    script = tmp_path / "kernel.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, str(script)], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kernel matches torch.optim.SparseAdam" in res.stdout
