# Corpora -> token ids: BOS prepended, truncated, shuffled, held-out split first.


rule tokenize:
    input:
        model=prepared_model,
    output:
        "results/tokens/{model}/{dataset}.npz",
    params:
        source=lambda w: json.dumps(dataset_cfg(w)["source"]),
        model_dir="resources/models/{model}/hf",
        max_doc_tokens=config["tokens"]["max_doc_tokens"],
        train=config["tokens"]["train_tokens"],
        heldout=config["tokens"]["heldout_tokens"],
        seed=config["tokens"]["seed"],
    log:
        "results/logs/tokenize/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/tokenize/{model}/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace tokenize --model-dir {params.model_dir} --source {params.source:q} "
        "--max-doc-tokens {params.max_doc_tokens} --train-tokens {params.train} "
        "--heldout-tokens {params.heldout} --seed {params.seed} --out {output} > {log} 2>&1"
