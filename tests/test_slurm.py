"""The SLURM profile, proven against a live one-node SLURM cluster.

Two kinds of tests live here:

- Static and dry-run checks of profiles/slurm, profiles/slurm-test and profiles/local, and of the
  GPU requests of the real workflow (`--config device=cuda` -> gpu=1 on exactly the training and cost
  rules). They need no cluster and run in the default suite.
- `-m slurm` tests: tests/slurm/start_cluster.sh starts slurmctld/slurmd/munged on this machine (root,
  apt; installs the Debian packages when missing), then
    * a one-rule workflow that requests gpu=1 goes through the plugin: its sbatch call carries
      `--gpus=1` and SLURM allocates one of the cluster's fake GPUs to the job;
    * the tiny end-to-end config runs as
      `snakemake --profile profiles/slurm-test --configfile .test/config.yaml` in a fresh copy of the
      checkout: every non-local job goes through sbatch (job ids in the Snakemake log, COMPLETED in
      `squeue`), the local rules run on the submit host, and the tables and figures are written.
  The daemons are stopped by the PIDs start_cluster.sh recorded (fixture teardown). Without root or
  apt, or when the cluster cannot start, these tests are skipped with the reason; set
  HETCOMP_SLURM_REQUIRED=1 (CI) to make that a failure instead. Wall time and sbatch job count go to
  $HETCOMP_SLURM_SUMMARY (default build/slurm-test-summary.json) and to the test's output.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = ROOT / "tests" / "slurm"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TEST_CONFIG = ".test/config.yaml"
# The rules that run on the configured device and so request gpu=1 when it is cuda
# (workflow/rules/common.smk, gpus()); every other rule must never ask for a GPU.
GPU_RULES = {"train_teacher", "distill", "distill_control", "tune_point", "tune", "cost"}
# profiles/slurm-test/config.yaml may differ from profiles/slurm/config.yaml in these keys only.
TEST_ONLY_KEYS = {
    "slurm-status-command",
    "slurm-init-seconds-before-status-checks",
    "slurm-no-account",
    "software-deployment-method",
}
RUN_TIMEOUT_S = int(os.environ.get("HETCOMP_SLURM_TIMEOUT_S", "2400"))


def _profile(name: str) -> dict:
    return yaml.safe_load((ROOT / "profiles" / name / "config.yaml").read_text())


def _clean_env() -> dict:
    """This process's environment without SLURM job variables or a default Snakemake profile."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SNAKEMAKE_PROFILE"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


# ------------------------------------------------------------------------------ dry-run parsing
_JOB_HEAD = re.compile(r"^(local)?(?:rule|checkpoint) (\S+):$")


def parse_jobs(text: str) -> list[dict]:
    """The jobs a Snakemake log announces: rule, whether local, and the printed resources.

    A dry run never says "localrule" (it does not know how the jobs will be executed), so
    `local` is only meaningful in the log of a real run."""
    jobs: list[dict] = []
    for line in text.splitlines():
        head = _JOB_HEAD.match(line.strip())
        if head and not line.startswith(" "):
            jobs.append({"rule": head.group(2), "local": bool(head.group(1)), "resources": {}})
        elif jobs and line.strip().startswith("jobid:"):
            jobs[-1]["jobid"] = int(line.split(":", 1)[1])
        elif jobs and line.strip().startswith("resources:"):
            for item in line.split("resources:", 1)[1].split(","):
                key, _, value = item.strip().partition("=")
                jobs[-1]["resources"][key] = value
    return jobs


