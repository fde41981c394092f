"""Dynamic knowledge construction (docs/METHOD.md, "DKC"), vectorised over teachers and users.

For every (teacher ``x``, user ``u``) pair a checkpoint index ``idx[x, u]`` selects which point of
the teacher's training trajectory the user's knowledge comes from. It starts at 0 and only moves
forward, one checkpoint per call at most, following the official rule:

- discrepancy of the student to a teacher list ``pi``: the student's top-``depth`` (50) ranking of
  non-training items ``a_0..a_{depth-1}``, position weights ``g_t = 2^{exp(-t/10)} - 1`` and
  ``NDCG* = sum_t 1[a_t in set(pi[:depth])] g_t / log2(t+2) / sum_t g_t / log2(t+2)``, rounded to
  4 decimals; ``d = 1 - NDCG*``. The teacher list's own order is not used, only its top-``depth``
  set; the position weights are the student's.
- the first call stores ``last_d = d(pi^{min(C-1, idx+1)})`` (the distance to the *next* checkpoint)
  and moves nothing;
- every later call, for pairs not at the last checkpoint: ``d_next = d(pi^{idx+1})``,
  ``theta = alpha * decay^{floor(epoch / period)}``, ``ratio = last_d / max(d_next, eps)``; the pair
  advances when ``ratio > theta`` or ``ratio < 1``, and only then ``last_d`` is refreshed to the
  distance to its new next checkpoint.

``eps`` (default 1e-12) is this implementation's guard: the official code divides by ``d_next``
unguarded. With the guard ``d_next = 0`` (the student's top-50 already equals the next
checkpoint's) always advances: ``last_d > 0`` gives a huge ratio and ``last_d = 0`` gives 0 < 1.

Cost per call (no Python loop over users): the student's top-``depth`` lists
(``factorized_top_unobserved``: blocked matmul + top-k, blocks spread over the threads), then for
blocks of users a small dense ``uint8`` table "position of item i in the student's list" from
which every teacher checkpoint's top-``depth`` items are looked up at once. The rebuilt targets
come from ``ensemble_topk``, which ranks only each user's candidate items (the union of the
selected lists) instead of a dense users x items score matrix.
"""

from __future__ import annotations

import numpy as np
import torch

from hetcomp.distill.losses import over_row_blocks


def position_weights(depth: int) -> torch.Tensor:
    """``w_t = (2^{exp(-t/10)} - 1) / log2(t + 2)`` for ``t = 0..depth-1`` (float64)."""
    t = torch.arange(depth, dtype=torch.float64)
    return (torch.pow(2.0, torch.exp(-t / 10.0)) - 1.0) / torch.log2(t + 2.0)


def discrepancy(student_top: torch.Tensor, teacher_sets: torch.Tensor, weights: torch.Tensor | None = None,
                decimals: int = 4) -> torch.Tensor:
    """``1 - NDCG*`` of the student's ranking against teacher top sets, per row (float64).

    ``student_top [..., U, k]``: the student's top-``k`` non-training items in order;
    ``teacher_sets [..., U, k']``: each teacher list's first items, **sorted ascending** (only the
    set matters); leading dimensions broadcast. ``weights``: ``position_weights(k)``.
    """
    k = student_top.shape[-1]
    weights = position_weights(k) if weights is None else weights
    shape = torch.broadcast_shapes(student_top.shape[:-1], teacher_sets.shape[:-1])
    sets = teacher_sets.expand(*shape, teacher_sets.shape[-1]).contiguous()
    values = student_top.to(sets.dtype).expand(*shape, k).contiguous()
    pos = torch.searchsorted(sets, values).clamp_(max=sets.shape[-1] - 1)
    hit = sets.gather(-1, pos) == values
    ndcg = (hit.to(torch.float64) * weights.to(hit.device)).sum(-1) / weights.sum()
    return 1.0 - torch.round(ndcg, decimals=decimals)


