"""The one training loop shared by teachers and distillation methods.

A *task* supplies the batches of an epoch, the named loss terms of a batch and a score function;
the loop runs Adam over its parameters, evaluates every ``eval_every`` epochs (after epochs
0, eval_every, 2*eval_every, ...), keeps the best state on the selection metric (validation
Recall@50 by default) and stops after ``patience`` evaluations without improvement.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import torch

from hetcomp.errors import HetCompError
from hetcomp.evaluation import EvalResult, Evaluator

log = logging.getLogger(__name__)


class Task(Protocol):
    """What the loop trains. ``hetcomp.models.base.ModelTask`` and distillers implement it."""

    def parameters(self) -> Iterable[torch.nn.Parameter]: ...

    def epoch_batches(self, epoch: int, generator: torch.Generator) -> Iterable[Any]: ...

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        """Named loss terms of one batch; the optimiser minimises their sum."""

    def after_step(self) -> None: ...

    def after_epoch(self, epoch: int) -> dict:
        """Epoch hook (curricula, knowledge construction); returns values to log."""

    def on_evaluation(self, epoch: int) -> None:
        """Called right after each evaluation (trajectory recording)."""

    def score(self, users: torch.Tensor) -> torch.Tensor: ...

    def train(self, mode: bool = True) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


@dataclass
class LoopConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 1000
    eval_every: int = 10
    patience: int = 5
    select_metric: str = "recall@50"


@dataclass
class FitResult:
    best_epoch: int
    valid: EvalResult
    test: EvalResult
    history: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 6) for name, value in values.items()}


def fit(task: Task, evaluator: Evaluator, config: LoopConfig, generator: torch.Generator) -> FitResult:
    """Train ``task`` to early stop; the task ends in its best state."""
    optimizer = torch.optim.Adam(task.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best = None
    stale = 0
    history: list[dict] = []
    started = time.perf_counter()
    for epoch in range(config.max_epochs):
        task.train(True)
        sums: dict[str, float] = {}
        n_batches = 0
        for batch in task.epoch_batches(epoch, generator):
            terms = task.loss_terms(batch)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise HetCompError(f"non-finite loss at epoch {epoch} ({_describe(terms)}); "
                                   "lower the learning rate or check the inputs")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            task.after_step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            n_batches += 1
        losses = {name: total / max(n_batches, 1) for name, total in sums.items()}
        if epoch % config.eval_every == 0:
            task.train(False)
            results = evaluator.evaluate(task.score)
            task.on_evaluation(epoch)
            valid, test = results["valid"].means(), results["test"].means()
            record = {"epoch": epoch, "loss": _rounded(losses), "valid": _rounded(valid),
                      "test": _rounded(test), "elapsed_s": round(time.perf_counter() - started, 3)}
            improved = best is None or valid[config.select_metric] > best[0]
            if improved:
                best = (valid[config.select_metric], epoch, results, copy.deepcopy(task.state_dict()))
                stale = 0
            else:
                stale += 1
            record.update(task.after_epoch(epoch) or {})
            history.append(record)
            log.info("epoch %d loss %.4f valid %s %.4f (best %.4f @ %d), test %s %.4f", epoch,
                     sum(losses.values()), config.select_metric, valid[config.select_metric], best[0],
                     best[1], config.select_metric, test[config.select_metric])
            if stale >= config.patience:
                break
        else:
            extra = task.after_epoch(epoch)
            if extra:
                history.append({"epoch": epoch, **extra})
    assert best is not None, "max_epochs must be >= 1"
    task.load_state_dict(best[3])
    task.train(False)
    return FitResult(best_epoch=best[1], valid=best[2]["valid"], test=best[2]["test"],
                     history=history, train_time_s=time.perf_counter() - started)


def _describe(terms: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in terms.items()
                     if not math.isfinite(float(value.detach()))) or "sum overflowed"
