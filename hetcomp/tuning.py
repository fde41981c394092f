"""Validation grids of the baselines (``hetcomp tune``): choosing a point, its files, reading them back.

A method YAML may hold a ``tune`` grid (``hetcomp.config.grid_points``). ``hetcomp tune`` trains
every point on one seed and keeps the one with the best **validation** ``SELECT_METRIC`` (the first
in grid order on a tie); test metrics are recorded beside it but never used to choose. Its output
folder holds:

- ``chosen.yaml``: the winning point, just the tuned keys and values (``hetcomp distill --tuned``);
- ``grid.csv``: one row per point (``point``, the tuned keys, ``GRID_METRICS``, ``best_epoch``,
  ``train_time_s``, ``chosen``, then the test columns ``TEST_COLUMNS``);
- ``tune_info.json``: the provenance record (``hetcomp.runtime.run_info``) plus the method,
  dataset, grid and choice;
- ``best_run/``: the winning point's run, exactly as ``hetcomp distill --tuned`` would write it
  on the tuning seed; ``hetcomp distill`` reuses it there instead of training the same run again
  (``reusable_run``).
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from hetcomp.config import TUNE_KEY, load_yaml
from hetcomp.errors import HetCompError
from hetcomp.io import atomic_output_dir, atomic_write_text, read_json, write_json

SELECT_METRIC = "recall@50"
#: Validation columns of grid.csv: the selection metric first.
GRID_METRICS = [f"valid_{SELECT_METRIC}", "valid_ndcg@50"]
#: Test columns of grid.csv, recorded for the record only: the choice never reads them.
TEST_COLUMNS = ["test_recall@50_not_used_for_selection", "test_ndcg@50_not_used_for_selection"]
CHOSEN_FILE, GRID_FILE, INFO_FILE, BEST_RUN = "chosen.yaml", "grid.csv", "tune_info.json", "best_run"
#: Columns of ``read_tunings`` (the aggregate's tuning.csv): one row per grid point.
TUNING_COLUMNS = ["dataset", "method", "seed", "setting", "point", *GRID_METRICS, "best_epoch",
                  "train_time_s", "chosen"]


def grid_row(index: int, point: Mapping, valid: Mapping, test: Mapping, best_epoch: int | None,
             train_time_s: float) -> dict:
    """One grid.csv row from a point's best-epoch validation/test means (``chosen`` set later)."""
    metrics = [valid.get(SELECT_METRIC), valid.get("ndcg@50")]
    tests = [test.get("recall@50"), test.get("ndcg@50")]
    return {"point": index, **point, **dict(zip(GRID_METRICS, metrics)), "best_epoch": best_epoch,
            "train_time_s": round(train_time_s, 3), "chosen": False, **dict(zip(TEST_COLUMNS, tests))}


def select_point(rows: Sequence[Mapping]) -> int:
    """Index of the row with the highest validation ``SELECT_METRIC`` (the first on a tie; NaN loses)."""
    if not rows:
        raise HetCompError("an empty grid has no best point")
    scores = [row.get(GRID_METRICS[0]) for row in rows]
    scores = [-math.inf if score is None or math.isnan(score) else float(score) for score in scores]
    return scores.index(max(scores))


def format_setting(point: Mapping) -> str:
    """``lambda=0.01, n_uninteresting=100``: a point in one short line."""
    return ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in point.items())


def write_tuning(out: str | Path, rows: list[dict], grid: list[dict], info: dict,
                 point_runs: Sequence[str | Path] | None = None) -> dict:
    """Choose on validation and write ``chosen.yaml``, ``grid.csv``, ``tune_info.json`` atomically,
    with the chosen point's run folder (from ``point_runs``, one per point) moved to ``best_run``.

    Returns the chosen point. ``info`` is the run_info record; the choice is added to it.
    """
    best = select_point(rows)
    chosen = dict(grid[best])
    rows = [{**row, "chosen": i == best} for i, row in enumerate(rows)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    info = {**info, "select_metric": f"valid {SELECT_METRIC}", "keys": list(chosen), "grid": grid,
            "chosen_point": best, "chosen": chosen}
    with atomic_output_dir(out) as tmp:
        atomic_write_text(tmp / CHOSEN_FILE, yaml.safe_dump(chosen, sort_keys=False))
        atomic_write_text(tmp / GRID_FILE, buffer.getvalue())
        write_json(tmp / INFO_FILE, info)
        if point_runs is not None:
            shutil.move(str(point_runs[best]), tmp / BEST_RUN)
    return chosen


def reusable_run(tuned: str | Path, *, config_hash: str, seed: int, split_fingerprint: str,
                 ensemble_dir: str | None, device: str) -> Path | None:
    """The tune folder's ``best_run`` if it is the run ``hetcomp distill`` is about to train (same
    config hash, seed, split, ensemble and device), else None."""
    run = Path(tuned) / BEST_RUN
    if not (run / "run_info.json").is_file():
        return None
    info = read_json(run / "run_info.json")
    same = (info.get("config_hash") == config_hash and info.get("seed") == seed
            and info.get("split_fingerprint") == split_fingerprint
            and info.get("ensemble_dir") == ensemble_dir and info.get("device") == device)
    return run if same else None


def copy_run(run: str | Path, out: str | Path, **provenance) -> None:
    """Copy a finished run folder to ``out`` (atomically), adding ``provenance`` to its run_info."""
    run = Path(run)
    with atomic_output_dir(out) as tmp:
        for path in run.iterdir():
            if path.is_file():
                shutil.copyfile(path, tmp / path.name)
        info = read_json(run / "run_info.json")
        write_json(tmp / "run_info.json", {**info, **provenance, "reused_from": str(run)})


def load_chosen(path: str | Path, grid: list[dict], where: str) -> dict:
    """The point in ``path`` (a ``hetcomp tune`` folder or its chosen.yaml); it must be in ``grid``."""
    path = Path(path)
    file = path / CHOSEN_FILE if path.is_dir() else path
    chosen = load_yaml(file)
    if not chosen:
        raise HetCompError(f"{file}: empty; expected the tuned keys and their values")
    if not grid:
        raise HetCompError(f"{where} has no {TUNE_KEY} grid, so the tuned setting {file} cannot apply")
    if chosen not in grid:
        raise HetCompError(f"{file}: {chosen} is not a point of the {TUNE_KEY} grid of {where} "
                           "(did the grid change? run hetcomp tune again)")
    return chosen


def read_tunings(dirs: Sequence[str | Path]):
    """Every grid of the ``hetcomp tune`` folders as one frame (``TUNING_COLUMNS``)."""
    import pandas as pd

    frames = []
    for folder in map(Path, dirs):
        if not (folder / INFO_FILE).is_file() or not (folder / GRID_FILE).is_file():
            raise HetCompError(f"{folder}: no {INFO_FILE}/{GRID_FILE}; not a finished hetcomp tune folder")
        info = read_json(folder / INFO_FILE)
        grid = pd.read_csv(folder / GRID_FILE)
        if len(grid) != len(info.get("grid", ())):
            raise HetCompError(f"{folder}: {GRID_FILE} has {len(grid)} rows for {len(info.get('grid', ()))} points")
        frame = grid[["point", *GRID_METRICS, "best_epoch", "train_time_s", "chosen"]].copy()
        frame.insert(0, "setting", [format_setting(point) for point in info["grid"]])
        for column, value in (("seed", info.get("seed")), ("method", info.get("method")),
                              ("dataset", info.get("dataset"))):
            frame.insert(0, column, value)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=TUNING_COLUMNS)
    return pd.concat(frames, ignore_index=True)[TUNING_COLUMNS]
