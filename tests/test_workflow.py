"""The Snakemake workflow: the full grid resolves, the lint is clean, the tiny config runs end to end.

Every call runs Snakemake in a subprocess from the repository root with the interpreter's own
``snakemake`` (the one of this virtual environment), and points ``workdir``/``results_dir`` at a
temporary folder so that tests never touch (or depend on) the real work folder.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
TABLES = ["main.md", "main.tex", "teachers.md", "cost.md", "datasets.md", "paper_comparison.md"]
FIGURES = ["training_curves.png", "checkpoint_selection.png", "accuracy_vs_cost.png", "discrepancy.png",
           "homogeneous_vs_heterogeneous.png"]
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(not SNAKEMAKE.is_file(), reason=f"snakemake not installed next to {sys.executable}")


def snakemake(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(SNAKEMAKE), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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
    counts = {"prepare": d, "train_teacher": d * s * t, "build_ensemble": d * s, "distill": d * s * m,
              "distill_control": d * s * c, "cost": d, "aggregate": 1, "report_tables": 1,
              "report_figures": 1, "all": 1}
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


def test_full_default_grid_dry_run_resolves_quickly(tmp_path):
    started = time.perf_counter()
    result = snakemake("-n", "--configfile", "config/config.yaml", *isolated(tmp_path))
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    counts = job_counts(result.stdout + result.stderr)
    assert counts == expected_counts(config)
    assert sum(counts.values()) > 300  # 3 datasets x 5 seeds x (6 teachers + 8 methods + 6 controls) + ...
    # Snakemake itself needs several seconds to import on a busy 2-core machine; the DAG adds little.
    assert elapsed < 120, f"dry run took {elapsed:.0f} s"


def test_two_core_citeulike_config_dry_run_is_the_one_seed_grid(tmp_path):
    """config/citeulike-2core.yaml (results/README.md) layers on the default: every job of one seed."""
    result = snakemake("-n", "--configfile", "config/citeulike-2core.yaml", *isolated(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.update(yaml.safe_load((ROOT / "config" / "citeulike-2core.yaml").read_text()))
    assert (config["datasets"], config["seeds"]) == (["citeulike-t"], [0])
    assert job_counts(result.stdout + result.stderr) == expected_counts(config)


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
