# Shared helpers: paths of every stage, the interpreter, per-dataset resources.
# No model logic here: everything below only computes file names and command-line fragments.
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

REPO_ROOT = Path(workflow.basedir).resolve()

# Without --use-conda, rules run in the Python environment Snakemake itself runs in (so
# `.venv/bin/snakemake` works without activating the venv); with it, in the rule's conda env.
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    PYTHON = "python"
else:
    PYTHON = config["python"] or sys.executable

WORK = config["workdir"].rstrip("/")
RESULTS = config["results_dir"].rstrip("/")
DEVICE = config["device"]
CONDA_ENV = "../envs/hetcomp.yaml"

# Method names may not contain '/'; the numeric seed follows "seed".
wildcard_constraints:
    dataset=r"[^/]+",
    seed=r"\d+",
    teacher=r"[^/]+",
    method=r"[^/]+",


def _check_config():
    unknown = sorted(set(config["control"]["teachers"]) - set(config["teachers"]))
    if unknown:
        raise WorkflowError(
            f"control.teachers {unknown} are not in teachers {config['teachers']}: "
            "a single-teacher control distils one teacher of the ensemble"
        )
    cost_seed = config["cost"]["seed"]
    if cost_seed is not None and int(cost_seed) not in [int(s) for s in config["seeds"]]:
        raise WorkflowError(f"cost.seed {cost_seed} is not one of seeds {config['seeds']}")
    for name, path in (config["dataset_configs"] or {}).items():
        if Path(path).stem != name:
            raise WorkflowError(f"dataset_configs: {name} -> {path}: the file name must be {name}.yaml "
                                "(the split records the file's stem as the dataset name)")
    for key in ("datasets", "seeds", "teachers", "methods"):
        if len(set(map(str, config[key]))) != len(config[key]):
            raise WorkflowError(f"config {key} lists a name twice: {config[key]}")


_check_config()

DATASETS = [str(d) for d in config["datasets"]]
SEEDS = [int(s) for s in config["seeds"]]
TEACHERS = [str(t) for t in config["teachers"]]
METHODS = [str(m) for m in config["methods"]]
CONTROL_METHODS = [str(m) for m in config["control"]["methods"]]
CONTROL_TEACHERS = [str(t) for t in config["control"]["teachers"]]
COST_SEED = SEEDS[0] if config["cost"]["seed"] is None else int(config["cost"]["seed"])


# ---------------------------------------------------------------------------------------
# Paths of the intermediates (all under the work folder) and of the final results.
def split_dir(dataset):
    return f"{WORK}/splits/{dataset}"


def teacher_dir(dataset, seed, teacher):
    return f"{WORK}/teachers/{dataset}/seed{seed}/{teacher}"


def ensemble_dir(dataset, seed):
    return f"{WORK}/ensembles/{dataset}/seed{seed}"


def student_dir(dataset, seed, method):
    return f"{WORK}/runs/{dataset}/seed{seed}/{method}"


def control_dir(dataset, seed, method, teacher):
    return f"{WORK}/controls/{dataset}/seed{seed}/{method}/{teacher}"


def cost_dir(dataset):
    return f"{WORK}/cost/{dataset}/seed{COST_SEED}"


def all_splits():
    return [split_dir(d) for d in DATASETS]


def all_teacher_runs(datasets=None, seeds=None):
    return [teacher_dir(d, s, t) for d in datasets or DATASETS for s in seeds or SEEDS for t in TEACHERS]


def all_ensembles():
    return [ensemble_dir(d, s) for d in DATASETS for s in SEEDS]


def all_student_runs(datasets=None, seeds=None):
    return [student_dir(d, s, m) for d in datasets or DATASETS for s in seeds or SEEDS for m in METHODS]


def all_control_runs():
    return [control_dir(d, s, m, t) for d in DATASETS for s in SEEDS
            for m in CONTROL_METHODS for t in CONTROL_TEACHERS]


def all_cost_dirs():
    return [cost_dir(d) for d in DATASETS] if config["cost"]["enabled"] else []


TABLES = ["main.md", "main.tex", "teachers.md", "cost.md", "datasets.md", "paper_comparison.md"]
FIGURES = ["training_curves.png", "checkpoint_selection.png", "accuracy_vs_cost.png",
           "discrepancy.png", "homogeneous_vs_heterogeneous.png"]


