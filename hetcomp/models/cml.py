"""Collaborative metric learning (Hsieh et al., "Collaborative Metric Learning", WWW 2017): the
metric-learning (ML) teacher."""

from __future__ import annotations

import scipy.sparse as sp
import torch

from hetcomp.models.base import Recommender
from hetcomp.models.sampling import PairwiseModel, normal_embedding
from hetcomp.registry import MODELS


@MODELS.register("cml")
class CML(PairwiseModel, Recommender):
    """s(u, i) = -||p_u - q_i||^2 with every embedding kept in the unit ball.

    Args:
        dim: embedding size.
        batch_size: training interactions (positives) per batch.
        n_neg: uniformly sampled negatives per positive (never training items of the user).
        margin: hinge margin.
        init_std: embeddings are initialised N(0, init_std^2) (then projected into the unit ball).

    Loss: the mean over positives of ``max(0, margin + d(u, i+) - d(u, j))`` where ``j`` is the
    *closest* (hardest) of the ``n_neg`` sampled negatives, as in CML's WARP-style use of several
    sampled impostors (without its rank weighting). ``after_step`` renormalises every row with
    norm > 1 (Adam moves all rows, not only the batch's, so all rows are checked; it is cheap).
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 64, batch_size: int = 1024,
                 n_neg: int = 20, margin: float = 1.0, init_std: float = 0.1):
        super().__init__(n_users, n_items)
        self.dim = dim
        self.batch_size = batch_size
        self.n_neg = n_neg
        self.margin = margin
        self.user_emb = normal_embedding(n_users, dim, init_std)
        self.item_emb = normal_embedding(n_items, dim, init_std)
        self.sampler = None
        self.device = torch.device("cpu")
        self.after_step()

    def setup(self, train: sp.csr_matrix, device: torch.device) -> None:
        self._setup_sampler(train, device)

    def loss(self, batch) -> torch.Tensor:
        users, pos, neg = batch
        if neg.dim() == 1:
            neg = neg.unsqueeze(1)
        u = self.user_emb(users)
        items = self.item_emb(torch.cat([pos.unsqueeze(1), neg], 1))  # one lookup, one gradient
        dist = (u.unsqueeze(1) - items).pow(2).sum(-1)
        d_pos, d_neg = dist[:, 0], dist[:, 1:].min(1).values
        return torch.relu(self.margin + d_pos - d_neg).mean()

    @torch.no_grad()
    def after_step(self) -> None:
        for table in (self.user_emb.weight, self.item_emb.weight):
            table.div_(table.norm(dim=1, keepdim=True).clamp_(min=1.0))

    def score(self, users: torch.Tensor) -> torch.Tensor:
        u = self.user_emb(users)
        items = self.item_emb.weight
        return 2.0 * (u @ items.T) - u.pow(2).sum(1, keepdim=True) - items.pow(2).sum(1)
