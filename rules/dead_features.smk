# Dead features of a LlamaScope-format SAE suite (one SAE per layer and site) against
# the intrinsic dimension of those sites: Figure 4. The embedded default trains its own
# suite (rules/sae.smk, base init); the paper config fetches the released LlamaScope SAEs.


rule fetch_llamascope:
    output:
        "resources/llamascope/{model}/L{layer}/{site}/hyperparams.json",
    params:
        repo=lambda w: llamascope_repo(w),
        folder=lambda w: llamascope_folder(w),
        out_dir=lambda w, output: os.path.dirname(output[0]),
    log:
        "results/logs/fetch_llamascope/{model}/L{layer}/{site}.log",
    benchmark:
        "results/benchmarks/fetch_llamascope/{model}/L{layer}/{site}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace fetch-llamascope --repo {params.repo:q} --folder {params.folder:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"


rule dead_features:
    input:
        sae=suite_sae,
        cache="results/activations/{model}/{dataset}/cache.json",
    output:
        "results/dead_features/{model}/{dataset}/L{layer}/{site}.json",
    params:
        sae_dir=lambda w, input: os.path.dirname(input.sae),
        store="results/activations/{model}/{dataset}/heldout/L{layer}.zarr",
        tokens=(
            f"--tokens {config['suite']['eval_tokens']}" if config["suite"]["eval_tokens"] else ""
        ),
    log:
        "results/logs/dead_features/{model}/{dataset}/L{layer}/{site}.log",
    benchmark:
        "results/benchmarks/dead_features/{model}/{dataset}/L{layer}/{site}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace dead-features {params.sae_dir:q} {params.store:q} --site {wildcards.site} {params.tokens} "
        "--out {output:q} > {log:q} 2>&1"


rule dead_features_table:
    input:
        records=all_dead_feature_records(),
        spectra=suite_spectra(),
        code=CODE / "dead_features.py",
    output:
        "results/tables/dead_features.csv",
    params:
        threshold=config["spectrum"]["threshold"],
    log:
        "results/logs/dead_features_table.log",
    benchmark:
        "results/benchmarks/dead_features_table.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace dead-features-table --records {input.records:q} --spectra {input.spectra:q} "
        "--threshold {params.threshold} --out {output:q} > {log:q} 2>&1"


rule fig4:
    input:
        text=caption_text("fig4"),
        table="results/tables/dead_features.csv",
        code=FIGURE_CODE,
    output:
        pdf=report(
            "results/figures/fig4.pdf",
            category="5.1 Dead features and intrinsic dimension",
            caption=report_caption("fig4"),
        ),
        png="results/figures/fig4.png",
        csv="results/figures/fig4.csv",
        caption="results/figures/fig4.caption.rst",
    log:
        "results/logs/figures/fig4.log",
    benchmark:
        "results/benchmarks/figures/fig4.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace figure fig4 --caption {input.text:q} --table {input.table:q} --out {output.pdf:q} > {log:q} 2>&1"
