# Corpora -> token ids: BOS prepended, truncated, shuffled, held-out split first.


rule tokenize:
    input:
        model=prepared_model,
        corpus=local_corpus_files,
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
    priority: MODEL_JOB_PRIORITY
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace tokenize --model-dir {params.model_dir:q} --source {params.source:q} "
        "--max-doc-tokens {params.max_doc_tokens} --train-tokens {params.train} "
        "--heldout-tokens {params.heldout} --seed {params.seed} --out {output:q} > {log:q} 2>&1"


# The SAE store's tokens (only where there is one: the focus model and dataset): the same
# held-out and train splits, and the training documents dealt on to tokens.sae_train_tokens.
# A file of its own, so that changing that length leaves the main cache alone.
rule tokenize_sae:
    input:
        model=prepared_model,
        corpus=local_corpus_files,
    output:
        "results/tokens/{model}/{dataset}.sae.npz",
    params:
        source=lambda w: json.dumps(dataset_cfg(w)["source"]),
        model_dir="resources/models/{model}/hf",
        max_doc_tokens=config["tokens"]["max_doc_tokens"],
        train=config["tokens"]["train_tokens"],
        heldout=config["tokens"]["heldout_tokens"],
        sae_train=config["tokens"]["sae_train_tokens"],
        seed=config["tokens"]["seed"],
    log:
        "results/logs/tokenize_sae/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/tokenize_sae/{model}/{dataset}.tsv"
    threads: 1
    priority: MODEL_JOB_PRIORITY
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace tokenize --model-dir {params.model_dir:q} --source {params.source:q} "
        "--max-doc-tokens {params.max_doc_tokens} --train-tokens {params.train} "
        "--heldout-tokens {params.heldout} --sae-train-tokens {params.sae_train} --seed {params.seed} "
        "--out {output:q} > {log:q} 2>&1"
