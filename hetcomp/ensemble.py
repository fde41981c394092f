"""The heterogeneous-teacher ensemble, built from teacher trajectories (``hetcomp build-ensemble``).

Importance (docs/METHOD.md, "Ensemble"): an item at 0-based rank ``r`` of a teacher's top-N list gets
``exp(-r / temperature)``; items outside the list get 0. The ensemble score of an item is the sum
over teachers. Only ranks are stored; dense scores exist one user batch at a time.

What ``build_knowledge`` produces (``hetcomp.knowledge.TeacherKnowledge``):

- ``trajectories`` int32 ``[T, C, U, N]``: every teacher's exported checkpoints, stacked in the
  order the runs were given. All teachers must have the same C, N and split.
- ``final_topk`` int32 ``[U, K]``: ``hetcomp.knowledge.combine_rankings`` of the final
  checkpoints (``K <= N``, so every entry is an item that some teacher listed, never a training item).
- ``observed`` int32 ``[U, L]``: each user's training items ranked by the ensemble of the teachers'
  ``train_rank`` (importance ``exp(-train_rank / temperature)`` summed over teachers; ties by item
  id), the first ``L`` of them. Padding (an open choice, docs/METHOD.md "Losses"): users with fewer
  than ``L`` training items are padded with ``-1`` at the end of the row, i.e. a per-user mask
  ``observed >= 0``; items are never repeated and unobserved items never fill the row.

The "Ensemble" row of the teachers table evaluates ``ensemble_score_fn`` of the final
checkpoints with the same ``Evaluator`` as every other model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from hetcomp.errors import HetCompError
from hetcomp.evaluation import ScoreFn
from hetcomp.io import read_json, write_json
from hetcomp.knowledge import TeacherKnowledge, combine_rankings, ensemble_scores
from hetcomp.trajectory import Trajectory

log = logging.getLogger(__name__)

#: How rows of ``observed`` shorter than ``L`` are filled (recorded in meta.json).
PADDING_RULE = "-1 after the user's last training item (per-user mask: observed >= 0)"
IMPORTANCE_RULE = "exp(-rank / temperature), rank 0-based within the teacher's list; summed over teachers"


@dataclass
class TeacherRun:
    """One ``hetcomp train-teacher`` output directory, as the ensemble needs it."""

    name: str
    run_dir: str
    trajectory: Trajectory
    seed: int | None = None
    n_parameters: int | None = None
    split_fingerprint: str | None = None
    info: dict = field(default_factory=dict)


def load_teacher_run(run_dir: str | Path) -> TeacherRun:
    path = Path(run_dir)
    if not (path / "run_info.json").is_file():
        raise HetCompError(f"{path}: not a teacher run (no run_info.json); run `hetcomp train-teacher`")
    info = read_json(path / "run_info.json")
    name = (info.get("config") or {}).get("model")
    if not name:
        raise HetCompError(f"{path}/run_info.json: no config.model (teacher name)")
    n_parameters = None
    if (path / "metrics.json").is_file():
        n_parameters = read_json(path / "metrics.json").get("n_parameters")
    return TeacherRun(name=str(name), run_dir=str(run_dir),
                      trajectory=Trajectory.load(path / "trajectory.npz"),
                      seed=info.get("seed"), n_parameters=n_parameters,
                      split_fingerprint=info.get("split_fingerprint"), info=info)


def check_compatible(runs: Sequence[TeacherRun], n_users: int, n_items: int, train_nnz: int,
                     fingerprint: str | None = None) -> None:
    """One-line errors for teacher runs that cannot be stacked into one ensemble."""
    if not runs:
        raise HetCompError("no teacher runs given")
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise HetCompError(f"teacher name(s) {', '.join(duplicates)} given more than once; "
                           "an ensemble needs one run per teacher")
    first = runs[0]
    for run in runs:
        topn, train_rank = run.trajectory.topn, run.trajectory.train_rank
        if topn.ndim != 3 or run.trajectory.epochs.shape != (topn.shape[0],):
            raise HetCompError(f"{run.run_dir}: malformed trajectory (topn {list(topn.shape)}, "
                               f"epochs {list(run.trajectory.epochs.shape)})")
        if topn.shape != first.trajectory.topn.shape:
            raise HetCompError(
                f"teacher trajectories differ in shape [checkpoints, users, N]: {first.name} "
                f"{list(first.trajectory.topn.shape)} vs {run.name} {list(topn.shape)}")
        if fingerprint and run.split_fingerprint and run.split_fingerprint != fingerprint:
            raise HetCompError(f"{run.run_dir}: teacher {run.name} was trained on a different split "
                               f"(fingerprint {run.split_fingerprint} vs {fingerprint})")
        if topn.shape[1] != n_users or train_rank.shape != (train_nnz,):
            raise HetCompError(
                f"{run.run_dir}: trajectory of {run.name} does not match the split ({topn.shape[1]} users "
                f"and {train_rank.shape[0]} train ranks vs {n_users} users and {train_nnz} interactions)")
        if topn.size and (topn.min() < 0 or topn.max() >= n_items):
            raise HetCompError(f"{run.run_dir}: trajectory of {run.name} has item ids outside [0, {n_items})")


def ensemble_score_fn(lists: np.ndarray, n_items: int, temperature: float,
                      device: torch.device | str = "cpu") -> ScoreFn:
    """A score function (``users -> [B, n_items]``) of the ensemble of ``lists [T, U, N]``."""

    def score(users: torch.Tensor) -> torch.Tensor:
        return ensemble_scores(lists[:, users.cpu().numpy()], n_items, temperature, device)

    return score


def selection_score_fn(knowledge: TeacherKnowledge, selection: np.ndarray,
                       device: torch.device | str = "cpu") -> ScoreFn:
    """The ensemble at a per-(teacher, user) checkpoint ``selection [T, U]`` as a score function.

    The matching ranking is ``combine_rankings(knowledge.selected_lists(selection), ...)``.
    """
    return ensemble_score_fn(knowledge.selected_lists(np.asarray(selection)), knowledge.n_items,
                             knowledge.temperature, device)


def final_score_fn(knowledge: TeacherKnowledge, device: torch.device | str = "cpu") -> ScoreFn:
    """The ensemble of every teacher's final checkpoint (the "Ensemble" row) as a score function."""
    return ensemble_score_fn(knowledge.trajectories[:, -1], knowledge.n_items, knowledge.temperature, device)


