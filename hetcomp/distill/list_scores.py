"""Scores of listed items for an inner-product student, with a deterministic numba CPU kernel.

``list_scores(user_table, item_table, users, items)`` is ``s[b, m] = <P[users[b]], Q[items[b, m]]>``
(``[B, M]``) with gradients into both embedding tables. Through autograd that is an
``index_select`` of ``B * M`` item rows, a broadcast product and sum, and in the backward the
product twice more and a generic scatter of ``B * M`` rows, which with several torch threads adds
in no fixed order (run-to-run differences) and costs ~10 ms per CiteULike batch. The kernel takes
each dot product straight from the tables (accumulated in float64, rounded to the tables' dtype)
and, in the backward, adds ``g[b, m] * Q[i]`` to user ``users[b]``'s gradient row and
``g[b, m] * P[users[b]]`` to item ``i``'s in one pass in row order (deterministic). It runs on
CPU for float32 or float64 tables; elsewhere (CUDA, other dtypes) the torch code runs. Both give
the same values and gradients up to float rounding (tested). Used by HetComp and the baselines.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from numba import njit
except ImportError:      # pragma: no cover - numba is a dependency; the torch path stays usable
    njit = None

KERNEL_DTYPES = (torch.float32, torch.float64)


def kernel_applies(*tensors: torch.Tensor) -> bool:
    """Whether the numba kernels can take these tensors: all on CPU, one float32/float64 dtype."""
    return (njit is not None and all(t.device.type == "cpu" for t in tensors)
            and len({t.dtype for t in tensors}) == 1 and tensors[0].dtype in KERNEL_DTYPES)


def list_scores(user_table: torch.Tensor, item_table: torch.Tensor, users: torch.Tensor,
                items: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` scores ``<user_table[users[b]], item_table[items[b, m]]>`` (valid ids only)."""
    if kernel_applies(user_table, item_table):
        return _ListScores.apply(user_table, item_table, users, items)
    item_vectors = item_table.index_select(0, items.flatten()).view(*items.shape, -1)
    return (item_vectors * user_table.index_select(0, users).unsqueeze(1)).sum(-1)


class _ListScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, user_table, item_table, users, items):
        users_np = users.contiguous().numpy()
        items_np = items.contiguous().numpy()
        user_np, item_np = user_table.detach().contiguous().numpy(), item_table.detach().contiguous().numpy()
        out = torch.empty(items.shape, dtype=user_table.dtype)
        _forward(user_np, item_np, users_np, items_np, out.numpy())
        ctx.save_for_backward(user_table, item_table, users, items)
        return out

    @staticmethod
    def backward(ctx, grad):
        user_table, item_table, users, items = ctx.saved_tensors
        grad_users, grad_items = torch.zeros_like(user_table), torch.zeros_like(item_table)
        _backward(user_table.detach().contiguous().numpy(), item_table.detach().contiguous().numpy(),
                  users.contiguous().numpy(), items.contiguous().numpy(),
                  grad.to(user_table.dtype).contiguous().numpy(), grad_users.numpy(), grad_items.numpy())
        return (grad_users if ctx.needs_input_grad[0] else None,
                grad_items if ctx.needs_input_grad[1] else None, None, None)


_forward = _backward = None
if njit is not None:
    @njit(cache=True, nogil=True)
    def _forward(user_table, item_table, users, items, out):
        dim = item_table.shape[1]
        for b in range(items.shape[0]):
            user = user_table[users[b]]
            for m in range(items.shape[1]):
                item = item_table[items[b, m]]
                total = 0.0
                for k in range(dim):
                    total += float(user[k]) * float(item[k])
                out[b, m] = total

    @njit(cache=True, nogil=True)
    def _backward(user_table, item_table, users, items, grad, grad_users, grad_items):
        dim = item_table.shape[1]
        user_sum = np.zeros(dim, dtype=grad_users.dtype)
        for b in range(items.shape[0]):
            u = users[b]
            user = user_table[u]
            user_sum[:] = 0.0
            for m in range(items.shape[1]):
                g = grad[b, m]
                i = items[b, m]
                for k in range(dim):
                    user_sum[k] += g * item_table[i, k]
                    grad_items[i, k] += g * user[k]
            for k in range(dim):
                grad_users[u, k] += user_sum[k]