def dry_run(cwd: Path, *args: str, timeout: int = 600) -> list[dict]:
    cmd = [SNAKEMAKE, "-n", "--forceall", "--nolock", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    jobs = parse_jobs(proc.stdout + "\n" + proc.stderr)
    assert jobs, f"no jobs in the dry run of {' '.join(cmd)}:\n{proc.stdout[-3000:]}"
    return jobs


def _need_test_config():
    if not (ROOT / TEST_CONFIG).is_file():
        pytest.skip(f"{TEST_CONFIG} (the tiny end-to-end config) does not exist yet")
    if not (ROOT / "Snakefile").is_file():
        pytest.skip("no Snakefile yet")


# ------------------------------------------------------------------------------ profile checks
def test_slurm_profile_uses_the_official_plugin_and_conda():
    profile = _profile("slurm")
    assert profile["executor"] == "slurm"
    for key in ("jobs", "latency-wait", "retries", "rerun-incomplete", "default-resources",
                "slurm-status-command"):
        assert key in profile, f"profiles/slurm lacks {key}"
    assert profile["rerun-incomplete"] is True
    assert profile["software-deployment-method"] in ("conda", ["conda"])
    resources = profile["default-resources"]
    assert int(resources["mem_mb"]) > 0 and int(resources["runtime"]) > 0
    # Site-specific values are left to the user (commented out), never guessed.
    assert "slurm_account" not in resources and "slurm_partition" not in resources
    assert not profile.get("set-resources"), "set-resources must stay site-specific (commented)"
    text = (ROOT / "profiles" / "slurm" / "config.yaml").read_text()
    for commented in ("# slurm_account:", "# slurm_partition:", "#   slurm_partition:",
                      "#   constraint:", "#   gpu_model:"):
        assert commented in text, f"profiles/slurm should show the site setting {commented!r} commented"
    for rule in GPU_RULES - {"cost", "distill_control", "tune_point", "tune"}:
        assert f"# {rule}:" in text, f"profiles/slurm should show GPU settings for {rule}"
    assert "# the same for distill_control, tune_point, tune and cost" in text


def test_slurm_test_profile_differs_only_in_test_settings():
    real, test = _profile("slurm"), _profile("slurm-test")
    for key in sorted(set(real) | set(test)):
        if key in TEST_ONLY_KEYS:
            continue
        if key == "default-resources":
            real_res = dict(real[key])
            test_res = dict(test[key])
            assert test_res.pop("slurm_partition") == "debug"
            assert real_res == test_res, "default-resources differ beyond slurm_partition"
            continue
        assert real.get(key) == test.get(key), f"profiles/slurm-test differs from profiles/slurm in {key}"
    assert test["slurm-status-command"] == "squeue"
    assert test["slurm-no-account"] is True
    assert int(test["slurm-init-seconds-before-status-checks"]) <= 10
    assert "software-deployment-method" not in test, "no conda on the test machines"


def test_local_profile_limits_gpu_jobs_and_skips_conda():
    profile = _profile("local")
    assert "executor" not in profile or profile["executor"] == "local"
    assert "gpu=1" in [str(r).replace(" ", "") for r in profile["resources"]]
    assert "software-deployment-method" not in profile
    assert profile["cores"] == "all" or int(profile["cores"]) >= 1


def test_rules_leave_site_settings_to_the_profile():
    rules = sorted((ROOT / "workflow" / "rules").glob("*.smk")) + [ROOT / "Snakefile"]
    text = "\n".join(p.read_text() for p in rules if p.exists())
    if not text:
        pytest.skip("no workflow yet")
    for key in ("slurm_account", "slurm_partition", "gpu_model", "constraint=", "gres="):
        assert key not in text, f"the workflow sets {key}: site settings belong in profiles/"


def profile_without_conda(name: str, dest: Path) -> Path:
    """A copy of profiles/NAME without `software-deployment-method`: even a dry run with conda
    enabled calls `conda info`, and there is no conda on the test machines."""
    profile = _profile(name)
    profile.pop("software-deployment-method", None)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_gpu_requests_follow_the_device(device, tmp_path):
    """Under the real SLURM profile, device=cuda puts gpu=1 on exactly the training/cost rules."""
    _need_test_config()
    profile = profile_without_conda("slurm", tmp_path / "slurm")
    jobs = dry_run(ROOT, "--profile", str(profile), "--configfile", TEST_CONFIG,
                   "--config", f"device={device}")
    assert {j["rule"] for j in jobs} & GPU_RULES, "no training job in the tiny config"
    for job in jobs:
        gpu = int(job["resources"].get("gpu", "0") or 0)
        wanted = 1 if device == "cuda" and job["rule"] in GPU_RULES else 0
        assert gpu == wanted, f"{job['rule']} requests gpu={gpu} with device={device}, expected {wanted}"
    for job in jobs:  # every job says how much memory and time it needs
        assert int(job["resources"]["mem_mb"]) > 0 and int(job["resources"]["runtime"]) > 0, job


# ------------------------------------------------------------------------------ live cluster
def _skip_or_fail(reason: str):
    if os.environ.get("HETCOMP_SLURM_REQUIRED") == "1":
        pytest.fail(f"SLURM test required (HETCOMP_SLURM_REQUIRED=1) but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster (tests/slurm/start_cluster.sh); stopped by PID afterwards."""
    if sys.platform != "linux":
        _skip_or_fail("the test cluster needs Linux")
    if os.geteuid() != 0:
        _skip_or_fail("the test cluster needs root (apt-get install, munged/slurmctld/slurmd)")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        _skip_or_fail("neither apt-get nor an installed SLURM: cannot set up the test cluster")
    state = tmp_path_factory.mktemp("slurm-cluster")
    start = subprocess.run(["bash", str(SLURM_SCRIPTS / "start_cluster.sh"), str(state)],
                           env=_clean_env(), capture_output=True, text=True, timeout=900)
    message = (start.stdout + start.stderr).strip()
    if start.returncode != 0:
        logs = ""
        for log in sorted((state / "log").glob("*")) if (state / "log").is_dir() else []:
            logs += f"\n--- {log.name}:\n" + log.read_text(errors="replace")[-2000:]
        # Whatever did start (the PIDs it recorded) is stopped again.
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_cluster.sh"), str(state)],
                       env=_clean_env(), capture_output=True, text=True, timeout=120)
        reasons = {3: "not root", 4: "no apt/Debian", 5: "SLURM packages unavailable",
                   6: "the cluster did not start", 7: "another test cluster is running",
                   9: "a real SLURM configuration exists in /etc/slurm"}
        _skip_or_fail(f"{reasons.get(start.returncode, 'start_cluster.sh failed')} "
                      f"(exit {start.returncode}): {message}{logs}")
    try:
        yield {"state": state, "start_message": message}
    finally:
        stop = subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_cluster.sh"), "--keep-logs", str(state)],
                              env=_clean_env(), capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, f"stop_cluster.sh failed: {stop.stdout}{stop.stderr}"


def run_snakemake(cmd: list[str], cwd: Path, log: Path, timeout: int = RUN_TIMEOUT_S) -> tuple[int, str, float]:
    """Run Snakemake; on timeout interrupt it (SIGINT: it cancels its SLURM jobs), then kill it."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_clean_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Not SIGTERM: Snakemake would wait for the running jobs (SLURM_LOCAL.md, pitfall 5).
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = -1
    return rc, log.read_text(errors="replace"), time.monotonic() - start


_SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def submitted_jobs(text: str) -> list[dict]:
    """The sbatch submissions in a Snakemake log: Snakemake job id, SLURM job id, rule."""
    jobs = []
    for sm_id, slurm_id, logfile in _SUBMITTED.findall(text):
        rule = re.search(r"/rule_([^/]+)/", logfile)
        jobs.append({"jobid": int(sm_id), "slurm_jobid": slurm_id, "rule": rule.group(1) if rule else "?"})
    return jobs


def slurmctld_records(state: Path) -> dict[str, dict]:
    """SLURM job id -> partition and exit status, from the test cluster's slurmctld log.

    (squeue forgets finished jobs after MinJobAge, and there is no accounting to ask instead.)"""
    records: dict[str, dict] = {}
    text = (state / "log" / "slurmctld.log").read_text(errors="replace")
    # The main scheduler logs "Allocate JobId=N ... Partition=P"; the backfill scheduler logs
    # "Started JobId=N in P on NODES".
    starts = (re.findall(r"sched: Allocate JobId=(\d+) .*Partition=(\S+)", text)
              + re.findall(r"Started JobId=(\d+) in (\S+) on ", text))
    for job, partition in starts:
        records.setdefault(job, {})["partition"] = partition
    for job, status in re.findall(r"_job_complete: JobId=(\d+) WEXITSTATUS (\d+)", text):
        records.setdefault(job, {})["exit"] = int(status)
    return records


def test_slurmctld_records_read_both_schedulers(tmp_path):
    """Jobs started by the main scheduler and by backfill both get their partition."""
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "slurmctld.log").write_text(
        "[t] sched: Allocate JobId=3 NodeList=vm #CPUs=1 Partition=debug\n"
        "[t] sched/backfill: _start_job: Started JobId=12 in gpu on vm\n"
        "[t] _job_complete: JobId=3 WEXITSTATUS 0\n"
        "[t] _job_complete: JobId=12 WEXITSTATUS 1\n")
    assert slurmctld_records(tmp_path) == {"3": {"partition": "debug", "exit": 0},
                                           "12": {"partition": "gpu", "exit": 1}}


def write_summary(**entries):
    path = Path(os.environ.get("HETCOMP_SLURM_SUMMARY", ROOT / "build" / "slurm-test-summary.json"))
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"SLURM test summary ({path}): {json.dumps(entries, sort_keys=True)}")


GPU_SNAKEFILE = """
localrules: all

rule all:
    input: "gpu.txt", "cpu.txt"

rule on_gpu:
    output: "gpu.txt"
    resources: gpu=1, mem_mb=200, runtime=5
    shell: "echo ok > {output}"

rule on_cpu:
    output: "cpu.txt"
    resources: mem_mb=200, runtime=5
    shell: "echo ok > {output}"
"""


@pytest.mark.slurm
def test_gpu_request_reaches_sbatch_and_the_scheduler(slurm_cluster, tmp_path):
    """gpu=1 -> `sbatch --gpus=1`, accepted, and SLURM allocates one (fake) GPU to the job."""
    (tmp_path / "Snakefile").write_text(GPU_SNAKEFILE)
    cmd = [SNAKEMAKE, "--profile", str(ROOT / "profiles" / "slurm-test"), "--verbose"]
    rc, log, wall = run_snakemake(cmd, tmp_path, tmp_path / "snakemake.log", timeout=900)
    assert rc == 0, f"snakemake failed (rc {rc}):\n{log[-6000:]}"
    jobs = {j["rule"]: j for j in submitted_jobs(log)}
    assert set(jobs) == {"on_gpu", "on_cpu"}, f"submissions: {jobs}"
    calls = re.findall(r"sbatch call: (.*)", log)
    gpu_calls = [c for c in calls if "--gpus=1" in c]
    assert len(calls) == 2 and len(gpu_calls) == 1, "sbatch calls:\n" + "\n".join(calls)
    assert "-p debug" in gpu_calls[0]
    details = subprocess.run(["scontrol", "show", "job", "-d", jobs["on_gpu"]["slurm_jobid"]],
                             env=_clean_env(), capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in details, details
    assert re.search(r"(JOB_GRES|TresPerJob)=\S*gpu:1", details), f"no GPU allocated:\n{details}"
    cpu_details = subprocess.run(["scontrol", "show", "job", "-d", jobs["on_cpu"]["slurm_jobid"]],
                                 env=_clean_env(), capture_output=True, text=True).stdout
    assert not re.search(r"(JOB_GRES|TresPerJob)=\S*gpu", cpu_details), f"CPU job got a GPU:\n{cpu_details}"
    write_summary(gpu_check={"wall_s": round(wall, 1), "sbatch_jobs": len(calls),
                             "gpu_sbatch_call": gpu_calls[0].split(" --wrap=")[0]})


def copy_checkout(dest: Path) -> Path:
    """The files of the checkout (tracked and untracked, minus git-ignored ones) copied to dest."""
    try:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
                                capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = None
    if listed is None:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".snakemake", "__pycache__", "build", "work", "results", ".pytest_cache"))
        return dest
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slurm
def test_tiny_workflow_through_slurm(slurm_cluster, tmp_path):
    _need_test_config()
    checkout = copy_checkout(tmp_path / "checkout")
    config = yaml.safe_load((checkout / TEST_CONFIG).read_text())
    expected = Counter(j["rule"] for j in
                       dry_run(checkout, "--profile", "profiles/slurm-test", "--configfile", TEST_CONFIG))

    cmd = [SNAKEMAKE, "--profile", "profiles/slurm-test", "--configfile", TEST_CONFIG]
    rc, log, wall = run_snakemake(cmd, checkout, tmp_path / "snakemake.log")
    assert rc == 0, f"snakemake --profile profiles/slurm-test failed (rc {rc}) after {wall:.0f}s:\n{log[-8000:]}"

    # The run did every job of the dry run; every non-local one went through sbatch, no local one.
    ran = list({j.get("jobid"): j for j in parse_jobs(log)}.values())  # a retried job once
    remote = Counter(j["rule"] for j in ran if not j["local"])
    local = Counter(j["rule"] for j in ran if j["local"])
    assert remote + local == expected, f"ran {dict(remote + local)}, the dry run has {dict(expected)}"
    assert remote and local, f"expected both local and SLURM jobs: remote {dict(remote)}, local {dict(local)}"
    submitted = submitted_jobs(log)
    per_job = {j["jobid"]: j for j in submitted}  # a retried job counts once here
    submitted_rules = Counter(j["rule"] for j in per_job.values())
    assert submitted_rules == remote, f"submitted {dict(submitted_rules)}, non-local jobs {dict(remote)}"
    assert not set(submitted_rules) & set(local)
    # SLURM ran each of them in the test partition, and the last attempt of each exited 0.
    records = slurmctld_records(slurm_cluster["state"])
    for job in per_job.values():
        record = records.get(job["slurm_jobid"])
        assert record == {"partition": "debug", "exit": 0}, (
            f"SLURM job {job['slurm_jobid']} ({job['rule']}): {record} in slurmctld.log")

    # The results: every table and figure of the workflow, non-empty; nothing left to do.
    results = checkout / config.get("results_dir", "results")
    tables = sorted((results / "tables").glob("*"))
    figures = sorted((results / "figures").glob("*"))
    assert tables and figures, f"no tables/figures under {results}"
    for path in tables + figures:
        assert path.stat().st_size > 0, f"{path} is empty"
    # Every configured teacher and method has its test metrics in the long table, as proportions.
    with open(results / "long.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for kind, names in (("teacher", config["teachers"]), ("student", config["methods"])):
        for name in map(str, names):
            cells = {(r["metric"], int(r["K"])) for r in rows
                     if r["kind"] == kind and r["method"] == name and r["split"] == "test"}
            assert {("recall", 10), ("ndcg", 10)} <= cells, f"long.csv lacks test metrics of {kind} {name}"
    values = [float(r["value"]) for r in rows if r["metric"] in ("recall", "ndcg")]
    assert values and all(0.0 <= v <= 1.0 for v in values), "metrics outside [0, 1] in long.csv"
    main = (results / "tables" / "main.md").read_text()
    table_rows = [line for line in main.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    assert len(table_rows) >= len(config["methods"]), f"main.md has fewer rows than methods:\n{main}"
    proc = subprocess.run([SNAKEMAKE, "-n", "--profile", "profiles/slurm-test", "--configfile", TEST_CONFIG],
                          cwd=checkout, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]

    write_summary(workflow={
        "wall_s": round(wall, 1),
        "sbatch_jobs": len(submitted),
        "snakemake_jobs_submitted": len(per_job),
        "local_jobs": dict(local),
        "jobs_by_rule": dict(submitted_rules),
        "tables": [p.name for p in tables],
    })
