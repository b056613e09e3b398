# Loss recovered by principal components (Figure 2B): at the focus dataset and each
# model's focus layer, every site in interventions.sites is replaced by its mean plus
# its projection onto k principal directions (from its spectrum) for a grid of k,
# and next-token loss is measured on held-out tokens against zero ablation.


rule loss_recovered:
    input:
        model=prepared_model,
        tokens="results/tokens/{model}/{dataset}.npz",
        spectra=intervention_spectra,
    output:
        "results/interventions/{model}/{dataset}/L{layer}/loss_recovered.csv",
    params:
        model_dir="resources/models/{model}/hf",
        dtype=lambda w: model_cfg(w)["dtype"],
        n_tokens=config["interventions"]["heldout_tokens"],
        grid=json.dumps(config["interventions"]["k_grid"]),
        batch=config["interventions"]["batch"],
    log:
        "results/logs/loss_recovered/{model}/{dataset}/L{layer}.log",
    benchmark:
        "results/benchmarks/loss_recovered/{model}/{dataset}/L{layer}.tsv"
    threads: 1
    priority: MODEL_JOB_PRIORITY
    resources:
        gpu=GPU,
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace loss-recovered --model-dir {params.model_dir:q} --dtype {params.dtype} --tokens {input.tokens:q} "
        "--model {wildcards.model} --dataset {wildcards.dataset} --layer {wildcards.layer} "
        "--spectra {input.spectra:q} --heldout-tokens {params.n_tokens} --k-grid {params.grid:q} "
        "--batch {params.batch} --threads {threads} --out {output:q} > {log:q} 2>&1"


rule loss_recovered_table:
    input:
        curves=loss_recovered_curves(),
        code=CODE / "interventions.py",
    output:
        table="results/tables/loss_recovered.csv",
        summary="results/tables/loss_recovered_summary.csv",
    params:
        target=config["interventions"]["recovery_target"],
    log:
        "results/logs/loss_recovered_table.log",
    benchmark:
        "results/benchmarks/loss_recovered_table.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace loss-recovered-table --curves {input.curves:q} --target {params.target} "
        "--out {output.table:q} --summary {output.summary:q} > {log:q} 2>&1"


rule fig2b:
    input:
        text=caption_text("fig2b"),
        table="results/tables/loss_recovered.csv",
        summary="results/tables/loss_recovered_summary.csv",
        code=FIGURE_CODE,
    output:
        pdf=report(
            "results/figures/fig2b.pdf",
            category="4.2 Low-rank structure of attention outputs",
            caption=report_caption("fig2b"),
        ),
        png="results/figures/fig2b.png",
        csv="results/figures/fig2b.csv",
        caption="results/figures/fig2b.caption.rst",
    log:
        "results/logs/figures/fig2b.log",
    benchmark:
        "results/benchmarks/figures/fig2b.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace figure fig2b --caption {input.text:q} --table {input.table:q} --summary {input.summary:q} --out {output.pdf:q} > {log:q} 2>&1"
