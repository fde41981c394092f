"""LightGCN (He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for
Recommendation", SIGIR 2020): the graph (GNN) teacher."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from hetcomp.models.base import CachedScoring
from hetcomp.models.sampling import PairwiseModel, batch_l2, normal_embedding
from hetcomp.registry import MODELS


def normalized_adjacency(train: sp.csr_matrix) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 of the bipartite graph A = [[0, R], [R^T, 0]] (users first, then items)."""
    n_users, n_items = train.shape
    r = (train > 0).astype(np.float32).tocsr()
    adj = sp.bmat([[None, r], [r.T, None]], format="csr", dtype=np.float32)
    degree = np.asarray(adj.sum(1)).ravel()
    inv_sqrt = np.zeros_like(degree)
    inv_sqrt[degree > 0] = degree[degree > 0] ** -0.5
    d = sp.diags(inv_sqrt)
    out = (d @ adj @ d).tocsr().astype(np.float32)
    out.sort_indices()
    return out


def _spmm(adj: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """CSR ``adj = (indptr, indices, values)`` times dense ``x``, as a weighted ``embedding_bag``
    (several times faster on CPU than ``torch.sparse`` CSR/COO matmul)."""
    indptr, indices, values = adj
    return F.embedding_bag(indices, x, indptr[:-1], mode="sum", per_sample_weights=values)


class _SymmetricSpMM(torch.autograd.Function):
    """``A @ X`` for a symmetric sparse ``A``; the gradient is ``A @ G`` (no transpose needed)."""

    @staticmethod
    def forward(ctx, x, indptr, indices, values):
        ctx.adj = (indptr, indices, values)
        return _spmm(ctx.adj, x)

    @staticmethod
    def backward(ctx, grad):
        return _spmm(ctx.adj, grad.contiguous()), None, None, None


@MODELS.register("lightgcn")
class LightGCN(PairwiseModel, CachedScoring):
    """K rounds of propagation over the normalised user-item graph; the final embedding is the
    mean of the K+1 layer embeddings; s(u, i) = <e_u, e_i>.

    Args:
        dim: embedding size.
        n_layers: propagation layers K.
        batch_size: training interactions per batch (one BPR negative each).
        init_std: ego embeddings initialised N(0, init_std^2) (0.1 as in the LightGCN code).
        reg: weight of the L2 penalty on the batch's *ego* (layer-0) embeddings, mean over the
            batch of ||e_u||^2 + ||e_pos||^2 + ||e_neg||^2 (LightGCN's regulariser).

    Loss: BPR, mean over the batch, plus the ``reg`` term.
    The graph (CSR index tensors) is built once in ``setup``. In training the propagation runs
    once per batch; in eval mode its result is cached until the next step, a mode change or a
    state load.
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 64, n_layers: int = 3,
                 batch_size: int = 2048, init_std: float = 0.1, reg: float = 1e-4):
        super().__init__(n_users, n_items)
        self.dim = dim
        self.n_layers = n_layers
        self.batch_size = batch_size
        self.reg = reg
        self.n_neg = 1
        self.user_emb = normal_embedding(n_users, dim, init_std)
        self.item_emb = normal_embedding(n_items, dim, init_std)
        self.sampler = None
        self.adj: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.device = torch.device("cpu")

    def setup(self, train: sp.csr_matrix, device: torch.device) -> None:
        self._setup_sampler(train, device)
        adj = normalized_adjacency(train)
        self.adj = tuple(torch.from_numpy(a).to(self.device) for a in (
            adj.indptr.astype(np.int64), adj.indices.astype(np.int64), adj.data.astype(np.float32)))
        self._cache = None

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final user and item embeddings (cached in eval mode)."""
        if self._cache is not None and not self.training:
            return self._cache
        if self.adj is None:
            raise RuntimeError("call setup(train, device) before using LightGCN")
        layer = torch.cat([self.user_emb.weight, self.item_emb.weight], 0)
        total = layer
        for _ in range(self.n_layers):
            layer = _SymmetricSpMM.apply(layer, *self.adj)
            total = total + layer
        final = total / (self.n_layers + 1)
        users, items = final[: self.n_users], final[self.n_users:]
        if not self.training:
            self._cache = (users.detach(), items.detach())
        return users, items

    def loss(self, batch) -> torch.Tensor:
        users, pos, neg = batch
        user_final, item_final = self.propagate()
        both = torch.cat([pos, neg])  # one gather for positives and negatives
        p, n = item_final[both].split(len(pos))
        loss = -F.logsigmoid((user_final[users] * (p - n)).sum(-1)).mean()
        if self.reg:
            loss = loss + self.reg * batch_l2(self.user_emb(users), *self.item_emb(both).split(len(pos)))
        return loss

    def score(self, users: torch.Tensor) -> torch.Tensor:
        user_final, item_final = self.propagate()
        return user_final[users] @ item_final.T
