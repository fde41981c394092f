"""BPR matrix factorisation (Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit
Feedback", UAI 2009): the MF teacher and HetComp's student."""

from __future__ import annotations

import scipy.sparse as sp
import torch
import torch.nn.functional as F

from hetcomp.models.base import Recommender
from hetcomp.models.sampling import PairwiseModel, batch_l2, normal_embedding
from hetcomp.registry import MODELS


@MODELS.register("mf")
class MF(PairwiseModel, Recommender):
    """s(u, i) = <p_u, q_i>, trained with BPR on (user, positive, sampled negative) triples.

    Args:
        dim: embedding size (64 for the teacher; HetComp's student uses 6).
        batch_size: training interactions per batch (1024 as in the official code).
        init_std: user and item embeddings are initialised N(0, init_std^2).
        reg: weight of an L2 penalty on the batch's embedding rows (mean over the batch of
            ||p_u||^2 + ||q_pos||^2 + ||q_neg||^2). 0 by default (the student relies on the
            optimiser's weight decay); the teacher uses it instead of dense weight decay, which
            with Adam shrinks rarely seen rows far too fast.

    ``epoch_batches`` yields ``(users, pos_items, neg_items)`` LongTensors on the model's device:
    every training interaction once per epoch in random order, one uniform negative each that
    is never a training item of the user. ``loss`` is the **mean** over the batch of
    ``-log sigmoid(s_pos - s_neg)``, plus the ``reg`` term.
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 64, batch_size: int = 1024,
                 init_std: float = 0.01, reg: float = 0.0):
        super().__init__(n_users, n_items)
        self.dim = dim
        self.batch_size = batch_size
        self.reg = reg
        self.user_emb = normal_embedding(n_users, dim, init_std)
        self.item_emb = normal_embedding(n_items, dim, init_std)
        self.n_neg = 1
        self.sampler = None
        self.device = torch.device("cpu")

    def setup(self, train: sp.csr_matrix, device: torch.device) -> None:
        self._setup_sampler(train, device)

    def loss(self, batch) -> torch.Tensor:
        users, pos, neg = batch
        u = self.user_emb(users)
        # one lookup for positives and negatives: one dense item gradient instead of two
        p, n = self.item_emb(torch.cat([pos, neg])).split(len(pos))
        loss = -F.logsigmoid((u * (p - n)).sum(-1)).mean()
        if self.reg:
            loss = loss + self.reg * batch_l2(u, p, n)
        return loss

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_emb(users) @ self.item_emb.weight.T
