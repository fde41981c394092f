# hetcomp-bench: the whole reproduction as one Snakemake DAG.
#
#   snakemake --cores all                                # one seed of CiteULike-t (config/config.yaml)
#   snakemake --profile profiles/slurm --configfile config/paper.yaml   # the paper's grid, on a cluster
#   snakemake --cores 2 --configfile .test/config.yaml   # the tiny end-to-end check (minutes, CPU)
#   snakemake --report report.html                       # tables and figures with captions
#
# Partial targets: data, teachers, ensembles, runs, tables, figures (e.g. `snakemake --cores 4 teachers`).
# Every rule calls the `hetcomp` command line with explicit paths; the rules hold no model logic.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


# common.smk first validates the config against workflow/schemas/config.schema.yaml (and fills
# in the schema's defaults), then checks the raw data.
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teachers.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/report.smk"


localrules:
    all,
    data,
    teachers,
    ensembles,
    runs,
    tables,
    figures,
    aggregate,
    report_tables,
    report_figures,
    restore_tuning,


onstart:
    print_plan()


rule all:
    input:
        table_files(),
        figure_files(),
    default_target: True


rule data:
    input:
        all_splits(),


rule teachers:
    input:
        all_teacher_runs(),


rule ensembles:
    input:
        all_ensembles(),


rule runs:
    input:
        all_student_runs(),
        all_control_runs(),


rule tables:
    input:
        table_files(),


rule figures:
    input:
        figure_files(),
