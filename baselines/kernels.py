"""CPU kernels (numba) of the baselines' losses, each with a torch equivalent.

Per batch the baselines do little arithmetic (~750 users x 100-640 items x 6 dimensions), but
through autograd it takes dozens of small tensor operations whose overhead dominates. Numba loops
replace the hot spots on CPU: the listed items' scores (``hetcomp.distill.list_scores``, shared
with HetComp), the relaxed ranking loss and CL-DRD's pairwise loss (here); elsewhere (CUDA, other
dtypes) the torch code runs. Both give the same values and gradients up to float rounding (tested).

**Relaxed ranking loss.** ``relaxed_ranking_kernel`` computes ``plackett_luce_loss``'s loss and
gradients per row (the quantities of ``baselines.common.relaxed_ranking_torch``; float64): one
pass for the row's largest score, one for the exponentials, one from the end for the suffix
masses, one from the start for the loss (one ``log1p`` per item) and the gradients.

**CL-DRD's pairwise loss.** ``tiered_pairs_kernel`` (float32) computes ``tiered_lambda_loss``'s
per-row sum ``sum w_ij softplus(s_j - s_i)`` and its gradient in one pass over the pairs (~9,000
per user in the last stage), vectorised over ``j``: with ``e = exp(-|d|)`` (the fused rest-mass
kernel's ``exp2`` polynomial), ``softplus(d) = max(d, 0) + log1p(e)`` and
``sigmoid(d) = (1 if d >= 0 else e) / (1 + e)``; ``log1p(e) = 2 atanh(e / (2 + e))`` by its series
(``e / (2 + e) <= 1/3``: seven terms, relative error below 1e-7, exact as ``e -> 0``). A
750 x 140 batch in the last stage, loss and gradient, one loaded core of the 2-core CI machine:
31-42 ms here, 115-168 ms through torch (``softplus`` alone ~7 ns per element there).
"""

from __future__ import annotations

import math

import numpy as np

try:
    from numba import njit

    from hetcomp.distill.fused_rest import FASTMATH_FLAGS, exp2_nonpositive
except ImportError:      # pragma: no cover - numba is a dependency; the torch path stays usable
    njit = None

_F32 = np.float32
_LOG2E = _F32(1.0 / math.log(2.0))
# 1 / (2k + 1): the series of atanh(t) / t in t^2
_A1, _A2, _A3, _A4, _A5, _A6 = (_F32(1 / 3), _F32(1 / 5), _F32(1 / 7), _F32(1 / 9), _F32(1 / 11), _F32(1 / 13))
_ONE, _TWO, _ZERO = _F32(1.0), _F32(2.0), _F32(0.0)

relaxed_ranking_kernel = tiered_pairs_kernel = None
if njit is not None:
    @njit(cache=True, nogil=True)
    def relaxed_ranking_kernel(scores, valid, rest, max_spread, neg, loss, grad_scores, grad_rest):
        """Per row ``b``: ``loss[b]``, ``grad_scores[b]`` and ``grad_rest[b]`` of the relaxed ranking
        loss (``e``, ``A``, ``S`` as in ``baselines.common.relaxed_ranking_torch``), shifted by the
        row's largest score. Returns False, unfinished, at the first row whose valid scores and
        rest spread wider than ``max_spread``. Everything is float64 whatever the inputs' dtype: a
        float32 ``exp`` is 0 below about -104, well inside ``max_spread``."""
        length = scores.shape[1]
        e = np.empty(length)
        after = np.empty(length)
        for b in range(scores.shape[0]):
            rest_b = np.float64(rest[b])
            top, low = rest_b, math.inf
            if rest_b > neg / 2:
                low = rest_b
            for k in range(length):
                e[k] = np.float64(scores[b, k])
                if valid[b, k]:
                    top = max(top, e[k])
                    low = min(low, e[k])
            if top - low > max_spread:
                return False
            for k in range(length):
                e[k] = math.exp(e[k] - top) if valid[b, k] else 0.0
            mass = math.exp(rest_b - top)
            r = mass
            for k in range(length - 1, -1, -1):
                after[k] = mass
                mass += e[k]
            total, before = 0.0, 0.0
            for k in range(length):
                if valid[b, k]:
                    total += math.log1p(after[k] / e[k])
                    inverse = 1.0 / (e[k] + after[k])
                    grad_scores[b, k] = e[k] * before - after[k] * inverse
                    before += inverse
                else:
                    grad_scores[b, k] = 0.0
            loss[b] = total
            grad_rest[b] = r * before
        return True

    # error_model="numpy": no ZeroDivisionError check in the divisions (1 + e, 2 + e >= 1), whose
    # branch would keep LLVM from vectorising the loop
    @njit(cache=True, nogil=True, fastmath=FASTMATH_FLAGS, error_model="numpy")
    def tiered_pairs_kernel(scores, valid, inverse, n_ordered, list_length, loss, grad):
        """Per row ``b`` (float32): ``loss[b] = sum w_ij softplus(s_j - s_i)`` over CL-DRD's pairs
        (each of the first ``n_ordered`` columns against every later column, each other column before
        ``list_length`` against every column from ``list_length`` on; both entries valid) with
        ``w_ij = |inverse_i - inverse_j|``, and ``grad[b]`` = its gradient with respect to ``scores[b]``."""
        width = scores.shape[1]
        ones = np.empty(width, dtype=np.float32)
        g = np.empty(width, dtype=np.float32)
        for b in range(scores.shape[0]):
            s, inv = scores[b], inverse[b]
            for j in range(width):
                ones[j] = _ONE if valid[b, j] else _ZERO
            g[:] = 0.0
            total = 0.0
            for i in range(min(list_length, width)):
                if not valid[b, i]:
                    continue
                si, ii = s[i], inv[i]
                start = i + 1 if i < n_ordered else list_length
                # the partners j >= start as views indexed from 0: no negative-index checks, so
                # that LLVM vectorises the loop
                s_j, inv_j, ones_j, g_j = s[start:], inv[start:], ones[start:], g[start:]
                row_loss = _ZERO
                row_grad = _ZERO
                for j in range(width - start):
                    d = s_j[j] - si
                    w = abs(ii - inv_j[j]) * ones_j[j]
                    e = exp2_nonpositive(-abs(d) * _LOG2E)
                    t = e / (_TWO + e)
                    u = t * t
                    series = _A6 * u + _A5
                    series = series * u + _A4
                    series = series * u + _A3
                    series = series * u + _A2
                    series = series * u + _A1
                    series = series * u + _ONE
                    row_loss += w * (max(d, _ZERO) + _TWO * t * series)
                    q = w * ((_ONE if d >= _ZERO else e) / (_ONE + e))
                    row_grad += q
                    g_j[j] += q
                g[i] -= row_grad
                total += row_loss
            loss[b] = total
            grad[b] = g
