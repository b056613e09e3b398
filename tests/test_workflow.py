"""The workflow itself: lint, dry runs of every config and figure target through
Snakemake's Python API, a bad config through the CLI, and a tiny end-to-end run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, tiny_config

FIGURES = ("fig1", "fig2a", "fig2b", "fig3", "fig4", "fig5", "fig6", "fig7", "fig8", "fig9")


def dry_run(targets=(), configfile: Path | None = None, workdir: Path | None = None) -> None:
    """Plan a run with the Snakemake API; raises if the DAG cannot be built."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, ResourceSettings)

    with SnakemakeApi(OutputSettings(quiet={Quietness.PROGRESS})) as api:
        wf = api.workflow(
            resource_settings=ResourceSettings(cores=2),
            config_settings=ConfigSettings(configfiles=[configfile] if configfile else []),
            snakefile=REPO / "Snakefile",
            workdir=workdir or REPO,
        )
        dag = wf.dag(DAGSettings(targets=set(targets)))
        dag.execute_workflow(executor="dryrun")


def snakemake_cli(*args, cwd: Path, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_lint_is_clean():
    r = snakemake_cli("--lint", cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Lints for" not in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("configfile", [None, "config/paper.yaml"])
def test_dry_run_of_whole_config(configfile, tmp_path):
    dry_run(configfile=REPO / configfile if configfile else None, workdir=tmp_path)


@pytest.mark.parametrize("target", FIGURES + tuple(f"results/figures/{f}.pdf" for f in FIGURES))
def test_dry_run_of_each_figure_target(target, tmp_path):
    dry_run(targets=[target], workdir=tmp_path)


def test_paper_dry_run_plans_every_model_and_dataset(tmp_path):
    r = snakemake_cli("-n", "--configfile", str(REPO / "config/paper.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    for model in ("llama-3.1-8b", "qwen3-8b", "gemma-2-9b", "pythia-2.8b"):
        for dataset in ("slimpajama", "redpajama-github", "cci3"):
            assert f"results/activations/{model}/{dataset}/cache.json" in out
    assert "smollm2" not in out  # the paper config is not merged with the embedded default
    # Figure 4 from the released LlamaScope suite, Table 1's Lorsa on Llama-3.1-8B layer 15
    for site in ("attn_out", "mlp_out", "resid_post"):
        assert f"resources/llamascope/llama-3.1-8b/L15/{site}/hyperparams.json" in out
    for init in ("vanilla", "asi"):
        assert f"results/lorsa/llama-3.1-8b/slimpajama/L15/{init}/metrics.json" in out


def planned_sae_runs(*targets, cwd: Path, configfile: Path | None = None) -> dict[str, str]:
    """{run folder: its shell command} of every train_sae job a dry run plans for ``targets``."""
    args = ["-n", "-p", *targets] + (["--configfile", str(configfile)] if configfile else [])
    r = snakemake_cli(*args, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = {}
    for line in r.stdout.splitlines():
        if "attnspace train-sae " in line:
            out_dir = line.split("--out-dir ")[1].split()[0]
            runs[out_dir.split("results/saes/")[1]] = line
    return runs


def expected_sweep(sweep: dict, d_model: int, figure: str, prefix: str) -> set[str]:
    """The run folders a sweep must expand to, written out here independently of rules/common.smk."""
    names = {"topk": "base-d0-adam-n{n}-k{k}", "topk_auxk": "base-d0-adam-n{n}-k{k}-auxk",
             "asi": "asi-d{d}-adam-n{n}-k{k}", "asi_sparseadam": "asi-d{d}-sparse_adam-n{n}-k{k}",
             "asi_maskedadam": "asi-d{d}-masked_adam-n{n}-k{k}"}
    if figure == "fig6":
        grid = [(sweep["expansion"] * d_model, k) for k in sweep["k"]]
    else:
        grid = [(e * d_model, sweep["k"]) for e in sweep["expansion"]]
    return {f"{prefix}/{sweep['site']}/" + names[v].format(n=n, k=k, d=sweep["d_init"])
            for v in sweep["variants"] for n, k in grid}


@pytest.mark.parametrize("figure", ["fig6", "fig7"])
def test_default_sweep_expands_to_exactly_the_configured_jobs(figure, tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    planned = planned_sae_runs(figure, cwd=tmp_path)
    expected = expected_sweep(cfg[figure], 576, figure, "smollm2-135m/pydocs/L15")
    assert set(planned) == expected
    n_grid = len(cfg[figure]["k"] if figure == "fig6" else cfg[figure]["expansion"])
    assert len(expected) == len(cfg[figure]["variants"]) * n_grid
    for run, command in planned.items():  # per-optimizer learning rates from config, same seed for all
        lr = cfg["sae"]["lr"][next((o for o in ("sparse_adam", "masked_adam") if f"-{o}-" in run), "adam")]
        assert f"--lr {lr} " in command and f"--seed {cfg['sae'].get('seed', 0)} " in command


def test_paper_fig7_plans_every_size_from_live_activations(tmp_path):
    cfg = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    planned = planned_sae_runs("fig7", cwd=tmp_path, configfile=REPO / "config/paper.yaml")
    assert set(planned) == expected_sweep(cfg["fig7"], 4096, "fig7", "llama-3.1-8b/slimpajama/L15")
    assert len(planned) == 4 * 7  # 16,384 .. 1,048,576 latents, four variants
    assert any("-n1048576-k50" in run for run in planned)
    for run, command in planned.items():
        assert "--live-source" in command and "--train-tokens 2500000000 " in command
        assert ("--lr 6e-05 " if "sparse_adam" in run else "--lr 4e-05 ") in command


def test_bad_config_stops_before_any_job(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["models"]["smollm2-135m"]["layers"] = [2, 40]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake_cli("-n", "--configfile", "bad.yaml", cwd=tmp_path)
    assert r.returncode != 0
    assert "models.smollm2-135m.layers[1] = 40 is outside the model" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()


def test_tiny_end_to_end_run_produces_every_figure(tiny_llama, tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config(tiny_llama)))
    r = snakemake_cli("--cores", "2", "--configfile", "config.yaml", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    for name in FIGURES:
        for ext in ("pdf", "png", "csv"):
            path = tmp_path / "results" / "figures" / f"{name}.{ext}"
            assert path.stat().st_size > 0, path
    idim = pd.read_csv(tmp_path / "results/tables/intrinsic_dim.csv")
    assert list(idim.columns) == ["model", "dataset", "layer", "site", "d", "n_tokens", "threshold", "k",
                                  "fraction", "n_sv_above_5pct"]
    # one row per (dataset, layer, site, threshold); k is monotone in the threshold
    assert len(idim) == 2 * 2 * 3 * 5
    for _, g in idim.groupby(["dataset", "layer", "site"]):
        assert g.sort_values("threshold")["k"].is_monotonic_increasing
    assert (idim["d"] == 48).all()
    # the cache is complete: manifests for both splits of every layer, and a benchmark per stage
    for split_dir in ("", "heldout/"):
        for layer in (1, 2):
            assert (tmp_path / f"results/activations/tiny/pydocs/{split_dir}L{layer}.manifest.json").is_file()
    assert (tmp_path / "results/benchmarks/cache_activations/tiny/pydocs.tsv").is_file()
    # loss recovered at the focus (pydocs, layer 2): every site, k from 0 to d; k = d is the clean model
    lr = pd.read_csv(tmp_path / "results/tables/loss_recovered.csv")
    assert list(lr.columns) == ["model", "dataset", "layer", "site", "k", "k_fraction", "loss", "loss_clean",
                                "loss_zero", "recovered"]
    assert set(lr["site"]) == {"attn_out", "mlp_out", "resid_post"}
    assert set(lr["dataset"]) == {"pydocs"} and set(lr["layer"]) == {2}
    full = lr[lr["k"] == 48]
    assert len(full) == 3 and ((full["loss"] - full["loss_clean"]).abs() < 1e-5 * full["loss_clean"]).all()
    assert (lr.groupby("site")["k"].min() == 0).all()
    summary = pd.read_csv(tmp_path / "results/tables/loss_recovered_summary.csv")
    assert len(summary) == 3 and (summary["target"] == 0.95).all()
    # the W^O decomposition at every layer and dataset; Var(O e_i) = Var(Z v_i) ||W^O e_i||^2
    wo = pd.read_csv(tmp_path / "results/tables/wo_decomposition.csv")
    assert list(wo.columns) == ["model", "dataset", "layer", "i", "var_o", "wo_contrib", "z_contrib"]
    assert len(wo) == 2 * 2 * 48
    assert ((wo["var_o"] - wo["z_contrib"] * wo["wo_contrib"]).abs() <= 1e-4 * wo["var_o"] + 1e-7 * wo["var_o"].max()).all()
    wo_summary = pd.read_csv(tmp_path / "results/tables/wo_summary.csv")
    assert len(wo_summary) == 4 and (wo_summary["o_rel_error"] < 1e-5).all()
    # SAEs: fig5's runs (base, then ASI and random subspace at d_init 4 and 8) and the suite
    runs = pd.read_csv(tmp_path / "results/tables/sae_runs.csv")
    fig5_runs = runs[(runs["layer"] == 2) & (runs["site"] == "attn_out") & (runs["d_sae"] == 96) & (runs["k"] == 4)
                     & ~runs["auxk"] & (runs["optimizer"] == "adam")]
    assert sorted(fig5_runs["run"]) == sorted(["base-d0-adam-n96-k4", "asi-d4-adam-n96-k4", "asi-d8-adam-n96-k4",
                                               "random_subspace-d4-adam-n96-k4",
                                               "random_subspace-d8-adam-n96-k4"])
    assert not runs.duplicated(["layer", "site", "run"]).any()
    assert (runs["status"] == "ok").all()
    # the sweeps: fig6 = 3 variants x 2 k at 96 latents, fig7 = 4 variants x 2 sizes at k 4; rows in
    # sae_runs.csv too; every variant saw the same token count
    fig6 = pd.read_csv(tmp_path / "results/figures/fig6.csv")
    assert len(fig6) == 6 and set(fig6["variant"]) == {"topk", "topk_auxk", "asi"} and set(fig6["k"]) == {2, 4}
    fig7 = pd.read_csv(tmp_path / "results/figures/fig7.csv")
    assert len(fig7) == 8 and set(fig7["d_sae"]) == {48, 96} and (fig7["k"] == 4).all()
    assert fig7["fit_exponent"].notna().all() and (fig7["n_alive"] == fig7["d_sae"] - fig7["n_dead"]).all()
    assert set(fig6["run"]) | set(fig7["run"]) <= set(runs["run"])
    # the LM loss with the SAE spliced in: measured for Figure 6's runs (which draw it), skipped elsewhere
    spliced = runs["delta_lm_loss"].notna()
    assert fig6["delta_lm_loss"].notna().all() and spliced.sum() == len(fig6)
    assert runs["tokens_trained"].nunique() == 1
    assert set(runs.loc[runs["optimizer"] == "sparse_adam", "variant"]) == {"asi_sparseadam"}
    assert (runs["tokens_per_second"] > 0).all()
    saved = tmp_path / "results/saes/tiny/pydocs/L1/mlp_out/base-d0-adam-n96-k4"
    assert (saved / "hyperparams.json").is_file() and (saved / "checkpoints/final.safetensors").is_file()
    # the suite: one SAE per (layer, site), evaluated by the dead-features command
    dead = pd.read_csv(tmp_path / "results/tables/dead_features.csv")
    assert list(dead.columns) == ["model", "dataset", "layer", "site", "d_sae", "n_tokens", "dead",
                                  "dead_fraction", "intrinsic_dim_fraction"]
    assert len(dead) == 2 * 3 and (dead["d_sae"] == 96).all()
    # Table 1: vanilla and ASI Lorsa at the focus layer
    table1 = pd.read_csv(tmp_path / "results/tables/table1_lorsa.csv")
    assert sorted(table1["init"]) == ["asi", "vanilla"] and (table1["n_ov_heads"] == 96).all()
    assert (tmp_path / "results/tables/table1_lorsa.md").read_text().strip()
    # the verdict: one row per claim at least, each with a verdict; every figure has a caption with numbers
    claims = pd.read_csv(tmp_path / "results/claims.csv")
    assert set(claims["claim"]) == {f"C{i}" for i in range(1, 8)}
    assert set(claims["verdict"]) <= {"holds", "does not hold", "not run"}
    assert (claims.loc[claims["claim"] != "C1", "verdict"] != "not run").all()
    assert "strict majority" in (tmp_path / "results/claims.md").read_text()
    for name in FIGURES:
        assert "This run: " in (tmp_path / f"results/figures/{name}.caption.rst").read_text()
    # the gallery (no README in this folder: only docs/gallery is written)
    gallery = snakemake_cli("gallery", "--cores", "1", "--configfile", "config.yaml", cwd=tmp_path)
    assert gallery.returncode == 0, gallery.stderr[-3000:]
    assert (tmp_path / "docs/gallery/fig7.png").is_file() and (tmp_path / "docs/gallery/claims.md").is_file()
    # the browsable report builds from this run
    report = snakemake_cli("--configfile", "config.yaml", "--report", "report.zip", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "report.zip").stat().st_size > 0
    # nothing left to do: a second run is a no-op
    again = snakemake_cli("-n", "--configfile", "config.yaml", cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_dry_run_of_unknown_target_fails(tmp_path):
    with pytest.raises(Exception):
        dry_run(targets=["fig99"], workdir=tmp_path)


def test_every_report_caption_exists():
    """Fixed captions (paths relative to the rule file) exist; each figure's generated caption
    starts from docs/captions/<figure>.rst, which must exist too."""
    import re

    for rule_file in (REPO / "rules").glob("*.smk"):
        text = rule_file.read_text()
        for caption in re.findall(r'caption="(\.\./[^"]+)"', text):
            assert (rule_file.parent / caption).resolve().is_file(), (rule_file.name, caption)
        for name in re.findall(r'report_caption\("(\w+)"\)', text):
            assert (REPO / "docs" / "captions" / f"{name}.rst").is_file(), (rule_file.name, name)
    assert {f"{name}.rst" for name in FIGURES} <= {p.name for p in (REPO / "docs" / "captions").iterdir()}
