# Shared helpers: paths of every stage, the interpreter, per-dataset resources.
# No model logic here: everything below only computes file names and command-line fragments.
import functools
import math
import shlex
import sys
import urllib.request
from pathlib import Path

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

REPO_ROOT = Path(workflow.basedir).resolve()
if str(REPO_ROOT) not in sys.path:  # the driver imports three small modules of hetcomp (stdlib, yaml, numpy)
    sys.path.insert(0, str(REPO_ROOT))
from hetcomp.data.fetch import OFFLINE_VAR, missing_file_message, offline, resolve_data_dir  # noqa: E402
from hetcomp.plan import describe, estimate, load_job_times  # noqa: E402
from hetcomp.reference import is_finished, recorded_cpu, recorded_threads  # noqa: E402
from snakemake.utils import validate  # noqa: E402


def stop(message):
    """End the workflow before any job with one line on stderr (no traceback, no schema dump)."""
    print(f"hetcomp workflow: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def validate_config(schema_path):
    """Snakemake's validation (which fills in the defaults), but a config error is reported in
    one line naming the key and, for an unknown key, the allowed ones (not the whole schema)."""
    schema = yaml.safe_load((REPO_ROOT / schema_path).read_text())
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        where = ".".join(map(str, error.absolute_path)) or "top level"
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = sorted(error.schema.get("properties", {}))
            unknown = sorted(set(error.instance) - set(allowed))
            message = f"unknown key(s) {', '.join(unknown)} ({where}); allowed: {', '.join(allowed)}"
        else:
            message = f"{where}: {error.message[:300]}"
        stop(f"invalid config: {message} (see {schema_path})")
    validate(config, str(REPO_ROOT / schema_path))


validate_config("workflow/schemas/config.schema.yaml")

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
    index=r"\d+",


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
    for section in ("cost", "control"):
        unknown = sorted(set(map(str, config[section]["datasets"] or [])) - set(map(str, config["datasets"])))
        if unknown:
            raise WorkflowError(f"{section}.datasets {unknown} are not in datasets {config['datasets']}")
    for number, limit in enumerate(config["seed_limits"], 1):
        for key, known in (("datasets", config["datasets"]), ("methods", config["methods"])):
            unknown = sorted(set(map(str, limit.get(key) or [])) - set(map(str, known)))
            if unknown:
                raise WorkflowError(f"seed_limits entry {number}: {key} {unknown} are not in {key} {known}")


_check_config()

DATASETS = [str(d) for d in config["datasets"]]
SEEDS = [int(s) for s in config["seeds"]]
TEACHERS = [str(t) for t in config["teachers"]]
METHODS = [str(m) for m in config["methods"]]
CONTROL_METHODS = [str(m) for m in config["control"]["methods"]]
CONTROL_TEACHERS = [str(t) for t in config["control"]["teachers"]]
COST_SEED = SEEDS[0] if config["cost"]["seed"] is None else int(config["cost"]["seed"])
CONTROL_SEEDS = SEEDS if config["control"]["seeds"] is None else [int(s) for s in config["control"]["seeds"]]
COST_DATASETS = DATASETS if config["cost"]["datasets"] is None else [str(d) for d in config["cost"]["datasets"]]
CONTROL_DATASETS = DATASETS if config["control"]["datasets"] is None else [str(d) for d in config["control"]["datasets"]]


def run_seeds(dataset, method):
    """The seeds of a method's runs on a dataset: `seeds`, narrowed by every `seed_limits` entry
    that names (or leaves out) the dataset and the method."""
    seeds = SEEDS
    for limit in config["seed_limits"]:
        if (dataset in map(str, limit.get("datasets") or [dataset])
                and method in map(str, limit.get("methods") or [method])):
            allowed = {int(s) for s in limit["seeds"]}
            seeds = [s for s in seeds if s in allowed]
    return seeds


def runs_at(dataset, seed):
    """The methods that have a run on this dataset and seed."""
    return [m for m in METHODS if seed in run_seeds(dataset, m)]


def control_seeds(dataset, method):
    """Seeds of a control method's single-teacher runs: its run seeds, narrowed by control.seeds
    (none on a dataset outside control.datasets)."""
    if dataset not in CONTROL_DATASETS:
        return []
    return [s for s in run_seeds(dataset, method) if s in CONTROL_SEEDS]


# ---------------------------------------------------------------------------------------
# Before any job: every raw file of a dataset still to prepare is in the data directory or can
# be downloaded (it has a URL, HETCOMP_OFFLINE is not set and the URL answers); else stop with one
# line naming the file, its URL and where to put it. Only the main Snakemake process checks.
def _url_answers(url, timeout=10):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _check_raw_data():
    data_dir = resolve_data_dir(config["data_dir"])
    for dataset in DATASETS:
        if Path(WORK, "splits", dataset, "meta.json").is_file():
            continue
        yaml_path = Path(dataset_config(dataset) or f"config/datasets/{dataset}.yaml")
        if not yaml_path.is_file():
            stop(f"dataset {dataset}: no {yaml_path} (shipped datasets: config/datasets/; "
                 "your own: dataset_configs in the config)")
        sources = (yaml.safe_load(yaml_path.read_text()) or {}).get("sources") or []
        for source in sources:
            path, url = source.get("path"), source.get("url")
            if not path or (data_dir / path).is_file():
                continue
            if not url:
                reason = ""
            elif offline():
                reason = f"{OFFLINE_VAR} is set"
            elif not _url_answers(url):
                reason = "no answer from its URL"
            else:
                continue  # `hetcomp prepare` downloads it
            stop(f"dataset {dataset}: {missing_file_message(data_dir, path, url, reason)}")


def print_plan():
    """Jobs per rule and the time estimate (hetcomp/plan.py), printed before the first job."""
    jobs = [(job.rule.name, dict(job.wildcards_dict or {}), int(job.threads))
            for job in workflow.dag.needrun_jobs()]
    table = load_job_times(REPO_ROOT / "config" / "job_times.yaml")
    cores = workflow.cores if workflow.local_exec else None
    print(describe(estimate(jobs, table, WORK), cores, table), file=sys.stderr, flush=True)


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


def ensemble_seeds(dataset):
    """Seeds of a dataset that need the teachers and their ensemble: a run or control distils it
    there, the tuning runs there, or its cost is measured there."""
    needed = {s for m in METHODS if uses_ensemble(m) for s in run_seeds(dataset, m)}
    needed |= {s for m in CONTROL_METHODS for s in control_seeds(dataset, m)}
    if any(tuned_here(dataset, m) for m in TUNED_METHODS):
        needed.add(TUNE_SEED)
    if dataset in all_cost_datasets():
        needed.add(COST_SEED)
    return [s for s in SEEDS if s in needed]


def all_teacher_runs():
    return [teacher_dir(d, s, t) for d in DATASETS for s in ensemble_seeds(d) for t in TEACHERS]


def all_ensembles():
    return [ensemble_dir(d, s) for d in DATASETS for s in ensemble_seeds(d)]


def all_student_runs():
    return [student_dir(d, s, m) for d in DATASETS for m in METHODS for s in run_seeds(d, m)]


def all_control_runs():
    return [control_dir(d, s, m, t) for d in DATASETS for m in CONTROL_METHODS
            for s in control_seeds(d, m) for t in CONTROL_TEACHERS]


def all_cost_datasets():
    """Datasets whose inference cost is measured: cost.datasets, those with a run on the cost seed."""
    if not config["cost"]["enabled"]:
        return []
    return [d for d in COST_DATASETS if d in DATASETS and runs_at(d, COST_SEED)]


def all_cost_dirs():
    return [cost_dir(d) for d in all_cost_datasets()]


TABLES = ["main.md", "main.tex", "teachers.md", "cost.md", "datasets.md", "paper_comparison.md",
          "tuning.md", "claims.md", "ablation.md", "per_seed.md", "reproduction.md"]
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

    Torch sizes its thread pools from OMP_NUM_THREADS/MKL_NUM_THREADS; OMP_WAIT_POLICY=PASSIVE
    keeps its idle OpenMP workers from spinning next to the fused rest-mass kernel's threads
    (hetcomp/distill/fused_rest.py); PYTHONPATH lets `python -m hetcomp` find the package of this
    repository without an install (conda envs).
    """
    root = shlex.quote(str(REPO_ROOT))
    return (f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} OMP_WAIT_POLICY=PASSIVE "
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
    inputs.update(tuned_input(wildcards))
    return inputs


def ensemble_arg(wildcards, input):
    return f"--ensemble {input.ensemble}" if "ensemble" in input.keys() else ""


def seed_teachers(wildcards):
    return [teacher_dir(wildcards.dataset, wildcards.seed, t) for t in TEACHERS]


def seed_students(wildcards):
    return [student_dir(wildcards.dataset, wildcards.seed, m) for m in runs_at(wildcards.dataset, int(wildcards.seed))]


def report_args(wildcards, input):
    paper = f" --paper {input.paper}" if "paper" in input.keys() else ""
    reference = REFERENCE["long"]
    if reference and Path(reference).is_file():
        paper += f" --reference-long {reference}"
    return (f"--long {input.long} --extras {input.extras}{paper}"
            f" --ks {' '.join(map(str, config['ks']))} --alpha {config['report']['alpha']}"
            f" --methods {' '.join(METHODS)} --teachers {' '.join(TEACHERS)} --datasets {' '.join(DATASETS)}")


def output_folder(wildcards, output):
    """The folder of a rule's first output (the tables or figures folder of `hetcomp report`)."""
    return str(Path(output[0]).parent)


# ---------------------------------------------------------------------------------------
# Validation tuning (`hetcomp tune`, config `tune`): a method whose YAML has a `tune` grid is
# tuned once per dataset on the tuning seed; its runs and controls then train the chosen point.
def _tune_grid(method, dataset=None):
    """The method YAML's `tune` mapping (a per-dataset override of it included), or None."""
    path = Path(method_config(method))
    raw = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    override = ((raw.get("datasets") or {}).get(dataset) or {}) if dataset else {}
    return override.get("tune", raw.get("tune"))


def _tuned_methods():
    if not config["tune"]["enabled"]:
        return []
    with_grid = [m for m in dict.fromkeys(METHODS + CONTROL_METHODS) if _tune_grid(m) is not None]
    chosen = config["tune"].get("methods")
    if chosen is None:
        return with_grid
    without = sorted(set(map(str, chosen)) - set(with_grid))
    if without:
        raise WorkflowError(f"tune.methods {without}: not a method or control method of this run "
                            "with a `tune` grid in its YAML")
    return [m for m in with_grid if m in chosen]


TUNE_SEED = SEEDS[0] if config["tune"]["seed"] is None else int(config["tune"]["seed"])
if TUNE_SEED not in SEEDS:
    raise WorkflowError(f"tune.seed {TUNE_SEED} is not one of seeds {SEEDS}")
TUNED_METHODS = _tuned_methods()


def tuning_dir(dataset, method):
    return f"{WORK}/tuning/{dataset}/{method}"


def tuned_here(dataset, method):
    """Whether a tuned method is tuned on this dataset: it has a run or a control there."""
    return method in TUNED_METHODS and bool(run_seeds(dataset, method) or
                                            (method in CONTROL_METHODS and control_seeds(dataset, method)))


def all_tuning_dirs():
    return [tuning_dir(d, m) for d in DATASETS for m in TUNED_METHODS if tuned_here(d, m)]


# ---------------------------------------------------------------------------------------
# Reference records (config `reference`, hetcomp/reference.py): with `use`, a folder of the work
# layout that has a record is replaced by the record, so its job (and what only it needed) is done.
REFERENCE = config["reference"]


def recorded(path):
    """The record of a work-folder run, tuning or cost folder when `reference.use` and it exists."""
    if REFERENCE["use"]:
        record = Path(REFERENCE["dir"]) / Path(path).relative_to(WORK)
        if is_finished(record):
            return str(record)
    return path


def recorded_all(paths):
    return [recorded(path) for path in paths]


def record_of(path):
    """The record of a work-folder run when `reference.use` and it exists, else None."""
    record = recorded(path)
    return record if record != path else None


def threads_as_recorded(stage, work_path):
    """The threads of a teacher or ensemble job (``work_path(wildcards)`` its folder): those its
    record trained with when `reference.use` and it has one, so that a retrained teacher repeats
    its record (another thread count changes the last bits of sums), else the config's."""
    def threads_of(wildcards):
        record = record_of(work_path(wildcards))
        return (recorded_threads(record) if record else None) or threads(stage)
    return threads_of


def expect_record_arg(wildcards, output):
    """`--expect-record RECORD` for an ensemble rebuilt while its record exists (`reference.use`):
    the recorded students of its seed distilled that ensemble, so the rebuilt one must equal it.
    (A function of `output`, so Snakemake does not count it among the params whose change reruns
    a job: recording an ensemble does not make its work folder's copy out of date.)"""
    record = record_of(output[0])
    if record and not Path(output[0]).exists():
        warn_if_built_on_another_cpu(record)
    return f"--expect-record {record}" if record else ""


@functools.cache  # once per record: Snakemake evaluates a job's params more than once
def warn_if_built_on_another_cpu(record):
    """A warning, before any job, for an ensemble to rebuild whose record names another CPU: its
    teachers will likely not repeat their records there (results/README.md), so the check fails."""
    recorded_on = recorded_cpu(record)
    if not recorded_on:
        return
    from hetcomp.runtime import cpu_description  # imports torch: only where a record names a CPU

    this_cpu = cpu_description()
    if recorded_on != this_cpu:
        print(f"warning: {record} was built on another CPU ({recorded_on}; this one: {this_cpu}):"
              " its rebuilt ensemble will likely differ from the record, and build_ensemble then stops"
              " (another CPU changes the teachers' last bits; retrain the seed there, or drop its records)",
              file=sys.stderr)


def tuned_input(wildcards):
    """`{"tuned": folder}` for a run of a tuned method, else nothing. Always the work folder's
    tuning (restored from its record where there is one, rule `restore_tuning`), so that recording
    a tuning mid-session does not change the input, and so the freshness, of its finished runs."""
    if wildcards.method in TUNED_METHODS:
        return {"tuned": tuning_dir(wildcards.dataset, wildcards.method)}
    return {}


#: Written into a work-folder tuning that `restore_tuning` copied from its record.
RESTORED_MARKER = "restored_from_record.txt"


def tuning_record_to_restore(wildcards):
    """The record `restore_tuning` copies into the work folder: when `reference.use`, the tuning
    is recorded and the work folder has no tuning of its own (none, or one restored before).
    Otherwise a path that no rule makes, so that the rule `tune` makes the folder."""
    work = Path(tuning_dir(wildcards.dataset, wildcards.method))
    record = record_of(str(work))
    if record and (not work.exists() or (work / RESTORED_MARKER).is_file()):
        return record
    return f"{WORK}/.no-record-to-restore/{wildcards.dataset}/{wildcards.method}"


def tuned_arg(wildcards, input):
    return f"--tuned {input.tuned}" if "tuned" in input.keys() else ""


def tune_inputs(wildcards):
    inputs = {"split": split_dir(wildcards.dataset), "config": method_config(wildcards.method)}
    if uses_ensemble(wildcards.method):
        inputs["ensemble"] = ensemble_dir(wildcards.dataset, TUNE_SEED)
    return inputs


def control_inputs(wildcards):
    return {"split": split_dir(wildcards.dataset), "ensemble": ensemble_dir(wildcards.dataset, wildcards.seed),
            "config": method_config(wildcards.method), **tuned_input(wildcards)}


def tune_points(wildcards):
    """The finished-point files of every point of the method's grid (one `tune_point` job each)."""
    tune = _tune_grid(wildcards.method, wildcards.dataset) or {}
    points = math.prod(len(v) for v in tune.values() if isinstance(v, list)) if isinstance(tune, dict) else 1
    return [f"{tuning_dir(wildcards.dataset, wildcards.method)}.partial/point{index}.done.pt"
            for index in range(max(points, 1))]


if workflow.is_main_process:  # after dataset_config() is defined
    _check_raw_data()
