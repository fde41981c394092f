"""A fused CPU kernel (numba) for the catalogue-wide rest mass of an inner-product student.

For every batch row ``b`` (user embedding ``p_b``) it computes
``log Z_b = log sum_{j kept} exp(clamp(p_b . q_j, -c, c))`` over the items ``j`` that are not
excluded for ``b`` (training items and target list), and in the backward the gradients with
respect to the user and item embeddings. Same semantics as
``losses.factorized_rest_log_mass``'s torch path (clamped entries count in ``Z`` with their clamped
score and pass no gradient), but the ``[B, n_items]`` score block is never written to memory:

- the catalogue is cut into tiles of ``TILE`` items; a tile of the item table (stored
  ``[n_tiles, d, TILE]``, one contiguous row per dimension) stays in the L1 cache while every
  user of the thread's chunk goes over it;
- per (4 users, tile): ``d`` fused multiply-adds per (user, item) give the score in base-2 units,
  one ``exp2`` (a vectorisable polynomial, about 1e-7 relative error) gives ``exp(s - m_b)`` into
  a tile-sized buffer per user; the four users' independent chains of multiply-adds keep the
  core busy (one user at a time waits on each chain's latency). Each user's excluded items in
  that tile are set to 0 there (each user's exclusion list is sorted, so a cursor finds them),
  and each buffer is summed;
- the backward recomputes the buffers the same way, zeroes the clamped entries too, and adds
  ``w_j q_j`` to each user's gradient and ``w_j u_b`` to its thread's item-gradient partial (one
  load and store of the gradient tile for four users).

Sums over items run in float32 within a tile and in float64 across tiles. The shift ``m_b`` is
the same as the torch path's: ``min(|p_b| max_j |q_j|, c)`` when that keeps every kept exponent
within float32 range, otherwise the row's largest kept (clamped) score (an extra pass, no exp).

**Threads and determinism.** The rows are cut into ``torch.get_num_threads()`` contiguous
chunks, one per Python thread (``losses.over_row_blocks``; the kernels release the GIL); every thread adds into its own
``[d, n_items]`` item-gradient partial and the partials are summed in chunk order. The result
is therefore bit-identical from run to run for a given thread count and machine.

The kernels are compiled on first use (a few seconds) and cached on disk by numba.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from hetcomp.distill.losses import RowExclusions, over_row_blocks

#: Items per tile: the tile's item vectors, its item-gradient partial and the exp buffer
#: (``(2 d + 1) * TILE * 4`` bytes) stay in a 32 KB L1 cache for small ``d``.
TILE = 512
#: Embedding widths the kernel is compiled for (one specialisation per width, unrolled).
MAX_DIM = 32
#: Largest shift for which ``exp(s - m)`` of every clamped score in ``[-m, m]`` stays a normal
#: float32 (``e^-80``; the smallest normal is ``e^-87.3``).
SAFE_SHIFT = 40.0

_LOG2E = 1.0 / math.log(2.0)
#: numba fastmath flags of the kernels (also `baselines.kernels`): vectorised sums and FMAs, no
#: finite-math assumption (infinities and NaN keep their meaning).
FASTMATH_FLAGS = {"contract", "reassoc", "nsz", "arcp"}
_F32 = np.float32
# 2^f on [-1/2, 1/2]: a degree-6 least-squares fit (relative error 2e-9 before float32 rounding)
_C0, _C1, _C2, _C3, _C4, _C5, _C6 = (_F32(1.0), _F32(6.93147206e-01), _F32(2.40226466e-01),
                                     _F32(5.55032897e-02), _F32(9.61851959e-03),
                                     _F32(1.33998699e-03), _F32(1.53375851e-04))
_HALF = _F32(0.5)
_LOWEST = _F32(-126.0)       # 2^-126: the smallest normal float32; anything below counts as it
_ZERO = _F32(0.0)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterprets the low 32 bits of an integer as a float32 (LLVM ``bitcast``)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width != 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@njit(nogil=True, fastmath=FASTMATH_FLAGS, inline="always", cache=True)
def exp2_nonpositive(x):
    """``2^x`` for float32 ``x <= 0`` (values below -126 give ``2^-126``)."""
    x = max(x, _LOWEST)
    k = np.int32(x - _HALF)                 # truncation of a negative number: round to nearest
    f = x - np.float32(k)                   # in [-1/2, 1/2]
    p = _C6 * f + _C5
    p = p * f + _C4
    p = p * f + _C3
    p = p * f + _C2
    p = p * f + _C1
    p = p * f + _C0
    return p * _float32_from_bits((k + 127) << 23)


@njit(nogil=True, cache=True)
def _sorted_exclusions(flat, group_starts, bounds, first, last, n_items, ptr, items):
    """Each row's excluded items, sorted, into ``items[ptr[r]:ptr[r+1]]`` for rows ``first..last-1``.

    ``flat`` is the concatenation of the groups of flat indices ``row * n_items + item`` (group
    ``g`` at ``flat[group_starts[g]:group_starts[g+1]]``, ordered by row); ``bounds[g, r]`` is
    where row ``r`` starts in group ``g``. ``ptr`` must already hold the row offsets.
    """
    for r in range(first, last):
        at = ptr[r]
        for g in range(bounds.shape[0]):
            base = group_starts[g]
            for t in range(base + bounds[g, r], base + bounds[g, r + 1]):
                items[at] = flat[t] - r * n_items
                at += 1
        items[ptr[r]:ptr[r + 1]].sort()


@njit(nogil=True, cache=True)
def _set_excluded(items, cursor, end, t0, t1, buf, value):
    """Sets ``buf[item - t0] = value`` for a row's excluded items in ``[t0, t1)`` (``items[cursor:end]``,
    sorted); returns the advanced cursor."""
    while cursor < end and items[cursor] < t1:
        buf[items[cursor] - t0] = value
        cursor += 1
    return cursor


def _make_kernels(D: int):
    # Every loop over items runs from 0 over one tile (``tiles[t]``: ``[D, TILE]``, C-contiguous),
    # so that numba drops its negative-index checks and LLVM vectorises it; the width ``D`` is a
    # compile-time constant (the loops over it are unrolled). The score-and-exp loop is written
    # out in each kernel: a helper kernel captured here would defeat numba's on-disk cache.
    @njit(nogil=True, fastmath=FASTMATH_FLAGS, cache=True)
    def row_maxima(users2, tiles, n_items, lo, hi, ptr, items, rows, shift):
        """``shift[r]`` = the largest kept clamped base-2 score of each row in ``rows`` (0 if none)."""
        size = tiles.shape[2]
        buf = np.empty(size, dtype=np.float32)
        for r in rows:
            user = users2[r]
            cursor, end = ptr[r], ptr[r + 1]
            best = -np.inf
            for t in range(tiles.shape[0]):
                tile, t0 = tiles[t], t * size
                n = min(size, n_items - t0)
                for j in range(n):
                    s = _ZERO
                    for k in range(D):
                        s += user[k] * tile[k, j]
                    buf[j] = min(max(s, lo), hi)
                cursor = _set_excluded(items, cursor, end, t0, t0 + n, buf, -np.inf)
                for j in range(n):
                    best = max(best, buf[j])
            shift[r] = best if best > -np.inf else 0.0

    @njit(nogil=True, fastmath=FASTMATH_FLAGS, cache=True)
    def forward(users2, tiles, n_items, shift, lo, hi, ptr, items, first, last, total):
        """``total[r] = sum_{j kept} exp2(clamp(s_rj, lo, hi) - shift[r])`` for rows ``first..last-1``.

        Rows go in groups of 4 (``users2`` and ``shift`` have 3 padding rows): one pass over a tile
        computes the four rows' exponentials, four independent chains of multiply-adds and exp2."""
        size = tiles.shape[2]
        bufs = np.empty((4, size), dtype=np.float32)
        cursor = ptr[first:last].copy()
        total[first:last] = 0.0
        for t in range(tiles.shape[0]):
            tile, t0 = tiles[t], t * size
            n = min(size, n_items - t0)
            for r0 in range(first, last, 4):
                u0, u1, u2, u3 = users2[r0], users2[r0 + 1], users2[r0 + 2], users2[r0 + 3]
                m0, m1, m2, m3 = shift[r0], shift[r0 + 1], shift[r0 + 2], shift[r0 + 3]
                b0, b1, b2, b3 = bufs[0], bufs[1], bufs[2], bufs[3]
                for j in range(n):
                    s0 = s1 = s2 = s3 = _ZERO
                    for k in range(D):
                        q = tile[k, j]
                        s0 += u0[k] * q
                        s1 += u1[k] * q
                        s2 += u2[k] * q
                        s3 += u3[k] * q
                    b0[j] = exp2_nonpositive(min(max(s0, lo), hi) - m0)
                    b1[j] = exp2_nonpositive(min(max(s1, lo), hi) - m1)
                    b2[j] = exp2_nonpositive(min(max(s2, lo), hi) - m2)
                    b3[j] = exp2_nonpositive(min(max(s3, lo), hi) - m3)
                for g in range(min(4, last - r0)):
                    r, buf = r0 + g, bufs[g]
                    cursor[r - first] = _set_excluded(items, cursor[r - first], ptr[r + 1], t0, t0 + n, buf, _ZERO)
                    acc = _ZERO
                    for j in range(n):
                        acc += buf[j]
                    total[r] += acc

    @njit(nogil=True, fastmath=FASTMATH_FLAGS, cache=True)
    def backward(users2, tiles, n_items, shift, lo, hi, ptr, items, first, last, user_scale,
                 grad_users, grad_tiles):
        """For rows ``first..last-1``, with ``w_rj`` the kept, passing ``exp(s_rj - m_r)``:
        ``grad_users[r] = sum_j w_rj q_j`` and ``grad_tiles[.., j] += sum_r w_rj user_scale[r]``.

        Rows go in groups of 4, as in ``forward``, that also share each load and store of the
        item-gradient tile (a padding row's weights meet a zero scale and its sums are dropped)."""
        size = tiles.shape[2]
        bufs = np.zeros((4, size), dtype=np.float32)
        cursor = ptr[first:last].copy()
        grad_users[first:last] = 0.0
        for t in range(tiles.shape[0]):
            tile, grad_tile, t0 = tiles[t], grad_tiles[t], t * size
            n = min(size, n_items - t0)
            for r0 in range(first, last, 4):
                rows = min(4, last - r0)
                u0, u1, u2, u3 = users2[r0], users2[r0 + 1], users2[r0 + 2], users2[r0 + 3]
                m0, m1, m2, m3 = shift[r0], shift[r0 + 1], shift[r0 + 2], shift[r0 + 3]
                w0, w1, w2, w3 = bufs[0], bufs[1], bufs[2], bufs[3]
                for j in range(n):       # exp(s - m), 0 where the clamp passes no gradient
                    s0 = s1 = s2 = s3 = _ZERO
                    for k in range(D):
                        q = tile[k, j]
                        s0 += u0[k] * q
                        s1 += u1[k] * q
                        s2 += u2[k] * q
                        s3 += u3[k] * q
                    e0 = exp2_nonpositive(min(max(s0, lo), hi) - m0)
                    e1 = exp2_nonpositive(min(max(s1, lo), hi) - m1)
                    e2 = exp2_nonpositive(min(max(s2, lo), hi) - m2)
                    e3 = exp2_nonpositive(min(max(s3, lo), hi) - m3)
                    w0[j] = e0 if (s0 >= lo and s0 <= hi) else _ZERO
                    w1[j] = e1 if (s1 >= lo and s1 <= hi) else _ZERO
                    w2[j] = e2 if (s2 >= lo and s2 <= hi) else _ZERO
                    w3[j] = e3 if (s3 >= lo and s3 <= hi) else _ZERO
                for g in range(4):
                    if g < rows:
                        r = r0 + g
                        cursor[r - first] = _set_excluded(items, cursor[r - first], ptr[r + 1], t0, t0 + n,
                                                          bufs[g], _ZERO)
                    else:   # a row past the chunk: its weights may be anything (another thread's shift)
                        bufs[g] = 0.0
                for k in range(D):
                    c0 = user_scale[r0, k]
                    c1 = user_scale[r0 + 1, k] if rows > 1 else _ZERO
                    c2 = user_scale[r0 + 2, k] if rows > 2 else _ZERO
                    c3 = user_scale[r0 + 3, k] if rows > 3 else _ZERO
                    q, grad_q = tile[k], grad_tile[k]
                    a0 = a1 = a2 = a3 = _ZERO
                    for j in range(n):
                        qj = q[j]
                        a0 += w0[j] * qj
                        a1 += w1[j] * qj
                        a2 += w2[j] * qj
                        a3 += w3[j] * qj
                        grad_q[j] += w0[j] * c0 + w1[j] * c1 + w2[j] * c2 + w3[j] * c3
                    grad_users[r0, k] += a0
                    if rows > 1:
                        grad_users[r0 + 1, k] += a1
                    if rows > 2:
                        grad_users[r0 + 2, k] += a2
                    if rows > 3:
                        grad_users[r0 + 3, k] += a3

    return {"row_maxima": row_maxima, "forward": forward, "backward": backward}


