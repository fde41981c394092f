"""CL-DRD: curriculum learning for ranking distillation, adapted to top-K recommendation.

H. Zeng, H. Zamani, V. Vinay. "Curriculum Learning for Dense Retrieval Distillation", SIGIR 2022
(method as described in the paper and its public code; this is an independent implementation).

The original distils a re-ranking teacher's list of 30 documents per query in stages of growing
difficulty. In each stage the list is split into three tiers: an **ordered group** (the teacher's
top ``g`` documents with graded labels ``1 / rank``, whose full order is learned), a **middle tier**
(the documents after the group, one lower label: above the negatives, unordered among themselves)
and a **negative tier** (one lowest label). The ordered group grows from stage to stage, 5 -> 10 ->
20 -> 30 documents (the last stage orders the whole list). The loss is LambdaRank-style: for every
pair ``(i, j)`` with label_i > label_j, a logistic loss ``log(1 + exp(-(s_i - s_j)))`` weighted by
``|1/p_i - 1/p_j|``, the change in reciprocal rank when ``i`` and ``j`` swap places, where ``p`` is
each candidate's 1-based position in the student's current ranking of the candidates (no
gradient through ``p``); the loss is the mean over the valid pairs.

Adaptation here (the list is the final ensemble's whole top-``top_k`` list, in order, no sampling
of top items, as the HetComp authors ran every baseline):

- candidates per user = the ensemble's top-100 list + ``n_negatives`` (40) items drawn uniformly
  from the user's items outside the list and the training items, redrawn every epoch (the
  ``rrd`` sampler);
- ordered group = the list's top ``ordered[stage]`` items, ``ordered = [10, 20, 50, 100]`` (the
  original's 5 -> 10 -> 20 -> 30 of 30 scaled to a list of 100), middle tier = the rest of the
  list, negative tier = the sampled items. The negative tier stays in the last stage (the
  original's last stage has no negatives; without them a recommender's list would never be
  pushed above the catalogue);
- the stage advances every ``stage_epochs`` (50) epochs: the original moves on after a fixed
  training budget per stage, not on a validation signal; so early stopping cannot end a run
  before every stage, the last included, has had its ``stage_epochs`` (``min_epochs``); the
  best validation epoch is still selected over the whole run;
- the per-user loss is the mean over that user's valid pairs, then averaged over the batch's
  users (the original averages over all pairs of the batch: the same when every list is full).

No stage is RRD: a pairwise, reciprocal-rank-weighted logistic loss, not a Plackett-Luce
likelihood. Loss: BPR + lambda * KD. At initialisation (scores ~ 0) every pair costs log 2 and the
weights average ~0.05, so KD ~ 0.035 in every stage on CiteULike-t (top-100 + 40 negatives) and
lambda = 10 gives ~0.35 against BPR ~0.69, the ratio RRD has at its original lambda.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baselines.common import KDBaseline, PrecomputedGradient
from baselines.kernels import tiered_pairs_kernel
from hetcomp.errors import HetCompError
from hetcomp.registry import METHODS


def reciprocal_positions(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``1 / p`` per candidate, ``p`` its 1-based position in its row sorted by descending score
    (invalid entries sort last); no gradient."""
    with torch.no_grad():
        order = torch.argsort(scores.masked_fill(~valid, -torch.inf), dim=1, descending=True, stable=True)
        positions = torch.arange(1, scores.shape[1] + 1, device=scores.device, dtype=scores.dtype)
        return torch.empty_like(scores).scatter_(1, order, 1.0 / positions.expand_as(scores))


#: Rows per chunk of the fused pairwise loss: a chunk's ``[rows, h, l]`` temporaries stay in cache.
PAIR_CHUNK = 32
#: Ordered items per block of ``tiered_lambda_loss`` (each block is paired with the candidates
#: after its first item only: ~27% fewer pair terms than the full square for 100 of 140).
ORDERED_BLOCK = 25


