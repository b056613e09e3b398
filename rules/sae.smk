# SAE training (TopK, base / ASI / random-subspace inits, Adam or SparseAdam, optional AuxK),
# the runs table and Figure 5 (dead fraction and NMSE against d_init).


# One job per SAE group (rules/common.smk: sae_groups): its runs share one stream of activations.
for group in sae_groups():

    rule:
        name:
            group["rule"]
        input:
            cache=sae_caches(group["model"], group["dataset"], group["layer"]),
            spectrum=spectrum_file(group["model"], group["dataset"], group["layer"], group["site"]),
            tokens=f"results/tokens/{group['model']}/{group['dataset']}.npz",
            model=f"resources/models/{group['model']}/prepared.json",
        output:
            group["outputs"],
        params:
            store=sae_store(group["model"], group["dataset"], group["layer"]),
            heldout=f"results/activations/{group['model']}/{group['dataset']}/heldout/L{group['layer']}.manifest.json",
            model_dir=f"resources/models/{group['model']}/hf",
            dtype=config["models"][group["model"]]["dtype"],
            site=group["site"],
            layer=group["layer"],
            stream=sae_stream_args(group),
            members=sae_member_args(group),
            ranks=group["ranks"],
            rank_logs=f"results/logs/train_sae/{group['rule']}.ranks",
        log:
            f"results/logs/train_sae/{group['rule']}.log",
        benchmark:
            f"results/benchmarks/train_sae/{group['rule']}.tsv"
        threads: sae_group_threads()
        priority: sae_group_priority(group)
        resources:
            **sae_group_resources(group),
        conda:
            "../envs/attnspace.yaml"
        shell:
            "attnspace train-sae-group --store {params.store:q} --heldout {params.heldout:q} --spectrum {input.spectrum:q} "
            "--site {params.site} {params.stream} "
            "--model-dir {params.model_dir:q} --dtype {params.dtype} --tokens {input.tokens:q} --layer {params.layer} "
            "--threads {threads} --ranks {params.ranks} --rank-logs {params.rank_logs:q} {params.members} > {log:q} 2>&1"


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
        "attnspace sae-runs-table --metrics {input.runs:q} --out {output:q} > {log:q} 2>&1"


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
        "attnspace figure fig5 --caption {input.text:q} --metrics {input.runs:q} {params.focus} --out {output.pdf:q} > {log:q} 2>&1"


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
        "attnspace figure fig6 --caption {input.text:q} --metrics {input.runs:q} {params.sweep} --out {output.pdf:q} > {log:q} 2>&1"


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
        "attnspace figure fig7 --caption {input.text:q} --metrics {input.runs:q} {params.sweep} --out {output.pdf:q} > {log:q} 2>&1"
