"""The workflow itself: lint, dry runs of every config and figure target through
Snakemake's Python API, a bad config through the CLI, and a tiny end-to-end run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnspace.sae.group import training_bytes
from attnspace.sae.runs import parse_run_name
from conftest import REPO

FIGURES = ("fig1", "fig2a", "fig2b", "fig3", "fig4", "fig5", "fig6", "fig7", "fig8", "fig9", "convergence")


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


def snakemake_cli(*args, cwd: Path, timeout=600, snakefile: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    snakefile = snakefile or REPO / "Snakefile"
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(snakefile), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_lint_is_clean():
    r = snakemake_cli("--lint", cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Lints for" not in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("configfile", [None, "config/paper.yaml"])
def test_dry_run_of_whole_config(configfile, tmp_path):
    dry_run(configfile=REPO / configfile if configfile else None, workdir=tmp_path)


PLANNED_RULES = ("cache_activations", "cache_sae", "loss_recovered", "train_sae", "train_lorsa", "fetch_llamascope")


def dry_run_output(*targets, cwd: Path, configfile: Path | None = None) -> str:
    """What a dry run of ``targets`` prints, shell commands included."""
    args = ["-n", "-p", *targets] + (["--configfile", str(configfile)] if configfile else [])
    r = snakemake_cli(*args, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def job_counts(out: str) -> dict[str, int]:
    """{rule: job count} of the rules in PLANNED_RULES in a dry run's output; the SAE group rules
    (train_sae_<figures>_<n>) count together as train_sae."""
    stats = out.split("Job stats:")[1].split("\n\n")[0]
    counts = {}
    for line in stats.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("train_sae_"):
            counts["train_sae"] = counts.get("train_sae", 0) + int(parts[1])
        elif len(parts) == 2 and parts[0] in PLANNED_RULES:
            counts[parts[0]] = int(parts[1])
    return counts


def planned_jobs(*targets, cwd: Path, configfile: Path | None = None) -> dict[str, int]:
    """{rule: job count} of the rules in PLANNED_RULES that a dry run of ``targets`` plans."""
    return job_counts(dry_run_output(*targets, cwd=cwd, configfile=configfile))


def replicate_suffixes(cfg: dict) -> list[str]:
    """Name suffixes of the claim-carrying runs: every form (-c: centred) times every seed (-r<n>, none for 0)."""
    sae = cfg.get("sae", {})
    forms, seeds = sae.get("forms", ["uncentred", "centred"]), sae.get("seeds", 3)
    return [("-c" if form == "centred" else "") + (f"-r{r}" if r else "") for form in forms for r in range(seeds)]


def figure_run_folders(cfg: dict, d_model: int) -> dict[str, set[str]]:
    """{figure: its SAE run folders} (fig4: the suite, when the pipeline trains it), written out
    independently of rules/common.smk."""
    f = cfg["focus"]
    prefix = f"{f['model']}/{f['dataset']}"
    n, k = cfg["sae"]["expansion"] * d_model, cfg["sae"]["k"]
    focus = f"{prefix}/L{f['layer']}/{cfg['fig5']['site']}/"
    fig5 = {focus + f"base-d0-adam-n{n}-k{k}" + x for x in replicate_suffixes(cfg)}
    fig5 |= {focus + f"{init}-d{d}-adam-n{n}-k{k}" + x for d in cfg["fig5"]["d_init"]
             for init in ("asi", "random_subspace") for x in replicate_suffixes(cfg)}
    runs = {"fig5": fig5}
    for figure in ("fig6", "fig7"):
        runs[figure] = expected_sweep(cfg[figure], d_model, figure, f"{prefix}/L{f['layer']}", replicate_suffixes(cfg))
    if cfg["suite"]["source"] == "pipeline":
        runs["fig4"] = {f"{prefix}/L{layer}/{site}/base-d0-adam-n{n}-k{k}"
                        for layer in cfg["models"][f["model"]]["layers"] for site in cfg["suite"]["sites"]}
    return runs


def all_run_folders(cfg: dict, d_model: int) -> set[str]:
    """Every SAE run folder of the whole configuration, shared runs once."""
    return set().union(*figure_run_folders(cfg, d_model).values())


def expected_sae_groups(cfg: dict, d_model: int) -> list[tuple[tuple[str, ...], list[str]]]:
    """The SAE groups the memory model gives, computed here by hand: runs drawn by the same figures
    at the same layer and site, sorted by memory (attnspace.sae.group.training_bytes of the run's size,
    optimizer and AuxK: the measured peak, tests/test_memory.py), largest first, each
    added to the last group while it fits sae.group.memory_gb and max_members. (figures, folders) each."""
    from attnspace.defaults import schema_default

    sae = cfg["sae"]
    group = sae.get("group", {})
    budget = group.get("memory_gb", schema_default("sae.group.memory_gb")) * 10**9
    most = group.get("max_members", schema_default("sae.group.max_members"))
    batch = sae.get("batch_size", schema_default("sae.batch_size"))
    by_figure = figure_run_folders(cfg, d_model)
    streams: dict[tuple, list[tuple[int, str]]] = {}
    for folder in all_run_folders(cfg, d_model):
        figures = tuple(name for name in ("fig5", "fig6", "fig7", "fig4") if folder in by_figure.get(name, ()))
        run = parse_run_name(folder.rsplit("/", 1)[1])
        memory = training_bytes(d_model, run["d_sae"], batch, optimizer=run["optimizer"], auxk=run["auxk"], k=run["k"],
                                k_aux=sae.get("auxk", {}).get("k_aux", schema_default("sae.auxk.k_aux")))
        streams.setdefault((figures, folder.rsplit("/", 1)[0]), []).append((memory, folder))
    groups = []
    for (figures, _), runs in streams.items():
        used = None
        for memory, folder in sorted(runs, key=lambda r: (-r[0], r[1])):
            if used is not None and used + memory <= budget and len(groups[-1][1]) < most:
                groups[-1][1].append(folder)
                used += memory
            else:
                groups.append((figures, [folder]))
                used = memory
    return groups


def expected_jobs(cfg: dict, target: str, d_model: int) -> dict[str, int]:
    """What each figure target must plan and nothing more, counted here from the config alone; SAEs
    in the groups whose runs that figure draws."""
    pairs = len(cfg["models"]) * len(cfg["datasets"])
    n_models = len(cfg["models"])
    focus = cfg["focus"]
    suite_layers = len(cfg["models"][focus["model"]]["layers"])
    suite = suite_layers * len(cfg["suite"]["sites"])
    groups = {name: sum(name in figures for figures, _ in expected_sae_groups(cfg, d_model))
              for name in ("fig4", "fig5", "fig6", "fig7")}
    one = {"cache_activations": 1}  # the focus (model, dataset)
    # SAEs at the focus layer train on the SAE store where there is one (sae.source cache)
    sae_store = {"cache_sae": 1} if cfg["tokens"].get("sae_train_tokens") and cfg["sae"].get("source") != "live" else {}
    expected = {
        "fig1": {"cache_activations": pairs},
        "fig9": {"cache_activations": pairs},
        "convergence": {"cache_activations": pairs},
        "fig2a": one,
        "fig8": {"cache_activations": pairs - 1},  # every pair but the focus one, at its focus layer
        "fig2b": {"cache_activations": n_models, "loss_recovered": n_models},  # the focus dataset, per model
        "fig3": {"cache_activations": n_models},
        "fig4": {**one, **({"fetch_llamascope": suite} if cfg["suite"]["source"] == "llamascope"
                           else {"train_sae": groups["fig4"], **sae_store})},
        "fig5": {**one, **sae_store, "train_sae": groups["fig5"]},
        "fig6": {**one, **sae_store, "train_sae": groups["fig6"]},
        "fig7": {**one, **sae_store, "train_sae": groups["fig7"]},
    }
    return expected[target]


def expected_members(cfg: dict, target: str, d_model: int) -> int:
    """SAE runs a figure target trains: base, then ASI and random per d_init, each in every form and
    seed (Figure 5); every variant at every k (Figure 6); every variant at every size, the largest in
    every form and seed (Figure 7); a base SAE per suite layer and site (Figure 4)."""
    forms_seeds = len(replicate_suffixes(cfg))
    return {
        "fig4": len(cfg["models"][cfg["focus"]["model"]]["layers"]) * len(cfg["suite"]["sites"])
        if cfg["suite"]["source"] == "pipeline" else 0,
        "fig5": (1 + 2 * len(cfg["fig5"]["d_init"])) * forms_seeds,
        "fig6": len(cfg["fig6"]["variants"]) * len(cfg["fig6"]["k"]),
        "fig7": len(cfg["fig7"]["variants"]) * (len(cfg["fig7"]["expansion"]) - 1 + forms_seeds),
    }.get(target, 0)


CONFIGS = {"default": ("config.yaml", 576), "paper": ("config/paper.yaml", 4096)}


@pytest.mark.parametrize("configfile", CONFIGS)
@pytest.mark.parametrize("figure", FIGURES)
def test_each_figure_plans_exactly_its_own_jobs(figure, configfile, tmp_path):
    """Each figure target plans its own jobs, its SAEs in the groups the memory model gives, and
    among them exactly the SAE runs the figure draws."""
    path, d_model = CONFIGS[configfile]
    cfg = yaml.safe_load((REPO / path).read_text())
    out = dry_run_output(figure, cwd=tmp_path, configfile=REPO / path)
    runs = sae_runs(out)
    assert len(runs) == expected_members(cfg, figure, d_model)
    assert set(runs) == figure_run_folders(cfg, d_model).get(figure, set())
    assert job_counts(out) == expected_jobs(cfg, figure, d_model)


@pytest.mark.parametrize("configfile", CONFIGS)
def test_whole_config_plans_every_job_once(configfile, tmp_path):
    path, d_model = CONFIGS[configfile]
    cfg = yaml.safe_load((REPO / path).read_text())
    n_pairs = len(cfg["models"]) * len(cfg["datasets"])
    lorsa_models = cfg["lorsa"].get("models") or [cfg["focus"]["model"]]
    expected = {"cache_activations": n_pairs, "loss_recovered": len(cfg["models"]),
                "train_sae": len(expected_sae_groups(cfg, d_model)),
                "train_lorsa": 2 * len(lorsa_models) * cfg["lorsa"].get("seeds", 3)}
    if cfg["suite"]["source"] == "llamascope":
        expected["fetch_llamascope"] = len(cfg["models"][cfg["focus"]["model"]]["layers"]) * len(cfg["suite"]["sites"])
    if cfg["tokens"].get("sae_train_tokens") and cfg["sae"]["source"] != "live":
        expected["cache_sae"] = 1  # the focus (model, dataset) only
    out = dry_run_output(cwd=tmp_path, configfile=REPO / path)
    assert job_counts(out) == expected
    assert set(sae_runs(out)) == all_run_folders(cfg, d_model)


def test_a_node_of_gpus_spreads_each_group_over_its_devices(tmp_path):
    """sae.group.devices 8 on the paper configuration: each member names its GPU, every GPU's memory
    (training_bytes of each member) stays within memory_gb unless one SAE alone exceeds it, and the
    node's groups are fewer than one device's."""
    import shlex

    cfg = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    cfg["sae"]["group"] = {**cfg["sae"].get("group", {}), "devices": 8}
    configfile = tmp_path / "node.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    out = dry_run_output("fig7", cwd=tmp_path, configfile=configfile)
    budget, batch = cfg["sae"]["group"]["memory_gb"] * 10**9, cfg["sae"]["batch_size"]
    groups = 0
    for line in out.splitlines():
        if "attnspace train-sae-group " not in line:
            continue
        groups += 1
        argv = shlex.split(line.split("attnspace ", 1)[1].split(" > ")[0])
        per_gpu: dict[int, list[int]] = {}
        for i, a in enumerate(argv):
            if a == "--member":
                own = shlex.split(argv[i + 1])
                run = parse_run_name(own[own.index("--run") + 1])
                per_gpu.setdefault(int(own[own.index("--gpu") + 1]), []).append(training_bytes(
                    4096, run["d_sae"], batch, optimizer=run["optimizer"], auxk=run["auxk"], k=run["k"],
                    k_aux=cfg["sae"]["auxk"]["k_aux"]))
        assert set(per_gpu) <= set(range(8))
        for sizes in per_gpu.values():
            assert sum(sizes) <= budget or len(sizes) == 1
    assert groups == job_counts(out)["train_sae"]
    assert groups < len([g for g in expected_sae_groups(cfg, 4096) if "fig7" in g[0]])


def test_figure_targets_by_file_plan_as_by_name(tmp_path):
    for figure in ("fig2a", "fig5"):
        assert planned_jobs(f"results/figures/{figure}.pdf", cwd=tmp_path) == planned_jobs(figure, cwd=tmp_path)


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
        assert f"results/lorsa/llama-3.1-8b/slimpajama/L15/{init}-r0/metrics.json" in out


def sae_runs(out: str) -> dict[str, str]:
    """{run folder: its group's shared options, then its own} of every SAE in a dry run's output."""
    import shlex

    runs = {}
    for line in out.splitlines():
        if "attnspace train-sae-group " in line:
            argv = shlex.split(line.split("attnspace ", 1)[1].split(" > ")[0])
            shared = " ".join(a for i, a in enumerate(argv) if a != "--member" and argv[i - 1] != "--member")
            for i, a in enumerate(argv):
                if a == "--member":
                    own = argv[i + 1]
                    folder = own.split("--out-dir ")[1].split()[0].split("results/saes/")[1]
                    assert folder not in runs  # each SAE in one group
                    runs[folder] = f"{shared} {own} "
    return runs


def planned_sae_runs(*targets, cwd: Path, configfile: Path | None = None) -> dict[str, str]:
    """{run folder: its group's shared options, then its own} of every SAE a dry run plans for ``targets``."""
    return sae_runs(dry_run_output(*targets, cwd=cwd, configfile=configfile))


def expected_sweep(sweep: dict, d_model: int, figure: str, prefix: str, suffixes=("",)) -> set[str]:
    """The run folders a sweep must expand to, written out here independently of rules/common.smk;
    Figure 7's largest size once per name suffix (form and seed)."""
    names = {"topk": "base-d0-adam-n{n}-k{k}", "topk_auxk": "base-d0-adam-n{n}-k{k}-auxk",
             "asi": "asi-d{d}-adam-n{n}-k{k}", "asi_sparseadam": "asi-d{d}-sparse_adam-n{n}-k{k}",
             "asi_maskedadam": "asi-d{d}-masked_adam-n{n}-k{k}"}
    if figure == "fig6":
        grid = [(sweep["expansion"] * d_model, k) for k in sweep["k"]]
    else:
        grid = [(e * d_model, sweep["k"]) for e in sweep["expansion"]]
    largest = max(n for n, _ in grid)
    return {f"{prefix}/{sweep['site']}/" + names[v].format(n=n, k=k, d=sweep["d_init"]) + x
            for v in sweep["variants"] for n, k in grid
            for x in (suffixes if figure == "fig7" and n == largest else ("",))}


@pytest.mark.parametrize("figure", ["fig6", "fig7"])
def test_default_sweep_expands_to_exactly_the_configured_jobs(figure, tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    planned = planned_sae_runs(figure, cwd=tmp_path)
    expected = expected_sweep(cfg[figure], 576, figure, "smollm2-135m/pydocs/L15", replicate_suffixes(cfg))
    assert set(planned) == expected
    n_grid = len(cfg[figure]["k"] if figure == "fig6" else cfg[figure]["expansion"])
    extra = (len(replicate_suffixes(cfg)) - 1) if figure == "fig7" else 0
    assert len(expected) == len(cfg[figure]["variants"]) * (n_grid + extra)
    for run, command in planned.items():  # per-optimizer learning rates from config; replicate r: init seed
        lr = cfg["sae"]["lr"][next((o for o in ("sparse_adam", "masked_adam") if f"-{o}-" in run), "adam")]
        replicate = int(run.rsplit("-r", 1)[1]) if "-r" in run.rsplit("/", 1)[1].split("-k")[1] else 0
        seed = cfg["sae"].get("seed", 0)  # seed + r, the batches' order sae.seed for all (one stream)
        assert f"--lr {lr} " in command and f"--seed {seed + replicate} " in command
        assert f"--data-seed {seed} " in command


def test_paper_fig7_plans_every_size_from_live_activations(tmp_path):
    cfg = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    planned = planned_sae_runs("fig7", cwd=tmp_path, configfile=REPO / "config/paper.yaml")
    assert set(planned) == expected_sweep(cfg["fig7"], 4096, "fig7", "llama-3.1-8b/slimpajama/L15",
                                          replicate_suffixes(cfg))
    assert len(planned) == 4 * (6 + len(replicate_suffixes(cfg)))  # 16,384 .. 1,048,576 latents, four variants
    assert any("-n1048576-k50" in run for run in planned)
    for run, command in planned.items():
        assert "--live-source" in command and "--train-tokens 2500000000 " in command
        assert ("--lr 6e-05 " if "sparse_adam" in run else "--lr 4e-05 ") in command
        # Up to 524,288 latents on one H200; 1M with Adam feature-sharded over the fewest GPUs that hold it
        if "-n1048576-" in run and "-adam-" in run:
            assert "--ranks 2 " in command, command
        elif "-n1048576-" not in run:
            assert "--ranks 1 " in command, command


def dry_run_lines(tmp_path, cfg: dict, target: str) -> list[str]:
    """The printed shell commands of a dry run of ``target`` under the configuration ``cfg``."""
    (tmp_path / "config_under_test.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake_cli(target, "-n", "-p", "--configfile", "config_under_test.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout.splitlines()


def test_streamed_spectra_read_moments_and_cache_no_spectrum_only_site(tmp_path):
    """spectrum.mode: streamed: the caching job streams every spectrum site, stores only cache.sites
    (mlp_out, a spectrum-only site once Figure 4's suite is left out, gets no store), and the spectrum
    job reads the moments."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["spectrum"]["mode"] = "streamed"
    cfg["cache"]["sites"] = ["attn_out", "resid_post", "attn_z", "attn_in"]
    cfg["figures"].pop("fig4")
    lines = dry_run_lines(tmp_path, cfg, "results/spectra/smollm2-135m/pydocs/L15/mlp_out.npz")
    cache = [line for line in lines if "attnspace cache " in line]
    spectrum = [line for line in lines if "attnspace spectrum " in line]
    assert len(cache) == 1 and len(spectrum) == 1
    assert "--sites attn_out resid_post attn_z attn_in --" in cache[0]
    assert "--moment-sites attn_out mlp_out resid_post --moments-dir results/moments/smollm2-135m/pydocs " \
           "--groups 64" in cache[0]
    assert "--moments results/moments/smollm2-135m/pydocs/moments.json --layer 15 --sites" in spectrum[0]
    assert "--store" not in spectrum[0]
    # it stores only what is read there: Lorsa's two sites at layer 15, and the held-out rows the SAEs of
    # Figures 5-7 are evaluated on (they train on the SAE store)
    assert """--store-sites '{"train":{"attn_out":[15],"attn_in":[15]},"heldout":{"attn_out":[15],"attn_in":[15]}}'""" \
        in cache[0]


def test_streamed_figure3_reads_moments_and_an_unread_pair_stores_nothing(tmp_path):
    """spectrum.mode: streamed: the W^O decomposition reads Figure 3's moments and the spectrum moments, no
    store; the caching job of a (model, dataset) no stage reads stores nothing but still streams both."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["spectrum"]["mode"] = "streamed"
    lines = dry_run_lines(tmp_path, cfg, "results/wo/smollm2-135m/pycode/summary.csv")
    cache = [line for line in lines if "attnspace cache " in line]
    wo = [line for line in lines if "attnspace wo-decomposition " in line]
    assert len(cache) == 1 and len(wo) == 1
    assert "--store-sites '{}' --wo-moments-dir results/moments/smollm2-135m/pycode/wo " in cache[0]
    layers = " ".join(map(str, cfg["models"]["smollm2-135m"]["layers"]))
    assert (f"--moments results/moments/smollm2-135m/pycode/wo/moments.json "
            f"results/moments/smollm2-135m/pycode/moments.json --layers {layers} ") in wo[0]
    assert "--stores" not in wo[0]


def test_bad_config_stops_before_any_job(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["models"]["smollm2-135m"]["layers"] = [2, 40]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake_cli("-n", "--configfile", "bad.yaml", cwd=tmp_path)
    assert r.returncode != 0
    assert "models.smollm2-135m.layers[1] = 40 is outside the model" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()


def test_dry_run_of_unknown_target_fails(tmp_path):
    r = snakemake_cli("-n", "fig99", cwd=tmp_path)
    assert r.returncode != 0
    assert "fig99" in r.stdout + r.stderr


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


def test_sae_groups_take_the_train_sae_resources_of_a_profile(tmp_path):
    """The group rules have generated names: a profile's (or the command line's) set-resources and
    set-threads for train_sae apply to each of them; without any, gpu=GPU and memory by estimate."""
    r = snakemake_cli("-n", "-p", "--cores", "4", "fig6", "--set-resources", "train_sae:gpu=1",
                      "train_sae:mem_mb=200000", 'train_sae:slurm_partition="gpu"', "--set-threads", "train_sae=4",
                      cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    blocks = [b for b in r.stdout.split("\nrule ") if b.startswith("train_sae_")]
    assert blocks
    for block in blocks:
        assert "gpu=1" in block and "slurm_partition=gpu," in block and "mem_mb=200000" in block, block
        assert "--threads 4 " in block
