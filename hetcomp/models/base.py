"""The backbone interface shared by teachers and the student."""

from __future__ import annotations

from typing import Any, Iterable

import scipy.sparse as sp
import torch
from torch import nn


class Recommender(nn.Module):
    """A top-K recommender: its own training loss, full-ranking scores and a parameter count.

    Subclasses take ``(n_users, n_items, **hyperparameters)`` and implement ``setup``,
    ``epoch_batches``, ``loss`` and ``score``.
    """

    def __init__(self, n_users: int, n_items: int):
        super().__init__()
        self.n_users = n_users
        self.n_items = n_items

    def setup(self, train: sp.csr_matrix, device: torch.device) -> None:
        """Receive the training interactions once before training (graphs, user rows...)."""

    def epoch_batches(self, epoch: int, generator: torch.Generator) -> Iterable[Any]:
        """The mini-batches of one epoch, drawn with ``generator``."""
        raise NotImplementedError

    def loss(self, batch: Any) -> torch.Tensor:
        """The model's own training loss on one batch."""
        raise NotImplementedError

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item for ``users``: ``[len(users), n_items]``."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimiser step (projections, norm constraints)."""

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ModelTask:
    """Adapts a ``Recommender`` to the training loop (``hetcomp.training.Task``)."""

    def __init__(self, model: Recommender, on_evaluation=None):
        self.model = model
        self._on_evaluation = on_evaluation

    def parameters(self):
        return self.model.parameters()

    def epoch_batches(self, epoch, generator):
        return self.model.epoch_batches(epoch, generator)

    def loss_terms(self, batch):
        return {"base": self.model.loss(batch)}

    def after_step(self):
        self.model.after_step()

    def after_epoch(self, epoch):
        return {}

    def on_evaluation(self, epoch):
        if self._on_evaluation is not None:
            self._on_evaluation(epoch, self.model)

    def score(self, users):
        return self.model.score(users)

    def train(self, mode=True):
        return self.model.train(mode)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        return self.model.load_state_dict(state)