class DynamicKnowledgeConstruction:
    """Per-(teacher, user) checkpoint selection over ``trajectories [T, C, U, N]`` (numpy, int).

    ``idx`` (int64 ``[T, U]``) is the current selection; ``step(epoch, student_top)`` applies one
    DKC call and returns the boolean ``[T, U]`` mask of the pairs that advanced.
    """

    def __init__(self, trajectories: np.ndarray, depth: int = 50, alpha: float = 1.05,
                 decay: float = 0.995, period: int = 10, eps: float = 1e-12):
        n_teachers, n_checkpoints, n_users, length = trajectories.shape
        self.depth = min(depth, length)
        self.alpha, self.decay, self.period, self.eps = float(alpha), float(decay), int(period), float(eps)
        self.n_teachers, self.n_checkpoints, self.n_users = n_teachers, n_checkpoints, n_users
        prefix = trajectories[..., :self.depth]
        self.n_items = int(prefix.max()) + 1 if prefix.size else 0
        # per user, every checkpoint's top-depth items in one row: int32 [U, T * C * depth]; padded
        # (-1) entries point at a spare column that never holds a code
        by_user = np.array(prefix.transpose(2, 0, 1, 3), dtype=np.int32, order="C").reshape(n_users, -1)
        by_user[by_user < 0] = self.n_items
        self.by_user = torch.from_numpy(by_user)
        self.weights = position_weights(self.depth)
        self.idx = torch.zeros(n_teachers, n_users, dtype=torch.int64)
        self.last_d: torch.Tensor | None = None
        self.calls = 0

    @property
    def last(self) -> int:
        return self.n_checkpoints - 1

    def all_discrepancies(self, student_top: torch.Tensor, block: int = 128) -> torch.Tensor:
        """``d [T, C, U]`` of the student's ``[U, >=depth]`` top lists to every teacher checkpoint.

        Equal to ``discrepancy`` (the reference) for teacher lists of distinct items. Per block of
        users a ``uint8 [block, n_items + 1]`` table holds each item's 1-based position in the
        student's list (0: absent); all teachers' lists are looked up in it with one ``gather``.
        """
        student_top = student_top[:, :self.depth].to(torch.int64).cpu()
        k = student_top.shape[1]
        spare = self.n_items                      # column of padded / out-of-range entries
        n_columns = max(self.n_items, int(student_top.max()) + 1 if student_top.numel() else 0) + 1
        weight_of_code = torch.cat([torch.zeros(1, dtype=torch.float64),
                                    self.weights[:k] / self.weights[:k].sum()])
        rows = min(block, self.n_users)
        codes = torch.arange(1, k + 1, dtype=torch.uint8).expand(rows, k)
        table = torch.zeros(rows, n_columns, dtype=torch.uint8)
        ndcg = torch.empty(self.n_users, self.n_teachers * self.n_checkpoints, dtype=torch.float64)
        for first in range(0, self.n_users, rows):
            last = min(first + rows, self.n_users)
            b = last - first
            mine = student_top[first:last]
            valid = (mine >= 0) & (mine != spare)
            table[:b].scatter_(1, torch.where(valid, mine, spare), torch.where(valid, codes[:b], 0))
            found = table[:b].gather(1, self.by_user[first:last].long())    # [b, T * C * depth]
            weight = weight_of_code.index_select(0, found.flatten().long()).view(b, -1, self.depth)
            ndcg[first:last] = weight.sum(-1)
            table[:b].zero_()
        ndcg = ndcg.T.reshape(self.n_teachers, self.n_checkpoints, self.n_users)
        return 1.0 - torch.round(ndcg, decimals=4)

    def threshold(self, epoch: int) -> float:
        return self.alpha * self.decay ** (epoch // self.period)

    def step(self, epoch: int, student_top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One DKC call at ``epoch``; returns ``(advanced [T, U] bool, d [T, C, U])``."""
        d = self.all_discrepancies(student_top)
        nxt = (self.idx + 1).clamp(max=self.last)
        d_next = d.gather(1, nxt.unsqueeze(1)).squeeze(1)
        self.calls += 1
        if self.last_d is None:
            self.last_d = d_next
            return torch.zeros_like(self.idx, dtype=torch.bool), d
        ratio = self.last_d / d_next.clamp(min=self.eps)
        theta = self.threshold(epoch)
        advanced = (self.idx < self.last) & ((ratio > theta) | (ratio < 1.0))
        self.idx += advanced.to(self.idx.dtype)
        refreshed = d.gather(1, (self.idx + 1).clamp(max=self.last).unsqueeze(1)).squeeze(1)
        self.last_d = torch.where(advanced, refreshed, self.last_d)
        return advanced, d

    def mean_selection(self) -> np.ndarray:
        """Mean checkpoint index per teacher (float64 ``[T]``)."""
        return self.idx.to(torch.float64).mean(1).numpy()

    def counts(self) -> np.ndarray:
        """``[T, C]``: how many users sit at each checkpoint of each teacher."""
        return np.stack([np.bincount(row, minlength=self.n_checkpoints) for row in self.idx.numpy()])


@torch.no_grad()
def factorized_top_unobserved(user_weight: torch.Tensor, item_weight: torch.Tensor, train_indptr: torch.Tensor,
                              train_flat: torch.Tensor, depth: int, block_rows: int | None = None) -> torch.Tensor:
    """Every user's ``depth`` best-scored non-training items under ``s = user_weight @ item_weight.T``.

    ``train_indptr [U + 1]`` (CSR row pointers) and ``train_flat`` (``user * n_items + item`` of every
    training interaction, in CSR order) locate each block's training items. Blocks of rows (CPU:
    16, spread over the threads; GPU: 1,024) are scored, masked and reduced with ``topk`` while
    in cache. Returns int64 ``[U, depth]`` on the weights' device (same as
    ``hetcomp.evaluation.top_unobserved`` up to the order of tied scores).
    """
    n_users, n_items = user_weight.shape[0], item_weight.shape[0]
    device = user_weight.device
    step = block_rows or (16 if device.type == "cpu" else 1024)
    depth = min(depth, n_items)
    items_t = item_weight.T.contiguous()
    out = torch.empty(n_users, depth, dtype=torch.int64, device=device)
    bounds = train_indptr.tolist()

    def work(firsts: list[int]) -> None:
        for first in firsts:
            last = min(first + step, n_users)
            scores = user_weight[first:last] @ items_t
            mask = train_flat[bounds[first]:bounds[last]] - first * n_items
            scores.view(-1).index_fill_(0, mask, -torch.inf)
            out[first:last] = torch.topk(scores, depth, dim=1).indices

    over_row_blocks(work, n_users, step, device)
    return out


def ensemble_topk(lists: np.ndarray | torch.Tensor, n_items: int, k: int, temperature: float = 10.0,
                  batch_size: int = 1024) -> torch.Tensor:
    """Top-``k`` of the rank-importance ensemble of ``lists [T, U, N]`` (int64 ``[U, k]``).

    The same float32 scores as ``hetcomp.knowledge.combine_rankings`` (an item at 0-based rank
    ``r`` of a list adds ``exp(-r / temperature)``, summed in teacher order), but only each user's
    ``T x N`` listed candidates are ranked instead of a dense users x items matrix: a stable sort
    of the candidates by item, one ``scatter_add`` per run of equal items (teacher order kept, so
    the float32 sums are ``combine_rankings``'s), then ``topk`` on an exact integer key (score, then
    item id). Ties thus go to the smaller item id; ``combine_rankings`` leaves them to
    ``torch.topk``. Rows with fewer than ``k`` distinct candidates are filled by
    ``combine_rankings`` (its zero-score tail). Users are processed ``batch_size`` at a time.
    """
    lists = torch.as_tensor(np.asarray(lists) if not torch.is_tensor(lists) else lists)
    if lists.shape[1] > batch_size:
        return torch.cat([ensemble_topk(lists[:, start:start + batch_size], n_items, k, temperature, batch_size)
                          for start in range(0, lists.shape[1], batch_size)])
    lists = lists.to(torch.int64)
    n_teachers, n_users, length = lists.shape
    slots = n_teachers * length
    out = torch.full((n_users, k), -1, dtype=torch.int64)
    if n_users and slots:
        candidates = lists.permute(1, 0, 2).reshape(n_users, slots)
        small = torch.int32 if n_items < 2**31 - 1 else torch.int64
        items, order = torch.sort(candidates.to(small), dim=1, stable=True)
        weights = torch.exp(-torch.arange(length, dtype=torch.float32) / temperature).repeat(n_teachers)
        mass = weights.expand(n_users, -1).gather(1, order)
        starts = torch.ones_like(items, dtype=torch.bool)
        starts[:, 1:] = items[:, 1:] != items[:, :-1]
        run = torch.cumsum(starts, dim=1) - 1                          # run index of each entry
        totals = torch.zeros_like(mass).scatter_add_(1, run, mass)     # [U, slots], per run
        run_items = torch.full((n_users, slots), n_items, dtype=torch.int64).scatter_(1, run, items.long())
        # exact lexicographic key (total desc, then run asc = item asc): the float32 bits of a
        # non-negative number order like the number itself
        key = totals.view(torch.int32).to(torch.int64) * slots + (slots - 1 - torch.arange(slots))
        key = torch.where(run_items < n_items, key, -1)                  # unused runs
        best = torch.topk(key, min(k, slots), dim=1)
        out[:, :best.indices.shape[1]] = torch.where(best.values >= 0, run_items.gather(1, best.indices), -1)
    short = torch.nonzero((out < 0).any(1)).flatten()
    if len(short):
        from hetcomp.knowledge import combine_rankings
        out[short] = torch.from_numpy(
            combine_rankings(lists[:, short].numpy(), n_items, k, temperature).astype(np.int64))
    return out
