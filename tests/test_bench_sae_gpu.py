"""bench/sae_gpu.py on CPU at tiny sizes: the JSON it writes (never its timings), and its memory model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "sae_gpu.py"
MEASURED = {"encoder_gemm", "naive_dense", "sparsify", "attnspace_adam", "attnspace_sparseadam"}
FIELDS = {"what", "n", "tok_s", "peak_gb", "oom", "device", "model_gb", "ratio_gemm", "ratio_sparsify"}


def tiny_args(out: Path, wheels: Path, sizes: str) -> list[str]:
    return ["--device", "cpu", "--sizes", sizes, "--d", "32", "--batch", "64", "--k", "4", "--iters", "1",
            "--warmup", "0", "--out", str(out), "--wheels", str(wheels)]


def read_rows(out: Path, stdout: str) -> list[dict]:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return rows


def bench_module():
    spec = importlib.util.spec_from_file_location("sae_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_writes_one_json_line_per_measurement(tmp_path, capsys):
    out = tmp_path / "sae_gpu_cpu.jsonl"
    bench_module().main(tiny_args(out, tmp_path / "no_wheels", "256,512"))
    rows = read_rows(out, capsys.readouterr().out)
    env = rows[0]
    assert env["what"] == "env" and env["device"] == "cpu" and env["sparsify"] is None
    checks = [r for r in rows if r["what"] == "check"]
    assert len(checks) == 1 and checks[0]["ok"] and checks[0]["precision"] == "fp32"
    measured = [r for r in rows if r["what"] in MEASURED]
    assert {(r["what"], r["n"]) for r in measured} == {(w, n) for w in MEASURED for n in (256, 512)}
    for r in measured:
        assert FIELDS <= set(r), r
        assert r["device"] == "cpu" and r["peak_gb"] is None  # no CUDA allocator to ask
        if r["what"] == "sparsify":
            assert r["skipped"] == "not installed" and r["tok_s"] is None
        else:
            assert r["oom"] is False and r["tok_s"] > 0
        if r["what"].startswith("attnspace"):
            assert r["model_gb"] is not None and r["ratio_gemm"] > 0 and r["ratio_sparsify"] is None
    assert rows[-1]["what"] == "total"


def test_bench_runs_sparsify_from_a_local_wheel(tmp_path):
    wheels = ROOT / "bench" / ".wheels"
    if not list(wheels.glob("eai_sparsify-*.whl")):
        pytest.skip("no sparsify wheel in bench/.wheels (pip download eai-sparsify --no-deps -d bench/.wheels)")
    # In a subprocess: loading sparsify stubs the modules it imports but a step does not use.
    out = tmp_path / "sae_gpu_cpu.jsonl"
    res = subprocess.run([sys.executable, str(SCRIPT), *tiny_args(out, wheels, "256")], check=False, capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_rows(out, res.stdout)
    assert rows[0]["sparsify"].startswith("eai_sparsify")
    (sp,) = [r for r in rows if r["what"] == "sparsify"]
    assert sp["tok_s"] > 0 and sp["ratio_sparsify"] == 1.0
    assert all(r["ratio_sparsify"] is not None for r in rows if r["what"].startswith("attnspace"))


def test_memory_model_at_the_paper_sizes():
    """Computed, not measured: 1M latents with SparseAdam fit one 141 GB H200, Adam does not."""
    mm = bench_module().memory_model
    d, B, k = 4096, 4096, 50
    nd_gib = 2**20 * d / 2**30  # n d fp32 words at 1M latents, in GiB of 4-byte words / 4
    sparse = mm(2**20, d, B, k, "sparse_adam")
    assert sparse["params"] == pytest.approx(8 * nd_gib, rel=1e-3) and sparse["moments"] == pytest.approx(16 * nd_gib, rel=1e-3)
    assert 100 < sparse["total"] < 125
    assert mm(2**20, d, B, k, "adam")["total"] > 131  # more than an H200 holds
    assert mm(2**19, d, B, k, "adam")["total"] < mm(2**20, d, B, k, "sparse_adam")["total"]
    assert 0.17 < sparse["touched"] / 2**20 < 0.18  # 1 - exp(-B k / n)


def test_bench_runs_with_torch_alone(tmp_path):
    """The GPU machine's image has torch but not zarr, dask, gguf or jsonschema: the benchmark (and the
    SAE model and optimizer it imports) must load without them, from the source tree."""
    out = tmp_path / "sae_gpu_cpu.jsonl"
    code = ("import runpy, sys\n"
            "for m in ('zarr', 'dask', 'crc32c', 'jsonschema', 'gguf', 'numcodecs', 'snakemake'):\n"
            "    sys.modules[m] = None\n"
            f"sys.argv = ['sae_gpu.py', *{tiny_args(out, tmp_path / 'no_wheels', '256')!r}]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(json.loads(line)["what"] == "attnspace_sparseadam" for line in out.read_text().splitlines())


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam", "masked_adam"])
def test_the_mirror_check_passes_on_the_bf16_path(optimizer):
    """The bench's 40-step mirror check (run on CUDA by bench/gpu_check.sh), here with the bf16 GEMM on the CPU."""
    import torch

    row = bench_module().mirror_steps(torch.device("cpu"), 512, 32, 64, 4, optimizer, steps=12)
    assert row["mirror_mismatches"] == 0 and row["ok"], row
    assert row["loss_last"] < row["loss_first"]


def test_one_failing_case_loses_no_result(tmp_path, capsys, monkeypatch):
    """Results are appended as measured; a case that raises is recorded and the others still run."""
    mod = bench_module()

    def broken(*args, **kw):
        raise RuntimeError("a case that fails")

    monkeypatch.setattr(mod, "check", broken)
    out = tmp_path / "sae_gpu_cpu.jsonl"
    mod.main(tiny_args(out, tmp_path / "no_wheels", "256") + ["--skip", "sparsify,naive_dense"])
    rows = read_rows(out, capsys.readouterr().out)
    failed = [r for r in rows if r["what"] == "check"]
    assert len(failed) == 1 and failed[0]["error"] == "RuntimeError: a case that fails"
    assert {r["what"] for r in rows} >= {"encoder_gemm", "attnspace_adam", "attnspace_sparseadam", "total"}