def observed_ranking(train: sp.csr_matrix, train_ranks: np.ndarray, length: int,
                     temperature: float) -> np.ndarray:
    """Each user's training items ranked by the summed importance of the teachers' ``train_ranks``.

    ``train_ranks`` is ``[T, nnz(train)]`` in CSR order. Returns int32 ``[n_users, length]``: the
    first ``length`` items of each ranking (ties by item id), padded with ``-1``.
    """
    train = train.tocsr()
    train_ranks = np.asarray(train_ranks)
    if train_ranks.ndim != 2 or train_ranks.shape[1] != train.nnz:
        raise HetCompError(f"train ranks {list(train_ranks.shape)} do not match {train.nnz} interactions")
    if length < 0:
        raise HetCompError(f"observed length must be >= 0, got {length}")
    total = np.exp(-train_ranks.astype(np.float64) / temperature).sum(0)
    lengths = np.diff(train.indptr)
    rows = np.repeat(np.arange(train.shape[0]), lengths)
    order = np.lexsort((-total, rows))  # by user, then importance descending; ties keep item order
    position = np.arange(train.nnz) - train.indptr[rows[order]]
    keep = position < length
    out = np.full((train.shape[0], length), -1, dtype=np.int32)
    out[rows[order][keep], position[keep]] = train.indices[order][keep]
    return out


def build_knowledge(runs: Sequence[TeacherRun], train: sp.csr_matrix, *, top_k: int = 100,
                    observed: int = 10, temperature: float = 10.0,
                    meta: dict | None = None) -> TeacherKnowledge:
    """Stack the runs' trajectories and compute ``final_topk`` and ``observed`` (module docstring)."""
    check_compatible(runs, train.shape[0], train.shape[1], train.nnz)
    if temperature <= 0:
        raise HetCompError(f"temperature must be > 0, got {temperature}")
    depth = runs[0].trajectory.topn.shape[2]
    if not 1 <= top_k <= depth:
        raise HetCompError(f"--top-k must be between 1 and the trajectories' N = {depth}, got {top_k}")
    trajectories = np.stack([run.trajectory.topn.astype(np.int32) for run in runs])
    final_topk = combine_rankings(trajectories[:, -1], train.shape[1], top_k, temperature)
    observed_lists = observed_ranking(train, np.stack([run.trajectory.train_rank for run in runs]),
                                      observed, temperature)
    meta = {
        "teachers": [run.name for run in runs],
        "teacher_runs": [run.run_dir for run in runs],
        "checkpoint_epochs": {run.name: run.trajectory.epochs.tolist() for run in runs},
        "n_users": int(train.shape[0]),
        "n_items": int(train.shape[1]),
        "n_checkpoints": int(trajectories.shape[1]),
        "depth": int(depth),
        "top_k": int(top_k),
        "observed_length": int(observed),
        "observed_padding": PADDING_RULE,
        "importance": IMPORTANCE_RULE,
        "temperature": float(temperature),
        **(meta or {}),
    }
    return TeacherKnowledge(teachers=meta["teachers"], trajectories=trajectories, observed=observed_lists,
                            final_topk=final_topk, n_items=int(train.shape[1]),
                            temperature=float(temperature), meta=meta)


def write_knowledge(knowledge: TeacherKnowledge, out_dir: str | Path) -> None:
    """``knowledge.npz`` and ``meta.json`` as ``hetcomp.knowledge.load_knowledge`` reads them."""
    out_dir = Path(out_dir)
    np.savez_compressed(out_dir / "knowledge.npz", trajectories=knowledge.trajectories,
                        observed=knowledge.observed, final_topk=knowledge.final_topk)
    write_json(out_dir / "meta.json", knowledge.meta)
