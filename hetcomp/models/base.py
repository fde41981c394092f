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


class CachedScoring(Recommender):
    """A recommender whose eval-mode scoring reuses derived tensors kept in ``self._cache``.

    The cache is cleared after every optimiser step, on every mode change and when weights are
    loaded, so it never outlives the parameters it was computed from.
    """

    def __init__(self, n_users: int, n_items: int):
        super().__init__(n_users, n_items)
        self._cache = None

    def after_step(self) -> None:
        self._cache = None

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_model(model_cls, split, kwargs: dict, device: torch.device, where: str) -> Recommender:
    """Construct ``model_cls`` for ``split`` on ``device`` and hand it the training data."""
    from hetcomp.errors import HetCompError

    try:
        model = model_cls(split.n_users, split.n_items, **kwargs)
    except (TypeError, ValueError) as exc:
        raise HetCompError(f"{where}: cannot build the model ({exc})") from None
    model.to(device)
    model.setup(split.train, device)
    return model


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

    def extra_state(self):
        """The ``on_evaluation`` callback's state (a teacher's recorded trajectory), if it keeps one."""
        keeps = hasattr(self._on_evaluation, "extra_state")
        return {"on_evaluation": self._on_evaluation.extra_state()} if keeps else {}

    def load_extra_state(self, state):
        if "on_evaluation" in state:
            self._on_evaluation.load_extra_state(state["on_evaluation"])
