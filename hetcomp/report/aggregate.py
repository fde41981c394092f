"""Collect every run into one long table (``hetcomp aggregate``).

``long.csv`` has one row per (run, split, metric, K) with the columns of ``LONG_COLUMNS``:

- ``kind``: ``teacher`` (a ``train-teacher`` run), ``ensemble`` (``build-ensemble``) or
  ``student`` (``distill``);
- ``method``: the teacher's model name, ``ensemble``, or the distillation method;
- ``teacher``: what the run learned from: the model itself for a teacher, ``ensemble`` for the
  ensemble and for students distilling it, the single teacher's name for a single-teacher control,
  ``none`` for methods without a teacher (w/o KD);
- ``seed``, ``split`` (valid/test), ``metric`` (recall/ndcg), ``K``, ``value``;
- ``best_epoch``, ``train_time_s``, ``peak_memory_mb``, ``n_parameters`` and ``run`` (the folder).

A run's identity comes from its own files (``run_info.json``: ``config.dataset``, ``config.model``,
``config.method``/``method``, ``config.teacher``/``teacher``, ``seed``); where a field is missing
it is read from the workflow's folder layout (``.../<dataset>/seed<seed>/<method>[/<teacher>]``).

The extras folder holds ``history.csv`` (every student's per-evaluation records, flattened to
``key, value``: ``valid/recall@50``, ``loss/kd``, HetComp's selection, ...), ``datasets.csv``
(split statistics), ``cost.csv`` and ``discrepancy.csv`` (from ``hetcomp cost`` folders) and
``tuning.csv`` (every point of every ``hetcomp tune`` grid, ``hetcomp.tuning.read_tunings``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from hetcomp.errors import HetCompError
from hetcomp.io import read_json

LONG_COLUMNS = ["kind", "dataset", "method", "teacher", "seed", "split", "metric", "K", "value",
                "best_epoch", "train_time_s", "peak_memory_mb", "n_parameters", "run"]
HISTORY_COLUMNS = ["kind", "dataset", "method", "teacher", "seed", "epoch", "key", "value"]
DATASET_COLUMNS = ["dataset", "n_users", "n_items", "n_interactions", "n_train", "n_valid", "n_test",
                   "n_eval_users", "density", "min_user_interactions", "split_rule", "description"]
METRIC_RE = re.compile(r"^(?P<metric>[a-z_]+)@(?P<k>\d+)$")
#: Methods that use no teacher knowledge (their ``teacher`` is ``none`` unless the run says otherwise).
NO_TEACHER_METHODS = {"wokd"}


def _read_info(run_dir: Path) -> dict:
    path = run_dir / "run_info.json"
    if not path.is_file():
        raise HetCompError(f"{run_dir}: no run_info.json; not a finished run")
    return read_json(path)


def _layout(run_dir: Path, kind: str) -> dict:
    """Identity read from the workflow layout: ``<dataset>/seed<seed>/<name>[/<teacher>]``."""
    parts = run_dir.parts
    for i in range(len(parts) - 1, 0, -1):
        match = re.fullmatch(r"seed(\d+)", parts[i])
        if match:
            out = {"dataset": parts[i - 1], "seed": int(match.group(1))}
            rest = parts[i + 1:]
            if kind == "student" and len(rest) == 2:
                out.update(method=rest[0], teacher=rest[1])
            elif rest:
                out["method"] = rest[0]
            return out
    return {}


def identify(run_dir: str | Path, kind: str) -> dict:
    """``{dataset, method, teacher, seed}`` of a run folder of the given kind."""
    run_dir = Path(run_dir)
    info = _read_info(run_dir)
    config = info.get("config") or {}
    layout = _layout(run_dir, kind)
    dataset = config.get("dataset") or info.get("dataset") or layout.get("dataset")
    seed = info.get("seed", config.get("seed"))
    if seed is None:
        seed = layout.get("seed")
    if kind == "teacher":
        method = config.get("model") or layout.get("method")
        teacher = method
    elif kind == "ensemble":
        method = teacher = "ensemble"
    elif kind == "student":
        method = info.get("method") or config.get("method") or layout.get("method")
        teacher = info.get("teacher") or config.get("teacher") or layout.get("teacher")
        if not teacher:
            if "teacher" in config:  # recorded as null: the method distils nothing
                uses = False
            else:
                uses = method not in NO_TEACHER_METHODS
            teacher = "ensemble" if uses else "none"
    else:
        raise ValueError(f"unknown run kind {kind!r}")
    missing = [name for name, value in (("dataset", dataset), ("method", method), ("seed", seed))
               if value is None]
    if missing:
        raise HetCompError(f"{run_dir}: cannot tell the run's {', '.join(missing)} "
                           "(neither run_info.json nor the folder layout names it)")
    return {"kind": kind, "dataset": str(dataset), "method": str(method), "teacher": str(teacher),
            "seed": int(seed)}


def _number(value):
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def run_rows(run_dir: str | Path, kind: str) -> list[dict]:
    """The long rows of one run (every split, metric and K in its metrics.json)."""
    run_dir = Path(run_dir)
    ident = identify(run_dir, kind)
    info = _read_info(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise HetCompError(f"{run_dir}: no metrics.json; not a finished run")
    metrics = read_json(run_dir / "metrics.json")
    extra = {
        "best_epoch": _number(metrics.get("best_epoch")),
        "train_time_s": _number(metrics.get("train_time_s", info.get("train_time_s", info.get("wall_time_s")))),
        "peak_memory_mb": _number(info.get("peak_memory_mb")),
        "n_parameters": _number(metrics.get("n_parameters", info.get("n_parameters"))),
        "run": str(run_dir),
    }
    rows = []
    for split in ("valid", "test"):
        for name, value in sorted((metrics.get(split) or {}).items()):
            match = METRIC_RE.match(name)
            if match and _number(value) is not None:
                rows.append({**ident, "split": split, "metric": match["metric"], "K": int(match["k"]),
                             "value": float(value), **extra})
    if not rows:
        raise HetCompError(f"{run_dir}/metrics.json: no valid/test metrics like 'recall@50'")
    return rows


def flatten(record: dict, prefix: str = "") -> Iterable[tuple[str, float]]:
    """``(key, number)`` pairs of a nested record: dicts join keys with '/', lists add the index."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, f"{name}/")
        elif isinstance(value, (list, tuple)):
            yield from flatten({str(i): v for i, v in enumerate(value)}, f"{name}/")
        elif isinstance(value, bool):
            yield name, float(value)
        elif _number(value) is not None:
            yield name, float(value)


