"""Shared pieces of the KD baselines: pure loss functions, training masks, student rankings, and
the ``KDBaseline`` distiller they all extend (negative sampling: ``baselines/sampling.py``).

Conventions (every baseline):

- ``loss_terms(batch)`` returns ``{"base": student.loss(batch), "kd": lambda * kd}``: the
  student's BPR loss plus the weighted KD term (the usual KD4Rec form).
- ``kd`` is computed for the **unique users** of the batch: each user's loss is summed over its
  list items and the per-user losses are **averaged** over those users.
- The teacher is the final ensemble (``knowledge.final_topk``; MTD: each teacher's final list),
  whose lists hold only non-training items, used whole and in teacher order (the HetComp authors
  dropped the originals' sampling of top items, nothing else).
- Negatives ("uninteresting" items) are *sampled* as in each original: ``draw_outside`` draws them
  per user per epoch, uniformly from the user's items outside the list and the training items
  (``baselines.sampling.ItemSampler``, seeded from the run's seed). ``rest_log_mass``, one mass over
  every such item of the catalogue, is HetComp's own device and only a non-default option here.
- Scores are not clamped (the official HetComp clamp to [-40, 40] is HetComp's own quirk).
- Losses are pure tensor functions written with ``logsumexp``/``logcumsumexp``/``softplus``.
  Masked entries are filled with the large finite ``NEG`` instead of ``-inf`` (whose gradients
  through ``logcumsumexp`` are NaN); ``exp(NEG - x)`` is exactly 0 in float32 and float64, so a
  masked entry contributes nothing to a sum and receives zero gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from baselines.kernels import relaxed_ranking_kernel
from baselines.sampling import ItemSampler
from hetcomp.config import TUNE_KEY, merge_defaults
from hetcomp.distill.base import Distiller
from hetcomp.distill.list_scores import kernel_applies, list_scores
from hetcomp.distill.student import STUDENT_DEFAULTS
from hetcomp.distill.losses import Workspace, factorized_rest_log_mass
from hetcomp.errors import HetCompError
from hetcomp.training import LoopConfig

#: Stand-in for log(0): exp(NEG - x) == 0 for any realistic score x, yet all arithmetic stays finite.
NEG = -1e30

#: Keys of a method YAML that belong to the training loop, the student or the tuning grid, not to
#: the distiller (derived from their definitions, so a new loop key needs no edit here).
LOOP_KEYS = frozenset({f.name for f in dataclasses.fields(LoopConfig)} | set(STUDENT_DEFAULTS) | {TUNE_KEY})


# ------------------------------------------------------------------------------------------
# Pure loss functions
# ------------------------------------------------------------------------------------------

def masked_logsumexp(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``log sum_{j: keep[b, j]} exp(scores[b, j])`` per row; ``~NEG`` for rows with nothing kept."""
    return scores.masked_fill(~keep, NEG).logsumexp(dim=-1)


#: Largest spread (max - min) of one row's scores for which ``plackett_luce_loss`` takes its fast
#: path (float64 ``exp`` with one shift per row is exact up to ~700 nats; wider rows use
#: ``logcumsumexp``).
FAST_SPREAD = 600.0


def plackett_luce_loss(scores: torch.Tensor, valid: torch.Tensor, rest_log: torch.Tensor) -> torch.Tensor:
    """Relaxed ranking (RRD) loss per row: ``-sum_k [s_k - log(sum_{j >= k} e^{s_j} + e^{rest})]``.

    ``scores [B, K]`` are the student's scores of a list in teacher order, ``valid [B, K]`` marks
    real entries (padding is ignored) and ``rest_log [B]`` is the log of the student's exp-mass on
    the "uninteresting" items (``NEG`` for none): the list must be ranked in order and above them,
    whose internal order is ignored. Written as ``sum_k softplus(log(sum_{j > k} e^{s_j} + e^{rest}) - s_k)``.

    When every row's valid scores and rest spread at most ``FAST_SPREAD``, the loss and its
    gradient are computed together in float64 with one shift per row (``relaxed_ranking_torch``,
    or the numba kernel ``baselines.kernels.relaxed_ranking_kernel`` on CPU) and the gradient is
    kept for the backward (``PrecomputedGradient``); wider rows go through ``logcumsumexp`` and
    autograd.
    """
    rest = rest_log.to(scores.dtype)
    if kernel_applies(scores, rest):
        loss = torch.empty(scores.shape[0], dtype=torch.float64)
        grad_scores, grad_rest = torch.empty_like(scores), torch.empty_like(rest)
        if relaxed_ranking_kernel(scores.detach().contiguous().numpy(), valid.contiguous().numpy(),
                                  rest.detach().contiguous().numpy(), FAST_SPREAD, NEG, loss.numpy(),
                                  grad_scores.numpy(), grad_rest.numpy()):
            return PrecomputedGradient.apply(scores, rest, loss.to(scores.dtype), grad_scores, grad_rest)
    s = scores.masked_fill(~valid, NEG)
    with torch.no_grad():
        top = torch.maximum(s.amax(1), rest) if scores.shape[1] else rest
        real_rest = torch.where(rest > NEG / 2, rest, torch.full_like(rest, torch.inf))
        low = (torch.minimum(scores.masked_fill(~valid, torch.inf).amin(1), real_rest)
               if scores.shape[1] else rest)
        fast = bool(((top - low) <= FAST_SPREAD).all()) if len(scores) else True
    if fast:
        return PrecomputedGradient.apply(scores, rest, *relaxed_ranking_torch(scores, valid, rest, top))
    batch = scores.shape[0]
    suffix = torch.logcumsumexp(s.flip(1), dim=1).flip(1)
    after = torch.cat([suffix[:, 1:], s.new_full((batch, 1), NEG)], dim=1)
    per_item = F.softplus(torch.logaddexp(after, rest.unsqueeze(1)) - s)
    return torch.where(valid, per_item, torch.zeros_like(per_item)).sum(1)


