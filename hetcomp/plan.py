"""What a workflow run is about to do, and roughly how long it takes (printed before its first job).

The estimate uses the measured per-job times of ``config/job_times.yaml`` (one machine class): a
dataset's own measurement where it has one (``per_dataset``), else the reference dataset's, scaled
linearly by the dataset's number of interactions; counted in core-minutes (minutes x threads of
the measurement), so that a run with other thread settings is estimated by the same work. Wall
time is the larger of (all core-minutes / cores) and the longest single job.
A ``tune_point`` job trains one point of a method's tuning grid: the method's measured time.
Standard library and PyYAML only: the Snakemake driver imports this module (it prints the plan
before the first job). ``python -m hetcomp.plan [snakemake options]`` prints it for a dry run
(``make plan``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import yaml

#: Rules that only group targets: no work of their own.
TARGET_RULES = {"all", "data", "teachers", "ensembles", "runs", "tables", "figures"}
#: The wildcard that selects a rule's per-name minutes (controls: method, then teacher).
KEYS = {"train_teacher": ("teacher",), "distill": ("method",), "distill_control": ("method", "teacher")}
#: Rules whose job is one run of another rule (a tuning grid point is one ``distill`` run).
REPEATS = {"tune_point": "distill"}


@dataclass
class Plan:
    """Jobs per rule, their core-minutes, and what had to be assumed."""

    jobs: Counter = field(default_factory=Counter)
    core_minutes: float = 0.0
    longest_minutes: float = 0.0
    unmeasured: Counter = field(default_factory=Counter)
    unsized: set = field(default_factory=set)

    def wall_hours(self, cores: int | None) -> float | None:
        if not cores:
            return None
        return max(self.core_minutes / cores, self.longest_minutes) / 60


def load_job_times(path: str | Path) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def dataset_size(dataset: str, table: Mapping, workdir: str | Path) -> int | None:
    """Interactions of ``dataset``: the table's, else its prepared split's, else None."""
    if dataset in table["interactions"]:
        return int(table["interactions"][dataset])
    meta = Path(workdir) / "splits" / dataset / "meta.json"
    if meta.is_file():
        return int(json.loads(meta.read_text())["n_interactions"])
    return None


def measured_minutes(rule: str, wildcards: Mapping, minutes: Mapping) -> float | None:
    """Minutes of the measured job of this rule and these wildcards in ``minutes`` (the table's
    ``minutes`` or a dataset's ``per_dataset`` entry), or None if unmeasured."""
    value = minutes.get(rule)
    for key in KEYS.get(rule, ()):
        if not isinstance(value, Mapping):
            break
        value = value.get(str(wildcards.get(key)))
    return float(value) if isinstance(value, (int, float)) else None


def estimate(jobs: Iterable[tuple[str, Mapping, int]], table: Mapping, workdir: str | Path) -> Plan:
    """The plan of ``jobs``, each ``(rule name, wildcards, threads)``."""
    plan = Plan()
    reference_size = table["interactions"][table["reference"]["dataset"]]
    for rule, wildcards, threads in jobs:
        if rule in TARGET_RULES:
            continue
        plan.jobs[rule] += 1
        runs_of = REPEATS.get(rule, rule)
        dataset = wildcards.get("dataset")
        own_table = (table.get("per_dataset") or {}).get(str(dataset)) or {}
        own = measured_minutes(runs_of, wildcards, own_table)
        if own is not None:  # measured on this dataset, at one thread
            core_minutes = own
        else:
            minutes = measured_minutes(runs_of, wildcards, table["minutes"])
            ref_threads = int(table["threads"].get(runs_of, 1))
            if minutes is None:
                plan.unmeasured[rule] += 1
                minutes, ref_threads = float(table["unmeasured_minutes"]), 1
            if dataset:
                size = dataset_size(str(dataset), table, workdir)
                if size is None:
                    plan.unsized.add(str(dataset))
                else:
                    minutes *= size / reference_size
            core_minutes = minutes * ref_threads
        plan.core_minutes += core_minutes
        plan.longest_minutes = max(plan.longest_minutes, core_minutes / max(1, threads))
    return plan


def describe(plan: Plan, cores: int | None, table: Mapping) -> str:
    """The lines printed before the first job."""
    if not plan.jobs:
        return "Plan: nothing to run."
    counts = ", ".join(f"{rule} {n}" for rule, n in sorted(plan.jobs.items()))
    lines = [f"Plan: {sum(plan.jobs.values())} job(s): {counts}."]
    hours = plan.wall_hours(cores)
    if hours is not None:
        amount = f"{_duration(hours)} on {cores} core(s)"
    else:
        amount = f"{_duration(plan.core_minutes / 60)} of CPU time in total, spread over the cluster's nodes"
    lines.append(f"Estimated time: {amount} (an estimate from the job times measured on a "
                 f"{table['reference']['machine']}, config/job_times.yaml, datasets not measured "
                 "scaled by size; "
                 "a GPU or a faster CPU is quicker, a loaded machine slower).")
    if plan.unmeasured:
        assumed = ", ".join(f"{rule} x{n}" for rule, n in sorted(plan.unmeasured.items()))
        lines.append(f"  not measured, counted at {table['unmeasured_minutes']:g} min each: {assumed}")
    if plan.unsized:
        lines.append(f"  size unknown until prepared, counted at {table['reference']['dataset']}'s: "
                     f"{', '.join(sorted(plan.unsized))}")
    return "\n".join(lines)


def _duration(hours: float) -> str:
    return f"about {hours * 60:.0f} minutes" if hours < 1.5 else f"about {hours:.1f} hours"


def dry_run_jobs(text: str, table: Mapping) -> list[tuple[str, dict, int]]:
    """``(rule, wildcards, threads)`` of every job listed by ``snakemake -n`` (which prints no
    thread counts: the measurement's are assumed)."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        match = re.match(r"(?:local)?rule (\w+):", block)
        if match:
            found = re.search(r"^\s+wildcards: (.+)$", block, re.M)
            wildcards = dict(pair.split("=", 1) for pair in found.group(1).split(", ")) if found else {}
            rule = match.group(1)
            jobs.append((rule, wildcards, int(table["threads"].get(REPEATS.get(rule, rule), 1))))
    return jobs


def main(argv: list[str]) -> int:
    """Dry-run the workflow with ``argv`` (Snakemake options), then print the plan."""
    from hetcomp import CONFIG_DIR, REPO_ROOT

    snakemake = Path(sys.executable).with_name("snakemake")
    result = subprocess.run([str(snakemake), "-n", *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        return result.returncode
    table = load_job_times(CONFIG_DIR / "job_times.yaml")
    jobs = dry_run_jobs(result.stdout, table)
    cores = argv[argv.index("--cores") + 1] if "--cores" in argv else "all"
    cores = os.cpu_count() if cores == "all" else int(cores)
    print(describe(estimate(jobs, table, REPO_ROOT / "work"), cores, table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
