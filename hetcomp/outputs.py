"""The files every training run writes: metrics.json, history.jsonl, per_user.npz, run_info.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hetcomp.evaluation import EvalResult
from hetcomp.io import write_json


def metrics_record(best_epoch: int | None, valid: EvalResult, test: EvalResult, **extra) -> dict:
    """Best-epoch validation and test means (4-decimal rounding is left to the reports)."""
    return {"best_epoch": best_epoch, "valid": valid.means(), "test": test.means(), **extra}


def write_per_user(path: str | Path, valid: EvalResult, test: EvalResult) -> None:
    """Per-user metrics for significance tests: ``users`` plus ``valid/recall@50``-style arrays."""
    arrays = {"users": test.users}
    for part, result in (("valid", valid), ("test", test)):
        arrays.update({f"{part}/{name}": values for name, values in result.per_user.items()})
    np.savez_compressed(path, **arrays)


def write_history(path: str | Path, history: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in history))


def write_run_outputs(out_dir: str | Path, *, metrics: dict, valid: EvalResult, test: EvalResult,
                      history: list[dict], info: dict) -> None:
    """Write the four standard run files into ``out_dir`` (normally an atomic temp dir)."""
    out_dir = Path(out_dir)
    write_json(out_dir / "metrics.json", metrics)
    write_per_user(out_dir / "per_user.npz", valid, test)
    write_history(out_dir / "history.jsonl", history)
    write_json(out_dir / "run_info.json", info)
