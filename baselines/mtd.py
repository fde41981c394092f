"""MTD: the suite's multi-teacher ranking distillation rule (not the HetComp paper's MTD).

The HetComp paper compares with a multi-teacher distillation method it calls MTD; which method
that is (and its exact formulation) could not be established from the sources available to this
suite, so this row is **the suite's own multi-teacher rule**, a standard recipe built from two
published ingredients:

- one relaxed-ranking term per teacher (RRD, Kang et al., CIKM 2020; see ``baselines/rrd.py``)
  on that teacher's final list ``pi_t(u) = knowledge.trajectories[t, -1, u, :top_k]`` in order (no
  sampling of top items, as the HetComp authors ran every baseline), against ``n_uninteresting``
  (40) items drawn uniformly per user per epoch from the items outside every teacher's list and
  outside the training items (one draw shared by the teachers, so each set lies outside each
  teacher's list);
- per-user teacher-importance weights from a gating network trained jointly with the student,
  in the spirit of instance-level teacher weighting (Liu et al., "Adaptive multi-teacher
  multi-level knowledge distillation", Neurocomputing 2020: each teacher has a learned latent
  vector, its weight for an instance is a softmax over teachers of the vector's match with the
  instance's representation):

      w_{u,t} = softmax_t( <e_u, k_t> ),    L_MTD(u) = sum_t w_{u,t} * L_RRD(u; pi_t(u)),

  with ``e_u`` the student's user embedding (detached: the gate does not move the student) and
  ``k_t`` one learned vector per teacher, initialised to 0 (uniform weights), updated by the same
  optimiser as the student on the same loss. Minimising the weighted loss moves each user's weight
  towards the teachers whose lists the student already follows best.

``weighting: uniform`` drops the gate (``w = 1 / n_teachers``), plain averaging of the terms.
With one teacher MTD is RRD on that teacher's list.

Loss: BPR + lambda * mean over the batch's users of L_MTD. The weights sum to 1, so the scale is
RRD's: ~4.4e2 per user at initialisation for 100-item lists and 40 sampled items. The class
default lambda is RRD's paper value (1e-3); the YAML uses 0.1, RRD's tuned value on CiteULike-t,
the centre of MTD's validation grid.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from baselines.common import KDBaseline, plackett_luce_loss
from hetcomp.errors import HetCompError
from hetcomp.registry import METHODS

WEIGHTINGS = ("gate", "uniform")
#: The gate's entry in the task state (beside the student's parameters).
GATE_KEY = "mtd.teacher_keys"


@METHODS.register("mtd")
class MTD(KDBaseline):
    defaults = {"lambda": 1e-3, "top_k": 100, "n_uninteresting": 40, "weighting": "gate"}
    needs_generator = True

    def __init__(self, split, knowledge, student, config, device):
        super().__init__(split, knowledge, student, config, device)
        if self.cfg["weighting"] not in WEIGHTINGS:
            raise HetCompError(f"mtd: weighting must be one of {', '.join(WEIGHTINGS)}, "
                               f"got {self.cfg['weighting']!r}")
        if int(self.cfg["n_uninteresting"]) < 1:
            raise HetCompError("mtd: n_uninteresting must be >= 1")
        final = knowledge.trajectories[:, -1]
        self.list_k = min(int(self.cfg["top_k"]), final.shape[2])
        # user-major [U, T * K] (teacher t's list of user u: user_lists[u, t * K:(t + 1) * K])
        lists = torch.from_numpy(np.ascontiguousarray(final[:, :, :self.list_k].transpose(1, 0, 2))
                                 .reshape(final.shape[1], -1).astype(np.int64))
        self.user_lists_valid = (lists >= 0).to(self.device)
        self.user_lists = lists.clamp(min=0).to(self.device)
        self.n_teachers = final.shape[0]
        self.negatives: torch.Tensor | None = None
        self.teacher_keys: torch.nn.Parameter | None = None
        if self.cfg["weighting"] == "gate":
            if not self.factorized:
                raise HetCompError("mtd: weighting 'gate' needs a student with user embeddings "
                                   "(user_emb); use weighting 'uniform'")
            table = self.student.user_emb.weight
            self.teacher_keys = torch.nn.Parameter(table.new_zeros(self.n_teachers, table.shape[1]))

    def parameters(self):
        extra = [self.teacher_keys] if self.teacher_keys is not None else []
        return itertools.chain(self.student.parameters(), extra)

    def state_dict(self) -> dict:
        """The student's state and the gate's teacher vectors (restored with the best epoch)."""
        state = super().state_dict()
        if self.teacher_keys is not None:
            state = {**state, GATE_KEY: self.teacher_keys.detach().clone()}
        return state

    def load_state_dict(self, state: dict):
        state = dict(state)
        keys = state.pop(GATE_KEY, None)
        if keys is not None and self.teacher_keys is not None:
            with torch.no_grad():
                self.teacher_keys.copy_(keys)
        return super().load_state_dict(state)

    def on_epoch(self, epoch: int) -> None:
        self.negatives = self.draw_outside(self.user_lists, self.user_lists_valid,
                                           int(self.cfg["n_uninteresting"]))

    def weights(self, users: torch.Tensor) -> torch.Tensor:
        """Per-user teacher weights ``[B, T]`` (rows sum to 1)."""
        if self.teacher_keys is None:
            return torch.full((len(users), self.n_teachers), 1.0 / self.n_teachers, device=self.device)
        return torch.softmax(self.student.user_emb(users).detach() @ self.teacher_keys.T, dim=1)

    def kd_loss(self, users):
        if self.negatives is None:
            raise HetCompError("mtd: no uninteresting items drawn yet (epoch_batches was not called)")
        lists = self.user_lists.index_select(0, users)                         # [B, T * K]
        valid = self.user_lists_valid.index_select(0, users)
        batch, n_teachers, length = len(users), self.n_teachers, self.list_k
        negatives = self.negatives.index_select(0, users)
        scores = self.item_scores(users, torch.cat([lists, negatives], dim=1))
        listed, uninteresting = scores.split([n_teachers * length, negatives.shape[1]], dim=1)
        rest = uninteresting.logsumexp(1)                                      # shared by the teachers
        per_list = plackett_luce_loss(listed.reshape(batch * n_teachers, length),
                                      valid.reshape(batch * n_teachers, length),
                                      rest.repeat_interleave(n_teachers))
        weights = self.weights(users)
        return (weights.to(listed.dtype) * per_list.view(batch, n_teachers)).sum(1).mean()

    def after_epoch(self, epoch: int) -> dict:
        return {"mtd_weights": self.mean_weights()} if self.teacher_keys is not None else {}

    @torch.no_grad()
    def mean_weights(self) -> dict[str, float]:
        users = torch.arange(self.split.n_users, device=self.device)
        means = self.weights(users).double().mean(0).tolist()
        return {name: round(value, 4) for name, value in zip(self.knowledge.teachers, means)}

    def method_state(self) -> dict:
        return {**super().method_state(), "weighting": self.cfg["weighting"],
                "mean_weights": self.mean_weights()}
