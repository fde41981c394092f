"""Item-based autoencoder (after I-AutoRec, Sedhain et al., "AutoRec: Autoencoders Meet
Collaborative Filtering", WWW 2015, and the denoising CDAE of Wu et al., WSDM 2016): the
item-based autoencoder (I-AE) teacher."""

from __future__ import annotations

import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from hetcomp.models.base import CachedScoring
from hetcomp.models.sampling import csr_tensors, gather_rows
from hetcomp.registry import MODELS


@MODELS.register("iae")
class ItemAE(CachedScoring):
    """Reconstructs each item's user vector (a column of the training matrix) through one hidden layer.

    Args:
        hidden: width of the code layer.
        batch_size: items per batch.
        dropout: denoising dropout on the input entries (kept entries are rescaled by 1/(1-p)).
        loss_type: ``"bce"``: binary cross-entropy over all users; ``"multinomial"``: the
            multinomial log-likelihood of the item's users (softmax over users).

    Encoder ``h_i = tanh(sum_{u in col(i)} x_ui V_u + b)``, decoder ``z_ui = <h_i, W_u> + c_u``.
    Batches are item ids, every item once per epoch, including items without training users
    (they learn to reconstruct zeros; skipped, their untrained scores would top every ranking).
    Ranking score of (u, i): the reconstruction logit z_ui for BCE, and
    ``log softmax_u(z_i)_u + log(n_i + 1)`` for the multinomial loss (the log expected count,
    comparable across items). In eval mode the codes of all items (and the multinomial offsets)
    are computed once and cached until the next step, mode change or state load; ``score(users)``
    then reads the users' reconstruction entries over all items with one
    [B x hidden] x [hidden x n_items] product (no [n_items x n_users] matrix is stored).
    """

    def __init__(self, n_users: int, n_items: int, hidden: int = 100, batch_size: int = 512,
                 dropout: float = 0.5, loss_type: str = "multinomial"):
        super().__init__(n_users, n_items)
        if loss_type not in ("bce", "multinomial"):
            raise ValueError(f"loss_type must be 'bce' or 'multinomial', not {loss_type!r}")
        self.hidden = hidden
        self.batch_size = batch_size
        self.dropout = dropout
        self.loss_type = loss_type
        self.encoder = nn.EmbeddingBag(n_users, hidden, mode="sum")
        self.encoder_bias = nn.Parameter(torch.zeros(hidden))
        self.decoder = nn.Linear(hidden, n_users)
        nn.init.xavier_uniform_(self.encoder.weight)
        nn.init.xavier_uniform_(self.decoder.weight)
        nn.init.zeros_(self.decoder.bias)
        self.device = torch.device("cpu")
        self._cols = None
        self._cols_cpu = None

    def setup(self, train: sp.csr_matrix, device: torch.device) -> None:
        self.device = torch.device(device)
        self.to(self.device)
        transposed = train.T.tocsr()
        self._cols_cpu = csr_tensors(transposed, torch.device("cpu"))
        self._cols = csr_tensors(transposed, self.device)
        self._cache = None

    def _need_setup(self):
        if self._cols is None:
            raise RuntimeError("call setup(train, device) before using the item autoencoder")

    def epoch_batches(self, epoch, generator):
        self._need_setup()
        indptr, indices = self._cols_cpu
        order = torch.randperm(self.n_items, generator=generator)
        for start in range(0, len(order), self.batch_size):
            items = order[start:start + self.batch_size]
            users, offsets, counts = gather_rows(indptr, indices, items)
            keep = torch.rand(len(users), generator=generator) >= self.dropout
            yield tuple(t.to(self.device) for t in (items, users, offsets, counts, keep))

    def _codes(self, users, offsets, weights):
        return torch.tanh(self.encoder(users, offsets, per_sample_weights=weights) + self.encoder_bias)

    def loss(self, batch) -> torch.Tensor:
        items, users, offsets, counts, keep = batch
        weights = keep.float() / (1.0 - self.dropout)
        logits = self.decoder(self._codes(users, offsets, weights))  # [B, n_users]
        rows = torch.repeat_interleave(torch.arange(len(items), device=users.device), counts,
                                       output_size=len(users))
        if self.loss_type == "bce":
            target = torch.zeros_like(logits)
            target[rows, users] = 1.0
            return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(items)
        log_lik = logits[rows, users].sum() - (torch.logsumexp(logits, 1) * counts).sum()
        return -log_lik / len(items)

    def _item_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of all items and the per-item additive score offset (cached in eval mode)."""
        if self._cache is not None and not self.training:
            return self._cache
        self._need_setup()
        indptr, indices = self._cols
        all_items = torch.arange(self.n_items, device=indptr.device)
        users, offsets, counts = gather_rows(indptr, indices, all_items)
        codes = self._codes(users, offsets, torch.ones(len(users), device=indptr.device))
        if self.loss_type == "bce":
            shift = torch.zeros(self.n_items, device=codes.device)
        else:
            lse = torch.cat([torch.logsumexp(self.decoder(chunk), 1) for chunk in codes.split(4096)])
            shift = torch.log1p(counts.float()) - lse
        if not self.training:
            self._cache = (codes.detach(), shift.detach())
        return codes, shift

    def score(self, users: torch.Tensor) -> torch.Tensor:
        codes, shift = self._item_codes()
        users = users.to(codes.device)
        return (self.decoder.weight[users] @ codes.T) + self.decoder.bias[users, None] + shift