class WeightedPairLogistic(torch.autograd.Function):
    """``sum_{i, j} w_ij * softplus(low_j - high_i)`` per row with
    ``w_ij = |inv_high_i - inv_low_j| * mask_ij`` (no gradient through ``w``).

    Fused and chunked over rows: the forward pass also computes the gradients with respect to
    ``high`` and ``low`` (``-sum_j q_ij`` and ``sum_i q_ij``, ``q = w * sigmoid(low_j - high_i)``)
    and keeps only those, so no ``[B, h, l]`` tensor is stored for autograd; each chunk's
    temporaries stay in cache (the pair tensors are up to ~100 x 140 per user).
    """

    @staticmethod
    def forward(ctx, high, low, inv_high, inv_low, mask, high_valid, low_valid):
        loss = high.new_zeros(high.shape[0])
        grad_high, grad_low = torch.zeros_like(high), torch.zeros_like(low)
        all_valid = bool(high_valid.all()) and bool(low_valid.all())     # then skip two passes per chunk
        for start in range(0, high.shape[0], PAIR_CHUNK):
            rows = slice(start, start + PAIR_CHUNK)
            diff = low[rows, None, :] - high[rows, :, None]
            weight = torch.sub(inv_high[rows, :, None], inv_low[rows, None, :]).abs_()
            if mask is not None:
                weight.mul_(mask)
            if not all_valid:
                weight.mul_(high_valid[rows, :, None]).mul_(low_valid[rows, None, :])
            n = diff.shape[0]
            # sum_ij softplus * weight as one batched dot product (no [rows, h, l] product tensor)
            loss[rows] = torch.bmm(F.softplus(diff).view(n, 1, -1), weight.view(n, -1, 1)).view(n)
            q = torch.sigmoid(diff.view(n, -1), out=diff.view(n, -1)).view_as(weight).mul_(weight)
            torch.sum(q, 2, out=grad_high[rows]).neg_()
            torch.sum(q, 1, out=grad_low[rows])
        ctx.save_for_backward(grad_high, grad_low)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_high, grad_low = ctx.saved_tensors
        scale = grad_loss.unsqueeze(1)
        return scale * grad_high, scale * grad_low, None, None, None, None, None


def _pairs_by_kernel(scores, valid, inverse, n_ordered: int, list_length: int) -> torch.Tensor:
    """The per-row pair sums of ``tiered_lambda_loss`` by ``baselines.kernels.tiered_pairs_kernel``
    (float32 CPU), whose gradient comes with them (``PrecomputedGradient``)."""
    loss = torch.empty(scores.shape[0], dtype=torch.float64)
    grad = torch.empty_like(scores)
    tiered_pairs_kernel(scores.detach().contiguous().numpy(), valid.contiguous().numpy(),
                        inverse.contiguous().numpy(), n_ordered, list_length, loss.numpy(), grad.numpy())
    return PrecomputedGradient.apply(scores, None, loss.to(scores.dtype), grad, None)


