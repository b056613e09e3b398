# Where the low rank comes from (Figure 3): O = Z W^O decomposed along the principal
# directions of O, from the cached attn_z / attn_out of every configured layer (spectrum.mode:
# stored) or their moments streamed by the caching job (streamed), and the model's o_proj
# weights; plus W^O's own spectrum and a per-layer summary.


rule wo_decomposition:
    input:
        model=prepared_model,
        source=wo_input,
    output:
        decomposition="results/wo/{model}/{dataset}/decomposition.csv",
        spectrum="results/wo/{model}/{dataset}/wo_spectrum.csv",
        summary="results/wo/{model}/{dataset}/summary.csv",
    params:
        model_dir="resources/models/{model}/hf",
        dtype=lambda w: model_cfg(w)["dtype"],
        source=wo_source_args,
        threshold=config["spectrum"]["threshold"],
    log:
        "results/logs/wo_decomposition/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/wo_decomposition/{model}/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace wo-decomposition --model-dir {params.model_dir:q} --dtype {params.dtype} "
        "{params.source} --model {wildcards.model} --dataset {wildcards.dataset} "
        "--threshold {params.threshold} --threads {threads} --decomposition {output.decomposition:q} "
        "--spectrum {output.spectrum:q} --summary {output.summary:q} > {log:q} 2>&1"


rule wo_tables:
    input:
        decomposition=wo_outputs("decomposition"),
        spectrum=wo_outputs("wo_spectrum"),
        summary=wo_outputs("summary"),
    output:
        decomposition="results/tables/wo_decomposition.csv",
        spectrum="results/tables/wo_spectrum.csv",
        summary="results/tables/wo_summary.csv",
    log:
        "results/logs/wo_tables.log",
    benchmark:
        "results/benchmarks/wo_tables.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace concat-tables --inputs {input.decomposition:q} --out {output.decomposition:q} "
        "--inputs {input.spectrum:q} --out {output.spectrum:q} "
        "--inputs {input.summary:q} --out {output.summary:q} > {log:q} 2>&1"


rule fig3:
    input:
        text=caption_text("fig3"),
        tables=wo_outputs("decomposition", datasets=[config["focus"]["dataset"]]),
        code=FIGURE_CODE,
    output:
        pdf=report(
            "results/figures/fig3.pdf",
            category="4.3 The low rank comes from W^O",
            caption=report_caption("fig3"),
        ),
        png="results/figures/fig3.png",
        csv="results/figures/fig3.csv",
        caption="results/figures/fig3.caption.rst",
    params:
        dataset=config["focus"]["dataset"],
        focus_layers=FOCUS_LAYERS,
    log:
        "results/logs/figures/fig3.log",
    benchmark:
        "results/benchmarks/figures/fig3.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace figure fig3 --caption {input.text:q} --table {input.tables:q} --dataset {params.dataset} "
        "--focus-layers {params.focus_layers:q} --out {output.pdf:q} > {log:q} 2>&1"
