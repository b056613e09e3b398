# Lorsa (low-rank sparse attention) at the focus layer: vanilla init vs active-subspace
# init of its output vectors, same data order; lorsa.seeds replicates of each (replicate n seeded
# lorsa.seed + n); Table 1.


rule train_lorsa:
    input:
        cache="results/activations/{model}/{dataset}/cache.json",
        spectrum="results/spectra/{model}/{dataset}/L{layer}/attn_out.npz",
        model=prepared_model,
    output:
        "results/lorsa/{model}/{dataset}/L{layer}/{init}-r{replicate}/metrics.json",
    params:
        store="results/activations/{model}/{dataset}/L{layer}.manifest.json",
        heldout="results/activations/{model}/{dataset}/heldout/L{layer}.manifest.json",
        model_dir="resources/models/{model}/hf",
        settings=lorsa_settings,
        out_dir=lambda w, output: os.path.dirname(output[0]),
    log:
        "results/logs/train_lorsa/{model}/{dataset}/L{layer}/{init}-r{replicate}.log",
    benchmark:
        "results/benchmarks/train_lorsa/{model}/{dataset}/L{layer}/{init}-r{replicate}.tsv"
    threads: 1
    priority: 20  # between the SAE groups, by its work (sae_group_priority in common.smk)
    resources:
        gpu=GPU,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace train-lorsa --store {params.store:q} --heldout {params.heldout:q} --spectrum {input.spectrum:q} "
        "--model-dir {params.model_dir:q} --init {wildcards.init} {params.settings} --threads {threads} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"


rule table1:
    input:
        runs=all_lorsa_runs(),
        code=CODE / "lorsa" / "table.py",
    output:
        csv=report(
            "results/tables/table1_lorsa.csv",
            category="5.4 Lorsa (sparse replacement models)",
            caption="../docs/captions/table1.rst",
        ),
        md="results/tables/table1_lorsa.md",
    log:
        "results/logs/table1.log",
    benchmark:
        "results/benchmarks/table1.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace lorsa-table --metrics {input.runs:q} --csv {output.csv:q} --md {output.md:q} > {log:q} 2>&1"
