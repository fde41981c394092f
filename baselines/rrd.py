"""RRD: relaxed ranking distillation.

S. Kang, J. Hwang, W. Kweon, H. Yu. "DE-RRD: A Knowledge Distillation Framework for Recommender
System", CIKM 2020 (the RRD part).

The student learns the teacher's ranking of its top ("interesting") items in teacher order and
only that they sit above a set ``U_u`` of "uninteresting" items, whose internal order is ignored:

    L_RRD(u) = -sum_{k=1..n} [ s_{u,pi_k} - log( sum_{j=k..n} e^{s_{u,pi_j}} + sum_{i in U_u} e^{s_{u,i}} ) ].

Loss: BPR + lambda * mean over the batch's users of L_RRD, lambda = 1e-3 as in the original.

As the HetComp authors ran it (``sample_top: false``, the default), ``pi`` is the final
ensemble's whole top-``top_k`` list (100) in order, with no sampling of top items. Everything else
is the original's: ``U_u`` is ``n_uninteresting`` (40) items drawn uniformly without replacement
from the user's items outside the list and outside its training items, redrawn for every user at
the start of every epoch (seeded from the run's seed).

Options:

- ``sample_top: true``: the original's top sampling, ``n_interesting`` (40) items drawn each epoch
  from the top-``top_k`` list with successive probabilities proportional to
  ``exp(-rank / sample_temperature)`` (10), kept in teacher order;
- ``uninteresting: catalogue``: every non-training item outside the list as one ``logsumexp``
  mass instead of the sampled set. That is HetComp's own device, not RRD's: with ~25k items the
  mass dominates every denominator and the order inside the list carries little signal.

Scale at initialisation (scores ~ 0): per user ``sum_{k=1..100} log(100 - k + 1 + 40)`` ~ 4.4e2
for a 100-item list, so lambda * KD ~ 0.44 against BPR ~ 0.69 at lambda = 1e-3.
"""

from __future__ import annotations

import torch

from baselines.common import KDBaseline, plackett_luce_loss
from baselines.sampling import ItemSampler
from hetcomp.errors import HetCompError
from hetcomp.registry import METHODS

UNINTERESTING = ("sampled", "catalogue")


@METHODS.register("rrd")
class RRD(KDBaseline):
    defaults = {"lambda": 1e-3, "top_k": 100, "uninteresting": "sampled", "n_uninteresting": 40,
                "sample_top": False, "n_interesting": 40, "sample_temperature": 10.0}

    def __init__(self, split, knowledge, student, config, device):
        super().__init__(split, knowledge, student, config, device)
        if self.cfg["uninteresting"] not in UNINTERESTING:
            raise HetCompError(f"rrd: uninteresting must be one of {', '.join(UNINTERESTING)}, "
                               f"got {self.cfg['uninteresting']!r}")
        if self.sampled and int(self.cfg["n_uninteresting"]) < 1:
            raise HetCompError("rrd: n_uninteresting must be >= 1")
        self.negatives: torch.Tensor | None = None          # [n_users, n_uninteresting], per epoch
        self.chosen: tuple[torch.Tensor, torch.Tensor] | None = None   # sampled top items, per epoch

    @property
    def sampled(self) -> bool:
        return self.cfg["uninteresting"] == "sampled"

    @property
    def needs_generator(self) -> bool:  # type: ignore[override]
        return self.sampled or bool(self.cfg["sample_top"])

    def on_epoch(self, epoch: int) -> None:
        if self.sampled:
            self.negatives = self.draw_outside(self.topk, self.topk_valid, int(self.cfg["n_uninteresting"]))
        if self.cfg["sample_top"]:
            ranked = torch.where(self.topk_valid, self.topk, torch.full_like(self.topk, -1))
            items, valid = ItemSampler.by_rank(ranked, int(self.cfg["n_interesting"]),
                                               float(self.cfg["sample_temperature"]), self.sampling_generator())
            self.chosen = items.clamp(min=0), valid

    def interesting(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The list the student must rank, in teacher order: ``(items [B, n], valid [B, n])``."""
        if self.cfg["sample_top"]:
            if self.chosen is None:
                raise HetCompError("rrd: no top items drawn yet (epoch_batches was not called)")
            return self.chosen[0].index_select(0, users), self.chosen[1].index_select(0, users)
        return self.teacher_list(users)

    def kd_loss(self, users):
        items, valid = self.interesting(users)
        if not self.sampled:
            rest = self.rest_log_mass(users, *self.teacher_list(users))
            return plackett_luce_loss(self.item_scores(users, items), valid, rest).mean()
        if self.negatives is None:
            raise HetCompError("rrd: no uninteresting items drawn yet (epoch_batches was not called)")
        negatives = self.negatives.index_select(0, users)
        scores = self.item_scores(users, torch.cat([items, negatives], dim=1))   # one gather for both
        listed, uninteresting = scores.split([items.shape[1], negatives.shape[1]], dim=1)
        return plackett_luce_loss(listed, valid, uninteresting.logsumexp(1)).mean()