def tiered_lambda_loss(scores: torch.Tensor, valid: torch.Tensor, n_ordered: int, list_length: int) -> torch.Tensor:
    """CL-DRD's pairwise loss per row over ``scores [B, C]``: columns ``[0, n_ordered)`` are the
    ordered group (in label order), ``[n_ordered, list_length)`` the middle tier, the rest the
    negative tier; ``valid`` masks padding. Mean over the row's pairs (0 for a row with none) of
    ``|1/p_i - 1/p_j| * softplus(s_j - s_i)`` for every pair with label_i > label_j: each ordered
    item against every later candidate, each middle item against every negative. float32 on the
    CPU: the numba kernel (``_pairs_by_kernel``); otherwise torch (``WeightedPairLogistic``)."""
    g = min(n_ordered, list_length)
    width = scores.shape[1]
    inverse = reciprocal_positions(scores, valid)
    ones = valid.to(scores.dtype)
    valid_after = ones.flip(1).cumsum(1).flip(1) - ones                                      # valid j > i
    count = (ones[:, :g] * valid_after[:, :g]).sum(1) + ones[:, g:list_length].sum(1) * ones[:, list_length:].sum(1)
    if tiered_pairs_kernel is not None and scores.device.type == "cpu" and scores.dtype == torch.float32:
        return _pairs_by_kernel(scores, valid, inverse, g, list_length) / count.clamp(min=1)
    later = (torch.arange(width, device=scores.device).unsqueeze(0)
             > torch.arange(g, device=scores.device).unsqueeze(1)).to(scores.dtype)            # [g, C]
    total = scores.new_zeros(scores.shape[0])
    # the ordered group in blocks of rows, each against the columns after its first row only:
    # the pairs (i, j > i) fill a triangle, and whole blocks of j <= i are never computed
    for start in range(0, g, ORDERED_BLOCK):
        rows, after = slice(start, min(start + ORDERED_BLOCK, g)), slice(start + 1, width)
        total = total + WeightedPairLogistic.apply(scores[:, rows], scores[:, after], inverse[:, rows],
                                                   inverse[:, after], later[rows, after], ones[:, rows],
                                                   ones[:, after])
    if list_length > g:
        total = total + WeightedPairLogistic.apply(
            scores[:, g:list_length], scores[:, list_length:], inverse[:, g:list_length],
            inverse[:, list_length:], None, ones[:, g:list_length], ones[:, list_length:])
    return total / count.clamp(min=1)


@METHODS.register("cldrd")
class CLDRD(KDBaseline):
    defaults = {"lambda": 10.0, "top_k": 100, "n_negatives": 40, "stage_epochs": 50,
                "ordered": [10, 20, 50, 100]}
    needs_generator = True

    def __init__(self, split, knowledge, student, config, device):
        super().__init__(split, knowledge, student, config, device)
        ordered = self.cfg["ordered"]
        if not isinstance(ordered, list) or not ordered or any(int(g) < 1 for g in ordered):
            raise HetCompError("cldrd: ordered must be a non-empty list of group sizes >= 1")
        if [int(g) for g in ordered] != sorted(int(g) for g in ordered):
            raise HetCompError(f"cldrd: the ordered group must grow stage by stage, got {ordered}")
        if int(self.cfg["stage_epochs"]) < 1 or int(self.cfg["n_negatives"]) < 1:
            raise HetCompError("cldrd: stage_epochs and n_negatives must be >= 1")
        self.ordered = [min(int(g), self.top_k) for g in ordered]
        self.stage = 0
        self.negatives: torch.Tensor | None = None

    @property
    def min_epochs(self) -> int:
        """Every stage, the last included, trains its full ``stage_epochs`` before early stopping
        may end the run (the original trains each stage for a fixed budget)."""
        return int(self.cfg["stage_epochs"]) * len(self.ordered)

    def stage_for_epoch(self, epoch: int) -> int:
        return min(epoch // int(self.cfg["stage_epochs"]), len(self.ordered) - 1)

    def on_epoch(self, epoch: int) -> None:
        self.stage = self.stage_for_epoch(epoch)
        self.negatives = self.draw_outside(self.topk, self.topk_valid, int(self.cfg["n_negatives"]))

    def after_epoch(self, epoch: int) -> dict:
        return {"cldrd_stage": self.stage}

    def kd_loss(self, users):
        if self.negatives is None:
            raise HetCompError("cldrd: no negatives drawn yet (epoch_batches was not called)")
        items, valid = self.teacher_list(users)
        negatives = self.negatives.index_select(0, users)
        candidates = torch.cat([items, negatives], dim=1)
        candidate_valid = torch.cat([valid, torch.ones_like(negatives, dtype=torch.bool)], dim=1)
        scores = self.item_scores(users, candidates)
        return tiered_lambda_loss(scores, candidate_valid, self.ordered[self.stage], items.shape[1]).mean()

    def method_state(self) -> dict:
        return {**super().method_state(), "stage": self.stage, "ordered_group": self.ordered[self.stage]}
