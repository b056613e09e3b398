"""The whole DAG on a tiny configuration (a random 4-layer Llama, the embedded corpora),
run once for this module; each stage's outputs are checked by a test named for it, so a
failure names its stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, tiny_config
from test_workflow import FIGURES, snakemake_cli as _snakemake_cli

PROJECT = ("Snakefile", "rules", "src", "docs", "profiles", "envs")
"""What a copy of the project holds besides its results (the workflow and the code it tracks)."""


def copy_project(folder: Path) -> None:
    """Copy :data:`PROJECT` from the repository into ``folder``."""
    for name in PROJECT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "gallery"))
        else:
            shutil.copy2(src, folder / name)


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    """A copy of the project with a finished tiny run in it (config.yaml, results/)."""
    folder = tmp_path_factory.mktemp("tiny-run")
    copy_project(folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(tiny_config(tiny_llama)))
    r = snakemake_cli("--cores", "2", "--configfile", "config.yaml", cwd=folder, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return folder


def snakemake_cli(*args, cwd: Path, **kwargs):
    """Snakemake on the project copy in ``cwd``."""
    return _snakemake_cli(*args, cwd=cwd, snakefile=cwd / "Snakefile", **kwargs)


def test_every_figure_with_its_data(run):
    for name in FIGURES:
        for ext in ("pdf", "png", "csv"):
            path = run / "results" / "figures" / f"{name}.{ext}"
            assert path.stat().st_size > 0, path


def test_intrinsic_dimension_table(run):
    idim = pd.read_csv(run / "results/tables/intrinsic_dim.csv")
    assert list(idim.columns) == ["model", "dataset", "layer", "site", "d", "n_tokens", "threshold", "k",
                                  "fraction", "fraction_lo", "fraction_hi", "level", "resamples", "n_groups",
                                  "n_sv_above_5pct", "method", "fraction_corrected", "fraction_half", "tokens_half",
                                  "last_doubling_change", "attn_minus_site", "attn_minus_site_lo", "attn_minus_site_hi"]
    # one row per (dataset, layer, site, threshold); k is monotone in the threshold
    assert len(idim) == 2 * 2 * 3 * 5
    for _, g in idim.groupby(["dataset", "layer", "site"]):
        assert g.sort_values("threshold")["k"].is_monotonic_increasing
    assert (idim["d"] == 48).all()


def test_cache_is_complete(run):
    # manifests for both splits of every layer, and a benchmark per stage
    for split_dir in ("", "heldout/"):
        for layer in (1, 2):
            assert (run / f"results/activations/tiny/pydocs/{split_dir}L{layer}.manifest.json").is_file()
    assert (run / "results/benchmarks/cache_activations/tiny/pydocs.tsv").is_file()


def test_loss_recovered(run):
    # at the focus (pydocs, layer 2): every site, k from 0 to d; k = d is the clean model
    lr = pd.read_csv(run / "results/tables/loss_recovered.csv")
    assert list(lr.columns) == ["model", "dataset", "layer", "site", "k", "k_fraction", "loss", "loss_clean",
                                "loss_zero", "recovered"]
    assert set(lr["site"]) == {"attn_out", "mlp_out", "resid_post"}
    assert set(lr["dataset"]) == {"pydocs"} and set(lr["layer"]) == {2}
    full = lr[lr["k"] == 48]
    assert len(full) == 3 and ((full["loss"] - full["loss_clean"]).abs() < 1e-5 * full["loss_clean"]).all()
    assert (lr.groupby("site")["k"].min() == 0).all()
    summary = pd.read_csv(run / "results/tables/loss_recovered_summary.csv")
    assert len(summary) == 3 and (summary["target"] == 0.95).all()


def test_wo_decomposition(run):
    # every layer and dataset; Var(O e_i) = Var(Z v_i) ||W^O e_i||^2
    wo = pd.read_csv(run / "results/tables/wo_decomposition.csv")
    assert list(wo.columns) == ["model", "dataset", "layer", "i", "var_o", "wo_contrib", "z_contrib"]
    assert len(wo) == 2 * 2 * 48
    assert ((wo["var_o"] - wo["z_contrib"] * wo["wo_contrib"]).abs()
            <= 1e-4 * wo["var_o"] + 1e-7 * wo["var_o"].max()).all()
    wo_summary = pd.read_csv(run / "results/tables/wo_summary.csv")
    assert len(wo_summary) == 4 and (wo_summary["o_rel_error"] < 1e-5).all()


def test_sae_runs(run):
    # fig5's runs (base, then ASI and random subspace at d_init 4 and 8), two seeds in two forms each, and the suite
    runs = pd.read_csv(run / "results/tables/sae_runs.csv")
    fig5_runs = runs[(runs["layer"] == 2) & (runs["site"] == "attn_out") & (runs["d_sae"] == 96) & (runs["k"] == 4)
                     & ~runs["auxk"] & (runs["optimizer"] == "adam")]
    names = ["base-d0-adam-n96-k4", "asi-d4-adam-n96-k4", "asi-d8-adam-n96-k4", "random_subspace-d4-adam-n96-k4",
             "random_subspace-d8-adam-n96-k4"]
    assert sorted(fig5_runs["run"]) == sorted(n + x for n in names for x in ("", "-r1", "-c", "-c-r1"))
    assert set(fig5_runs["seed"]) == {0, 1} and fig5_runs["centred"].sum() == 10
    # NMSE on the training tokens beside the held-out NMSE, for every run
    assert runs["train_nmse"].notna().all() and (runs["train_nmse"] > 0).all()
    centred = run / "results/saes/tiny/pydocs/L2/attn_out/asi-d4-adam-n96-k4-c"
    assert json.loads((centred / "hyperparams.json").read_text())["apply_decoder_bias_to_pre_encoder"] is True
    assert not runs.duplicated(["layer", "site", "run"]).any()
    assert (runs["status"] == "ok").all()
    assert runs["tokens_trained"].nunique() == 1
    assert set(runs.loc[runs["optimizer"] == "sparse_adam", "variant"]) == {"asi_sparseadam"}
    assert (runs["tokens_per_second"] > 0).all()
    saved = run / "results/saes/tiny/pydocs/L1/mlp_out/base-d0-adam-n96-k4"
    assert (saved / "hyperparams.json").is_file() and (saved / "checkpoints/final.safetensors").is_file()
    fig5 = pd.read_csv(run / "results/figures/fig5.csv")
    assert set(fig5["run"]) == set(fig5_runs["run"])


def test_sweeps(run):
    # fig6 = 3 variants x 2 k at 96 latents, fig7 = 4 variants x 2 sizes at k 4; rows in sae_runs.csv too
    runs = pd.read_csv(run / "results/tables/sae_runs.csv")
    fig6 = pd.read_csv(run / "results/figures/fig6.csv")
    assert len(fig6) == 6 and set(fig6["variant"]) == {"topk", "topk_auxk", "asi"} and set(fig6["k"]) == {2, 4}
    fig7 = pd.read_csv(run / "results/figures/fig7.csv")  # the largest size in 2 seeds x 2 forms
    assert len(fig7) == 4 + 4 * 4 and set(fig7["d_sae"]) == {48, 96} and (fig7["k"] == 4).all()
    assert fig7["fit_exponent"].notna().all() and (fig7["n_alive"] == fig7["d_sae"] - fig7["n_dead"]).all()
    assert set(fig6["run"]) | set(fig7["run"]) <= set(runs["run"])
    # the LM loss with the SAE spliced in: measured for Figure 6's runs (which draw it), skipped elsewhere
    assert fig6["delta_lm_loss"].notna().all() and runs["delta_lm_loss"].notna().sum() == len(fig6)


def test_dead_feature_suite(run):
    # one SAE per (layer, site), evaluated by the dead-features command
    dead = pd.read_csv(run / "results/tables/dead_features.csv")
    assert list(dead.columns) == ["model", "dataset", "layer", "site", "d_sae", "n_tokens", "dead",
                                  "dead_fraction", "intrinsic_dim_fraction"]
    assert len(dead) == 2 * 3 and (dead["d_sae"] == 96).all()
    # the intrinsic dimension beside each count is the main threshold's (spectrum.threshold)
    idim = pd.read_csv(run / "results/tables/intrinsic_dim.csv")
    main = idim[(idim["threshold"] == 0.99) & (idim["dataset"] == "pydocs")]
    joined = dead.merge(main, on=["model", "dataset", "layer", "site"])
    assert len(joined) == len(dead) and (joined["intrinsic_dim_fraction"] == joined["fraction"]).all()


def test_lorsa_table1(run):
    table1 = pd.read_csv(run / "results/tables/table1_lorsa.csv")
    assert sorted(table1["init"]) == ["asi", "asi", "vanilla", "vanilla"] and (table1["n_ov_heads"] == 96).all()
    assert set(table1["seed"]) == {0, 1}
    assert (run / "results/tables/table1_lorsa.md").read_text().strip()


def test_claims_and_captions(run):
    # one row per claim at least, each with a verdict; every figure has a caption with numbers
    claims = pd.read_csv(run / "results/claims.csv")
    assert set(claims["claim"]) == {f"C{i}" for i in range(1, 8)}
    assert set(claims["verdict"]) <= {"holds", "does not hold", "inconclusive", "not run"}
    idim = pd.read_csv(run / "results/tables/intrinsic_dim.csv")
    assert (idim["resamples"] == 20).all() and (idim["fraction_lo"] <= idim["fraction_hi"]).all()
    assert set(claims.loc[claims["claim"] == "C4", "tested_on"].str.rsplit(", ", n=1).str[1]) == {"uncentred", "centred"}
    assert (claims.loc[claims["claim"] != "C1", "verdict"] != "not run").all()
    assert "strict majority" in (run / "results/claims.md").read_text()
    for name in FIGURES:
        assert "This run: " in (run / f"results/figures/{name}.caption.rst").read_text()


def test_gallery(run):
    # no README in this folder: only docs/gallery is written
    gallery = snakemake_cli("gallery", "--cores", "1", "--configfile", "config.yaml", cwd=run)
    assert gallery.returncode == 0, gallery.stderr[-3000:]
    assert (run / "docs/gallery/fig7.png").is_file() and (run / "docs/gallery/claims.md").is_file()


def test_report(run):
    report = snakemake_cli("--configfile", "config.yaml", "--report", "report.zip", cwd=run)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (run / "report.zip").stat().st_size > 0


def test_second_run_plans_nothing(run):
    again = snakemake_cli("-n", "--configfile", "config.yaml", cwd=run)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_moved_project_plans_nothing(run, tmp_path):
    """A copy of the project with its results (moved from a cluster to a laptop, say) reruns
    nothing: code and caption inputs are relative paths."""
    moved = tmp_path / "moved"
    shutil.copytree(run, moved, symlinks=True)
    again = snakemake_cli("-n", "--configfile", "config.yaml", cwd=moved)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