def history_rows(run_dir: str | Path, kind: str) -> list[dict]:
    """Flattened per-evaluation records of a run's history (``history.jsonl``, or a reference
    record's ``history.jsonl.gz``; empty if it has none)."""
    from hetcomp.reference import read_history_lines

    run_dir = Path(run_dir)
    path = run_dir / "history.jsonl"
    lines = read_history_lines(run_dir)
    if lines is None:
        return []
    ident = identify(run_dir, kind)
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise HetCompError(f"{path}:{lineno}: not JSON") from None
        epoch = record.get("epoch")
        if epoch is None:
            continue
        for key, value in flatten({k: v for k, v in record.items() if k != "epoch"}):
            rows.append({**ident, "epoch": int(epoch), "key": key, "value": value})
    return rows


def dataset_row(split_dir: str | Path) -> dict:
    """Statistics of a prepared split (counts from the matrices, rules from meta.json)."""
    from hetcomp.data.store import load_split

    split = load_split(split_dir)
    meta = split.meta
    n_train, n_valid, n_test = split.train.nnz, split.valid.nnz, split.test.nnz
    n_interactions = meta.get("n_interactions", n_train + n_valid + n_test)
    rule = meta.get("split") or {}
    if rule.get("method") == "random":
        rule_text = (f"random per user: test {rule.get('test_ratio')}, valid {rule.get('valid_ratio')}, "
                     f"seed {rule.get('seed')}")
    else:
        rule_text = str(rule.get("method", "n/a"))
    return {
        "dataset": meta.get("dataset") or Path(split_dir).name,
        "n_users": split.n_users, "n_items": split.n_items, "n_interactions": int(n_interactions),
        "n_train": int(n_train), "n_valid": int(n_valid), "n_test": int(n_test),
        "n_eval_users": int(len(split.eval_users)),
        "density": float(n_interactions) / max(split.n_users * split.n_items, 1),
        "min_user_interactions": (meta.get("filters") or {}).get("min_user_interactions"),
        "split_rule": rule_text,
        "description": " ".join(str(meta.get("description", "")).split()),
    }


