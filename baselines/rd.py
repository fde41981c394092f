"""RD: ranking distillation.

J. Tang, K. Wang. "Ranking Distillation: Learning Compact Ranking Models With High Performance for
Recommender System", KDD 2018.

The teacher's top-``top_k`` unobserved items (here the final ensemble's list, in order) become
extra positives of the student, each weighted:

    L_RD(u) = sum_{r=1..K} w_r * -log sigmoid(s_{u,pi_r}).

- ``top_k`` K = 10, as in the paper.
- Position importance ``w^a_r ∝ exp(-r / weight_temperature)`` (the paper's lambda; 1 in the
  paper), so the first items dominate.
- Hybrid weighting (the paper's best): after the first ``dynamic_start`` epochs (10) the weights
  become ``w_r ∝ w^a_r * w^b_r`` with the dynamic weight ``w^b_r = tanh(max(dynamic_mu * (rhat_r -
  r), 0))``, where ``rhat_r`` is the student's current rank of ``pi_r``: items the student already
  ranks at least as high as the teacher get no weight, the most under-ranked the most. The weights
  are normalised to sum 1 per user (a user whose student already ranks every item high enough gets
  none).
- ``rhat``: the paper estimates it per batch from a sample of items; here it is the exact rank
  among the user's non-training items (0-based, like ``r``), recomputed before every epoch. Ranks
  beyond ``top_k + 20 / dynamic_mu`` are capped there, where ``tanh`` is already 1.0.
- ``dynamic: false`` keeps the position weights throughout (the paper's "weighted by position"
  variant).

Loss: BPR + lambda * mean over the batch's users. lambda = 1: the weights sum to 1, so at
initialisation the KD term is log 2 ~ 0.69, the same as BPR's ~0.69.
"""

from __future__ import annotations

import math

import torch

from baselines.common import KDBaseline, weighted_logsigmoid_loss
from hetcomp.errors import HetCompError
from hetcomp.registry import METHODS


def position_weights(valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """``exp(-r / temperature)`` over the valid positions, normalised to sum 1 per row."""
    ranks = torch.arange(valid.shape[1], device=valid.device, dtype=torch.float64)
    weights = torch.exp(-ranks / temperature).expand(valid.shape) * valid
    return weights / weights.sum(1, keepdim=True).clamp(min=1e-300)


def hybrid_weights(valid: torch.Tensor, student_rank: torch.Tensor, temperature: float,
                   mu: float) -> torch.Tensor:
    """RD's hybrid weights: position importance times ``tanh(max(mu * (rhat - r), 0))``, normalised
    (rows whose student ranks every item at least as high as the teacher get all-zero weights)."""
    ranks = torch.arange(valid.shape[1], device=valid.device, dtype=torch.float64)
    dynamic = torch.tanh((mu * (student_rank.double() - ranks)).clamp(min=0))
    weights = torch.exp(-ranks / temperature) * dynamic * valid
    return weights / weights.sum(1, keepdim=True).clamp(min=1e-300)


@METHODS.register("rd")
class RD(KDBaseline):
    defaults = {"lambda": 1.0, "top_k": 10, "weight_temperature": 1.0, "dynamic": True,
                "dynamic_mu": 0.1, "dynamic_start": 10}

    def __init__(self, split, knowledge, student, config, device):
        super().__init__(split, knowledge, student, config, device)
        if min(float(self.cfg["weight_temperature"]), float(self.cfg["dynamic_mu"])) <= 0:
            raise HetCompError("RD: weight_temperature and dynamic_mu must be > 0")
        self.weights = position_weights(self.topk_valid, float(self.cfg["weight_temperature"]))
        self.updated_at: int | None = None
        self.rank_cap = self.top_k + int(math.ceil(20.0 / float(self.cfg["dynamic_mu"])))

    def on_epoch(self, epoch: int) -> None:
        if self.cfg["dynamic"] and epoch >= int(self.cfg["dynamic_start"]):
            self.update_weights(epoch)

    @torch.no_grad()
    def update_weights(self, epoch: int) -> None:
        """Hybrid weights from the student's current ranks of the teacher's items."""
        _, ranks = self.rankings(self.topk, 1, self.rank_cap)
        self.weights = hybrid_weights(self.topk_valid, ranks, float(self.cfg["weight_temperature"]),
                                      float(self.cfg["dynamic_mu"]))
        self.updated_at = epoch

    def kd_loss(self, users):
        items, _ = self.teacher_list(users)
        scores = self.item_scores(users, items)
        return weighted_logsigmoid_loss(scores, self.weights[users].to(scores.dtype)).mean()

    def method_state(self) -> dict:
        return {**super().method_state(), "updated_at_epoch": self.updated_at,
                "mean_weights": [round(w, 4) for w in self.weights.mean(0).tolist()]}
