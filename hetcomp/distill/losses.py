"""HetComp's two knowledge-transfer losses as pure tensor functions (docs/METHOD.md, "The two losses").

Notation for one user ``u`` with student scores ``s_u·``:

- ``Z_u(S)``: the student's exp-mass on the *rest* items, i.e. every item that is neither a
  training item of ``u`` nor in the set ``S``. Training items never enter a rest mass.
- phase 1, ``overall_loss``: every target ``a`` (observed list ``P_u`` and unobserved list ``T_u``)
  against the rest, ``l(u, a) = -log(e^{s_ua} / (e^{s_ua} + Z_u(T_u)))`` = ``softplus(log Z - s_ua)``;
- phase 2, ``rank_loss``: Plackett-Luce over ordered lists against a rest mass,
  ``PL(L; R) = -sum_k [s_{l_k} - log(sum_{j>=k} e^{s_{l_j}} + R)]``, combined as
  ``PL(P_u; Z(T[:50])) + 1/2 [PL(T[:50]; Z(T[:50])) + PL(T[:10]; Z(T[:10]))]``.

Both are **summed** over users and items (the official code's reduction, so its learning rate and
loss weights 0.01 / 0.005 carry over). Everything is computed in log space (``logsumexp``,
shifted suffix sums, ``softplus``, ``logaddexp``); nothing is exponentiated unshifted and divided.

The official code floors each denominator at ``1e-5`` (``log_floor``): ``max(log D, log 1e-5)`` in
log space, for the phase-1 denominator ``e^{s} + Z`` and for each Plackett-Luce denominator. With
realistic scores it never binds. ``log_floor=None`` disables it. ``overall_loss`` also offers a floor
on the *ratio* (``floor_on="ratio"``), which caps each phase-1 term; it is not the official formula.

Rest masses of a nested prefix never subtract: ``Z(T[:m]) = Z(T) + sum_{j in T[m:]} e^{s_j}``
is computed as ``logaddexp(log Z(T), logsumexp(s[T[m:]]))``.

The big term is ``log Z_u(T_u)`` over the whole catalogue. ``rest_log_mass`` computes it from a
score matrix (generic, autograd); ``factorized_rest_log_mass`` computes it for an inner-product
student ``s = clamp(p_u . q_i, -c, c)`` straight from the embeddings with a hand-written forward
and backward over cache-sized row blocks (a reused buffer, no autograd copies of the
``[B, n_items]`` matrix, blocks spread over the CPU threads). On the CPU in float32 the latter
runs a fused numba kernel instead (``hetcomp.distill.fused_rest``: scores recomputed tile by tile
in the cache, never stored; a CiteULike epoch ~20 % shorter on two CPU cores and 30 % less peak
memory, README "Tests and benchmarks"). ``rest_kernel`` chooses: ``$HETCOMP_REST_KERNEL`` = auto /
fused / torch; with more than one torch thread ``auto`` wants ``OMP_WAIT_POLICY=passive``. All are
tested against each other and against a naive loop.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from hetcomp.errors import HetCompError

#: Stand-in for log(0) in masked list entries: exp(MASKED - x) is exactly 0 for any realistic
#: score and every gradient stays finite (``-inf`` can give NaN gradients).
MASKED = -1.0e30


# ------------------------------------------------------------------------------------------
# The rest mass
# ------------------------------------------------------------------------------------------

def rest_log_mass(scores: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """``log sum_{j: not exclude[b, j]} exp(scores[b, j])`` per row (``[B]``).

    ``exclude`` is a boolean ``[B, n_items]`` mask (training items and the target set) or a 1-D
    LongTensor of flat indices ``row * n_items + item`` into ``scores``. Reference implementation:
    a masked ``torch.logsumexp``, differentiable by autograd.
    """
    if exclude.dtype == torch.bool:
        masked = scores.masked_fill(exclude, -torch.inf)
    else:
        masked = scores.flatten().index_fill(0, exclude, -torch.inf).view_as(scores)
    return torch.logsumexp(masked, dim=1)


class Workspace:
    """A reusable ``[B, n_items]`` buffer for ``factorized_rest_log_mass`` (one per training run).

    Fresh 100 MB allocations are returned to the OS and page-faulted again on every batch; one
    buffer that only grows avoids that. Not thread-safe; one forward/backward at a time.
    """

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def get(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        need = rows * cols
        buf = self._buffer
        if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffer = torch.empty(need, dtype=like.dtype, device=like.device)
        return buf[:need].view(rows, cols)


#: Largest bound usable as the shift: scores in [m - 2m, m] give exp(s - m) >= e^-80, still a
#: normal float32 (e^-87.3 is the smallest).
_SAFE_SHIFT = 40.0
#: exp(x) = exp2(x * log2(e)): scores are computed in base-2 units for the faster exp2.
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2
#: On the CPU the ``[B, n_items]`` block is processed in row blocks of about this many bytes (one
#: core's L2 cache), so that the matmul, the exp and the sum of a block run while it is cached.
_BLOCK_BYTES = 1 << 20


def _block_rows(n_rows: int, n_items: int, like: torch.Tensor) -> int:
    if like.device.type != "cpu":
        return max(n_rows, 1)
    return max(1, _BLOCK_BYTES // max(1, n_items * like.element_size()))


_POOL: ThreadPoolExecutor | None = None


def over_row_blocks(work: Callable[[list[int]], Any], n_rows: int, step: int, device: torch.device) -> list:
    """``work(first rows of some blocks)`` over every block, in parallel on the CPU.

    With ``torch.get_num_threads() = n > 1`` the blocks are dealt round-robin to ``n`` Python
    threads while torch's own intra-op threads are set to 1: the ops release the GIL, so the
    cores are used without one thread-pool barrier per (small) op, which stalls badly when other
    processes share the cores. Returns the workers' results in a fixed order (deterministic for
    a given thread count).

    Each pool thread sets its own torch thread count to 1 when it starts: OpenMP's and MKL's
    thread counts are per thread, and a new thread starts at the process default (OMP_NUM_THREADS, else every core),
    so until its first parallel torch op its matmuls ran on two MKL threads, whose sums differ in
    the last bits from one thread's: gradients then depended on when the pool's threads were made.
    """
    firsts = list(range(0, n_rows, step))
    workers = min(torch.get_num_threads(), len(firsts)) if device.type == "cpu" else 1

    def run(chunk: list[int]):
        with torch.no_grad():
            return work(chunk)

    if workers <= 1:
        return [run(firsts)]
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:
        _POOL = ThreadPoolExecutor(workers, thread_name_prefix="hetcomp-rest-mass",
                                   initializer=torch.set_num_threads, initargs=(1,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_POOL.submit(run, firsts[k::workers]) for k in range(workers)]
        return [future.result() for future in futures]
    finally:
        torch.set_num_threads(threads)


class RowExclusions(NamedTuple):
    """Each row's excluded items, sorted (duplicates allowed): row ``r``'s are
    ``items[ptr[r]:ptr[r + 1]]`` (int64 tensors on one device). ``HetComp`` keeps these per user
    between DKC calls, so a batch's lists are gathered, not sorted again."""

    ptr: torch.Tensor
    items: torch.Tensor

    def flat(self, n_items: int) -> torch.Tensor:
        """The flat indices ``row * n_items + item``, ordered by row."""
        counts = self.ptr.diff()
        rows = torch.repeat_interleave(torch.arange(len(counts), device=self.ptr.device), counts,
                                       output_size=len(self.items))
        return rows * n_items + self.items


