# The verdict: the claims table from the data behind the figures, and the README gallery.


rule claims:
    input:
        unpack(claims_inputs),
        code=CODE / "claims.py",
    output:
        csv=report(
            "results/claims.csv",
            category="0 Claims of the paper",
            caption="../docs/captions/claims.rst",
        ),
        md="results/claims.md",
    params:
        data=lambda w, input: " ".join(f"--{k} {input[k]}" for k in claims_inputs(w)),
        threshold=config["spectrum"]["threshold"],
    log:
        "results/logs/claims.log",
    benchmark:
        "results/benchmarks/claims.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace claims {params.data} --threshold {params.threshold} --out-csv {output.csv:q} --out-md {output.md:q} > {log:q} 2>&1"


rule gallery:
    """Small PNGs of every figure and the claims table under docs/gallery/ (committed), and the
    README's gallery and claims blocks (between their <!-- ... --> markers) refreshed from them."""
    input:
        figures=expand("results/figures/{name}.png", name=config["figures"]),
        captions=[caption_text(name) for name in config["figures"]],
        claims="results/claims.md",
    output:
        figures=expand("docs/gallery/{name}.png", name=config["figures"]),
        claims="docs/gallery/claims.md",
    params:
        readme="README.md",
        width=900,
    log:
        "results/logs/gallery.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace gallery --figures {input.figures:q} --captions {input.captions:q} --claims {input.claims:q} "
        "--out-dir docs/gallery --width {params.width} --readme {params.readme:q} > {log:q} 2>&1"
