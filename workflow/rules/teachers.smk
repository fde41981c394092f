# Stage 2: the heterogeneous teachers (`hetcomp train-teacher`), one run per (dataset, seed, teacher),
# shared by every method of that dataset and seed; then their ensemble (`hetcomp build-ensemble`).
# With `reference.use`, a recorded teacher or ensemble that is needed again (its seed has students
# left to train) retrains with its record's thread count, and the rebuilt ensemble must equal its
# record (`--expect-record`), since the recorded students of that seed distilled it.


rule train_teacher:
    input:
        split=f"{WORK}/splits/{{dataset}}",
        config=teacher_config,
    output:
        directory(f"{WORK}/teachers/{{dataset}}/seed{{seed}}/{{teacher}}"),
    params:
        hetcomp=hetcomp,
        device=DEVICE,
    log:
        f"{WORK}/logs/teachers/{{dataset}}/seed{{seed}}/{{teacher}}.log",
    benchmark:
        f"{WORK}/benchmarks/teachers/{{dataset}}/seed{{seed}}/{{teacher}}.tsv"
    threads: threads_as_recorded("teacher", lambda w: teacher_dir(w.dataset, w.seed, w.teacher))
    resources:
        mem_mb=mem_mb("teacher"),
        runtime=runtime("teacher"),
        gpu=gpus("teacher"),
    conda:
        CONDA_ENV
    shell:
        "{params.hetcomp} train-teacher --model {wildcards.teacher} --split {input.split}"
        " --config {input.config} --seed {wildcards.seed} --device {params.device}"
        " --out {output} > {log} 2>&1"


rule build_ensemble:
    input:
        split=f"{WORK}/splits/{{dataset}}",
        teachers=seed_teachers,
    output:
        directory(f"{WORK}/ensembles/{{dataset}}/seed{{seed}}"),
    params:
        hetcomp=hetcomp,
        top_k=config["ensemble"]["top_k"],
        observed=config["ensemble"]["observed"],
        temperature=config["ensemble"]["temperature"],
        expect_record=expect_record_arg,
    log:
        f"{WORK}/logs/ensembles/{{dataset}}/seed{{seed}}.log",
    benchmark:
        f"{WORK}/benchmarks/ensembles/{{dataset}}/seed{{seed}}.tsv"
    threads: threads_as_recorded("ensemble", lambda w: ensemble_dir(w.dataset, w.seed))
    resources:
        mem_mb=mem_mb("ensemble"),
        runtime=runtime("ensemble"),
    conda:
        CONDA_ENV
    shell:
        "{params.hetcomp} build-ensemble --split {input.split} --teachers {input.teachers}"
        " --top-k {params.top_k} --observed {params.observed} --temperature {params.temperature}"
        " {params.expect_record} --out {output} > {log} 2>&1"
