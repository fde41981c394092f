"""Full-ranking evaluation: Recall@K and NDCG@K over all items, in user batches.

For the validation metric a user's training and test items are excluded from the ranking; for
the test metric the training and validation items are (as in the official HetComp code). The
per-user metrics are pure functions of the hit matrix and the number of ground-truth items, so
results do not depend on the user batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from hetcomp.data.store import Split

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps a 1-D LongTensor of user ids to a fresh ``[len(users), n_items]`` float score tensor
(the evaluator masks it in place)."""

DEFAULT_KS = (10, 20, 50)
OTHER_PART = {"valid": "test", "test": "valid"}


def recall_at_k(hits: torch.Tensor, n_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """|top-K ∩ GT| / |GT| per user (``hits``: ``[B, >=K]`` 0/1 in rank order)."""
    return hits[:, :k].sum(1) / n_relevant


def ndcg_at_k(hits: torch.Tensor, n_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """Binary-gain NDCG@K with discount 1/log2(rank+2) and IDCG over min(|GT|, K) hits."""
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=hits.device) + 2.0)
    dcg = (hits[:, :k] * discount[: hits[:, :k].shape[1]]).sum(1)
    ideal = torch.cumsum(discount, 0)[(n_relevant.clamp(max=k) - 1).long()]
    return dcg / ideal


def metric_names(ks: Sequence[int]) -> list[str]:
    return [f"{name}@{k}" for name in ("recall", "ndcg") for k in ks]


@dataclass
class EvalResult:
    """Per-user metrics of one split part (``per_user[name][j]`` belongs to ``users[j]``)."""

    users: np.ndarray
    per_user: dict[str, np.ndarray]

    def means(self) -> dict[str, float]:
        return {name: float(values.mean()) for name, values in self.per_user.items()}


def _flat_keys(matrix: sp.csr_matrix, users: np.ndarray, n_items: int) -> np.ndarray:
    """``row_position * n_items + item`` for every entry of ``matrix[users]`` (sorted)."""
    rows = matrix[users]
    positions = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(rows.indptr))
    return positions * n_items + rows.indices.astype(np.int64)


class Evaluator:
    """Evaluates any score function on the validation and test parts of a split."""

    def __init__(self, split: Split, ks: Sequence[int] = DEFAULT_KS, batch_size: int = 1024,
                 device: torch.device | str = "cpu"):
        self.ks = tuple(sorted(ks))
        self.max_k = self.ks[-1]
        self.n_items = split.n_items
        self.device = torch.device(device)
        self.users = split.eval_users
        self._batches = []
        for start in range(0, len(self.users), batch_size):
            users = self.users[start:start + batch_size]
            batch = {"users": torch.from_numpy(users).to(self.device)}
            for part in ("train", "valid", "test"):
                keys = _flat_keys(split.part(part), users, self.n_items)
                batch[part] = torch.from_numpy(keys).to(self.device)
            for part in ("valid", "test"):
                counts = np.diff(split.part(part)[users].indptr)
                batch[f"n_{part}"] = torch.from_numpy(counts).to(self.device, torch.float64)
            self._batches.append(batch)

    @torch.no_grad()
    def evaluate(self, score_fn: ScoreFn, parts: Sequence[str] = ("valid", "test")) -> dict[str, EvalResult]:
        """Per-user metrics for each requested part; the scores are computed once per batch."""
        collected = {part: {name: [] for name in metric_names(self.ks)} for part in parts}
        for batch in self._batches:
            scores = score_fn(batch["users"]).float().contiguous()
            flat = scores.view(-1)
            flat[batch["train"]] = -torch.inf
            for part in parts:
                # Hide the other held-out part, rank, then restore it (cheaper than a copy).
                other = batch[OTHER_PART[part]]
                saved = flat[other]
                flat[other] = -torch.inf
                hits = self._hits(scores, batch[part])
                flat[other] = saved
                n_relevant = batch[f"n_{part}"]
                for k in self.ks:
                    collected[part][f"recall@{k}"].append(recall_at_k(hits, n_relevant, k))
                    collected[part][f"ndcg@{k}"].append(ndcg_at_k(hits, n_relevant, k))
        return {
            part: EvalResult(
                users=self.users,
                per_user={name: torch.cat(values).cpu().numpy() for name, values in metrics.items()},
            )
            for part, metrics in collected.items()
        }

    def _hits(self, scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """0/1 float64 ``[B, max_k]``: is the item at each rank a ground-truth item?"""
        top = torch.topk(scores, min(self.max_k, scores.shape[1]), dim=1).indices
        rows = torch.arange(top.shape[0], device=top.device).unsqueeze(1)
        keys = rows * self.n_items + top
        # ``truth`` holds the batch's sorted flat keys (never empty: every evaluated user has
        # held-out items), so membership is a binary search.
        position = torch.searchsorted(truth, keys).clamp(max=len(truth) - 1)
        return (truth[position] == keys).to(torch.float64)


@torch.no_grad()
def top_unobserved(score_fn: ScoreFn, train: sp.csr_matrix, n: int, users: np.ndarray | None = None,
                   batch_size: int = 1024, device: torch.device | str = "cpu") -> np.ndarray:
    """Each user's ``n`` best-scored items that are not training items, as int32 ``[len(users), n]``."""
    device = torch.device(device)
    users = np.arange(train.shape[0]) if users is None else np.asarray(users)
    out = np.empty((len(users), n), dtype=np.int32)
    for start in range(0, len(users), batch_size):
        chunk = users[start:start + batch_size]
        scores = score_fn(torch.from_numpy(chunk).to(device)).float()
        keys = torch.from_numpy(_flat_keys(train, chunk, train.shape[1])).to(device)
        scores.view(-1)[keys] = -torch.inf
        out[start:start + len(chunk)] = torch.topk(scores, n, dim=1).indices.cpu().numpy()
    return out
