"""The CPU kernel (numba) of the baselines' relaxed ranking loss, with a torch equivalent.

Per batch the baselines do little arithmetic (~750 users x 100-640 items x 6 dimensions), but
through autograd it takes dozens of small tensor operations whose overhead dominates. Numba loops
replace the two hot spots on CPU (float32 or float64): the listed items' scores
(``hetcomp.distill.list_scores``, shared with HetComp) and the relaxed ranking loss (here);
elsewhere (CUDA, other dtypes) the torch code runs. Both give the same values and gradients up to
float rounding (tested).

**Relaxed ranking loss.** ``relaxed_ranking_kernel`` computes ``plackett_luce_loss``'s loss and
gradients per row (the quantities of ``baselines.common.relaxed_ranking_torch``; float64): one
pass for the row's largest score, one for the exponentials, one from the end for the suffix
masses, one from the start for the loss (one ``log1p`` per item) and the gradients.
"""

from __future__ import annotations

import math

import numpy as np

try:
    from numba import njit
except ImportError:      # pragma: no cover - numba is a dependency; the torch path stays usable
    njit = None

relaxed_ranking_kernel = None
if njit is not None:
    @njit(cache=True, nogil=True)
    def relaxed_ranking_kernel(scores, valid, rest, max_spread, neg, loss, grad_scores, grad_rest):
        """Per row ``b``: ``loss[b]``, ``grad_scores[b]`` and ``grad_rest[b]`` of the relaxed ranking
        loss (``e``, ``A``, ``S`` as in ``baselines.common.relaxed_ranking_torch``), shifted by the
        row's largest score. Returns False, unfinished, at the first row whose valid scores and
        rest spread wider than ``max_spread``."""
        length = scores.shape[1]
        e = np.empty(length)
        after = np.empty(length)
        for b in range(scores.shape[0]):
            top, low = rest[b], math.inf
            if rest[b] > neg / 2:
                low = rest[b]
            for k in range(length):
                if valid[b, k]:
                    top = max(top, scores[b, k])
                    low = min(low, scores[b, k])
            if top - low > max_spread:
                return False
            for k in range(length):
                e[k] = math.exp(scores[b, k] - top) if valid[b, k] else 0.0
            mass = math.exp(rest[b] - top)
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
