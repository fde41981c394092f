"""Teacher trajectories: per-user top-N lists recorded while a teacher trains.

Recording
    ``TrajectoryRecorder`` is the ``on_evaluation`` callback of ``hetcomp.models.base.ModelTask``.
    At every evaluation of ``hetcomp.training.fit`` it stores the model's top-``top_n``
    non-training items of every user (``hetcomp.evaluation.top_unobserved``, int32, best first)
    together with the epoch. Validation metrics are not recorded here: they are in the fit
    history.

    Memory: every evaluation is kept, ``n_users x top_n x 4`` bytes each (CiteULike, N = 100:
    2 MB; 100 evaluations: 200 MB). All of them are kept on purpose: the selection policy may
    need any evaluation up to the best one, and which one is best is only known when the run
    stops. ``finish`` releases them.

Selection policy (``select_checkpoints``)
    ``"even"`` (default): among the ``b`` evaluations up to and including the best epoch, take
    the ones at fractions 1/C, 2/C, ..., C/C of the way (position ``ceil(k * b / C) - 1`` for
    k = 1..C, 0-based), so the last checkpoint is the best epoch and the first one is about a
    quarter of the way there for C = 4 (docs/METHOD.md, "Teachers and trajectories": 1/4, 1/2,
    3/4 of the best epoch, plus the best epoch). Positions are strictly increasing when
    ``b >= C``. When the run has fewer evaluations than checkpoints (``b < C``) the positions
    repeat: each evaluation is used for about ``C / b`` consecutive checkpoints, in order, and
    the last one is still the best (e.g. b = 2, C = 4 -> evaluations 0, 0, 1, 1). The exported
    ``epochs`` then repeat as well.
    ``"last"``: the C evaluations that end at the best one (repeating the first evaluation
    when there are fewer).

Export (``Trajectory.save`` -> ``trajectory.npz``, see docs/CONTRACTS.md)
    ``topn`` int32 ``[n_checkpoints, n_users, N]``, ``epochs`` int64 ``[n_checkpoints]`` and
    ``train_rank`` int32 ``[nnz(train)]``: under the final (best) model, the 0-based rank of each
    training interaction among its user's training items by score, aligned with the CSR order
    of ``split.train``. Ties are broken by item id (the CSR order), so ranks are a permutation
    of ``0..n_u-1`` per user.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from hetcomp.errors import HetCompError
from hetcomp.evaluation import ScoreFn, top_unobserved

log = logging.getLogger(__name__)

POLICIES = ("even", "last")


def select_checkpoints(epochs: Sequence[int], best_epoch: int, n_checkpoints: int,
                       policy: str = "even") -> np.ndarray:
    """Indices into ``epochs`` (the recorded evaluations) of the checkpoints to export.

    Non-decreasing, the last one is the index of ``best_epoch``; see the module docstring.
    """
    epochs = [int(e) for e in epochs]
    if n_checkpoints < 1:
        raise HetCompError(f"n_checkpoints must be >= 1, got {n_checkpoints}")
    if any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise HetCompError(f"recorded epochs are not increasing: {epochs}")
    if int(best_epoch) not in epochs:
        raise HetCompError(f"best epoch {best_epoch} was not recorded (recorded: {epochs})")
    n_until_best = epochs.index(int(best_epoch)) + 1
    c = n_checkpoints
    if policy == "even":
        positions = [-(-k * n_until_best // c) - 1 for k in range(1, c + 1)]
    elif policy == "last":
        positions = [max(0, n_until_best - c + k) for k in range(c)]
    else:
        raise HetCompError(f"unknown checkpoint policy {policy!r}; known: {', '.join(POLICIES)}")
    return np.asarray(positions, dtype=np.int64)


@torch.no_grad()
def train_ranks(score_fn: ScoreFn, train: sp.csr_matrix, batch_size: int = 1024,
                device: torch.device | str = "cpu") -> np.ndarray:
    """0-based rank of every training interaction among its user's training items (int32, CSR order).

    Scores are computed ``batch_size`` users at a time; only the training entries of a batch
    leave the device. Ties keep the CSR order (ascending item id).
    """
    device = torch.device(device)
    train = train.tocsr()
    indptr = train.indptr
    out = np.empty(train.nnz, dtype=np.int32)
    for start in range(0, train.shape[0], batch_size):
        stop = min(start + batch_size, train.shape[0])
        lo, hi = int(indptr[start]), int(indptr[stop])
        if lo == hi:
            continue
        lengths = np.diff(indptr[start:stop + 1])
        rows = np.repeat(np.arange(stop - start), lengths)
        items = train.indices[lo:hi].astype(np.int64)
        scores = score_fn(torch.arange(start, stop, device=device))
        values = scores[torch.from_numpy(rows).to(scores.device),
                        torch.from_numpy(items).to(scores.device)].float().cpu().numpy()
        order = np.lexsort((-values, rows))  # by row, then score descending; stable on ties
        segment_start = (indptr[start:stop] - lo)[rows[order]]
        ranks = np.empty(hi - lo, dtype=np.int64)
        ranks[order] = np.arange(hi - lo) - segment_start
        out[lo:hi] = ranks
    return out


def split_fingerprint(split) -> str:
    """A short hash of a split's interactions (train, valid, test), to tell splits apart."""
    digest = hashlib.sha256()
    for part in (split.train, split.valid, split.test):
        digest.update(np.asarray(part.shape, dtype=np.int64).tobytes())
        digest.update(np.asarray(part.indptr, dtype=np.int64).tobytes())
        digest.update(np.asarray(part.indices, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Trajectory:
    """The exported checkpoints of one teacher run (see docs/CONTRACTS.md)."""

    topn: np.ndarray
    epochs: np.ndarray
    train_rank: np.ndarray

    @property
    def n_checkpoints(self) -> int:
        return self.topn.shape[0]

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, topn=self.topn.astype(np.int32), epochs=self.epochs.astype(np.int64),
                            train_rank=self.train_rank.astype(np.int32))

    @classmethod
    def load(cls, path: str | Path) -> "Trajectory":
        path = Path(path)
        if not path.is_file():
            raise HetCompError(f"{path}: no trajectory; run `hetcomp train-teacher` first")
        try:
            with np.load(path) as arrays:
                return cls(topn=arrays["topn"], epochs=arrays["epochs"], train_rank=arrays["train_rank"])
        except (KeyError, ValueError, OSError) as exc:
            raise HetCompError(f"{path}: not a valid trajectory file ({exc})") from None


class TrajectoryRecorder:
    """Records top-N lists at every evaluation; ``finish`` selects and builds the ``Trajectory``.

    Use as ``ModelTask(model, on_evaluation=recorder)``; it is called as ``recorder(epoch, model)``.
    """

    def __init__(self, train: sp.csr_matrix, top_n: int = 100, n_checkpoints: int = 4,
                 policy: str = "even", batch_size: int = 1024, device: torch.device | str = "cpu"):
        train = train.tocsr()
        if policy not in POLICIES:
            raise HetCompError(f"unknown checkpoint policy {policy!r}; known: {', '.join(POLICIES)}")
        if int(n_checkpoints) < 1:
            raise HetCompError(f"n_checkpoints must be >= 1, got {n_checkpoints}")
        longest = int(np.diff(train.indptr).max()) if train.shape[0] else 0
        if not 1 <= int(top_n) <= train.shape[1] - longest:
            raise HetCompError(f"top_n must be between 1 and {train.shape[1] - longest} (items minus "
                               f"the largest training row), got {top_n}")
        self.train = train
        self.top_n = int(top_n)
        self.n_checkpoints = int(n_checkpoints)
        self.policy = policy
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.epochs: list[int] = []
        self.lists: list[np.ndarray] = []

    def __call__(self, epoch: int, model) -> None:
        self.epochs.append(int(epoch))
        self.lists.append(top_unobserved(model.score, self.train, self.top_n,
                                         batch_size=self.batch_size, device=self.device))

    def selection(self, best_epoch: int) -> np.ndarray:
        return select_checkpoints(self.epochs, best_epoch, self.n_checkpoints, self.policy)

    def finish(self, best_epoch: int, model) -> Trajectory:
        """The selected checkpoints plus ``train_rank`` of ``model`` (which must be in its best
        state, as ``fit`` leaves it); releases the recorded lists."""
        chosen = self.selection(best_epoch)
        trajectory = Trajectory(
            topn=np.stack([self.lists[i] for i in chosen]),
            epochs=np.asarray([self.epochs[i] for i in chosen], dtype=np.int64),
            train_rank=train_ranks(model.score, self.train, self.batch_size, self.device),
        )
        log.info("trajectory: %d of %d evaluations selected (%s policy), epochs %s",
                 len(set(chosen.tolist())), len(self.epochs), self.policy, trajectory.epochs.tolist())
        self.lists = []
        return trajectory

    def extra_state(self) -> dict:
        """The evaluations recorded so far, for a resumable checkpoint."""
        return {"epochs": list(self.epochs), "lists": list(self.lists)}

    def load_extra_state(self, state: dict) -> None:
        self.epochs, self.lists = list(state["epochs"]), list(state["lists"])