def _grouped(exclude, n_items: int) -> list[torch.Tensor]:
    if isinstance(exclude, RowExclusions):
        return [exclude.flat(n_items)]
    return [exclude] if torch.is_tensor(exclude) else list(exclude)


class _FactorizedRestLogMass(torch.autograd.Function):
    """``log sum_{j not excluded} exp(clamp(p_b . q_j, -c, c))`` for every row ``b``.

    Forward, per block of rows (CPU: about 1 MB, so it stays in cache, blocks spread over the
    threads; GPU: one block): one matmul writes the scores in base-2 units, ``(s - m_b) log2(e)``,
    excluded entries are set to ``-inf``, one in-place ``exp2`` (several times faster than ``exp``
    on the CPU) and one row sum. The shift ``m_b`` is an upper bound of the row's clamped scores,
    known before the matmul (it is folded into it as an extra column) whenever possible:

    - with a clamp ``c <= 40``: ``m_b = min(|p_b| max_j |q_j|, c)`` (Cauchy-Schwarz). Clamped
      scores lie in ``[-c, m_b]``, so the shifted ones lie in ``[-2c, 0]`` (``exp`` stays a normal
      float32) and the clamp is exactly ``clamp(s - m_b, -2c, 0)`` on the block. It is applied
      only in a block with a row whose bound passes ``c`` and an entry outside that range (one
      ``aminmax`` tells);
    - with no clamp (or ``c > 40``), while every bound is at most 40: ``m_b`` = the bound;
    - otherwise ``m_b`` is the maximum of the row's kept (clamped) entries: an extra pass.

    Clamped entries get zero gradient (as ``torch.clamp`` gives them).
    Backward, per block, from the kept ``E = exp(s - m)`` (never rescaled in place):
    ``dP = (g / Z) * (E Q)``, ``dQ^T += ((g / Z) * P)^T E``. With a ``Workspace`` the next forward
    reuses ``E``'s memory, so backpropagate each result before computing the next one.
    """

    @staticmethod
    def forward(ctx, users: torch.Tensor, items: torch.Tensor, exclude, clamp: float | None,
                workspace: Workspace | None):
        n_rows, n_items = users.shape[0], items.shape[0]
        out = (workspace.get(n_rows, n_items, users) if workspace is not None
               else users.new_empty(n_rows, n_items))
        step = _block_rows(n_rows, n_items, users)
        bound = users.norm(dim=1) * items.norm(dim=1).max() if n_items else users.new_zeros(n_rows)
        clamp_bounds_shift = clamp is not None and clamp <= _SAFE_SHIFT
        known = n_rows > 0 and (clamp_bounds_shift or bool(bound.max() <= _SAFE_SHIFT))
        may_clamp: set[int] = set()     # blocks with a row whose bound passes the clamp
        if known:
            shift = bound.clamp(max=clamp) if clamp_bounds_shift else bound
            if clamp_bounds_shift:   # shifted clamped scores lie in [-2c, 0]
                may_clamp = set((torch.nonzero(bound > clamp).flatten() // step).tolist())
                low_limit, high_limit = -2 * clamp * _LOG2E, 0.0
            lhs = torch.cat([users, -shift[:, None]], 1) * _LOG2E
            rhs = torch.cat([items, items.new_ones(n_items, 1)], 1).T.contiguous()
        else:
            shift = users.new_empty(n_rows)
            lhs, rhs = users * _LOG2E, items.T.contiguous()
            if clamp is not None:
                low_limit, high_limit = -clamp * _LOG2E, clamp * _LOG2E
                may_clamp = set(range(0, n_rows // step + 1))
        groups = _grouped(exclude, n_items)
        cuts = []
        for group in groups:   # each group is ordered by row: searchsorted finds each block's slice
            starts = torch.arange(0, n_rows + step, step, device=group.device) * n_items
            cuts.append(torch.searchsorted(group, starts).tolist())
        total = users.new_empty(n_rows)

        def work(firsts: list[int]) -> None:
            scratch = None
            for first in firsts:
                j, last = first // step, min(first + step, n_rows)
                block = out[first:last]
                torch.mm(lhs[first:last], rhs, out=block)
                passed = None
                if j in may_clamp:
                    low, high = torch.aminmax(block)   # whole block: far cheaper than per row
                    if bool(high > high_limit) or bool(low < low_limit):
                        # 1.0 where the clamp passes the gradient, else 0.0: float ops are
                        # several times faster than boolean masks here
                        if scratch is None:
                            scratch = block.new_empty(step * n_items)
                        passed = scratch[:block.numel()].view_as(block)
                        torch.sub(block, (low_limit + high_limit) / 2, out=passed).abs_()
                        passed.le_((high_limit - low_limit) / 2)
                        block.clamp_(low_limit, high_limit)
                flat = block.view(-1)
                for group, cut in zip(groups, cuts):
                    flat.index_fill_(0, group[cut[j]:cut[j + 1]] - first * n_items, -torch.inf)
                if not known:
                    peak = block.amax(dim=1)
                    # a row with nothing left would give -inf - -inf; any finite shift does there
                    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
                    shift[first:last] = peak * _LN2
                    block.sub_(peak[:, None])
                block.exp2_()
                torch.sum(block, dim=1, out=total[first:last])
                if passed is not None:
                    block.mul_(passed)

        over_row_blocks(work, n_rows, step, users.device)
        ctx.save_for_backward(users, items, total)
        ctx.weights = out
        ctx.step = step
        return shift + total.log()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        users, items, total = ctx.saved_tensors
        weights, step = ctx.weights, ctx.step
        scale = (grad / total.clamp(min=torch.finfo(total.dtype).tiny)).unsqueeze(1)
        need_users, need_items = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_users = torch.empty_like(users) if need_users else None
        scaled = users * scale
        items_t = items.T.contiguous()

        def work(firsts: list[int]):
            grad_items_t = items.new_zeros(items.shape[1], items.shape[0]) if need_items else None
            for first in firsts:
                block = weights[first:first + step]
                if need_users:   # (Q^T E^T)^T: faster than E Q for a wide, short block
                    grad_users[first:first + step] = (items_t @ block.T).T
                if need_items:
                    grad_items_t.addmm_(scaled[first:first + step].T, block)
            return grad_items_t

        partials = over_row_blocks(work, users.shape[0], step, users.device)
        grad_items = None
        if need_items:
            grad_items = partials[0]
            for partial in partials[1:]:
                grad_items = grad_items + partial
            grad_items = grad_items.T
        if need_users:
            grad_users.mul_(scale)
        return grad_users, grad_items, None, None, None


#: Environment variable choosing the implementation of ``factorized_rest_log_mass``: ``auto``
#: (default), ``fused`` (the fused kernel; an error where it cannot run) or ``torch``.
REST_KERNEL_ENV = "HETCOMP_REST_KERNEL"
_REST_KERNELS = ("auto", "fused", "torch")


def _openmp_workers_sleep() -> bool:
    """Whether torch's idle OpenMP workers sleep: one torch thread, or ``OMP_WAIT_POLICY=passive``.

    Otherwise (libgomp's default) they spin between ops, and next to the fused kernel's threads
    on a shared machine that made whole training steps 3-5x slower (measured on 2 loaded cores;
    the torch path is indifferent to the policy).
    """
    return torch.get_num_threads() == 1 or os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"


def _fused_rest():
    """The fused-kernel module, or ``None`` when numba is not installed."""
    try:
        from hetcomp.distill import fused_rest
    except ImportError:
        return None
    return fused_rest


def rest_kernel(users: torch.Tensor, items: torch.Tensor) -> str:
    """``"fused"`` or ``"torch"``: the implementation ``factorized_rest_log_mass`` uses for these
    embeddings under ``$HETCOMP_REST_KERNEL``.

    ``auto`` picks the fused kernel for float32 CPU embeddings when numba is installed and torch's
    OpenMP workers sleep when idle (one thread, or ``OMP_WAIT_POLICY=passive`` set before Python
    starts), else the torch path; ``fused`` insists on the kernel, ``torch`` avoids it.
    """
    choice = os.environ.get(REST_KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in _REST_KERNELS:
        raise HetCompError(f"{REST_KERNEL_ENV} must be one of {', '.join(_REST_KERNELS)}, got {choice!r}")
    if choice == "torch":
        return "torch"
    fused = _fused_rest()
    if fused is not None and fused.supports(users, items) and (choice == "fused" or _openmp_workers_sleep()):
        return "fused"
    if choice == "fused":
        why = ("numba is not installed" if fused is None else
               f"it needs float32 CPU embeddings of width <= {fused.MAX_DIM}, got {users.dtype} "
               f"[{users.shape[1]}] on {users.device.type}")
        raise HetCompError(f"{REST_KERNEL_ENV}=fused: the fused rest-mass kernel cannot run: {why}")
    return "torch"


def factorized_rest_log_mass(users: torch.Tensor, items: torch.Tensor, exclude: torch.Tensor,
                             clamp: float | None = 40.0, workspace: Workspace | None = None) -> torch.Tensor:
    """``log Z`` for an inner-product student, from the embeddings (``[B]``).

    ``users [B, d]`` (the batch users' embeddings), ``items [n_items, d]`` (all item embeddings),
    ``exclude``: flat indices ``row * n_items + item`` of the excluded entries (training items and
    the target set), one LongTensor or several, **each ordered by row** (row-major flat indices
    are; items within a row may come in any order; duplicates are fine). Scores are
    ``clamp(users @ items.T, -clamp, clamp)`` (``clamp=None``: none).
    Equal to ``rest_log_mass(scores.clamp(-c, c), exclude)`` in value and gradient.

    On the CPU in float32 this runs the fused numba kernel (``hetcomp.distill.fused_rest``: no
    ``[B, n_items]`` block in memory) where ``rest_kernel`` says so; elsewhere the torch
    implementation, with ``workspace`` as its reusable buffer.
    """
    if users.shape[0] and items.shape[0] and rest_kernel(users, items) == "fused":
        return _fused_rest().FusedRestLogMass.apply(users, items, exclude, clamp)
    return _FactorizedRestLogMass.apply(users, items, exclude, clamp, workspace)


# ------------------------------------------------------------------------------------------
# Phase 1: overall relations
# ------------------------------------------------------------------------------------------

def _floor(log_floor: float | None) -> float | None:
    return None if log_floor is None or log_floor <= 0 else math.log(log_floor)


def overall_loss(target_scores: torch.Tensor, target_mask: torch.Tensor | None, log_rest: torch.Tensor,
                 log_floor: float | None = 1e-5, floor_on: str = "denominator") -> torch.Tensor:
    """Phase-1 loss, summed: ``sum_{b, a valid} -log(e^{s_ba} / (e^{s_ba} + Z_b))``.

    ``target_scores [B, M]``: the student's scores of the targets (observed list then top-K list),
    ``target_mask [B, M]``: the real entries (padded observed entries are False; ``None``: all),
    ``log_rest [B]``: ``log Z_b(T_b)``.

    ``floor_on="denominator"`` (the official formula): the denominator ``e^{s_ba} + Z_b`` is floored
    at ``log_floor``, ``term = max(log(e^{s} + Z), log floor) - s``; it never binds for realistic
    scores. ``floor_on="ratio"`` (a variant, not the official code): the ratio is floored, which caps
    every term at ``-log(log_floor)`` with zero gradient beyond the cap.
    """
    s = target_scores
    floor = _floor(log_floor)
    if floor is None or floor_on == "denominator":
        log_denominator = torch.logaddexp(s, log_rest.unsqueeze(1))
        if floor is not None:
            log_denominator = log_denominator.clamp(min=floor)
        terms = log_denominator - s
    elif floor_on == "ratio":
        terms = F.softplus(log_rest.unsqueeze(1) - s).clamp(max=-floor)
    else:
        raise ValueError(f"floor_on must be 'denominator' or 'ratio', got {floor_on!r}")
    if target_mask is not None:
        terms = torch.where(target_mask, terms, torch.zeros_like(terms))
    return terms.sum()


# ------------------------------------------------------------------------------------------
# Phase 2: fine-grained ranking
# ------------------------------------------------------------------------------------------

def plackett_luce(list_scores: torch.Tensor, log_rest: torch.Tensor, mask: torch.Tensor | None = None,
                  log_floor: float | None = 1e-5) -> torch.Tensor:
    """``PL(L; R)`` per row (``[B]``): ``-sum_k [s_k - log(sum_{j>=k} e^{s_j} + R)]``.

    ``list_scores [B, n]`` in list order, ``log_rest [B]`` = ``log R``, ``mask [B, n]``: real entries
    (masked entries neither add a term nor mass). Each denominator is floored at ``log_floor``.

    The suffix sums are a log-sum-exp with one shift per row, ``m = max(max_k s_k, log R)``:
    ``log(sum_{j>=k} e^{s_j - m} + e^{log R - m}) + m`` in float64, where every term is at most 1
    and one of them is 1, so nothing overflows and a term underflows only when it is more than
    ~700 below the row's largest (then it is negligible). This equals ``torch.logcumsumexp`` on the
    reversed list but is several times cheaper on the CPU (forward and backward).
    """
    s = list_scores.double()
    if mask is not None:
        s = s.masked_fill(~mask, MASKED)
    log_r = log_rest.double().unsqueeze(1)
    shift = torch.maximum(s.amax(dim=1, keepdim=True), log_r).detach()
    tail = torch.exp(s - shift).flip(1).cumsum(1).flip(1)
    log_denominator = torch.log(tail + torch.exp(log_r - shift)) + shift
    floor = _floor(log_floor)
    if floor is not None:
        log_denominator = log_denominator.clamp(min=floor)
    terms = log_denominator - s
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros_like(terms))
    return terms.sum(1).to(list_scores.dtype)


def prefix_log_rest(top_scores: torch.Tensor, log_rest: torch.Tensor, length: int) -> torch.Tensor:
    """``log Z(T[:length])`` from ``log Z(T)``: the items ``T[length:]`` rejoin the rest mass."""
    if length >= top_scores.shape[1]:
        return log_rest
    return torch.logaddexp(log_rest, torch.logsumexp(top_scores[:, length:], dim=1))


def rank_loss(observed_scores: torch.Tensor, observed_mask: torch.Tensor | None, top_scores: torch.Tensor,
              log_rest: torch.Tensor, prefixes: Sequence[int] = (50, 10),
              log_floor: float | None = 1e-5) -> torch.Tensor:
    """Phase-2 loss, summed over rows.

    ``PL(P; Z(T[:p_0])) + mean_m PL(T[:m]; Z(T[:m]))`` over ``m`` in ``prefixes`` (the official
    ``1/2 [PL(T[:50]) + PL(T[:10])]`` for ``prefixes = (50, 10)``); the observed list competes with
    the rest of the first (longest) prefix. ``top_scores [B, K]``: scores of ``T`` in order,
    ``log_rest [B]``: ``log Z(T)`` over the full ``K``.
    """
    first = prefix_log_rest(top_scores, log_rest, prefixes[0])
    loss = plackett_luce(observed_scores, first, observed_mask, log_floor)
    unobserved = sum(plackett_luce(top_scores[:, :m], prefix_log_rest(top_scores, log_rest, m),
                                   None, log_floor) for m in prefixes)
    return (loss + unobserved / len(prefixes)).sum()
