"""Live SAE runs checkpoint and resume: every ``checkpoint_every`` steps and when SLURM signals the end
of the time limit (SIGTERM, or SIGUSR1 through ``--signal``), the run writes its checkpoint and stops; the
rerun resumes to weights bitwise equal to an uninterrupted run's on the same batches. Killed with
SIGKILL instead, the rerun resumes from the last periodic checkpoint, to the same weights."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnspace.sae.io import checkpoint_record
from attnspace.sae.train import CHECKPOINT

SCRIPT = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    import numpy as np, torch
    from attnspace.sae import SAETrainConfig
    from attnspace.sae.data import LiveStream
    from attnspace.sae.train import SAERun, train_runs

    out, kill_at, how = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    D = 16

    def chunk(i):  # a deterministic "forward pass": chunk i of the corpus, 37 rows
        rng = np.random.default_rng(1000 + i)
        z = (rng.random((37, 40)) < 0.1) * rng.exponential(1.0, (37, 40))
        basis = np.random.default_rng(0).standard_normal((40, D))
        return torch.from_numpy((z @ basis + 0.05 * rng.standard_normal((37, D))).astype(np.float32))

    def producer_after(c):
        counter = iter(range(c, 10**6))
        return lambda: chunk(next(counter))

    config = SAETrainConfig(d_sae=64, k=4, init="asi", d_init=6, optimizer=sys.argv[4], lr=3e-3, auxk=True,
                            k_aux=16, dead_threshold_tokens=64, batch_size=32, train_tokens=32 * 12,
                            buffer_rows=128, eval_tokens=256, asi_sample_tokens=256, init_batch_tokens=64,
                            checkpoint_every=4, log_every=0)
    stream = LiveStream(producer_after(0), D, 32, 128, seed=5, restart=producer_after)

    def on_step(done):
        print("step", done, flush=True)
        if done == kill_at:
            os.kill(os.getpid(), getattr(signal, how))

    try:
        train_runs([SAERun(config, out)], stream, [chunk(-1 - i) for i in range(4)], on_step=on_step)
    finally:
        stream.close()
''')


def train(tmp_path: Path, out: Path, kill_at: int = 0, how: str = "SIGTERM", optimizer: str = "adam"):
    script = tmp_path / "live_run.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), str(out), str(kill_at), how, optimizer],
                          capture_output=True, text=True, timeout=300)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / "final.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """optimizer -> the folder of its uninterrupted run (trained once for the module)."""
    runs: dict[str, Path] = {}

    def get(optimizer: str) -> Path:
        if optimizer not in runs:
            root = tmp_path_factory.mktemp(f"whole-{optimizer}")
            whole = train(root, root / "sae", optimizer=optimizer)
            assert whole.returncode == 0, whole.stderr[-2000:]
            runs[optimizer] = root / "sae"
        return runs[optimizer]

    return get


@pytest.mark.parametrize("how, optimizer", [("SIGTERM", "adam"), ("SIGKILL", "adam"), ("SIGUSR1", "sparse_adam")])
def test_a_stopped_live_run_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted, how, optimizer):
    whole = uninterrupted(optimizer)

    out = tmp_path / "stopped"
    first = train(tmp_path, out, kill_at=6, how=how, optimizer=optimizer)
    if how == "SIGKILL":
        assert first.returncode == -signal.SIGKILL
        assert checkpoint_record(out / CHECKPOINT)["step"] == 4  # the last periodic checkpoint
    else:
        assert first.returncode == 1
        assert f"stopped by {how} after step 6 of 12; the checkpoints to resume from are written" in first.stderr
        assert checkpoint_record(out / CHECKPOINT)["step"] == 6  # written on the signal
    assert not (out / "checkpoints" / "final.safetensors").exists()

    again = train(tmp_path, out, optimizer=optimizer)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed_at = 4 if how == "SIGKILL" else 6
    assert again.stdout.split("\n")[0] == f"step {resumed_at + 1}"  # resumed, not started over
    a, b = weights(whole), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / CHECKPOINT).exists()