def cost_frames(cost_dirs: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``cost.csv`` and ``discrepancy.csv`` of every ``hetcomp cost`` folder, with dataset and seed."""
    costs, discrepancies = [], []
    for cost_dir in cost_dirs:
        cost_dir = Path(cost_dir)
        if not (cost_dir / "cost.json").is_file():
            raise HetCompError(f"{cost_dir}: no cost.json; run `hetcomp cost` first")
        meta = read_json(cost_dir / "cost.json")
        layout = _layout(cost_dir, "cost")
        dataset = meta.get("dataset") or layout.get("dataset")
        seed = meta.get("seed", layout.get("seed"))
        for name, target in (("cost.csv", costs), ("discrepancy.csv", discrepancies)):
            path = cost_dir / name
            if path.is_file() and path.stat().st_size:
                frame = pd.read_csv(path)
                frame.insert(0, "seed", seed)
                frame.insert(0, "dataset", dataset)
                target.append(frame)
    cost = pd.concat(costs, ignore_index=True) if costs else pd.DataFrame(
        columns=["dataset", "seed", "kind", "name", "teacher", "n_parameters", "latency_ms",
                 "throughput_users_per_s", "device", "device_name"])
    discrepancy = pd.concat(discrepancies, ignore_index=True) if discrepancies else pd.DataFrame(
        columns=["dataset", "seed", "method", "student_teacher", "teacher", "checkpoint", "epoch",
                 "discrepancy"])
    return cost, discrepancy


def aggregate(*, teachers: Sequence = (), ensembles: Sequence = (), students: Sequence = (),
              splits: Sequence = (), cost: Sequence = (), tuning: Sequence = ()) -> dict[str, pd.DataFrame]:
    """Every frame ``hetcomp aggregate`` writes: ``long``, ``history``, ``datasets``, ``cost``,
    ``discrepancy``, ``tuning``."""
    from hetcomp.tuning import read_tunings

    long_rows, history = [], []
    for kind, dirs in (("teacher", teachers), ("ensemble", ensembles), ("student", students)):
        for run_dir in dirs:
            long_rows.extend(run_rows(run_dir, kind))
            if kind == "student":
                history.extend(history_rows(run_dir, kind))
    long = pd.DataFrame(long_rows, columns=LONG_COLUMNS)
    duplicated = long.duplicated(["kind", "dataset", "method", "teacher", "seed", "split", "metric", "K"])
    if duplicated.any():
        first = long[duplicated].iloc[0]
        raise HetCompError(f"two runs are the same (kind {first.kind}, dataset {first.dataset}, method "
                           f"{first.method}, teacher {first.teacher}, seed {first.seed}): {first.run}")
    cost_frame, discrepancy = cost_frames(cost)
    return {
        "long": long.sort_values(["kind", "dataset", "method", "teacher", "seed", "split", "metric", "K"],
                                 kind="stable").reset_index(drop=True),
        "history": pd.DataFrame(history, columns=HISTORY_COLUMNS),
        "datasets": pd.DataFrame([dataset_row(s) for s in splits], columns=DATASET_COLUMNS),
        "cost": cost_frame,
        "discrepancy": discrepancy,
        "tuning": read_tunings(tuning),
    }


EXTRAS = ("history", "datasets", "cost", "discrepancy", "tuning")


def read_extras(extras_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The extras folder written by ``hetcomp aggregate`` (missing files read as empty frames)."""
    extras_dir = Path(extras_dir)
    out = {}
    for name in EXTRAS:
        path = extras_dir / f"{name}.csv"
        try:
            out[name] = pd.read_csv(path) if path.is_file() else pd.DataFrame()
        except pd.errors.EmptyDataError:
            out[name] = pd.DataFrame()
    return out


def read_long(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise HetCompError(f"{path}: not found; run `hetcomp aggregate` first")
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    missing = sorted(set(LONG_COLUMNS) - set(frame.columns) - {"run", "n_parameters"})
    if missing:
        raise HetCompError(f"{path}: missing column(s) {', '.join(missing)}")
    for column in ("dataset", "method", "teacher", "kind", "split", "metric"):
        frame[column] = frame[column].astype(str)
    return frame


def per_user_values(run_dir: str | Path, split: str, metric: str, k: int) -> pd.Series | None:
    """A run's per-user metric (index: user id) from per_user.npz, or None when unavailable."""
    path = Path(str(run_dir)) / "per_user.npz"
    if not path.is_file():
        return None
    with np.load(path) as arrays:
        key = f"{split}/{metric}@{k}"
        if key not in arrays or "users" not in arrays:
            return None
        return pd.Series(arrays[key], index=arrays["users"])
