"""NeuMF (He et al., "Neural Collaborative Filtering", WWW 2017): the deep (DL) teacher."""

from __future__ import annotations


import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from hetcomp.models.base import Recommender
from hetcomp.models.sampling import PairwiseModel, batch_l2, normal_embedding
from hetcomp.registry import MODELS


@MODELS.register("neumf")
class NeuMF(PairwiseModel, Recommender):
    """GMF branch (p_u * q_i) and MLP branch (an MLP tower over [p'_u; q'_i]) fused by a linear layer.

    Args:
        dim: GMF embedding size.
        mlp_dim: MLP embedding size per side; the tower's first layer maps the 2*mlp_dim input
            to ``mlp_dim`` units and each further layer halves the width (``n_mlp_layers`` layers).
        n_mlp_layers: depth of the MLP tower (ReLU after every layer).
        batch_size: training interactions (positives) per batch.
        n_neg: sampled negatives per positive.
        init_std: embeddings initialised N(0, init_std^2).
        reg: weight of the L2 penalty on the batch's embedding rows (GMF and MLP, users and
            items), mean over the batch's pairs.
        score_chunk: max (users x items x units) elements of one scoring chunk (memory bound).

    Loss: binary cross-entropy with logits, mean over the batch's positives and negatives, plus
    the ``reg`` term.
    The first MLP layer is split into a user part and an item part, W [u; i] + b = W_u u + W_i i + b,
    so full ranking precomputes both parts once and the [users x items] pairs only need a
    broadcast add followed by the (small) remaining layers, in chunks of users.
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 64, mlp_dim: int = 8,
                 n_mlp_layers: int = 2, batch_size: int = 1024, n_neg: int = 4,
                 init_std: float = 0.01, reg: float = 0.0, score_chunk: int = 2**20):
        super().__init__(n_users, n_items)
        if n_mlp_layers < 1 or mlp_dim >> (n_mlp_layers - 1) < 1:
            raise ValueError("n_mlp_layers must be >= 1 and mlp_dim / 2^(n_mlp_layers-1) >= 1")
        self.dim = dim
        self.mlp_dim = mlp_dim
        self.batch_size = batch_size
        self.n_neg = n_neg
        self.reg = reg
        self.score_chunk = score_chunk
        self.user_gmf = normal_embedding(n_users, dim, init_std)
        self.item_gmf = normal_embedding(n_items, dim, init_std)
        self.user_mlp = normal_embedding(n_users, mlp_dim, init_std)
        self.item_mlp = normal_embedding(n_items, mlp_dim, init_std)
        widths = [mlp_dim >> k for k in range(n_mlp_layers)]
        self.first_user = nn.Linear(mlp_dim, widths[0], bias=True)
        self.first_item = nn.Linear(mlp_dim, widths[0], bias=False)
        self.tower = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.predict = nn.Linear(dim + widths[-1], 1)
        for layer in [self.first_user, self.first_item, *self.tower]:
            nn.init.xavier_uniform_(layer.weight)
        for layer in [self.first_user, *self.tower]:
            nn.init.zeros_(layer.bias)
        nn.init.xavier_uniform_(self.predict.weight)
        nn.init.zeros_(self.predict.bias)
        self.sampler = None
        self.device = torch.device("cpu")

    def setup(self, train: sp.csr_matrix, device: torch.device) -> None:
        self._setup_sampler(train, device)

    def _mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(hidden)
        for layer in self.tower:
            hidden = torch.relu(layer(hidden))
        return hidden

    def pair_logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits of aligned (user, item) pairs (``items`` may have one more dim than ``users``)."""
        user_gmf, user_mlp = self.user_gmf(users), self.first_user(self.user_mlp(users))
        if items.dim() == users.dim() + 1:  # each user's row of items: broadcast the user side
            user_gmf, user_mlp = user_gmf.unsqueeze(-2), user_mlp.unsqueeze(-2)
        gmf = user_gmf * self.item_gmf(items)
        mlp = self._mlp(user_mlp + self.first_item(self.item_mlp(items)))
        return self.predict(torch.cat([gmf, mlp], -1)).squeeze(-1)

    def loss(self, batch) -> torch.Tensor:
        users, pos, neg = batch
        if neg.dim() == 1:
            neg = neg.unsqueeze(1)
        items = torch.cat([pos.unsqueeze(1), neg], 1)  # [B, 1 + n_neg], positives first
        logits = self.pair_logits(users, items)
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        if self.reg:
            loss = loss + self.reg * (batch_l2(self.user_gmf(users), self.user_mlp(users))
                                      + batch_l2(self.item_gmf(items), self.item_mlp(items)) / items.shape[1])
        return loss

    def score(self, users: torch.Tensor) -> torch.Tensor:
        w_gmf, w_mlp = self.predict.weight[0, : self.dim], self.predict.weight[0, self.dim:]
        # GMF part is linear: (p_u * q_i) . w = (p_u * w) . q_i
        out = (self.user_gmf(users) * w_gmf) @ self.item_gmf.weight.T + self.predict.bias
        user_part = self.first_user(self.user_mlp(users))  # [B, h]
        item_part = self.first_item(self.item_mlp.weight)  # [n_items, h]
        chunk = max(1, self.score_chunk // (self.n_items * user_part.shape[1]))
        for start in range(0, len(users), chunk):
            hidden = (user_part[start:start + chunk, None, :] + item_part[None, :, :]).relu_()
            for layer in self.tower:
                hidden = F.linear(hidden, layer.weight, layer.bias).relu_()
            out[start:start + chunk] += hidden @ w_mlp
        return out
