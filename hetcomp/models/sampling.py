"""Vectorised sampling shared by the pairwise models (MF, CML, NeuMF, LightGCN).

All random draws happen on the CPU with the run's ``torch.Generator`` (so a seed gives the same
batches on every device); the finished tensors of an epoch are moved to the model's device once
and then sliced into mini-batches.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch


class InteractionSampler:
    """Shuffled training interactions with uniformly drawn negatives that are not training items.

    ``keys`` is the sorted array ``user * n_items + item`` of every training interaction (CSR
    order with sorted indices is already sorted), so membership is one ``torch.searchsorted``.
    A drawn negative that is a training item of its user is redrawn, in rounds over the
    colliding entries only, until none is left (users owning every item cannot get a negative;
    their collisions are left after ``max_rounds`` rounds).
    """

    def __init__(self, train: sp.csr_matrix, max_rounds: int = 100):
        train = train.tocsr()
        train.sort_indices()
        self.n_users, self.n_items = train.shape
        counts = np.diff(train.indptr)
        self.users = torch.from_numpy(np.repeat(np.arange(self.n_users, dtype=np.int64), counts))
        self.items = torch.from_numpy(train.indices.astype(np.int64))
        self.keys = self.users * self.n_items + self.items
        if len(self.keys) > 1 and not bool((self.keys[1:] > self.keys[:-1]).all()):
            order = torch.argsort(self.keys)
            self.keys = self.keys[order]
        self.max_rounds = max_rounds

    @property
    def n_interactions(self) -> int:
        return len(self.users)

    def is_training(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Boolean mask: ``(users[j], items[j])`` is a training interaction (CPU tensors)."""
        query = users * self.n_items + items
        if len(self.keys) == 0:
            return torch.zeros_like(query, dtype=torch.bool)
        pos = torch.searchsorted(self.keys, query).clamp_(max=len(self.keys) - 1)
        return self.keys[pos] == query

    def negatives(self, users: torch.Tensor, n_neg: int, generator: torch.Generator) -> torch.Tensor:
        """``[len(users), n_neg]`` item ids drawn uniformly among each user's non-training items."""
        users = users.cpu()
        shape = (len(users), n_neg)
        items = torch.randint(self.n_items, shape, generator=generator)
        owners = users.unsqueeze(1).expand(shape)
        bad = self.is_training(owners, items).nonzero(as_tuple=True)
        for _ in range(self.max_rounds):
            if len(bad[0]) == 0:
                break
            redraw = torch.randint(self.n_items, (len(bad[0]),), generator=generator)
            items[bad] = redraw
            still = self.is_training(owners[bad], redraw)
            bad = (bad[0][still], bad[1][still])
        return items

    def epoch(self, batch_size: int, n_neg: int, generator: torch.Generator,
              device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every interaction once in random order: ``(users, pos_items, neg_items)`` batches.

        ``neg_items`` is ``[B]`` when ``n_neg == 1`` and ``[B, n_neg]`` otherwise.
        """
        order = torch.randperm(self.n_interactions, generator=generator)
        users = self.users[order]
        pos = self.items[order]
        neg = self.negatives(users, n_neg, generator)
        if n_neg == 1:
            neg = neg.squeeze(1)
        users, pos, neg = users.to(device), pos.to(device), neg.to(device)
        for start in range(0, self.n_interactions, batch_size):
            end = start + batch_size
            yield users[start:end], pos[start:end], neg[start:end]


def normal_embedding(n: int, dim: int, std: float) -> torch.nn.Embedding:
    """An embedding table initialised N(0, std^2)."""
    table = torch.nn.Embedding(n, dim)
    torch.nn.init.normal_(table.weight, std=std)
    return table


def csr_tensors(matrix: sp.csr_matrix, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indptr, indices)`` of a CSR matrix as int64 tensors on ``device``."""
    matrix = matrix.tocsr()
    matrix.sort_indices()
    return (torch.from_numpy(matrix.indptr.astype(np.int64)).to(device),
            torch.from_numpy(matrix.indices.astype(np.int64)).to(device))


def gather_rows(indptr: torch.Tensor, indices: torch.Tensor,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nonzeros of ``rows`` of a CSR pattern, vectorised.

    Returns ``(columns, offsets, counts)``: ``columns`` concatenates the rows' column ids in
    order, ``offsets[j]`` is where row ``j`` starts in it (the ``offsets`` of ``embedding_bag``)
    and ``counts[j]`` its length.
    """
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    offsets = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    within = torch.arange(total, device=indptr.device) - torch.repeat_interleave(offsets, counts,
                                                                                output_size=total)
    positions = torch.repeat_interleave(starts, counts, output_size=total) + within
    return indices[positions], offsets, counts


class PairwiseModel:
    """Mixin for models trained on ``(users, pos_items, neg_items)`` batches from ``InteractionSampler``.

    The class sets ``batch_size`` and ``n_neg`` in its constructor; ``setup`` moves the model to
    the device and builds the sampler.
    """

    batch_size: int = 1024
    n_neg: int = 1

    def _setup_sampler(self, train: sp.csr_matrix, device: torch.device) -> None:
        self.device = torch.device(device)
        self.to(self.device)
        self.sampler = InteractionSampler(train)

    def epoch_batches(self, epoch, generator):
        if getattr(self, "sampler", None) is None:
            raise RuntimeError("call setup(train, device) before training")
        return self.sampler.epoch(self.batch_size, self.n_neg, generator, self.device)


def batch_l2(*embeddings: torch.Tensor) -> torch.Tensor:
    """Mean over the batch (first dim) of the summed squared norms of the given embedding rows."""
    total = sum(e.pow(2).reshape(e.shape[0], -1).sum(1) for e in embeddings)
    return total.mean()
