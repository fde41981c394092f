"""CL-DRD: curriculum learning for ranking distillation, adapted to top-K recommendation.

H. Zeng, H. Zamani, V. Vinay. "Curriculum Learning for Dense Retrieval Distillation", SIGIR 2022.

An easy-to-hard curriculum over the **final** teacher ranking (the ensemble's top-``top_k`` list,
default 100). At each stage the list is cut into groups and a group-wise listwise loss enforces
only the order *between* groups: every item must beat every item of the later groups plus the
rest (the user's other non-training items, one ``logsumexp`` mass); items of one group do not
compete:

    L(u) = sum_k -log( e^{s_k} / (e^{s_k} + sum_{j in later groups} e^{s_j} + sum_{rest} e^{s_r}) ).

Default curriculum (``stages``, cut points = exclusive group ends; ``top_k`` closes the last group):

- stage 0: ``[10, 50]``  -> top-10 | 11-50 | 51-100 | rest;
- stage 1: ``[5, 10, 20, 30, 50, 75]`` -> finer groups;
- stage 2: ``full``      -> every position its own group: the full order (= RRD's loss).

The stage advances every ``stage_epochs`` epochs (default 50: stage 0 for epochs 0-49, stage 1 for
50-99, the full order from epoch 100 on, about when HetComp's own loss switches, by epoch 120 at the
latest). The paper's exact group sizes (for passage re-ranking) are not transferred; these are
this suite's choice. No sampling of top items (the HetComp convention): the whole list is used.

Loss: BPR + lambda * mean over the batch's users. lambda = 1e-3: at initialisation the per-user
sum is ~1.0e3 on CiteULike-sized data (100 items each against >= 25k rest items), so
lambda * KD ~ 1.0 against BPR ~ 0.69.
"""

from __future__ import annotations

import torch

from baselines.common import KDBaseline, group_ends, groupwise_loss
from hetcomp.errors import HetCompError
from hetcomp.registry import METHODS


@METHODS.register("cldrd")
class CLDRD(KDBaseline):
    defaults = {"lambda": 1e-3, "top_k": 100, "stage_epochs": 50,
                "stages": [[10, 50], [5, 10, 20, 30, 50, 75], "full"]}

    def __init__(self, split, knowledge, student, config, device):
        super().__init__(split, knowledge, student, config, device)
        stages = self.cfg["stages"]
        if not isinstance(stages, list) or not stages:
            raise HetCompError("cldrd: stages must be a non-empty list of cut-point lists or 'full'")
        if int(self.cfg["stage_epochs"]) < 1:
            raise HetCompError("cldrd: stage_epochs must be >= 1")
        self.ends = [group_ends(stage, self.top_k) for stage in stages]
        self.ends_t = [torch.tensor(ends, dtype=torch.long, device=self.device) for ends in self.ends]
        self.stage = 0

    def stage_for_epoch(self, epoch: int) -> int:
        return min(epoch // int(self.cfg["stage_epochs"]), len(self.ends) - 1)

    def after_epoch(self, epoch: int) -> dict:
        self.stage = self.stage_for_epoch(epoch + 1)
        return {"cldrd_stage": self.stage}

    def groups(self, stage: int | None = None) -> list[tuple[int, int]]:
        """The ``[start, end)`` position ranges of the groups of ``stage`` (default: current)."""
        ends = self.ends[self.stage if stage is None else stage]
        out, start = [], 0
        for end in sorted(set(ends)):
            out.append((start, end))
            start = end
        return out

    def kd_loss(self, users):
        items, valid = self.teacher_list(users)
        rest = self.rest_log_mass(users, items, valid)
        return groupwise_loss(self.item_scores(users, items), valid, rest, self.ends_t[self.stage]).mean()

    def method_state(self) -> dict:
        return {**super().method_state(), "stage": self.stage,
                "groups": [list(group) for group in self.groups()]}
