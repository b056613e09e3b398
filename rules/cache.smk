# The activation cache: one forward pass per (model, dataset) fills every site at its
# layers (cache.layers; every configured layer by default), train and held-out splits; each
# layer's store holds the sites cached there. Each store gets a manifest
# beside it (L{layer}.manifest.json), written last; cache.json, the rule's output,
# lists them all and is written after every store is complete. A record whose stores are
# not all published (a manifest deleted or lost) is dropped when the workflow loads, so
# this run rebuilds that cache instead of finding nothing to do. With spectrum.mode: streamed the
# same job also writes the spectrum sites' moments and their record (results/moments/...), Figure 3's
# (results/moments/.../wo/), and stores only the sites, layers and splits some stage reads of that
# (model, dataset) (attnspace.config.stored_sites): nothing at all where none does.

import sys

from attnspace.moments import drop_incomplete_moments
from attnspace.store import drop_incomplete_cache

for _model in MODELS:
    for _dataset in DATASETS:
        for _name in ("cache.json", "sae.json"):
            _record = f"results/activations/{_model}/{_dataset}/{_name}"
            _missing = drop_incomplete_cache(_record)
            if _missing:
                print(f"{_record}: stores without a manifest ({', '.join(_missing)}); the cache will be rebuilt.",
                      file=sys.stderr)
        for _record in (moments_record(_model, _dataset), wo_moments_record(_model, _dataset)):  # streamed
            _missing = drop_incomplete_moments(_record)
            if _missing:
                print(f"{_record}: files missing or short ({', '.join(_missing)}); the cache will be rebuilt.",
                      file=sys.stderr)


rule cache_activations:
    input:
        model=prepared_model,
        tokens="results/tokens/{model}/{dataset}.npz",
    output:
        cache_moment_records(),  # spectrum.mode: streamed
        record="results/activations/{model}/{dataset}/cache.json",
    params:
        model_dir="resources/models/{model}/hf",
        dtype=lambda w: model_cfg(w)["dtype"],
        layers=lambda w: model_cfg(w)["layers"],
        sites=config["cache"]["sites"],
        site_layers=site_layers,
        chunk_rows=config["cache"]["chunk_rows"],
        shard_rows=config["cache"]["shard_rows"],
        config_hash=cache_hash,
        out_dir="results/activations/{model}/{dataset}",
        moments=streamed_moments_args,
    log:
        "results/logs/cache_activations/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/cache_activations/{model}/{dataset}.tsv"
    threads: 1  # one thread a job: see MODEL_JOB_PRIORITY in common.smk
    priority: MODEL_JOB_PRIORITY
    resources:
        gpu=GPU,
        mem_mb=16000,
        runtime=720,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace cache --model-dir {params.model_dir:q} --dtype {params.dtype} --tokens {input.tokens:q} "
        "--model {wildcards.model} --dataset {wildcards.dataset} --layers {params.layers} "
        "--sites {params.sites} --site-layers {params.site_layers:q} --chunk-rows {params.chunk_rows} --shard-rows {params.shard_rows} "
        "--config-hash {params.config_hash} --threads {threads} --out-dir {params.out_dir:q} --record {output.record:q} "
        "{params.moments} > {log:q} 2>&1"


# The SAE store (where tokens.sae_train_tokens is set and SAEs train on the cache): the SAE sites at
# the focus layer for tokens.sae_train_tokens training rows, results/activations/{model}/{dataset}/sae/
# L{layer}.zarr; its first rows are the train split's. The forward stops at the focus layer. The
# SAEs there read it instead of the train split (sae_store in common.smk); held-out rows stay shared.
rule cache_sae:
    input:
        model=prepared_model,
        tokens="results/tokens/{model}/{dataset}.sae.npz",
    output:
        "results/activations/{model}/{dataset}/sae.json",
    params:
        model_dir="resources/models/{model}/hf",
        dtype=lambda w: model_cfg(w)["dtype"],
        layer=config["focus"]["layer"],
        sites=SAE_STORE_SITES,
        chunk_rows=config["cache"]["chunk_rows"],
        shard_rows=config["cache"]["shard_rows"],
        config_hash=sae_store_hash,
        out_dir="results/activations/{model}/{dataset}",
    log:
        "results/logs/cache_sae/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/cache_sae/{model}/{dataset}.tsv"
    threads: 1
    priority: MODEL_JOB_PRIORITY
    resources:
        gpu=GPU,
        mem_mb=16000,
        runtime=720,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace cache --model-dir {params.model_dir:q} --dtype {params.dtype} --tokens {input.tokens:q} "
        "--model {wildcards.model} --dataset {wildcards.dataset} --layers {params.layer} "
        "--sites {params.sites} --splits sae --chunk-rows {params.chunk_rows} --shard-rows {params.shard_rows} "
        "--config-hash {params.config_hash} --threads {threads} --out-dir {params.out_dir:q} --record {output:q} > {log:q} 2>&1"