_KERNELS: dict = {}


def _kernels(dim: int) -> dict:
    """The kernels for embeddings of width ``dim`` (made once per width and process)."""
    if dim not in _KERNELS:
        _KERNELS[dim] = _make_kernels(dim)
    return _KERNELS[dim]


def _in_chunks(work, n_rows: int) -> list:
    """``work(first, last)`` over ``torch.get_num_threads()`` contiguous row chunks, one chunk per
    thread (``losses.over_row_blocks``); the results in chunk order."""
    step = max(1, -(-n_rows // torch.get_num_threads()))
    per_worker = over_row_blocks(lambda firsts: [work(f, min(f + step, n_rows)) for f in firsts],
                                 n_rows, step, torch.device("cpu"))
    return [result for results in per_worker for result in results]


def supports(users: torch.Tensor, items: torch.Tensor) -> bool:
    """Whether the kernel handles these embeddings: float32 CPU tensors of width <= ``MAX_DIM``."""
    return (users.device.type == "cpu" and items.device.type == "cpu" and users.dtype == torch.float32
            and items.dtype == torch.float32 and 1 <= users.shape[1] <= MAX_DIM)


def _exclusion_lists(exclude, n_rows: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ptr [n_rows + 1], items)``: each row's excluded items (sorted, duplicates kept) from
    ``RowExclusions`` (as they are) or from groups of row-ordered flat indices (``row * n_items + item``)."""
    if isinstance(exclude, RowExclusions):
        return exclude.ptr.numpy(), exclude.items.numpy()
    groups = [exclude] if torch.is_tensor(exclude) else list(exclude)
    starts = torch.arange(n_rows + 1) * n_items
    bounds = torch.stack([torch.searchsorted(g.to(torch.int64), starts) for g in groups]).numpy()
    flat = torch.cat([g.to(torch.int64) for g in groups]).numpy()
    group_starts = np.cumsum([0] + [len(g) for g in groups]).astype(np.int64)
    ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.diff(bounds, axis=1).sum(0), out=ptr[1:])
    items = np.empty(ptr[-1], dtype=np.int64)
    _in_chunks(lambda first, last: _sorted_exclusions(flat, group_starts, bounds, first, last, n_items,
                                                         ptr, items), n_rows)
    return ptr, items


def _to_tiles(items: np.ndarray) -> np.ndarray:
    """``[n_items, d]`` -> ``[n_tiles, d, TILE]`` (zero-padded): each tile's items, one row per dimension."""
    n_items, dim = items.shape
    n_tiles = -(-n_items // TILE)
    tiles = np.zeros((n_tiles * TILE, dim), dtype=np.float32)
    tiles[:n_items] = items
    return np.ascontiguousarray(tiles.reshape(n_tiles, TILE, dim).transpose(0, 2, 1))


def _from_tiles(tiles: np.ndarray, n_items: int) -> np.ndarray:
    """The inverse of ``_to_tiles``."""
    n_tiles, dim, size = tiles.shape
    return tiles.transpose(0, 2, 1).reshape(n_tiles * size, dim)[:n_items]


class FusedRestLogMass(torch.autograd.Function):
    """``log sum_{j not excluded} exp(clamp(p_b . q_j, -c, c))`` per row, by the fused kernel."""

    @staticmethod
    def forward(ctx, users: torch.Tensor, items: torch.Tensor, exclude, clamp: float | None):
        n_rows, dim = users.shape
        n_items = items.shape[0]
        kernels = _kernels(dim)
        users_np = users.detach().contiguous().numpy()
        items_np = items.detach().contiguous().numpy()
        users2 = np.zeros((n_rows + 3, dim), dtype=np.float32)     # 3 padding rows (groups of 4)
        users2[:n_rows] = users_np * _F32(_LOG2E)
        tiles = _to_tiles(items_np)
        lo = _F32(-math.inf if clamp is None else -clamp * _LOG2E)
        hi = _F32(math.inf if clamp is None else clamp * _LOG2E)
        ptr, excluded = _exclusion_lists(exclude, n_rows, n_items)
        # the shift (natural units): the Cauchy-Schwarz bound of the clamped scores where safe
        bound = (np.linalg.norm(users_np.astype(np.float64), axis=1)
                 * (np.linalg.norm(items_np.astype(np.float64), axis=1).max() if n_items else 0.0))
        if clamp is not None:
            bound = np.minimum(bound, clamp)
        shift2 = np.zeros(n_rows + 3, dtype=np.float32)
        shift2[:n_rows] = bound * _LOG2E
        unsafe = np.flatnonzero(bound > SAFE_SHIFT)
        total = np.empty(n_rows, dtype=np.float64)

        def work(first, last):
            rows = unsafe[(unsafe >= first) & (unsafe < last)]
            if len(rows):
                kernels["row_maxima"](users2, tiles, n_items, lo, hi, ptr, excluded, rows, shift2)
            kernels["forward"](users2, tiles, n_items, shift2, lo, hi, ptr, excluded, first, last, total)

        _in_chunks(work, n_rows)
        ctx.save_for_backward(users, items)
        ctx.state = (users2, tiles, shift2, lo, hi, ptr, excluded, total)
        shift = torch.from_numpy(shift2[:n_rows].astype(np.float64) / _LOG2E)
        return (shift + torch.from_numpy(total).log()).to(users.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        users, items = ctx.saved_tensors
        users2, tiles, shift2, lo, hi, ptr, excluded, total = ctx.state
        n_rows, dim = users.shape
        n_items = items.shape[0]
        kernels = _kernels(dim)
        # d log Z_b / d s_bj = w_bj / Z_b with w = exp(s - m); a row with nothing left gets none
        total_t = torch.from_numpy(total)
        scale = torch.where(total_t > 0, grad.detach().double() / total_t.clamp(min=1.0e-300),
                            torch.zeros_like(total_t))
        user_scale = (users.detach().double() * scale[:, None]).float().numpy()
        grad_users = np.empty((n_rows, dim), dtype=np.float64)

        def work(first, last):
            partial = np.zeros_like(tiles)
            kernels["backward"](users2, tiles, n_items, shift2, lo, hi, ptr, excluded, first, last,
                                user_scale, grad_users, partial)
            return partial

        partials = _in_chunks(work, n_rows)
        grad_tiles = partials[0]
        for partial in partials[1:]:
            grad_tiles += partial
        grad_u = (torch.from_numpy(grad_users) * scale[:, None]).to(users.dtype)
        grad_i = torch.from_numpy(np.ascontiguousarray(_from_tiles(grad_tiles, n_items)))
        return grad_u, grad_i, None, None
