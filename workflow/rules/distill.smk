# Stage 3: the students (`hetcomp distill`). Every method distils the same ensemble of its
# (dataset, seed); methods without a teacher (w/o KD) need none. The single-teacher controls
# distil one teacher of that ensemble alone (`--teacher NAME`).
# A method whose YAML has a `tune` grid is first tuned per dataset on the tuning seed
# (`hetcomp tune`, config `tune`); its runs and controls then train the chosen point (`--tuned`).
# Each grid point is its own job (`tune_point`, in parallel where cores or nodes allow); `tune`
# then chooses on validation from the finished points (it trains nothing itself).
# With `reference.use`, a tuning that has a record is copied into the work folder instead
# (`restore_tuning`), so runs read the work folder's tuning whether or not it is recorded.


rule tune_point:
    input:
        unpack(tune_inputs),
    output:
        temp(f"{WORK}/tuning/{{dataset}}/{{method}}.partial/point{{index}}.done.pt"),
    params:
        hetcomp=hetcomp,
        ensemble=ensemble_arg,
        seed=TUNE_SEED,
        device=DEVICE,
        out=lambda wildcards: tuning_dir(wildcards.dataset, wildcards.method),
    log:
        f"{WORK}/logs/tuning/{{dataset}}/{{method}}.point{{index}}.log",
    benchmark:
        f"{WORK}/benchmarks/tuning/{{dataset}}/{{method}}.point{{index}}.tsv"
    threads: threads("distill")
    resources:
        mem_mb=mem_mb("distill"),
        runtime=runtime("distill"),
        gpu=gpus("distill"),
    conda:
        CONDA_ENV
    shell:
        "{params.hetcomp} tune --method {wildcards.method} --split {input.split} {params.ensemble}"
        " --config {input.config} --seed {params.seed} --device {params.device} --out {params.out}"
        " --point {wildcards.index} > {log} 2>&1"


rule tune:
    input:
        unpack(tune_inputs),
        points=tune_points,
    output:
        directory(f"{WORK}/tuning/{{dataset}}/{{method}}"),
    params:
        hetcomp=hetcomp,
        ensemble=ensemble_arg,
        seed=TUNE_SEED,
        device=DEVICE,
    log:
        f"{WORK}/logs/tuning/{{dataset}}/{{method}}.log",
    benchmark:
        f"{WORK}/benchmarks/tuning/{{dataset}}/{{method}}.tsv"
    threads: 1
    resources:
        mem_mb=mem_mb("distill"),
        runtime=runtime("distill"),
        gpu=gpus("distill"),  # the points' device is part of their identity: the same device here
    conda:
        CONDA_ENV
    shell:
        "{params.hetcomp} tune --method {wildcards.method} --split {input.split} {params.ensemble}"
        " --config {input.config} --seed {params.seed} --device {params.device} --out {output} > {log} 2>&1"


# With `reference.use`, a recorded tuning is copied into the work folder instead of re-tuned.
ruleorder: restore_tuning > tune


rule restore_tuning:
    input:
        tuning_record_to_restore,
    output:
        directory(f"{WORK}/tuning/{{dataset}}/{{method}}"),
    params:
        marker=RESTORED_MARKER,
    log:
        f"{WORK}/logs/tuning/{{dataset}}/{{method}}.restore.log",
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "(cp -R {input} {output} && echo {input} > {output}/{params.marker}) > {log} 2>&1"


rule distill:
    input:
        unpack(distill_inputs),
    output:
        directory(f"{WORK}/runs/{{dataset}}/seed{{seed}}/{{method}}"),
    params:
        hetcomp=hetcomp,
        ensemble=ensemble_arg,
        tuned=tuned_arg,
        device=DEVICE,
    log:
        f"{WORK}/logs/runs/{{dataset}}/seed{{seed}}/{{method}}.log",
    benchmark:
        f"{WORK}/benchmarks/runs/{{dataset}}/seed{{seed}}/{{method}}.tsv"
    threads: threads("distill")
    resources:
        mem_mb=mem_mb("distill"),
        runtime=runtime("distill"),
        gpu=gpus("distill"),
    conda:
        CONDA_ENV
    shell:
        "{params.hetcomp} distill --method {wildcards.method} --split {input.split} {params.ensemble}"
        " --config {input.config} {params.tuned} --seed {wildcards.seed} --device {params.device}"
        " --out {output} > {log} 2>&1"


rule distill_control:
    input:
        unpack(control_inputs),
    output:
        directory(f"{WORK}/controls/{{dataset}}/seed{{seed}}/{{method}}/{{teacher}}"),
    params:
        hetcomp=hetcomp,
        tuned=tuned_arg,
        device=DEVICE,
    log:
        f"{WORK}/logs/controls/{{dataset}}/seed{{seed}}/{{method}}/{{teacher}}.log",
    benchmark:
        f"{WORK}/benchmarks/controls/{{dataset}}/seed{{seed}}/{{method}}/{{teacher}}.tsv"
    threads: threads("distill")
    resources:
        mem_mb=mem_mb("distill"),
        runtime=runtime("distill"),
        gpu=gpus("distill"),
    conda:
        CONDA_ENV
    shell:
        "{params.hetcomp} distill --method {wildcards.method} --split {input.split}"
        " --ensemble {input.ensemble} --teacher {wildcards.teacher} --config {input.config} {params.tuned}"
        " --seed {wildcards.seed} --device {params.device} --out {output} > {log} 2>&1"
