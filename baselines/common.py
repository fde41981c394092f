"""Shared pieces of the KD baselines: pure loss functions, training masks, student rankings,
sampling, and the ``KDBaseline`` distiller they all extend.

Conventions (every baseline):

- ``loss_terms(batch)`` returns ``{"base": student.loss(batch), "kd": lambda * kd}``: the
  student's BPR loss plus the weighted KD term (the usual KD4Rec form).
- ``kd`` is computed for the **unique users** of the batch: each user's loss is summed over its
  list items and the per-user losses are **averaged** over those users.
- The teacher is the final ensemble (``knowledge.final_topk``; MTD: each teacher's final list),
  whose lists hold only non-training items; every "rest" set excludes the user's training items.
- Scores are not clamped (the official HetComp clamp to [-40, 40] is HetComp's own quirk).
- Losses are pure tensor functions written with ``logsumexp``/``logcumsumexp``/``softplus``.
  Masked entries are filled with the large finite ``NEG`` instead of ``-inf`` (whose gradients
  through ``logcumsumexp`` are NaN); ``exp(NEG - x)`` is exactly 0 in float32 and float64, so a
  masked entry contributes nothing to a sum and receives zero gradient.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from hetcomp.config import merge_defaults
from hetcomp.distill.base import Distiller
from hetcomp.distill.losses import Workspace, factorized_rest_log_mass
from hetcomp.errors import HetCompError

#: Stand-in for log(0): exp(NEG - x) == 0 for any realistic score x, yet all arithmetic stays finite.
NEG = -1e30

#: Keys of a method YAML that belong to the training loop or the student, not to the distiller.
LOOP_KEYS = frozenset({"lr", "weight_decay", "max_epochs", "eval_every", "patience", "select_metric",
                       "student_dim", "batch_size", "init_std"})


# ------------------------------------------------------------------------------------------
# Pure loss functions
# ------------------------------------------------------------------------------------------

def masked_logsumexp(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``log sum_{j: keep[b, j]} exp(scores[b, j])`` per row; ``~NEG`` for rows with nothing kept."""
    return scores.masked_fill(~keep, NEG).logsumexp(dim=-1)


def groupwise_loss(scores: torch.Tensor, valid: torch.Tensor, rest_log: torch.Tensor,
                   group_end: torch.Tensor) -> torch.Tensor:
    """Group-wise relaxed ranking loss, one value per row.

    ``scores [B, K]`` are the student's scores of a list in teacher order, ``valid [B, K]`` marks
    real entries (padding is ignored), ``rest_log [B]`` is the log of the student's exp-mass on the
    "rest" items (all below the list; ``NEG`` for none) and ``group_end [K]`` (or ``[B, K]``) is, for
    each position ``k``, the exclusive end of ``k``'s group. Each valid item must beat every valid
    item of the *later* groups plus the rest:

        loss_b = sum_{k valid} -log( e^{s_k} / (e^{s_k} + sum_{j >= group_end[k], valid} e^{s_j} + e^{rest}) )
               = sum_{k valid} softplus( LSE({s_j : j >= group_end[k]} U {rest}) - s_k ).

    Items of the same group do not compete. ``group_end[k] = k + 1`` gives the relaxed
    Plackett-Luce loss of RRD (``plackett_luce_loss``); one group gives HetComp's overall loss.
    """
    batch, length = scores.shape
    s = scores.masked_fill(~valid, NEG)
    suffix = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # LSE_{j >= k}
    suffix = torch.cat([suffix, s.new_full((batch, 1), NEG)], dim=1)
    if group_end.dim() == 1:
        group_end = group_end.unsqueeze(0).expand(batch, length)
    lower = torch.logaddexp(suffix.gather(1, group_end), rest_log.unsqueeze(1))
    per_item = F.softplus(lower - s)
    return torch.where(valid, per_item, torch.zeros_like(per_item)).sum(1)


