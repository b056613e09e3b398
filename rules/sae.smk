# SAE training (TopK, base / ASI / random-subspace inits, Adam or SparseAdam, optional AuxK),
# the runs table and Figure 5 (dead fraction and NMSE against d_init).


rule train_sae:
    input:
        cache=sae_caches,
        spectrum="results/spectra/{model}/{dataset}/L{layer}/{site}.npz",
        tokens="results/tokens/{model}/{dataset}.npz",
        model=prepared_model,
    output:
        "results/saes/{model}/{dataset}/L{layer}/{site}/{run}/metrics.json",
    params:
        store=lambda w: sae_store(w.model, w.dataset, w.layer),
        heldout="results/activations/{model}/{dataset}/heldout/L{layer}.manifest.json",
        model_dir="resources/models/{model}/hf",
        dtype=lambda w: model_cfg(w)["dtype"],
        settings=sae_settings,
        out_dir=lambda w, output: os.path.dirname(output[0]),
    log:
        "results/logs/train_sae/{model}/{dataset}/L{layer}/{site}/{run}.log",
    benchmark:
        "results/benchmarks/train_sae/{model}/{dataset}/L{layer}/{site}/{run}.tsv"
    threads: 1
    resources:
        gpu=GPU,
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace train-sae --store {params.store} --heldout {params.heldout} --spectrum {input.spectrum} "
        "--site {wildcards.site} --run {wildcards.run} {params.settings} "
        "--model-dir {params.model_dir} --dtype {params.dtype} --tokens {input.tokens} --layer {wildcards.layer} "
        "--threads {threads} --out-dir {params.out_dir} > {log} 2>&1"


rule sae_runs_table:
    input:
        runs=all_sae_runs(),
        code=CODE / "sae" / "runs.py",
    output:
        "results/tables/sae_runs.csv",
    log:
        "results/logs/sae_runs_table.log",
    benchmark:
        "results/benchmarks/sae_runs_table.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace sae-runs-table --metrics {input.runs} --out {output} > {log} 2>&1"


rule fig5:
    input:
        text=caption_text("fig5"),
        runs=fig5_runs(),
        code=FIGURE_CODE,
    output:
        pdf=report(
            "results/figures/fig5.pdf",
            category="5.2 Active subspace initialisation",
            caption=report_caption("fig5"),
        ),
        png="results/figures/fig5.png",
        csv="results/figures/fig5.csv",
        caption="results/figures/fig5.caption.rst",
    params:
        focus=fig5_focus_args(),
    log:
        "results/logs/figures/fig5.log",
    benchmark:
        "results/benchmarks/figures/fig5.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace figure fig5 --caption {input.text} --metrics {input.runs} {params.focus} --out {output.pdf} > {log} 2>&1"


rule fig6:
    input:
        text=caption_text("fig6"),
        runs=fig6_runs(),
        code=FIGURE_CODE,
    output:
        pdf=report(
            "results/figures/fig6.pdf",
            category="5.2 Active subspace initialisation",
            caption=report_caption("fig6"),
        ),
        png="results/figures/fig6.png",
        csv="results/figures/fig6.csv",
        caption="results/figures/fig6.caption.rst",
    params:
        sweep=sweep_args("fig6"),
    log:
        "results/logs/figures/fig6.log",
    benchmark:
        "results/benchmarks/figures/fig6.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace figure fig6 --caption {input.text} --metrics {input.runs} {params.sweep} --out {output.pdf} > {log} 2>&1"


rule fig7:
    input:
        text=caption_text("fig7"),
        runs=fig7_runs(),
        code=FIGURE_CODE,
    output:
        pdf=report(
            "results/figures/fig7.pdf",
            category="5.3 Scaling laws",
            caption=report_caption("fig7"),
        ),
        png="results/figures/fig7.png",
        csv="results/figures/fig7.csv",
        caption="results/figures/fig7.caption.rst",
    params:
        sweep=sweep_args("fig7"),
    log:
        "results/logs/figures/fig7.log",
    benchmark:
        "results/benchmarks/figures/fig7.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace figure fig7 --caption {input.text} --metrics {input.runs} {params.sweep} --out {output.pdf} > {log} 2>&1"
