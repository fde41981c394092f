"""Reference records: the small files of finished runs, kept in the repository.

A grid that spans several sessions (or machines) keeps each finished run's *records* under one
folder (``results/reference`` by default) with the work folder's layout::

    teachers/<dataset>/seed<S>/<teacher>/      runs/<dataset>/seed<S>/<method>/
    ensembles/<dataset>/seed<S>/               controls/<dataset>/seed<S>/<method>/<teacher>/
    cost/<dataset>/seed<S>/                    tuning/<dataset>/<method>/

A record holds what the reports read and nothing that is only needed to train further: the run's
``metrics.json``, ``run_info.json``, ``method_state.json`` and ``meta.json`` where present, the
per-user *test* metrics (``per_user.npz``, compressed; the paired tests read nothing else of it)
and the history (``history.jsonl.gz``); for cost and tuning folders their tables. Checkpoints,
trajectories and the ensemble's knowledge are not recorded (tens of MB each).

``hetcomp record`` copies every finished run of a work folder that has no record yet (a record is
never overwritten). With ``reference.use: true`` the workflow treats a recorded run as done and
aggregates from its record (``workflow/rules/common.smk``). Teachers and ensembles are retrained
where a seed still has students to train (their trajectories are not recorded): with the record's
thread count (``recorded_threads``), and a rebuilt ensemble must equal its record
(``differences_from_record``), since the recorded students of its seed distilled that one.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np

from hetcomp.io import atomic_output_dir

#: Folders of the work layout that hold runs, with the depth of a run below them.
RUN_KINDS = {"teachers": 3, "ensembles": 2, "runs": 3, "controls": 4, "cost": 2, "tuning": 2}
#: Small files copied as they are (when present).
KEPT_FILES = ("metrics.json", "run_info.json", "method_state.json", "meta.json",
              "cost.json", "cost.csv", "discrepancy.csv", "chosen.yaml", "grid.csv", "tune_info.json")
#: The arrays of ``per_user.npz`` a record keeps: the users and their test metrics.
KEPT_PER_USER = ("users", "test/")
#: The groups of ``metrics.json`` a retrained run must reproduce.
COMPARED_METRICS = ("valid", "test")
#: What marks a folder as a finished run of each kind.
FINISHED_MARKERS = ("run_info.json", "cost.json", "tune_info.json")


def is_finished(run_dir: Path) -> bool:
    return any((run_dir / marker).is_file() for marker in FINISHED_MARKERS)


def finished_runs(work: str | Path) -> list[Path]:
    """Every finished run folder under ``work`` (relative paths, sorted)."""
    work = Path(work)
    found = []
    for kind, depth in RUN_KINDS.items():
        root = work / kind
        if not root.is_dir():
            continue
        for candidate in root.glob("/".join(["*"] * depth)):
            if candidate.is_dir() and is_finished(candidate):
                found.append(candidate.relative_to(work))
    return sorted(found)


def record_run(run_dir: str | Path, record_dir: str | Path) -> int:
    """Write the record of one finished run into ``record_dir`` (atomically); returns its bytes."""
    run_dir, record_dir = Path(run_dir), Path(record_dir)
    with atomic_output_dir(record_dir) as tmp:
        for name in KEPT_FILES:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, tmp / name)
        per_user = run_dir / "per_user.npz"
        if per_user.is_file():
            with np.load(per_user) as arrays:
                kept = {name: arrays[name] for name in arrays.files if name.startswith(KEPT_PER_USER)}
            np.savez_compressed(tmp / "per_user.npz", **kept)
        history = run_dir / "history.jsonl"
        if history.is_file():
            with open(history, "rb") as source, gzip.GzipFile(tmp / "history.jsonl.gz", "wb",
                                                              mtime=0) as target:
                shutil.copyfileobj(source, target)
    return record_size(record_dir)


def record_size(record_dir: str | Path) -> int:
    return sum(path.stat().st_size for path in Path(record_dir).iterdir() if path.is_file())


def record_all(work: str | Path, reference: str | Path) -> list[tuple[Path, int]]:
    """Record every finished run of ``work`` that ``reference`` does not hold yet.

    Returns ``(relative path, bytes)`` of each new record.
    """
    work, reference = Path(work), Path(reference)
    written = []
    for relative in finished_runs(work):
        target = reference / relative
        if target.exists():
            continue
        written.append((relative, record_run(work / relative, target)))
    return written


def _run_info(record_dir: str | Path) -> dict:
    """A record's ``run_info.json``, or {} where there is none."""
    path = Path(record_dir) / "run_info.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def recorded_threads(record_dir: str | Path) -> int | None:
    """The torch thread count a recorded run trained with, or None (no record, or not recorded).
    Records older than the `torch_threads` key name it only in `device_name`, "cpu (..., 2 threads)"."""
    info = _run_info(record_dir)
    if info.get("torch_threads"):
        return int(info["torch_threads"])
    named = re.search(r"(\d+) threads\)$", info.get("device_name", ""))
    return int(named.group(1)) if named else None


def recorded_cpu(record_dir: str | Path) -> str | None:
    """The CPU a recorded run trained on, "MODEL, CAPABILITY" as `runtime.cpu_description` gives
    it, or None (no record, a GPU run, or a record older than that part of `device_name`)."""
    named = re.fullmatch(r"cpu \((.+), (\S+), \d+ threads\)", _run_info(record_dir).get("device_name", ""))
    return f"{named.group(1)}, {named.group(2)}" if named else None


def differences_from_record(metrics: Mapping, record_dir: str | Path) -> list[str]:
    """Each metric of ``metrics`` (valid and test) that differs from the record's, as
    ``"test recall@50 0.2304701 vs 0.2314424"`` (this run's value first, every digit); empty if
    all are equal."""
    recorded = json.loads((Path(record_dir) / "metrics.json").read_text())
    differences = []
    for group in COMPARED_METRICS:
        ours, theirs = metrics.get(group) or {}, recorded.get(group) or {}
        for name in sorted(set(ours) | set(theirs)):
            if ours.get(name) != theirs.get(name):
                differences.append(f"{group} {name} {ours.get(name)!r} vs {theirs.get(name)!r}")
    return differences


def read_history_lines(run_dir: str | Path) -> list[str] | None:
    """The lines of a run's ``history.jsonl`` (or of a record's ``history.jsonl.gz``); None if neither."""
    run_dir = Path(run_dir)
    if (run_dir / "history.jsonl").is_file():
        return (run_dir / "history.jsonl").read_text().splitlines()
    if (run_dir / "history.jsonl.gz").is_file():
        with gzip.open(run_dir / "history.jsonl.gz", "rt") as handle:
            return handle.read().splitlines()
    return None
