# Stage 4: inference cost (`hetcomp cost`), the long table of every run (`hetcomp aggregate`) and
# the paper's tables and figures (`hetcomp report`).


rule cost:
    input:
        split=f"{WORK}/splits/{{dataset}}",
        ensemble=f"{WORK}/ensembles/{{dataset}}/seed{{seed}}",
        teachers=seed_teachers,
        students=seed_students,
    output:
        directory(f"{WORK}/cost/{{dataset}}/seed{{seed}}"),
    params:
        hetcomp=hetcomp,
        device=DEVICE,
        batch_size=config["cost"]["batch_size"],
        k=config["cost"]["k"],
        repeats=config["cost"]["repeats"],
        warmup=config["cost"]["warmup"],
    log:
        f"{WORK}/logs/cost/{{dataset}}/seed{{seed}}.log",
    benchmark:
        f"{WORK}/benchmarks/cost/{{dataset}}/seed{{seed}}.tsv"
    threads: threads("cost")
    resources:
        mem_mb=mem_mb("cost"),
        runtime=runtime("cost"),
        gpu=gpus("cost"),
    conda:
        CONDA_ENV
    shell:
        "{params.hetcomp} cost --split {input.split} --ensemble {input.ensemble}"
        " --teachers {input.teachers} --students {input.students} --batch-size {params.batch_size}"
        " --k {params.k} --repeats {params.repeats} --warmup {params.warmup} --seed {wildcards.seed}"
        " --device {params.device} --out {output} > {log} 2>&1"


rule aggregate:
    input:
        splits=all_splits(),
        teachers=recorded_all(all_teacher_runs()),
        ensembles=recorded_all(all_ensembles()),
        students=recorded_all(all_student_runs() + all_control_runs()),
        cost=recorded_all(all_cost_dirs()),
        tuning=recorded_all(all_tuning_dirs()),
    output:
        long=f"{RESULTS}/long.csv",
        extras=directory(f"{WORK}/aggregate"),
    params:
        hetcomp=hetcomp,
        cost=lambda wildcards, input: f"--cost {input.cost}" if input.cost else "",
        tuning=lambda wildcards, input: f"--tuning {input.tuning}" if input.tuning else "",
    log:
        f"{WORK}/logs/aggregate.log",
    benchmark:
        f"{WORK}/benchmarks/aggregate.tsv"
    threads: threads("report")
    resources:
        mem_mb=mem_mb("report"),
        runtime=runtime("report"),
    conda:
        CONDA_ENV
    shell:
        "{params.hetcomp} aggregate --splits {input.splits} --teachers {input.teachers}"
        " --ensembles {input.ensembles} --students {input.students} {params.cost} {params.tuning}"
        " --out {output.long} --extras {output.extras} > {log} 2>&1"


rule report_tables:
    input:
        long=f"{RESULTS}/long.csv",
        extras=f"{WORK}/aggregate",
        paper=config["report"]["paper_results"],
    output:
        main=report(f"{RESULTS}/tables/main.md", caption="../report/main.rst", category="Tables"),
        main_tex=report(f"{RESULTS}/tables/main.tex", caption="../report/main_tex.rst", category="Tables"),
        teachers=report(f"{RESULTS}/tables/teachers.md", caption="../report/teachers.rst",
                        category="Tables"),
        cost=report(f"{RESULTS}/tables/cost.md", caption="../report/cost.rst", category="Tables"),
        datasets=report(f"{RESULTS}/tables/datasets.md", caption="../report/datasets.rst",
                        category="Tables"),
        paper=report(f"{RESULTS}/tables/paper_comparison.md", caption="../report/paper_comparison.rst",
                     category="Tables"),
        tuning=report(f"{RESULTS}/tables/tuning.md", caption="../report/tuning.rst", category="Tables"),
        claims=report(f"{RESULTS}/tables/claims.md", caption="../report/claims.rst", category="Tables"),
        ablation=report(f"{RESULTS}/tables/ablation.md", caption="../report/ablation.rst", category="Tables"),
        per_seed=report(f"{RESULTS}/tables/per_seed.md", caption="../report/per_seed.rst", category="Tables"),
        reproduction=report(f"{RESULTS}/tables/reproduction.md", caption="../report/reproduction.rst",
                            category="Tables"),
    params:
        hetcomp=hetcomp,
        args=report_args,
        tables=output_folder,
    log:
        f"{WORK}/logs/report_tables.log",
    benchmark:
        f"{WORK}/benchmarks/report_tables.tsv"
    threads: threads("report")
    resources:
        mem_mb=mem_mb("report"),
        runtime=runtime("report"),
    conda:
        CONDA_ENV
    shell:
        "{params.hetcomp} report {params.args} --tables-dir {params.tables} > {log} 2>&1"


rule report_figures:
    input:
        long=f"{RESULTS}/long.csv",
        extras=f"{WORK}/aggregate",
    output:
        curves=report(f"{RESULTS}/figures/training_curves.png", caption="../report/training_curves.rst",
                      category="Figures"),
        selection=report(f"{RESULTS}/figures/checkpoint_selection.png",
                         caption="../report/checkpoint_selection.rst", category="Figures"),
        cost=report(f"{RESULTS}/figures/accuracy_vs_cost.png", caption="../report/accuracy_vs_cost.rst",
                    category="Figures"),
        discrepancy=report(f"{RESULTS}/figures/discrepancy.png", caption="../report/discrepancy.rst",
                           category="Figures"),
        homogeneous=report(f"{RESULTS}/figures/homogeneous_vs_heterogeneous.png",
                           caption="../report/homogeneous_vs_heterogeneous.rst", category="Figures"),
    params:
        hetcomp=hetcomp,
        args=report_args,
        figures=output_folder,
    log:
        f"{WORK}/logs/report_figures.log",
    benchmark:
        f"{WORK}/benchmarks/report_figures.tsv"
    threads: threads("report")
    resources:
        mem_mb=mem_mb("report"),
        runtime=runtime("report"),
    conda:
        CONDA_ENV
    shell:
        "{params.hetcomp} report {params.args} --figures-dir {params.figures} > {log} 2>&1"
