"""The Snakemake workflow: the full grid resolves, the lint is clean, the tiny config runs end to end.

Every call runs Snakemake in a subprocess from the repository root with the interpreter's own
``snakemake`` (the one of this virtual environment), and points ``workdir``/``results_dir`` at a
temporary folder so that tests never touch (or depend on) the real work folder. The raw data
directory is a folder of empty stand-in files (the workflow only checks that they exist before
a dry run), so that these tests need neither the datasets nor internet.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
TABLES = ["main.md", "main.tex", "teachers.md", "cost.md", "datasets.md", "paper_comparison.md", "tuning.md",
          "claims.md", "ablation.md", "per_seed.md", "reproduction.md"]
FIGURES = ["training_curves.png", "checkpoint_selection.png", "accuracy_vs_cost.png", "discrepancy.png",
           "homogeneous_vs_heterogeneous.png"]
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(not SNAKEMAKE.is_file(), reason=f"snakemake not installed next to {sys.executable}")


def snakemake(*args: str, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(SNAKEMAKE), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def stand_in_data(tmp_path_factory) -> Path:
    """A data directory with an empty file for every source of every shipped dataset."""
    folder = tmp_path_factory.mktemp("data")
    for config in (ROOT / "config" / "datasets").glob("*.yaml"):
        for source in yaml.safe_load(config.read_text())["sources"]:
            (folder / source["path"]).parent.mkdir(parents=True, exist_ok=True)
            (folder / source["path"]).touch()
    return folder


@pytest.fixture(autouse=True)
def _data_dir(stand_in_data, monkeypatch):
    monkeypatch.setenv("HETCOMP_DATA_DIR", str(stand_in_data))
    monkeypatch.setenv("HETCOMP_OFFLINE", "1")


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake (dry) run: rule -> number of jobs."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Job stats:")), None)
    if start is None:  # "Nothing to be done"
        return counts
    for line in lines[start + 3:]:
        match = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
        if not match or match.group(1) == "total":
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def expected_counts(config: dict) -> dict[str, int]:
    d, s = len(config["datasets"]), len(config["seeds"])
    t, m = len(config["teachers"]), len(config["methods"])
    control = config.get("control") or {}
    c = len(control.get("methods", [])) * len(control.get("teachers", []))
    # per dataset, for each method whose YAML has a `tune` grid: one `tune_point` job per grid
    # point and one `hetcomp tune` job that chooses
    grids = {name: yaml.safe_load((ROOT / config["method_configs"] / f"{name}.yaml").read_text()).get("tune")
             for name in dict.fromkeys([*config["methods"], *control.get("methods", [])])}
    tuned = [name for name, grid in grids.items() if grid]
    tune = config.get("tune") or {}
    if tune.get("methods") is not None:
        tuned = [name for name in tuned if name in tune["methods"]]
    if not tune.get("enabled", True):
        tuned = []
    points = sum(math.prod(len(values) for values in grids[name].values()) for name in tuned)
    counts = {"prepare": d, "train_teacher": d * s * t, "build_ensemble": d * s, "distill": d * s * m,
              "distill_control": d * s * c, "tune": d * len(tuned), "tune_point": d * points, "cost": d,
              "aggregate": 1, "report_tables": 1, "report_figures": 1, "all": 1}
    return {rule: n for rule, n in counts.items() if n}


def isolated(tmp_path: Path) -> list[str]:
    return ["--config", f"workdir={tmp_path / 'work'}", f"results_dir={tmp_path / 'results'}"]


def _properties(schema: dict, root: dict, where: str = "", in_def: bool = False):
    """``(path, subschema, in_def)`` of every property, following local ``$ref``s into ``$defs``
    (``in_def``: reached through a ``$ref``, where values are required rather than defaulted)."""
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{where}.{name}" if where else name
        yield path, sub, in_def
        target, deeper = sub, in_def
        if "$ref" in sub:
            target, deeper = root["$defs"][sub["$ref"].split("/")[-1]], True
        yield from _properties(target, root, path, deeper)


def test_config_schema_describes_every_key_with_a_default():
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert set(config) <= set(schema["properties"]), "config/config.yaml has keys the schema lacks"
    for path, sub, in_def in _properties(schema, schema):
        assert sub.get("description"), f"{path}: no description"
        assert in_def or "default" in sub, f"{path}: no default"


def layered(*names: str) -> dict:
    """config/config.yaml with the given config files over it (top-level keys replaced)."""
    config = {}
    for name in ("config.yaml", *names):
        config.update(yaml.safe_load((ROOT / "config" / name).read_text()))
    return config


def test_paper_grid_dry_run_resolves(tmp_path):
    """(Its time, and Snakemake's start-up beside it, is measured by benchmarks/workflow_speed.py.)"""
    result = snakemake("-n", "--configfile", "config/paper.yaml", *isolated(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    config = layered("paper.yaml")
    assert (config["datasets"], config["seeds"]) == (["citeulike-t", "foursquare", "amazon-music"], [0, 1, 2, 3, 4])
    counts = job_counts(result.stdout + result.stderr)
    assert counts == expected_counts(config)
    assert sum(counts.values()) > 300  # 3 datasets x 5 seeds x (6 teachers + 8 methods + 6 controls) + ...


def test_default_config_is_the_one_seed_citeulike_grid_writing_outside_results(tmp_path):
    """The main command's grid: one seed of CiteULike-t, tables in work/results, not the committed
    results/ (config/citeulike-2core.yaml, the setting of results/, writes there explicitly)."""
    config = layered()
    assert (config["datasets"], config["seeds"], config["results_dir"]) == (["citeulike-t"], [0], "work/results")
    assert layered("citeulike-2core.yaml")["results_dir"] == "results"
    result = snakemake("-n", "--config", f"workdir={tmp_path / 'work'}")
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert job_counts(result.stdout + result.stderr) == expected_counts(config)
    outputs = re.findall(r"^\s+output: (.+)$", result.stdout, re.M)
    assert outputs and not [o for o in outputs if re.search(r"(^|, )results/", o)]
    assert "work/results/tables/main.md" in result.stdout


def test_tune_methods_tunes_only_those(tmp_path):
    """`tune.methods` picks the tuned methods (the others train their YAML values); a method
    without a grid there is a one-line error."""
    layer = tmp_path / "layer.yaml"
    layer.write_text("tune: {enabled: true, methods: [rrd, cd]}\n")
    result = snakemake("-n", "--configfile", str(layer), *isolated(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    counts = job_counts(result.stdout + result.stderr)
    assert counts["tune"] == 2 and counts == expected_counts({**layered(), "tune": {"methods": ["rrd", "cd"]}})
    assert sorted(re.findall(r"^\s+output: \S+/tuning/citeulike-t/(\w+)$", result.stdout, re.M)) == ["cd", "rrd"]
    layer.write_text("tune: {enabled: true, methods: [rrd, hetcomp]}\n")
    result = snakemake("-n", "--configfile", str(layer), *isolated(tmp_path))
    assert result.returncode != 0 and "tune.methods ['hetcomp']" in result.stderr + result.stdout


def test_seed_limits_narrow_the_grid_and_its_teachers(tmp_path):
    """seed_limits: the ablations on seed 0 only, a second dataset with only w/o KD on seed 1 (no
    teachers there); controls on seed 0; cost on the first dataset. An unknown name is an error."""
    ablations = ["hetcomp_nodkc", "hetcomp_phase1", "hetcomp_phase2", "hetcomp_nosep"]
    layer = tmp_path / "layer.yaml"
    layer.write_text(yaml.safe_dump({
        "datasets": ["citeulike-t", "amazon-music"], "seeds": [0, 1], "methods": ["wokd", "rrd", *ablations],
        "tune": {"enabled": False}, "control": {"methods": ["rrd"], "teachers": ["mf"], "seeds": [0]},
        "cost": {"datasets": ["citeulike-t"]},
        "seed_limits": [{"methods": ablations, "seeds": [0]},
                        {"datasets": ["amazon-music"], "seeds": [1]},
                        {"datasets": ["amazon-music"], "methods": ["rrd", *ablations], "seeds": []}]}))
    result = snakemake("-n", "--configfile", str(layer), *isolated(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    runs = sorted(re.findall(r"^\s+output: \S+/work/runs/(\S+)$", result.stdout, re.M))
    assert runs == sorted([f"citeulike-t/seed{s}/{m}" for s in (0, 1) for m in ("wokd", "rrd")]
                          + [f"citeulike-t/seed0/{m}" for m in ablations] + ["amazon-music/seed1/wokd"])
    ensembles = sorted(re.findall(r"^\s+output: \S+/work/ensembles/(\S+)$", result.stdout, re.M))
    assert ensembles == ["citeulike-t/seed0", "citeulike-t/seed1"]
    counts = job_counts(result.stdout + result.stderr)
    assert (counts["train_teacher"], counts["distill_control"], counts["cost"]) == (12, 1, 1)
    layer.write_text(yaml.safe_dump({"seed_limits": [{"methods": ["hetcomp_nosep"], "seeds": [0]}]}))
    result = snakemake("-n", "--configfile", str(layer), *isolated(tmp_path))
    assert result.returncode != 0 and "seed_limits entry 1: methods ['hetcomp_nosep']" in result.stderr + result.stdout


def test_control_datasets_keep_the_controls_to_those_datasets(tmp_path):
    """control.datasets: controls only on the listed datasets (their runs everywhere); a dataset
    that is not in `datasets` is a one-line error."""
    layer = tmp_path / "layer.yaml"
    layer.write_text(yaml.safe_dump({
        "datasets": ["citeulike-t", "amazon-music"], "seeds": [0], "methods": ["wokd", "rrd"],
        "tune": {"enabled": False}, "cost": {"enabled": False},
        "control": {"methods": ["rrd"], "teachers": ["mf", "cml"], "datasets": ["amazon-music"]}}))
    result = snakemake("-n", "--configfile", str(layer), *isolated(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    controls = sorted(re.findall(r"^\s+output: \S+/work/controls/(\S+)$", result.stdout, re.M))
    assert controls == ["amazon-music/seed0/rrd/cml", "amazon-music/seed0/rrd/mf"]
    runs = sorted(re.findall(r"^\s+output: \S+/work/runs/(\S+)$", result.stdout, re.M))
    assert runs == sorted(f"{d}/seed0/{m}" for d in ("citeulike-t", "amazon-music") for m in ("wokd", "rrd"))
    layer.write_text(yaml.safe_dump({"control": {"datasets": ["gowalla"]}}))
    result = snakemake("-n", "--configfile", str(layer), *isolated(tmp_path))
    assert result.returncode != 0
    assert "control.datasets ['gowalla'] are not in datasets" in result.stderr + result.stdout


def test_reference_layer_regenerates_results_from_the_committed_records_alone(tmp_path):
    """config/reference.yaml lists only recorded runs: from a clean work folder nothing is trained,
    tuned or measured; the splits are prepared and the reports made from results/reference."""
    config = layered("reference.yaml")
    assert config["reference"]["use"] and config["results_dir"] == "results"
    result = snakemake("-n", "--configfile", "config/reference.yaml", *isolated(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert job_counts(result.stdout + result.stderr) == {
        "prepare": len(config["datasets"]), "aggregate": 1, "report_tables": 1, "report_figures": 1, "all": 1}


def test_missing_raw_file_stops_before_any_job_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HETCOMP_DATA_DIR", str(tmp_path / "empty"))
    result = snakemake("-n", *isolated(tmp_path))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    target = tmp_path / "empty" / "citeulike-t" / "users.dat"
    assert errors[0].startswith("hetcomp workflow: error: dataset citeulike-t: citeulike-t/users.dat is missing")
    assert "download it from https://raw.githubusercontent.com/js05212/citeulike-t/" in errors[0]
    assert f"put it at {target}" in errors[0] and "HETCOMP_OFFLINE is set" in errors[0]
    assert "Job stats" not in result.stdout + result.stderr


def test_local_profile_prints_the_log_of_a_failed_job():
    profile = yaml.safe_load((ROOT / "profiles" / "local" / "config.yaml").read_text())
    assert profile["show-failed-logs"] is True and profile["rerun-incomplete"] is True


def test_config_typo_prints_one_line_with_the_allowed_keys(tmp_path):
    result = snakemake("-n", "--config", "seedz=[0]")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 3, result.stderr  # Snakemake's own notice about --config, then ours
    assert lines[-1].startswith("hetcomp workflow: error: invalid config: unknown key(s) seedz (top level); "
                                "allowed: control, cost, data_dir,")


def test_partial_targets_exist():
    result = snakemake("--list-target-rules")
    assert result.returncode == 0, result.stderr[-3000:]
    targets = set(result.stdout.split())
    assert {"all", "data", "teachers", "ensembles", "runs", "tables", "figures"} <= targets


def test_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert "Congratulations" in result.stdout + result.stderr


def test_tiny_config_end_to_end(tmp_path):
    """The whole DAG on the tiny synthetic dataset (CPU), then a resume: only missing work is redone."""
    base = ["--cores", "2", "--configfile", ".test/config.yaml", *isolated(tmp_path)]
    result = snakemake(*base, timeout=1800)
    assert result.returncode == 0, result.stderr[-6000:]
    # before the first job: the plan and its time estimate (hetcomp/plan.py)
    plan = result.stderr.index("Plan: ")
    assert plan < result.stderr.index("rule prepare:") and "Estimated time: about" in result.stderr[plan:]
    results = tmp_path / "results"
    for name in TABLES:
        path = results / "tables" / name
        assert path.is_file() and path.stat().st_size > 100, name
    for name in FIGURES:
        path = results / "figures" / name
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000, name
    main = (results / "tables" / "main.md").read_text()
    for method in ("w/o KD", "HetComp", "RRD", "DCD", "CL-DRD", "MTD", "RD", "CD"):
        assert f"| {method} " in main, method
    teachers = (results / "tables" / "teachers.md").read_text()
    for teacher in ("MF", "CML", "NeuMF", "LightGCN", "VAE", "I-AE", "Ensemble"):
        assert f"| {teacher} " in teachers, teacher
    assert "Device: cpu" in (results / "tables" / "cost.md").read_text()
    long = (results / "long.csv").read_text()
    assert ",rrd,mf," in long and ",rrd,lightgcn," in long  # the single-teacher controls

    # `snakemake --report` packages the tables and figures with their captions
    report = tmp_path / "report.html"
    packaged = snakemake("--report", str(report), *base[2:])
    assert packaged.returncode == 0, packaged.stderr[-3000:]
    assert report.stat().st_size > 100_000

    # Finished outputs are final: nothing to redo. A run killed before the reports (one student
    # run and everything downstream missing) resumes with the missing jobs only.
    again = snakemake("-n", *base)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    for path in ("work/runs/tiny/seed0/rrd", "work/aggregate", "results"):
        shutil.rmtree(tmp_path / path)
    resumed = snakemake("-n", *base)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert job_counts(resumed.stdout + resumed.stderr) == {
        "distill": 1, "cost": 1, "aggregate": 1, "report_tables": 1, "report_figures": 1, "all": 1}

    # Reference records: every finished run recorded; with reference.use a recorded run is done,
    # so only the one never recorded (deleted above) and the reports are left.
    record = subprocess.run([sys.executable, "-m", "hetcomp", "record", "--work", str(tmp_path / "work"),
                             "--out", str(tmp_path / "reference")], capture_output=True, text=True, cwd=ROOT)
    assert record.returncode == 0, record.stderr[-3000:]
    shutil.rmtree(tmp_path / "work" / "runs" / "tiny" / "seed0" / "hetcomp")
    layer = tmp_path / "use_reference.yaml"
    layer.write_text(yaml.safe_dump({"reference": {"use": True, "dir": str(tmp_path / "reference")}}))
    from_records = snakemake("-n", "--cores", "2", "--configfile", ".test/config.yaml", str(layer),
                             *isolated(tmp_path))
    assert from_records.returncode == 0, from_records.stderr[-3000:]
    assert job_counts(from_records.stdout + from_records.stderr) == {
        "distill": 1, "aggregate": 1, "report_tables": 1, "report_figures": 1, "all": 1}

    # A finished run recorded after its tuning (its record is missing here) is not redone: its
    # tuning is the work folder's, whether or not a record of it exists.
    shutil.rmtree(tmp_path / "reference" / "runs" / "tiny" / "seed0" / "dcd")
    unrecorded = snakemake("-n", "--cores", "2", "--configfile", ".test/config.yaml", str(layer),
                           *isolated(tmp_path))
    assert unrecorded.returncode == 0, unrecorded.stderr[-3000:]
    assert job_counts(unrecorded.stdout + unrecorded.stderr) == {
        "distill": 1, "aggregate": 1, "report_tables": 1, "report_figures": 1, "all": 1}

    # A work folder without tunings (a new session) copies the recorded ones its runs need (RRD's
    # and DCD's) instead of tuning again; without `reference.use` it tunes.
    shutil.rmtree(tmp_path / "work" / "tuning")
    shutil.rmtree(tmp_path / "work" / "runs" / "tiny" / "seed0" / "dcd")
    restored = snakemake("-n", "--cores", "2", "--configfile", ".test/config.yaml", str(layer),
                         *isolated(tmp_path))
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert job_counts(restored.stdout + restored.stderr) == {
        "restore_tuning": 2, "distill": 2, "aggregate": 1, "report_tables": 1, "report_figures": 1, "all": 1}
    retuned = snakemake("-n", *base)
    assert retuned.returncode == 0, retuned.stderr[-3000:]
    counts = job_counts(retuned.stdout + retuned.stderr)
    assert "restore_tuning" not in counts and counts["tune"] >= 2, counts

    # A recorded teacher and ensemble needed again (lost from the work folder, a student of their
    # seed left to train): the teacher retrains with its record's threads (2 here, the config
    # says 1), and the rebuilt ensemble is checked against its record.
    record_info = tmp_path / "reference" / "teachers" / "tiny" / "seed0" / "mf" / "run_info.json"
    info = json.loads(record_info.read_text())
    record_info.write_text(json.dumps({**info, "torch_threads": 2}))
    shutil.rmtree(tmp_path / "work" / "teachers" / "tiny" / "seed0" / "mf")
    shutil.rmtree(tmp_path / "work" / "ensembles" / "tiny" / "seed0")
    retrained = snakemake("-n", "-p", "--cores", "2", "--configfile", ".test/config.yaml", str(layer),
                          *isolated(tmp_path))
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    commands = [line for line in (retrained.stdout + retrained.stderr).splitlines() if "-m hetcomp" in line]
    teacher = [line for line in commands if "train-teacher --model mf" in line]
    assert len(teacher) == 1 and "OMP_NUM_THREADS=2 " in teacher[0], teacher
    ensemble = [line for line in commands if " build-ensemble " in line]
    record = tmp_path / "reference" / "ensembles" / "tiny" / "seed0"
    assert len(ensemble) == 1 and f"--expect-record {record} " in ensemble[0], ensemble
    assert "another CPU" not in retrained.stderr  # recorded on this machine

    # An ensemble record that names another CPU: a warning before any job (the check will fail).
    ensemble_info = record / "run_info.json"
    info = json.loads(ensemble_info.read_text())
    ensemble_info.write_text(json.dumps({**info, "device_name": "cpu (Other CPU, AVX9, 2 threads)"}))
    elsewhere = snakemake("-n", "--cores", "2", "--configfile", ".test/config.yaml", str(layer),
                          *isolated(tmp_path))
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    warnings = [line for line in elsewhere.stderr.splitlines() if "another CPU (Other CPU, AVX9;" in line]
    assert len(warnings) == 1 and str(record) in warnings[0], elsewhere.stderr[-3000:]
