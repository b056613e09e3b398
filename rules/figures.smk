# Figures: each a named rule figN writing results/figures/figN.{pdf,png,csv}.
# The plotting code is an input, so editing it redraws the figures (and nothing else).

FOCUS = config["focus"]


rule fig1:
    input:
        table="results/tables/intrinsic_dim.csv",
        code=CODE / "figures.py",
    output:
        pdf=report(
            "results/figures/fig1.pdf",
            category="4 Low-rank structure",
            caption="../docs/captions/fig1.rst",
        ),
        png="results/figures/fig1.png",
        csv="results/figures/fig1.csv",
    params:
        threshold=config["figures"].get("fig1", {}).get("threshold", 0.99),
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
        "attnspace figure fig1 --table {input.table} --threshold {params.threshold} "
        "--out {output.pdf} > {log} 2>&1"


rule fig2a:
    input:
        table="results/tables/spectra.csv",
        code=CODE / "figures.py",
    output:
        pdf=report(
            "results/figures/fig2a.pdf",
            category="4 Low-rank structure",
            caption="../docs/captions/fig2a.rst",
        ),
        png="results/figures/fig2a.png",
        csv="results/figures/fig2a.csv",
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
        "attnspace figure fig2a --table {input.table} {params.focus} --out {output.pdf} > {log} 2>&1"


rule fig8:
    input:
        table="results/tables/spectra.csv",
        code=CODE / "figures.py",
    output:
        pdf=report(
            "results/figures/fig8.pdf",
            category="C Other models and datasets",
            caption="../docs/captions/fig8.rst",
        ),
        png="results/figures/fig8.png",
        csv="results/figures/fig8.csv",
    params:
        focus=f"--model {FOCUS['model']} --dataset {FOCUS['dataset']}",
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
        "attnspace figure fig8 --table {input.table} {params.focus} --out {output.pdf} > {log} 2>&1"


rule fig9:
    input:
        table="results/tables/intrinsic_dim.csv",
        code=CODE / "figures.py",
    output:
        pdf=report(
            "results/figures/fig9.pdf",
            category="D Other variance thresholds",
            caption="../docs/captions/fig9.rst",
        ),
        png="results/figures/fig9.png",
        csv="results/figures/fig9.csv",
    params:
        thresholds=config["figures"].get("fig9", {}).get("thresholds", [0.5, 0.9, 0.999, 0.9999]),
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
        "attnspace figure fig9 --table {input.table} --thresholds {params.thresholds} "
        "--out {output.pdf} > {log} 2>&1"
