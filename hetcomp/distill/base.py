"""The distiller interface: one class per method, all trained by ``hetcomp.training.fit``.

A distiller wraps the student, reads the teacher knowledge and returns its loss terms by name.
Its ``after_epoch`` hook runs method logic between epochs (HetComp's dynamic knowledge
construction, curricula); ``method_state`` is saved next to the run outputs. ``extra_state`` /
``load_extra_state`` carry the method's changing state (beyond the student's weights) through a
resumable checkpoint (``hetcomp.checkpoint``); the default has none.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from hetcomp.data.store import Split
from hetcomp.knowledge import TeacherKnowledge
from hetcomp.models.base import Recommender


class Distiller:
    """Base class. Subclasses set ``uses_knowledge`` and implement ``loss_terms``.

    The default batches are the student's own (for MF: shuffled BPR triples of
    ``batch_size`` training interactions).
    """

    #: False for methods that ignore the teachers (w/o KD); the CLI then needs no ensemble.
    uses_knowledge = True

    def __init__(self, split: Split, knowledge: TeacherKnowledge | None, student: Recommender,
                 config: dict, device: torch.device):
        self.split = split
        self.knowledge = knowledge
        self.student = student
        self.config = config
        self.device = device

    # -- what the training loop calls -------------------------------------------------------
    def parameters(self) -> Iterable[torch.nn.Parameter]:
        return self.student.parameters()

    def epoch_batches(self, epoch: int, generator: torch.Generator) -> Iterable[Any]:
        return self.student.epoch_batches(epoch, generator)

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self) -> None:
        self.student.after_step()

    def after_epoch(self, epoch: int) -> dict:
        return {}

    def on_evaluation(self, epoch: int) -> None:
        pass

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return self.student.score(users)

    def train(self, mode: bool = True):
        return self.student.train(mode)

    def state_dict(self) -> dict:
        return self.student.state_dict()

    def load_state_dict(self, state: dict):
        return self.student.load_state_dict(state)

    def extra_state(self) -> dict:
        """The method's training state beyond the student's weights, for a checkpoint."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what ``extra_state`` returned (on a freshly built distiller)."""

    # -- saved with the run -----------------------------------------------------------------
    def method_state(self) -> dict:
        """JSON-serialisable method state (selection indices, curriculum stage, ...)."""
        return {}
