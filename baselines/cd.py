"""CD: collaborative distillation.

J.-w. Lee, M. Choi, J. Lee, H. Shim. "Collaborative Distillation for Top-N Recommendation",
ICDM 2019.

The student matches the teacher's soft labels on unobserved items drawn from the teacher's ranking
with a rank discount, through a binary cross-entropy:

    L_CD(u) = sum_r p_r * -[ q_ur log sigmoid(s_{u,pi_r}) + (1 - q_ur) log sigmoid(-s_{u,pi_r}) ].

- Items: the final ensemble's top-``top_k`` list ``pi`` (default 100).
- Rank-discounted sampling distribution ``p_r ∝ exp(-r / sample_temperature)`` (10) over the list.
  As HetComp ran its baselines (no sampling of top items, ``sample_top: false``), the loss is the
  **exact expectation** under ``p`` (every item, weight ``p_r``); with ``sample_top: true``,
  ``n_samples`` (10) items are drawn per user and batch without replacement with probability ``p_r``
  and their losses averaged.
- Soft labels: the teachers store rankings, not scores, so the label is derived from ranks as a
  rank importance averaged over teachers,
  ``q_ui = (1 / n_teachers) * sum_t exp(-rank_t(u, i) / label_temperature)`` (0-based rank in teacher
  t's final list, 0 outside it). An item all teachers put first gets 1, an item no teacher lists 0;
  as ``label_temperature`` grows, ``q`` tends to the fraction of teachers listing the item.
  ``label_temperature`` = 100 (the list length; ``null`` = the ensemble's importance temperature,
  10). Why not 10: the base loss is BPR, so the student's logits are not calibrated probabilities
  and a typical unobserved item sits near logit 0; a label below 0.5 pushes a teacher's top item
  *below* it. With temperature 10 most labels of the top-100 are below 0.5 (rank 7 already), and on
  a synthetic check (600 users, 1,500 items, 4 noisy teachers, dim-6 student) CD fell below w/o KD
  (test Recall@50 0.287 vs 0.332); with 30 / 100 / infinity it reached 0.347 / 0.366 / 0.368.

Loss: BPR + lambda * mean over the batch's users. lambda = 1: the weights sum to 1, so at
initialisation the KD term is log 2 ~ 0.69, the same as BPR's ~0.69.
"""

from __future__ import annotations

import numpy as np
import torch

from baselines.common import KDBaseline, gumbel_topk, soft_bce_loss
from hetcomp.registry import METHODS


def rank_soft_labels(lists: np.ndarray, items: np.ndarray, n_items: int, temperature: float,
                     batch_size: int = 1024) -> np.ndarray:
    """``q[u, k] = mean_t exp(-rank_t(u, items[u, k]) / temperature)`` (0 where teacher t lacks the item).

    ``lists [n_teachers, n_users, N]`` are the teachers' final lists (``-1`` padding allowed),
    ``items [n_users, K]`` the items to label; returns float64 ``[n_users, K]``.
    """
    n_teachers, n_users, depth = lists.shape
    importance = torch.exp(-torch.arange(depth, dtype=torch.float64) / temperature)
    out = np.zeros(items.shape, dtype=np.float64)
    for start in range(0, n_users, batch_size):
        chunk = torch.from_numpy(lists[:, start:start + batch_size].astype(np.int64))
        rows = chunk.shape[1]
        dense = torch.zeros(rows, n_items + 1, dtype=torch.float64)
        for t in range(n_teachers):
            index = torch.where(chunk[t] >= 0, chunk[t], torch.full_like(chunk[t], n_items))
            dense.scatter_add_(1, index, importance.expand(rows, -1).contiguous())
        wanted = torch.from_numpy(items[start:start + rows].astype(np.int64))
        wanted = torch.where(wanted >= 0, wanted, torch.full_like(wanted, n_items))
        labels = dense.gather(1, wanted) / n_teachers
        labels[wanted == n_items] = 0.0
        out[start:start + rows] = labels.numpy()
    return out


@METHODS.register("cd")
class CD(KDBaseline):
    defaults = {"lambda": 1.0, "top_k": 100, "sample_top": False, "n_samples": 10,
                "sample_temperature": 10.0, "label_temperature": 100.0}

    def __init__(self, split, knowledge, student, config, device):
        super().__init__(split, knowledge, student, config, device)
        label_t = self.cfg["label_temperature"]
        label_t = float(knowledge.temperature if label_t is None else label_t)
        labels = rank_soft_labels(knowledge.trajectories[:, -1], knowledge.final_topk[:, :self.top_k],
                                  split.n_items, label_t)
        self.labels = torch.from_numpy(labels).to(self.device)
        ranks = torch.arange(self.top_k, device=self.device, dtype=torch.float64)
        self.log_p = (-ranks / float(self.cfg["sample_temperature"])).expand(self.topk.shape)
        self.log_p = self.log_p.masked_fill(~self.topk_valid, -torch.inf)
        weights = torch.exp(self.log_p)
        self.p = weights / weights.sum(1, keepdim=True).clamp(min=1e-300)

    @property
    def needs_generator(self) -> bool:  # type: ignore[override]
        return bool(self.cfg["sample_top"])

    def kd_loss(self, users):
        items, _ = self.teacher_list(users)
        labels = self.labels[users]
        if not self.cfg["sample_top"]:
            scores = self.item_scores(users, items)
            return soft_bce_loss(scores, labels.to(scores.dtype), self.p[users].to(scores.dtype)).mean()
        columns, drawn = gumbel_topk(self.log_p[users], int(self.cfg["n_samples"]), self.sampling_generator())
        scores = self.item_scores(users, items.gather(1, columns))
        weights = drawn.to(scores.dtype) / drawn.sum(1, keepdim=True).clamp(min=1)
        return soft_bce_loss(scores, labels.gather(1, columns).to(scores.dtype), weights).mean()

    def method_state(self) -> dict:
        return {**super().method_state(),
                "mean_label_by_rank": [round(v, 4) for v in self.labels.mean(0)[:10].tolist()]}
