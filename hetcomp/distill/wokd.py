"""The "w/o KD" row: the student trained on the training interactions alone, with BPR."""

from __future__ import annotations

from hetcomp.distill.base import Distiller
from hetcomp.registry import METHODS


@METHODS.register("wokd")
class WithoutKD(Distiller):
    """The student (MF, dim 6) with its own BPR loss only; no teacher knowledge is read.

    Same student, batches (1,024 shuffled training interactions, one sampled negative each),
    optimiser and early stopping as HetComp, so the row isolates the effect of distillation.
    Note that HetComp itself does not use the BPR loss (docs/METHOD.md, "Losses").
    """

    uses_knowledge = False
    defaults: dict = {}

    def loss_terms(self, batch):
        return {"bpr": self.student.loss(batch)}

    def method_state(self) -> dict:
        return {"loss": "bpr"}
