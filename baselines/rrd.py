"""RRD: relaxed ranking distillation.

S. Kang, J. Hwang, W. Kweon, H. Yu. "DE-RRD: A Knowledge Distillation Framework for Recommender
System", CIKM 2020 (the RRD part).

The student learns the teacher's ranking of its top ("interesting") items in teacher order and
only that they sit above the "uninteresting" items, whose internal order is ignored:

    L_RRD(u) = -sum_{k=1..n} [ s_{u,pi_k} - log( sum_{j=k..n} e^{s_{u,pi_j}} + sum_{i in U_u} e^{s_{u,i}} ) ].

As the HetComp authors ran it (their README; HETCOMP_SPEC section 5), **without sampling**
(``sample_top: false``, the default): ``pi`` is the final ensemble's whole top-``top_k`` list
(default 100, the full ensemble list) and ``U_u`` is every other non-training item, entered as one
rest mass (``logsumexp``). With ``sample_top: true`` the original recipe is used per batch:
``n_interesting`` (40) items drawn without replacement from the top-``top_k`` list with probability
proportional to ``exp(-rank / sample_temperature)`` (10), kept in teacher order, against
``n_uninteresting`` (40) items drawn uniformly from the non-training items outside the list.

Loss: BPR + lambda * mean over the batch's users of L_RRD. lambda = 1e-3 (the original RRD's
value): at initialisation (scores ~ 0) on CiteULike-sized data (25k items, K = 100) the per-user
sum is ~1.0e3, so lambda * KD ~ 1.0 against BPR ~ 0.69.
"""

from __future__ import annotations

import torch

from baselines.common import KDBaseline, gumbel_topk, mark_items, masked_logsumexp, plackett_luce_loss
from hetcomp.registry import METHODS


@METHODS.register("rrd")
class RRD(KDBaseline):
    defaults = {"lambda": 1e-3, "top_k": 100, "sample_top": False, "n_interesting": 40,
                "n_uninteresting": 40, "sample_temperature": 10.0}

    @property
    def needs_generator(self) -> bool:  # type: ignore[override]
        return bool(self.cfg["sample_top"])

    def kd_loss(self, users):
        items, valid = self.teacher_list(users)
        if self.cfg["sample_top"]:
            return self._sampled(users, items, valid).mean()
        rest = self.rest_log_mass(users, items, valid)
        return plackett_luce_loss(self.item_scores(users, items), valid, rest).mean()

    def _sampled(self, users, items, valid):
        generator = self.sampling_generator()
        ranks = torch.arange(items.shape[1], device=items.device, dtype=torch.float64)
        log_w = (-ranks / float(self.cfg["sample_temperature"])).expand(items.shape)
        log_w = log_w.masked_fill(~valid, -torch.inf)
        positions, drawn = gumbel_topk(log_w, int(self.cfg["n_interesting"]), generator)
        positions, order = torch.sort(positions.masked_fill(~drawn, items.shape[1]), dim=1)
        drawn = drawn.gather(1, order)
        chosen = items.gather(1, positions.clamp(max=items.shape[1] - 1))
        outside = ~mark_items(self.train_index.mask(users), items, valid)
        log_u = torch.zeros(outside.shape, dtype=torch.float64, device=outside.device)
        log_u = log_u.masked_fill(~outside, -torch.inf)
        rest_items, rest_drawn = gumbel_topk(log_u, int(self.cfg["n_uninteresting"]), generator)
        rest = masked_logsumexp(self.item_scores(users, rest_items), rest_drawn)
        return plackett_luce_loss(self.item_scores(users, chosen), drawn, rest)
