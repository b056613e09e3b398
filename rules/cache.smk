# The activation cache: one forward pass per (model, dataset) fills every site of
# every configured layer, train and held-out splits. Each store gets a manifest
# beside it (L{layer}.manifest.json), written last; cache.json, the rule's output,
# lists them all and is written after every store is complete. A record whose stores are
# not all published (a manifest deleted or lost) is dropped when the workflow loads, so
# this run rebuilds that cache instead of finding nothing to do. With spectrum.mode: streamed the
# same job also writes the spectrum sites' moments and their record (results/moments/...).

import sys

from attnspace.moments import drop_incomplete_moments
from attnspace.store import drop_incomplete_cache

for _model in MODELS:
    for _dataset in DATASETS:
        _record = f"results/activations/{_model}/{_dataset}/cache.json"
        _missing = drop_incomplete_cache(_record)
        if _missing:
            print(f"{_record}: stores without a manifest ({', '.join(_missing)}); the cache will be rebuilt.",
                  file=sys.stderr)
        _missing = drop_incomplete_moments(moments_record(_model, _dataset))  # spectrum.mode: streamed
        if _missing:
            print(f"{moments_record(_model, _dataset)}: files missing or short ({', '.join(_missing)}); "
                  "the cache will be rebuilt.", file=sys.stderr)


rule cache_activations:
    input:
        model=prepared_model,
        tokens="results/tokens/{model}/{dataset}.npz",
    output:
        [moments_record()] if STREAMED else [],  # spectrum.mode: streamed
        record="results/activations/{model}/{dataset}/cache.json",
    params:
        model_dir="resources/models/{model}/hf",
        dtype=lambda w: model_cfg(w)["dtype"],
        layers=lambda w: model_cfg(w)["layers"],
        sites=config["cache"]["sites"],
        chunk_rows=config["cache"]["chunk_rows"],
        shard_rows=config["cache"]["shard_rows"],
        config_hash=cache_hash,
        out_dir="results/activations/{model}/{dataset}",
        moments=streamed_moments_args,
    log:
        "results/logs/cache_activations/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/cache_activations/{model}/{dataset}.tsv"
    threads: 2
    resources:
        gpu=GPU,
        mem_mb=16000,
        runtime=720,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace cache --model-dir {params.model_dir} --dtype {params.dtype} --tokens {input.tokens} "
        "--model {wildcards.model} --dataset {wildcards.dataset} --layers {params.layers} "
        "--sites {params.sites} --chunk-rows {params.chunk_rows} --shard-rows {params.shard_rows} "
        "--config-hash {params.config_hash} --threads {threads} --out-dir {params.out_dir} --record {output.record} "
        "{params.moments} > {log} 2>&1"
