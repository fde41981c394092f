"""CD: collaborative distillation, student-guided training.

J.-w. Lee, M. Choi, J. Lee, H. Shim. "Collaborative Distillation for Top-N Recommendation",
ICDM 2019.

Before every epoch the student ranks each user's non-training items. From the student's top
``candidates`` (100) items, ``n_samples`` (10) distinct items per user are drawn with rank-aware
probability ``∝ exp(-rank / sample_temperature)`` (10; rank 0-based in the student's ranking) and
kept for the epoch. The student's score of each drawn item is fitted to the teacher's soft label
by binary cross-entropy:

    L_CD(u) = sum_{i in S_u} -[ q_ui log sigmoid(s_ui) + (1 - q_ui) log sigmoid(-s_ui) ].

Because the items come from the student's own ranking, the items it over-ranks (high for the
student, not in the teacher's list) get labels near 0 and are pushed down, while the teacher's items
among them are pulled up. This is the paper's student-guided training; its teacher-guided variant
would draw from the teacher's ranking, which here would be a sampling of the teacher's top items,
the part the HetComp authors removed from every baseline.

Soft labels. In the paper the label is the teacher's predicted probability for the item (a sigmoid
of the teacher's score, sharpened by a temperature). The teacher here is the final ensemble, which
keeps a ranking only, so the label is derived from the item's ensemble rank ``r`` (0-based in the
top-``top_k`` list):

    q_ui = exp(-r_ui / label_temperature)   for items in the list,   q_ui = 0   outside it.

With ``label_temperature`` = 100 (the list length) the labels run from 1 (the ensemble's first item)
to e^-1 ~ 0.37 (its 100th); an item outside the list gets 0. The paper's values of the number of
draws and of the temperatures were not established here (a public re-implementation on CiteULike
draws 2 items per user and epoch from the student's top 3000 and uses ``sigmoid(score / 2)``); the
values above are this suite's.

Loss: BPR + lambda * mean over the batch's users. lambda = 0.01: at initialisation (scores ~ 0) the
per-user sum is ``n_samples`` * log 2 ~ 6.9, so lambda * KD ~ 0.07 against BPR's ~0.69. Early on the
student's top items are mostly outside the teacher's list (label 0), so a larger weight mainly pushes
down whatever the student ranks first (on CiteULike-t, lambda = 0.1 left the student well behind
w/o KD for its first 30 epochs, lambda = 0.01 did not); the tuning grid covers 1e-3 .. 1e-1.
"""

from __future__ import annotations

import torch

from baselines.common import KDBaseline, soft_bce_loss
from hetcomp.errors import HetCompError
from hetcomp.registry import METHODS


def rank_labels(teacher: torch.Tensor, teacher_valid: torch.Tensor, items: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """``q[b, j] = exp(-r / temperature)`` where ``items[b, j]`` sits at position ``r`` of the valid
    entries of ``teacher[b]``, 0 where it is not on that list (or ``items[b, j]`` is -1); float64."""
    positions = torch.arange(teacher.shape[1], device=teacher.device, dtype=torch.float64)
    label = torch.exp(-positions / temperature).expand(teacher.shape) * teacher_valid
    match = (items.unsqueeze(2) == teacher.unsqueeze(1)) & teacher_valid.unsqueeze(1)
    match &= (items >= 0).unsqueeze(2)
    return (match * label.unsqueeze(1)).sum(2)


@METHODS.register("cd")
class CD(KDBaseline):
    defaults = {"lambda": 0.01, "top_k": 100, "candidates": 100, "n_samples": 10,
                "sample_temperature": 10.0, "label_temperature": 100.0}
    needs_generator = True

    def __init__(self, split, knowledge, student, config, device):
        super().__init__(split, knowledge, student, config, device)
        if min(int(self.cfg["n_samples"]), int(self.cfg["candidates"])) < 1:
            raise HetCompError("CD: n_samples and candidates must be >= 1")
        if min(float(self.cfg["sample_temperature"]), float(self.cfg["label_temperature"])) <= 0:
            raise HetCompError("CD: sample_temperature and label_temperature must be > 0")
        n_users, n = split.n_users, int(self.cfg["n_samples"])
        self.samples = torch.full((n_users, n), -1, dtype=torch.long, device=self.device)
        self.labels = torch.zeros(n_users, n, dtype=torch.float64, device=self.device)
        self.drawn_at: int | None = None

    def on_epoch(self, epoch: int) -> None:
        self.draw(epoch)

    @torch.no_grad()
    def draw(self, epoch: int) -> None:
        """Draw each user's items from the student's current ranking and label them."""
        student_top, _ = self.rankings(None, int(self.cfg["candidates"]))
        items, valid = self.sampler.by_rank(student_top, int(self.cfg["n_samples"]),
                                            float(self.cfg["sample_temperature"]), self.sampling_generator())
        self.samples = items.masked_fill(~valid, -1)
        self.labels = rank_labels(self.topk, self.topk_valid, self.samples,
                                  float(self.cfg["label_temperature"]))
        self.drawn_at = epoch

    def kd_loss(self, users):
        items = self.samples[users]
        valid = items >= 0
        scores = self.item_scores(users, items.clamp(min=0))
        return soft_bce_loss(scores, self.labels[users].to(scores.dtype), valid.to(scores.dtype)).mean()

    def after_epoch(self, epoch: int) -> dict:
        return self._summary()

    def _summary(self) -> dict:
        """Share of this epoch's draws on the teacher's list, and their mean label."""
        drawn = self.samples >= 0
        in_list = (self.labels > 0) & drawn
        return {"cd_in_list": round(float(in_list.sum()) / max(int(drawn.sum()), 1), 4),
                "cd_mean_label": round(float(self.labels[drawn].mean()) if bool(drawn.any()) else 0.0, 4)}

    def method_state(self) -> dict:
        return {**super().method_state(), "drawn_at_epoch": self.drawn_at, **self._summary()}
