"""Teacher knowledge as every distiller sees it: rankings, never dense users x items arrays.

An ensemble directory (written by ``hetcomp build-ensemble``) holds ``knowledge.npz`` with

- ``trajectories``: int32 ``[n_teachers, n_checkpoints, n_users, N]``, each teacher checkpoint's
  top-N non-training items per user, best first (checkpoint ``n_checkpoints - 1`` is the final one);
- ``observed``: int32 ``[n_users, L]``, each user's training items ranked by the final ensemble,
  padded with ``-1`` where a user has fewer than ``L`` training items;
- ``final_topk``: int32 ``[n_users, K]``, the final ensemble's top-K non-training items;

and ``meta.json`` (teacher names and source trajectories, checkpoint epochs, temperature, ...).
The importance of an item ranked ``r`` (0-based) by a teacher is ``exp(-r / temperature)``; the
ensemble score is the sum over teachers (docs/METHOD.md, "Teachers and their ensemble").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hetcomp.errors import HetCompError
from hetcomp.io import read_json


@dataclass
class TeacherKnowledge:
    teachers: list[str]
    trajectories: np.ndarray
    observed: np.ndarray
    final_topk: np.ndarray
    n_items: int
    temperature: float = 10.0
    meta: dict = field(default_factory=dict)

    @property
    def n_teachers(self) -> int:
        return self.trajectories.shape[0]

    @property
    def n_checkpoints(self) -> int:
        return self.trajectories.shape[1]

    def single_teacher(self, name: str) -> "TeacherKnowledge":
        """The knowledge of one teacher alone (the homogeneous-teacher control)."""
        if name not in self.teachers:
            raise HetCompError(f"teacher {name!r} not in the ensemble; known: {', '.join(self.teachers)}")
        index = self.teachers.index(name)
        lists = self.trajectories[index:index + 1]
        return TeacherKnowledge(
            teachers=[name], trajectories=lists, observed=self.observed,
            final_topk=combine_rankings(lists[:, -1], self.n_items, self.final_topk.shape[1],
                                        self.temperature),
            n_items=self.n_items, temperature=self.temperature, meta={**self.meta, "teachers": [name]},
        )

    def selected_lists(self, selection: np.ndarray) -> np.ndarray:
        """Per-teacher lists at a per-(teacher, user) checkpoint ``selection [n_teachers, n_users]``."""
        users = np.arange(self.trajectories.shape[2])
        return np.stack([self.trajectories[t, selection[t], users] for t in range(self.n_teachers)])


def importance(depth: int, temperature: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``exp(-r / temperature)`` for ranks ``r = 0..depth-1`` (float32)."""
    return torch.exp(-torch.arange(depth, dtype=torch.float32, device=device) / temperature)


def ensemble_scores(lists: np.ndarray | torch.Tensor, n_items: int, temperature: float,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Dense ensemble scores ``[B, n_items]`` of per-teacher lists ``[T, B, N]`` (0 off the lists;
    ``-1`` padding in a list adds nothing)."""
    lists = torch.as_tensor(np.asarray(lists) if not torch.is_tensor(lists) else lists)
    lists = lists.to(device=device, dtype=torch.int64)
    n_teachers, rows, depth = lists.shape
    index = lists.permute(1, 0, 2).reshape(rows, n_teachers * depth)
    weights = importance(depth, temperature, device).repeat(n_teachers).expand(rows, -1)
    weights = weights * (index >= 0)
    dense = torch.zeros(rows, n_items, device=device)
    return dense.scatter_add_(1, index.clamp(min=0), weights.contiguous())


def combine_rankings(lists: np.ndarray, n_items: int, k: int, temperature: float = 10.0,
                     batch_size: int = 2048) -> np.ndarray:
    """Top-``k`` items of the rank-importance ensemble of ``lists [n_teachers, n_users, N]``.

    Each list holds a teacher's best non-training items in order; an item at 0-based rank ``r``
    contributes ``exp(-r / temperature)``. Items in no list score 0 and can only fill the tail.
    Returns int32 ``[n_users, k]``.
    """
    n_users = lists.shape[1]
    out = np.empty((n_users, k), dtype=np.int32)
    for start in range(0, n_users, batch_size):
        scores = ensemble_scores(lists[:, start:start + batch_size], n_items, temperature)
        out[start:start + scores.shape[0]] = torch.topk(scores, k, dim=1).indices.numpy()
    return out


def load_knowledge(ensemble_dir: str | Path) -> TeacherKnowledge:
    ensemble_dir = Path(ensemble_dir)
    if not (ensemble_dir / "knowledge.npz").is_file():
        raise HetCompError(f"{ensemble_dir}: no knowledge.npz; run `hetcomp build-ensemble` first")
    meta = read_json(ensemble_dir / "meta.json")
    with np.load(ensemble_dir / "knowledge.npz") as arrays:
        return TeacherKnowledge(
            teachers=list(meta["teachers"]), trajectories=arrays["trajectories"],
            observed=arrays["observed"], final_topk=arrays["final_topk"], n_items=int(meta["n_items"]),
            temperature=float(meta["temperature"]), meta=meta,
        )
