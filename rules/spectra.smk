# Spectra with Dask: one float64 pass (Gram + column sums per document group) per cached site, then eigh
# and the bootstrap replicates; one job per (model, dataset, layer) computes all its spectrum sites.
# With spectrum.mode: streamed the moments come from the caching job (results/moments/...) instead.


rule spectrum:
    input:
        source=spectrum_input,
    output:
        expand("results/spectra/{{model}}/{{dataset}}/L{{layer}}/{site}.npz", site=config["spectrum"]["sites"]),
    params:
        source=spectrum_source_args,
        sites=config["spectrum"]["sites"],
        n_vectors=(
            f"--n-vectors {config['spectrum']['n_vectors']}" if config["spectrum"]["n_vectors"] else ""
        ),
        bootstrap=spectrum_bootstrap_args(),
    log:
        "results/logs/spectrum/{model}/{dataset}/L{layer}.log",
    benchmark:
        "results/benchmarks/spectrum/{model}/{dataset}/L{layer}.tsv"
    threads: 1
    priority: SPECTRUM_PRIORITY
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace spectrum {params.source} --sites {params.sites} {params.n_vectors} {params.bootstrap} "
        "--threads {threads} --out {output:q} > {log:q} 2>&1"


rule intrinsic_dim_table:
    input:
        spectra=all_spectra(),
        code=[CODE / "spectrum.py", CODE / "intervals.py"],
    output:
        table="results/tables/intrinsic_dim.csv",
        convergence="results/tables/id_convergence.csv",
    params:
        thresholds=config["spectrum"]["thresholds"],
        level=config["spectrum"]["bootstrap"]["level"],
    log:
        "results/logs/intrinsic_dim_table.log",
    benchmark:
        "results/benchmarks/intrinsic_dim_table.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace idim-table --spectra {input.spectra:q} --thresholds {params.thresholds} --level {params.level} "
        "--out {output.table:q} --out-convergence {output.convergence:q} > {log:q} 2>&1"


rule spectra_table:
    input:
        spectra=all_spectra(),
    output:
        "results/tables/spectra.csv",
    params:
        focus_layers=FOCUS_LAYERS,
    log:
        "results/logs/spectra_table.log",
    benchmark:
        "results/benchmarks/spectra_table.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace spectra-table --spectra {input.spectra:q} --focus-layers {params.focus_layers:q} --out {output:q} > {log:q} 2>&1"
