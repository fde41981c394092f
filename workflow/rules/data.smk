# Stage 1: raw files -> the frozen split of each dataset (`hetcomp prepare`).


rule prepare:
    input:
        unpack(prepare_inputs),
    output:
        directory(f"{WORK}/splits/{{dataset}}"),
    params:
        hetcomp=hetcomp,
        args=prepare_args,
    log:
        f"{WORK}/logs/prepare/{{dataset}}.log",
    benchmark:
        f"{WORK}/benchmarks/prepare/{{dataset}}.tsv"
    threads: threads("prepare")
    resources:
        mem_mb=mem_mb("prepare"),
        runtime=runtime("prepare"),
    conda:
        CONDA_ENV
    shell:
        "{params.hetcomp} prepare {params.args} --out {output} > {log} 2>&1"