def table_files():
    return [f"{RESULTS}/tables/{name}" for name in TABLES]


def figure_files():
    return [f"{RESULTS}/figures/{name}" for name in FIGURES]


# ---------------------------------------------------------------------------------------
# Configs of the stages: the shipped YAMLs, or the directories named in the config.
def dataset_config(dataset):
    """The dataset YAML passed as `--config` (user datasets), or None for a shipped dataset."""
    path = (config["dataset_configs"] or {}).get(dataset)
    return str(path) if path else None


def model_config(teacher):
    return f"{config['model_configs']}/{teacher}.yaml"


def teacher_config(wildcards):
    return model_config(wildcards.teacher)


def method_config(method):
    return f"{config['method_configs']}/{method}.yaml"


def control_config(wildcards):
    return method_config(wildcards.method)


def uses_ensemble(method):
    return method not in config["methods_without_teacher"]


# ---------------------------------------------------------------------------------------
# Resources: per stage, per dataset (config `resources`), multiplied by the attempt number
# so that `--retries N` asks for more memory and time after an out-of-memory or timeout kill.
def _resource(stage, dataset, key):
    value = config["resources"]["default"][stage][key]
    override = (config["resources"]["datasets"] or {}).get(dataset) or {}
    return int((override.get(stage) or {}).get(key, value))


def mem_mb(stage):
    return lambda wildcards, attempt: int(_resource(stage, wildcards.get("dataset"), "mem_mb") * attempt)


def runtime(stage):
    return lambda wildcards, attempt: int(_resource(stage, wildcards.get("dataset"), "runtime") * attempt)


def gpus(stage):
    """One GPU for the stages that run on the configured device, when that device is CUDA."""
    return 1 if DEVICE == "cuda" and stage in ("teacher", "distill", "cost") else 0


def threads(stage):
    return int(config["threads"][stage])


def hetcomp(wildcards, threads):
    """The command prefix of every rule: `python -m hetcomp` with the rule's thread count.

    Torch sizes its thread pools from OMP_NUM_THREADS/MKL_NUM_THREADS; PYTHONPATH lets
    `python -m hetcomp` find the package of this repository without an install (conda envs).
    """
    root = shlex.quote(str(REPO_ROOT))
    return (f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "
            f"PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}} {PYTHON} -m hetcomp")


# ---------------------------------------------------------------------------------------
# Inputs and arguments of single rules.
def prepare_inputs(wildcards):
    path = dataset_config(wildcards.dataset)
    return {"config": path or f"config/datasets/{wildcards.dataset}.yaml"}


def prepare_args(wildcards, input):
    """`--dataset NAME` for a shipped dataset, `--config FILE` for one of dataset_configs."""
    if dataset_config(wildcards.dataset):
        args = f"--config {input.config}"
    else:
        args = f"--dataset {wildcards.dataset}"
    if config["data_dir"]:
        args += f" --data-dir {config['data_dir']}"
    return args


def distill_inputs(wildcards):
    inputs = {"split": split_dir(wildcards.dataset), "config": method_config(wildcards.method)}
    if uses_ensemble(wildcards.method):
        inputs["ensemble"] = ensemble_dir(wildcards.dataset, wildcards.seed)
    return inputs


def ensemble_arg(wildcards, input):
    return f"--ensemble {input.ensemble}" if "ensemble" in input.keys() else ""


def seed_teachers(wildcards):
    return [teacher_dir(wildcards.dataset, wildcards.seed, t) for t in TEACHERS]


def seed_students(wildcards):
    return [student_dir(wildcards.dataset, wildcards.seed, m) for m in METHODS]


def report_args(wildcards, input):
    paper = f" --paper {input.paper}" if "paper" in input.keys() else ""
    return (f"--long {input.long} --extras {input.extras}{paper}"
            f" --ks {' '.join(map(str, config['ks']))} --alpha {config['report']['alpha']}"
            f" --methods {' '.join(METHODS)} --teachers {' '.join(TEACHERS)}")


def output_folder(wildcards, output):
    """The folder of a rule's first output (the tables or figures folder of `hetcomp report`)."""
    return str(Path(output[0]).parent)