@torch.no_grad()
def relaxed_ranking_torch(scores: torch.Tensor, valid: torch.Tensor, rest: torch.Tensor,
                          shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss [B], d loss / d scores [B, K], d loss / d rest [B])`` of ``plackett_luce_loss``
    for rows whose scores lie within ``FAST_SPREAD`` of ``shift [B]`` (their largest).

    With ``e_j = exp(s_j - shift)`` (0 where not valid), ``r = exp(rest - shift)``, ``A_k = sum_{j > k}
    e_j + r`` and ``S_k = e_k + A_k`` (float64), the loss is ``sum_{k valid} softplus(log A_k - s_k
    + shift)`` and

        d/ds_j = -A_j / S_j + e_j * sum_{k < j, valid} 1 / S_k   (j valid; 0 otherwise),
        d/drest = r * sum_{k valid} 1 / S_k.
    """
    batch = scores.shape[0]
    shift = shift.double().unsqueeze(1)
    e = torch.exp(scores.double().masked_fill(~valid, NEG) - shift)           # masked entries: exactly 0
    r = torch.exp(rest.double().unsqueeze(1) - shift)
    suffix = e.flip(1).cumsum(1).flip(1)                                       # sum_{j >= k}
    after = torch.cat([suffix[:, 1:], suffix.new_zeros(batch, 1)], dim=1).add_(r)
    tiny = torch.finfo(torch.float64).tiny
    lower = after.clamp(min=tiny).log_().add_(shift)
    loss = F.softplus(lower - scores.double()).masked_fill_(~valid, 0.0).sum(1)
    inverse = (e + after).clamp_(min=tiny).reciprocal_().masked_fill_(~valid, 0.0)          # 1 / S_k
    before = inverse.cumsum(1)                                                 # sum_{k <= j}
    total = before[:, -1:].clone() if before.shape[1] else before.new_zeros(batch, 1)
    before = before.sub_(inverse)                                              # sum_{k < j}
    grad_scores = (e * before).sub_(after * inverse)
    return (loss.to(scores.dtype), grad_scores.to(scores.dtype), (r * total).squeeze(1).to(rest.dtype))


class PrecomputedGradient(torch.autograd.Function):
    """``apply(scores, rest, loss, grad_scores, grad_rest)`` is ``loss`` (``[B]``), whose gradients
    with respect to ``scores`` and ``rest`` were computed with it (no autograd graph of the loss).
    A loss without a rest passes ``None`` for ``rest`` and ``grad_rest``."""

    @staticmethod
    def forward(ctx, scores, rest, loss, grad_scores, grad_rest):
        ctx.save_for_backward(grad_scores, grad_rest)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_scores, grad_rest = ctx.saved_tensors
        return (grad_loss.unsqueeze(1) * grad_scores, None if grad_rest is None else grad_loss * grad_rest,
                None, None, None)


def weighted_logsigmoid_loss(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """RD's distillation term per row: ``sum_k w_k * -log sigmoid(s_k)`` (teacher items as positives)."""
    return (weights * F.softplus(-scores)).sum(1)