def plackett_luce_loss(scores: torch.Tensor, valid: torch.Tensor, rest_log: torch.Tensor) -> torch.Tensor:
    """Relaxed ranking (RRD) loss per row: ``-sum_k [s_k - log(sum_{j >= k} e^{s_j} + e^{rest})]``.

    The list (valid entries, in teacher order) must be ranked in order and above the rest items,
    whose internal order is ignored (``groupwise_loss`` with singleton groups).
    """
    ends = torch.arange(1, scores.shape[1] + 1, device=scores.device)
    return groupwise_loss(scores, valid, rest_log, ends)


def weighted_logsigmoid_loss(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """RD's distillation term per row: ``sum_k w_k * -log sigmoid(s_k)`` (teacher items as positives)."""
    return (weights * F.softplus(-scores)).sum(1)


def soft_bce_loss(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """CD's term per row: ``sum_k w_k * -[q_k log sigmoid(s_k) + (1 - q_k) log sigmoid(-s_k)]``."""
    bce = labels * F.softplus(-scores) + (1.0 - labels) * F.softplus(scores)
    return (weights * bce).sum(1)


def group_ends(cuts: Iterable[int] | str, length: int) -> list[int]:
    """Exclusive end of each position's group for cut points ``cuts`` over a list of ``length``.

    ``cuts = [10, 50, 100]`` -> groups ``[0, 10) [10, 50) [50, 100)``; cut points past ``length``
    are dropped and ``length`` always closes the last group; ``"full"`` makes every position its
    own group (full order).
    """
    if isinstance(cuts, str):
        if cuts != "full":
            raise HetCompError(f"a curriculum stage is a list of cut points or 'full', got {cuts!r}")
        return list(range(1, length + 1))
    points = sorted({int(c) for c in cuts if 0 < int(c) < length}) + [length]
    ends, start = [], 0
    for end in points:
        ends.extend([end] * (end - start))
        start = end
    return ends


# ------------------------------------------------------------------------------------------
# Masks, rankings, sampling
# ------------------------------------------------------------------------------------------

class TrainIndex:
    """The training interactions on the device, as flat entries or dense masks for user batches."""

    def __init__(self, train: sp.csr_matrix, device: torch.device):
        train = train.tocsr()
        self.n_items = train.shape[1]
        self.indptr = torch.from_numpy(train.indptr.astype(np.int64)).to(device)
        self.indices = torch.from_numpy(train.indices.astype(np.int64)).to(device)

    def entries(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, items)`` of the training interactions of ``users`` (row = position in ``users``)."""
        users = users.to(self.indptr.device)
        starts = self.indptr[users]
        counts = self.indptr[users + 1] - starts
        total = int(counts.sum())
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts,
                                       output_size=total)
        offsets = torch.arange(total, device=users.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts, output_size=total)
        return rows, self.indices[starts[rows] + offsets]

    def mask(self, users: torch.Tensor) -> torch.Tensor:
        """Dense boolean ``[len(users), n_items]``: the users' training items."""
        rows, items = self.entries(users)
        out = torch.zeros(len(users), self.n_items, dtype=torch.bool, device=self.indptr.device)
        out[rows, items] = True
        return out


def mark_items(mask: torch.Tensor, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A copy of ``mask [B, n_items]`` with ``items[b, k]`` set wherever ``valid[b, k]``."""
    out = mask.clone()
    rows, cols = valid.nonzero(as_tuple=True)
    out[rows, items[rows, cols]] = True
    return out


def gumbel_topk(log_weights: torch.Tensor, n: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n`` columns per row without replacement with probability proportional to
    ``exp(log_weights)`` (Gumbel top-k; ``-inf`` weights are never drawn).

    Returns ``(columns [B, n], drawn [B, n])``; ``drawn`` is False where a row had fewer than
    ``n`` positive weights.
    """
    n = min(n, log_weights.shape[1])
    uniform = torch.rand(log_weights.shape, generator=generator, device=log_weights.device,
                         dtype=torch.float64).clamp_(min=1e-300)
    keys = log_weights.double() - torch.log(-torch.log(uniform))
    top = torch.topk(keys, n, dim=1)
    return top.indices, torch.isfinite(top.values)


@torch.no_grad()
def student_rankings(score_fn, train_index: TrainIndex, n_users: int, items: torch.Tensor | None,
                     top: int, rank_cap: int | None = None,
                     batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The student's ranking among each user's non-training items.

    Returns ``(top_items [n_users, top], ranks)``: the student's ``top`` best non-training items
    (``-1`` where a user has fewer) and, if ``items [n_users, K]`` is given, the 0-based rank of each
    listed item (the number of non-training items the student scores strictly higher), capped at
    ``rank_cap`` if given: ``min(rank, rank_cap)`` needs only the top ``rank_cap`` scores of a row
    (one ``topk``), not a sort of the whole row.
    """
    device = train_index.indptr.device
    tops, ranks = [], []
    for start in range(0, n_users, batch_size):
        users = torch.arange(start, min(start + batch_size, n_users), device=device)
        scores = score_fn(users).float()
        scores = scores.masked_fill(train_index.mask(users), -torch.inf)
        k = min(top, scores.shape[1])
        depth = k if items is None else min(max(k, rank_cap or scores.shape[1]), scores.shape[1])
        best = torch.topk(scores, depth, dim=1)
        tops.append(best.indices[:, :k].masked_fill(~torch.isfinite(best.values[:, :k]), -1))
        if items is not None:
            chunk = items[start:start + len(users)].to(device)
            ascending = best.values.flip(1)
            query = scores.gather(1, chunk.clamp(min=0)).contiguous()
            rank = depth - torch.searchsorted(ascending, query, right=True)
            ranks.append(rank if rank_cap is None else rank.clamp(max=rank_cap))
    return torch.cat(tops), (torch.cat(ranks) if items is not None else None)


# ------------------------------------------------------------------------------------------
# The distiller base of every baseline
# ------------------------------------------------------------------------------------------

class KDBaseline(Distiller):
    """Base + lambda * KD on the final ensemble's top-K list.

    Subclasses set ``defaults`` (their method keys; ``lambda`` and ``top_k`` at least), implement
    ``kd_loss(users)`` (the mean over the unique batch ``users`` of the per-user KD loss) with
    ``item_scores`` and ``rest_log_mass``, and may set ``needs_generator`` and the epoch hooks.

    For an inner-product student (``user_emb``/``item_emb``, i.e. MF) the scores of listed items
    come straight from the embeddings and the catalogue-wide rest mass from
    ``hetcomp.distill.losses.factorized_rest_log_mass`` (no clamp: the baselines have none), so no
    ``[B, n_items]`` score matrix goes through autograd; any other student uses its full
    ``score(users)`` matrix. Both give the same values and gradients.
    """

    defaults: Mapping[str, Any] = {"lambda": 1.0, "top_k": 100}
    #: Whether the method draws random samples (then it gets its own generator, seeded from the run's).
    needs_generator = False

    def __init__(self, split, knowledge, student, config, device):
        super().__init__(split, knowledge, student, config, device)
        if knowledge is None:
            raise HetCompError(f"{type(self).__name__} needs the teacher knowledge (--ensemble)")
        self.device = torch.device(device)
        self.cfg = method_config(self.defaults, config, type(self).__name__)
        self.train_index = TrainIndex(split.train, self.device)
        self.top_k = min(int(self.cfg["top_k"]), knowledge.final_topk.shape[1])
        if self.top_k < 1:
            raise HetCompError(f"{type(self).__name__}: top_k must be >= 1")
        topk = torch.from_numpy(np.ascontiguousarray(knowledge.final_topk[:, :self.top_k]).astype(np.int64))
        self.topk_valid = (topk >= 0).to(self.device)
        self.topk = topk.clamp(min=0).to(self.device)
        self.factorized = hasattr(student, "user_emb") and hasattr(student, "item_emb")
        self.workspace = Workspace()
        self.generator: torch.Generator | None = None
        self.started = False
        self._batch_users: torch.Tensor | None = None
        self._full_scores: torch.Tensor | None = None

    # -- hooks -------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, generator: torch.Generator):
        if self.needs_generator and self.generator is None:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            self._make_generator(seed)
        self._ensure_started()
        return super().epoch_batches(epoch, generator)

    def _ensure_started(self) -> None:
        if not self.started:
            self.started = True
            self.on_start()

    def on_start(self) -> None:
        """Runs once before the first batch (initial per-epoch state)."""

    def _make_generator(self, seed: int) -> torch.Generator:
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        return self.generator

    def sampling_generator(self) -> torch.Generator:
        return self.generator if self.generator is not None else self._make_generator(0)

    def loss_terms(self, batch) -> dict[str, torch.Tensor]:
        self._ensure_started()
        base = self.student.loss(batch)
        users = torch.unique(batch[0])
        kd = self.kd_loss(users)
        self._batch_users = self._full_scores = None
        return {"base": base, "kd": float(self.cfg["lambda"]) * kd}

    def kd_loss(self, users: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- student scores ----------------------------------------------------------------------
    def _full(self, users: torch.Tensor) -> torch.Tensor:
        if self._full_scores is None or self._batch_users is not users:
            self._batch_users, self._full_scores = users, self.student.score(users)
        return self._full_scores

    def item_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The student's scores ``[B, M]`` of ``items [B, M]`` (valid ids) for ``users [B]``."""
        if self.factorized:
            # index_select, not the embedding call: the same gradient sums, but its backward
            # (index_add_) is ~5x faster on CPU than embedding_dense_backward for [B, M] lists
            item_vectors = self.student.item_emb.weight.index_select(0, items.flatten())
            return torch.einsum("bd,bkd->bk", self.student.user_emb(users),
                                item_vectors.view(*items.shape, -1))
        return self._full(users).gather(1, items)

    def rest_log_mass(self, users: torch.Tensor, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``log sum exp(s_ui)`` over each user's items that are neither training items nor in
        ``items [B, M]`` (where ``valid``); ``~NEG`` for a user with none left."""
        rows, train_items = self.train_index.entries(users)
        n_items = self.split.n_items
        listed_rows, listed_cols = valid.nonzero(as_tuple=True)
        # two groups of flat indices ``row * n_items + item``, each ordered by row (row-major)
        exclude = [rows * n_items + train_items, listed_rows * n_items + items[listed_rows, listed_cols]]
        if self.factorized:
            out = factorized_rest_log_mass(self.student.user_emb(users), self.student.item_emb.weight,
                                           exclude, None, self.workspace)
        else:
            full = self._full(users)
            out = full.flatten().index_fill(0, torch.cat(exclude), NEG).view_as(full).logsumexp(1)
        # a user with every item excluded gets -inf from the factorized path: make it NEG
        return torch.where(torch.isfinite(out), out, torch.full_like(out, NEG))

    # -- helpers -----------------------------------------------------------------------------
    def teacher_list(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final ensemble's top-K ``(items [B, K], valid [B, K])`` for ``users``."""
        return self.topk[users], self.topk_valid[users]

    def rankings(self, items: torch.Tensor | None, top: int, rank_cap: int | None = None):
        was_training = self.student.training
        self.student.train(False)
        try:
            return student_rankings(self.student.score, self.train_index, self.split.n_users, items, top,
                                    rank_cap)
        finally:
            self.student.train(was_training)

    def method_state(self) -> dict:
        return {"config": dict(self.cfg), "top_k": self.top_k}


def method_config(defaults: Mapping[str, Any], config: Mapping[str, Any] | None, where: str) -> dict:
    """The method keys of ``config`` over ``defaults``; loop/student keys are ignored, others are errors."""
    given = {k: v for k, v in (config or {}).items() if k not in LOOP_KEYS}
    return merge_defaults(defaults, given, where)
