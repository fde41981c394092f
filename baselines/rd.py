"""RD: ranking distillation.

J. Tang, K. Wang. "Ranking Distillation: Learning Compact Ranking Models With High Performance for
Recommender System", KDD 2018.

The teacher's top-``top_k`` unobserved items (here the final ensemble's list; default K = 10 as in
the paper) become extra positives of the student, weighted by position:

    L_RD(u) = sum_{r=0..K-1} w_r * -log sigmoid(s_{u,pi_r}),

with the position importance ``w_r ∝ exp(-r / weight_temperature)`` (normalised over the list;
``weight_temperature`` 5 is this suite's choice, the paper tunes this sharpness per dataset). With
``dynamic: true`` the paper's hybrid weighting is used: ``w_r ∝ exp(-r / weight_temperature) *
tanh(max(dynamic_mu * (rhat_r - r), 0))`` where ``rhat_r`` is the student's current rank of
``pi_r`` among the user's non-training items. The paper estimates ``rhat`` by sampling; here it is
the exact rank, recomputed after every epoch (position weights alone before the first update).
The list is short and not sampled; there is no ``sample_top`` option.

Loss: BPR + lambda * mean over the batch's users. lambda = 1: the weights sum to 1, so at
initialisation the KD term is log 2 ~ 0.69, the same as BPR's ~0.69.
"""

from __future__ import annotations

import torch

from baselines.common import KDBaseline, weighted_logsigmoid_loss
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
    defaults = {"lambda": 1.0, "top_k": 10, "weight_temperature": 5.0, "dynamic": False,
                "dynamic_mu": 0.1}

    def __init__(self, split, knowledge, student, config, device):
        super().__init__(split, knowledge, student, config, device)
        self.weights = position_weights(self.topk_valid, float(self.cfg["weight_temperature"]))
        self.updated_at: int | None = None

    def after_epoch(self, epoch: int) -> dict:
        if not self.cfg["dynamic"]:
            return {}
        _, ranks = self.rankings(self.topk, 1)
        self.weights = hybrid_weights(self.topk_valid, ranks, float(self.cfg["weight_temperature"]),
                                      float(self.cfg["dynamic_mu"]))
        self.updated_at = epoch
        return {"rd_weight_mass": round(float(self.weights.sum(1).mean()), 4)}

    def kd_loss(self, users):
        items, _ = self.teacher_list(users)
        scores = self.item_scores(users, items)
        return weighted_logsigmoid_loss(scores, self.weights[users].to(scores.dtype)).mean()

    def method_state(self) -> dict:
        return {**super().method_state(), "updated_at_epoch": self.updated_at,
                "mean_weights": [round(w, 4) for w in self.weights.mean(0).tolist()]}
