# Figures: each a named rule figN writing results/figures/figN.{pdf,png,csv}.
# The plotting code is an input, so editing it redraws the figures (and nothing else).

FOCUS = config["focus"]


rule fig1:
    input:
        text=caption_text("fig1"),
        table="results/tables/intrinsic_dim.csv",
        code=FIGURE_CODE,
    output:
        pdf=report(
            "results/figures/fig1.pdf",
            category="4.2 Low-rank structure of attention outputs",
            caption=report_caption("fig1"),
        ),
        png="results/figures/fig1.png",
        csv="results/figures/fig1.csv",
        caption="results/figures/fig1.caption.rst",
    params:
        threshold=config["spectrum"]["threshold"],
    log:
        "results/logs/figures/fig1.log",
    benchmark:
        "results/benchmarks/figures/fig1.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace figure fig1 --caption {input.text:q} --table {input.table:q} --threshold {params.threshold} "
        "--out {output.pdf:q} > {log:q} 2>&1"


rule fig2a:
    input:
        text=caption_text("fig2a"),
        spectra=fig2a_spectra(),
        code=FIGURE_CODE,
    output:
        pdf=report(
            "results/figures/fig2a.pdf",
            category="4.2 Low-rank structure of attention outputs",
            caption=report_caption("fig2a"),
        ),
        png="results/figures/fig2a.png",
        csv="results/figures/fig2a.csv",
        caption="results/figures/fig2a.caption.rst",
    params:
        focus=f"--model {FOCUS['model']} --dataset {FOCUS['dataset']} --layer {FOCUS['layer']}",
    log:
        "results/logs/figures/fig2a.log",
    benchmark:
        "results/benchmarks/figures/fig2a.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace figure fig2a --caption {input.text:q} --spectra {input.spectra:q} {params.focus} --out {output.pdf:q} > {log:q} 2>&1"


rule fig8:
    input:
        text=caption_text("fig8"),
        spectra=fig8_spectra(),
        code=FIGURE_CODE,
    output:
        pdf=report(
            "results/figures/fig8.pdf",
            category="C Other models and datasets",
            caption=report_caption("fig8"),
        ),
        png="results/figures/fig8.png",
        csv="results/figures/fig8.csv",
        caption="results/figures/fig8.caption.rst",
    params:
        focus_layers=FOCUS_LAYERS,
    log:
        "results/logs/figures/fig8.log",
    benchmark:
        "results/benchmarks/figures/fig8.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace figure fig8 --caption {input.text:q} --spectra {input.spectra:q} "
        "--focus-layers {params.focus_layers:q} --out {output.pdf:q} > {log:q} 2>&1"


rule convergence:
    input:
        text=caption_text("convergence"),
        table="results/tables/id_convergence.csv",
        code=FIGURE_CODE,
    output:
        pdf=report(
            "results/figures/convergence.pdf",
            category="4.2 Low-rank structure of attention outputs",
            caption=report_caption("convergence"),
        ),
        png="results/figures/convergence.png",
        csv="results/figures/convergence.csv",
        caption="results/figures/convergence.caption.rst",
    params:
        threshold=config["spectrum"]["threshold"],
    log:
        "results/logs/figures/convergence.log",
    benchmark:
        "results/benchmarks/figures/convergence.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace figure convergence --caption {input.text:q} --table {input.table:q} --threshold {params.threshold} "
        "--out {output.pdf:q} > {log:q} 2>&1"


rule fig9:
    input:
        text=caption_text("fig9"),
        table="results/tables/intrinsic_dim.csv",
        code=FIGURE_CODE,
    output:
        pdf=report(
            "results/figures/fig9.pdf",
            category="D Other variance thresholds",
            caption=report_caption("fig9"),
        ),
        png="results/figures/fig9.png",
        csv="results/figures/fig9.csv",
        caption="results/figures/fig9.caption.rst",
    params:
        thresholds=config["figures"]["fig9"]["thresholds"],
    log:
        "results/logs/figures/fig9.log",
    benchmark:
        "results/benchmarks/figures/fig9.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace figure fig9 --caption {input.text:q} --table {input.table:q} --thresholds {params.thresholds} "
        "--out {output.pdf:q} > {log:q} 2>&1"