def soft_bce_loss(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """CD's term per row: ``sum_k w_k * -[q_k log sigmoid(s_k) + (1 - q_k) log sigmoid(-s_k)]``."""
    bce = labels * F.softplus(-scores) + (1.0 - labels) * F.softplus(scores)
    return (weights * bce).sum(1)


# ------------------------------------------------------------------------------------------
# Training interactions and student rankings
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


#: Users per block of ``student_rankings``: a ``[256, n_items]`` float32 block (~26 MB on
#: CiteULike-t) goes through ``topk`` faster than a 4x larger one.
RANKING_BATCH = 256


@torch.no_grad()
def student_rankings(score_fn, train_index: TrainIndex, n_users: int, items: torch.Tensor | None,
                     top: int, rank_cap: int | None = None, batch_size: int = RANKING_BATCH,
                     owned: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The student's ranking among each user's non-training items.

    Returns ``(top_items [n_users, top], ranks)``: the student's ``top`` best non-training items
    (``-1`` where a user has fewer) and, if ``items [n_users, K]`` is given, the 0-based rank of each
    listed item (the number of non-training items the student scores strictly higher), capped at
    ``rank_cap`` if given: ``min(rank, rank_cap)`` needs only the top ``rank_cap`` scores of a row
    (one ``topk``), not a sort of the whole row.

    ``owned``: ``score_fn`` returns tensors this function may overwrite (a reused buffer); otherwise
    its scores are copied first (a model may return cached scores).
    """
    device = train_index.indptr.device
    tops, ranks = [], []
    for start in range(0, n_users, batch_size):
        users = torch.arange(start, min(start + batch_size, n_users), device=device)
        scores = score_fn(users)
        if not (owned and scores.dtype == torch.float32):
            scores = scores.to(torch.float32, copy=True)
        rows, train_items = train_index.entries(users)
        scores.index_put_((rows, train_items), scores.new_tensor(-torch.inf))    # no dense mask
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
    ``item_scores`` (and ``rest_log_mass`` for a catalogue-wide rest), and may set ``needs_generator`` and the
    hooks ``on_start`` (once), ``on_epoch`` (before each epoch's batches: per-epoch draws with
    ``draw_outside`` / ``sampling_generator``) and ``after_epoch``.

    For an inner-product student (``user_emb``/``item_emb``, i.e. MF) the scores of listed items
    come straight from the embeddings (``hetcomp.distill.list_scores``: no autograd graph of
    gathers) and the catalogue-wide rest mass from
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
        self.sampler = ItemSampler(split.train, self.device)
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
        self.on_epoch(epoch)
        return super().epoch_batches(epoch, generator)

    def _ensure_started(self) -> None:
        if not self.started:
            self.started = True
            self.on_start()

    def on_start(self) -> None:
        """Runs once before the first batch (initial per-epoch state)."""

    def on_epoch(self, epoch: int) -> None:
        """Runs before each epoch's batches (per-epoch draws)."""

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
            return list_scores(self.student.user_emb.weight, self.student.item_emb.weight, users, items)
        return self._full(users).gather(1, items)

    def draw_outside(self, items: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
        """``[n_users, n]`` items per user drawn uniformly without replacement from the items that
        are neither its training items nor among ``items [n_users, M]`` (where ``valid``)."""
        users = torch.arange(self.split.n_users, device=self.device)
        return self.sampler.uniform_outside(users, items, valid, n, self.sampling_generator())

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
        return self.topk.index_select(0, users), self.topk_valid.index_select(0, users)

    def rankings(self, items: torch.Tensor | None, top: int, rank_cap: int | None = None):
        was_training = self.student.training
        self.student.train(False)
        try:
            if not self.factorized:
                return student_rankings(self.student.score, self.train_index, self.split.n_users, items,
                                        top, rank_cap)
            # inner products written into one reused block (no fresh [256, n_items] tensor per call)
            user_table = self.student.user_emb.weight.detach()
            item_table = self.student.item_emb.weight.detach()
            block = item_table.new_empty(RANKING_BATCH, item_table.shape[0])

            def score_block(users: torch.Tensor) -> torch.Tensor:
                return torch.mm(user_table.index_select(0, users), item_table.T, out=block[:len(users)])

            return student_rankings(score_block, self.train_index, self.split.n_users, items, top, rank_cap,
                                    batch_size=RANKING_BATCH, owned=True)
        finally:
            self.student.train(was_training)

    def method_state(self) -> dict:
        return {"config": dict(self.cfg), "top_k": self.top_k}

    # -- resuming (hetcomp.checkpoint) -------------------------------------------------------
    def extra_state(self) -> dict:
        """The sampling generator's state and every instance attribute holding plain data
        (tensors, arrays, numbers, strings, None, and lists/tuples/dicts of them): per-epoch
        samples, curriculum stage, correction sets, update epochs, extra parameters, whatever a
        subclass keeps. Helper objects (train index, sampler, workspace) are rebuilt, not saved."""
        return {"generator": None if self.generator is None else self.generator.get_state(),
                "attributes": {name: value for name, value in vars(self).items()
                               if name != "generator" and _plain_data(value)}}

    def load_extra_state(self, state: dict) -> None:
        if state["generator"] is not None:
            self._make_generator(0).set_state(state["generator"])
        for name, value in state["attributes"].items():
            current = getattr(self, name, None)
            if isinstance(current, torch.nn.Parameter):   # the optimiser holds this very tensor
                with torch.no_grad():
                    current.copy_(value)
            else:
                setattr(self, name, value)


def _plain_data(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, np.ndarray)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return False


def method_config(defaults: Mapping[str, Any], config: Mapping[str, Any] | None, where: str) -> dict:
    """The method keys of ``config`` over ``defaults``; loop/student keys are ignored, others are errors."""
    given = {k: v for k, v in (config or {}).items() if k not in LOOP_KEYS}
    return merge_defaults(defaults, given, where)
