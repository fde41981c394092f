"""The one training loop shared by teachers and distillation methods.

A *task* supplies the batches of an epoch, the named loss terms of a batch and a score function;
the loop runs Adam over its parameters, evaluates every ``eval_every`` epochs (after epochs
0, eval_every, 2*eval_every, ...), keeps the best state on the selection metric (validation
Recall@50 by default; compared after rounding to ``round_select`` decimals if set, as the
official HetComp code does with 4) and stops after ``patience`` evaluations without improvement.

Each evaluation logs one progress line: epoch, loss, validation metric, best so far and its
epoch, elapsed time and two upper bounds on the time left: until ``patience`` runs out if the
metric does not improve again, and until ``max_epochs``.

Resuming (``hetcomp.checkpoint``): given a ``Checkpoint``, the loop continues from it if it
exists, and saves its whole state there after every ``checkpoint_every`` evaluations (null: no
checkpoints), at the end of an epoch, so a restarted run ends exactly as an uninterrupted one.

Stopping: SIGTERM or SIGINT stops the loop before the next batch and raises
``TrainingInterrupted`` (the commands write no output). If the signal arrives while an epoch ends
(during the evaluation or the epoch hook), the loop first saves a checkpoint there. A second
signal acts at once (the handlers in place before ``fit`` are back).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

import torch

from hetcomp.checkpoint import Checkpoint, capture_rng, restore_rng
from hetcomp.config import coerce_number
from hetcomp.errors import HetCompError
from hetcomp.evaluation import EvalResult, Evaluator

log = logging.getLogger(__name__)


class Task(Protocol):
    """What the loop trains. ``hetcomp.models.base.ModelTask`` and distillers implement it.

    A task may also have ``min_epochs`` (default 0): early stopping does not end training before
    that many epochs (a curriculum's length); ``max_epochs`` still does.
    """

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

    def extra_state(self) -> dict:
        """Training state beyond ``state_dict`` (method state, own generators) for checkpoints."""

    def load_extra_state(self, state: dict) -> None: ...


#: Loop keys that may be null (their numeric type is that of the template).
NULLABLE_KEYS = {"round_select": 0, "checkpoint_every": 1}


@dataclass
class LoopConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 1000
    eval_every: int = 10
    patience: int = 5
    select_metric: str = "recall@50"
    #: Decimals the selection metric is rounded to before comparing (None: exact).
    round_select: int | None = None
    #: Evaluations between checkpoints (None: no checkpoints). Does not change results.
    checkpoint_every: int | None = 5

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str) -> "LoopConfig":
        """The loop keys of a flat config (other keys are left alone), converted and checked."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in config:
                template = NULLABLE_KEYS.get(f.name, f.default)
                values[f.name] = coerce_number(config[f.name], template, f.name, where,
                                               nullable=f.name in NULLABLE_KEYS)
        loop = cls(**values)
        if loop.max_epochs < 1 or loop.eval_every < 1 or loop.patience < 1:
            raise HetCompError(f"{where}: max_epochs, eval_every and patience must be >= 1")
        if loop.round_select is not None and loop.round_select < 0:
            raise HetCompError(f"{where}: round_select must be null or >= 0, got {loop.round_select}")
        if loop.checkpoint_every is not None and loop.checkpoint_every < 1:
            raise HetCompError(f"{where}: checkpoint_every must be null or >= 1, got {loop.checkpoint_every}")
        return loop


@dataclass
class FitResult:
    best_epoch: int
    valid: EvalResult
    test: EvalResult
    history: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    #: Epochs at which this run continued from a checkpoint.
    resumed_at: list[int] = field(default_factory=list)


class TrainingInterrupted(HetCompError):
    """Training stopped on SIGTERM/SIGINT."""


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 6) for name, value in values.items()}


def selection_key(value: float, decimals: int | None) -> float:
    """The value compared for early stopping: exact, or rounded to ``decimals``."""
    return value if decimals is None else round(value, decimals)


def fit(task: Task, evaluator: Evaluator, config: LoopConfig, generator: torch.Generator,
        checkpoint: Checkpoint | None = None) -> FitResult:
    """Train ``task`` to early stop; the task ends in its best state."""
    optimizer = torch.optim.Adam(task.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    metric = config.select_metric
    checkpoint = checkpoint if config.checkpoint_every is not None else None
    best = None  # (selection key, epoch, results, state)
    min_epochs = int(getattr(task, "min_epochs", 0))
    stale = 0
    n_evaluations = 0
    history: list[dict] = []
    resumed_at: list[int] = []
    first_epoch, elapsed_before = 0, 0.0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        task.load_state_dict(saved["task"])
        task.load_extra_state(saved["extra"])
        optimizer.load_state_dict(saved["optimizer"])
        restore_rng(saved["rng"], generator)
        best, stale, n_evaluations, history = saved["best"], saved["stale"], saved["n_evaluations"], saved["history"]
        first_epoch, elapsed_before = saved["next_epoch"], saved["elapsed_s"]
        resumed_at = saved["resumed_at"] + [first_epoch]
        log.info("resuming from %s at epoch %d (best %.4f @ %d)", checkpoint.path, first_epoch, best[0], best[1])
    started = time.perf_counter() - elapsed_before

    def save(next_epoch: int) -> None:
        checkpoint.save({
            "next_epoch": next_epoch, "task": task.state_dict(), "extra": task.extra_state(),
            "optimizer": optimizer.state_dict(), "rng": capture_rng(generator), "best": best,
            "stale": stale, "n_evaluations": n_evaluations, "history": history,
            "elapsed_s": time.perf_counter() - started, "resumed_at": resumed_at})

    with _StopSignals() as stop:
        for epoch in range(first_epoch, config.max_epochs):
            task.train(True)
            sums: dict[str, float] = {}
            n_batches = 0
            for batch in task.epoch_batches(epoch, generator):
                if stop.received:
                    raise stop.interrupted(epoch, checkpoint, saved_now=False)
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
            finished = epoch == config.max_epochs - 1
            if epoch % config.eval_every == 0:
                task.train(False)
                results = evaluator.evaluate(task.score)
                task.on_evaluation(epoch)
                n_evaluations += 1
                valid, test = results["valid"].means(), results["test"].means()
                record = {"epoch": epoch, "loss": _rounded(losses), "valid": _rounded(valid),
                          "test": _rounded(test), "elapsed_s": round(time.perf_counter() - started, 3)}
                key = selection_key(valid[metric], config.round_select)
                if best is None or key > best[0]:
                    best = (key, epoch, results, copy.deepcopy(task.state_dict()))
                    stale = 0
                else:
                    stale += 1
                record.update(task.after_epoch(epoch) or {})
                history.append(record)
                log.info(progress_line(epoch, config, sum(losses.values()), valid[metric], best[0], best[1],
                                       stale, time.perf_counter() - started))
                finished = finished or (stale >= config.patience and epoch + 1 >= min_epochs)
                if (checkpoint is not None and not finished and not stop.received
                        and n_evaluations % config.checkpoint_every == 0):
                    save(epoch + 1)
            else:
                extra = task.after_epoch(epoch)
                if extra:
                    history.append({"epoch": epoch, **extra})
            if stop.received:
                if checkpoint is not None and not finished:
                    save(epoch + 1)
                raise stop.interrupted(epoch + 1, checkpoint, saved_now=checkpoint is not None and not finished)
            if finished:
                break
    assert best is not None, "max_epochs must be >= 1"
    task.load_state_dict(best[3])
    task.train(False)
    return FitResult(best_epoch=best[1], valid=best[2]["valid"], test=best[2]["test"], history=history,
                     train_time_s=time.perf_counter() - started, resumed_at=resumed_at)


def progress_line(epoch: int, config: LoopConfig, loss: float, value: float, best: float, best_epoch: int,
                  stale: int, elapsed: float) -> str:
    """One compact status line per evaluation (see the module docstring)."""
    per_epoch = elapsed / (epoch + 1)
    to_max = config.max_epochs - 1 - epoch
    to_patience = min((config.patience - stale) * config.eval_every, to_max)
    left = f"<= {_duration(to_patience * per_epoch)} left (patience)"
    if to_patience < to_max:
        left += f", <= {_duration(to_max * per_epoch)} (max_epochs)"
    return (f"epoch {epoch}/{config.max_epochs} loss {loss:.4f} | valid {config.select_metric} {value:.4f}"
            f" | best {best:.4f} @ {best_epoch} ({stale}/{config.patience} stale)"
            f" | {_duration(elapsed)} elapsed, {left}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _StopSignals:
    """Within the block, the first SIGTERM/SIGINT only sets ``received``; the previous handlers
    are then put back, so a second signal acts at once. A no-op outside the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def interrupted(self, epoch: int, checkpoint: Checkpoint | None, saved_now: bool) -> TrainingInterrupted:
        name = signal.Signals(self.received).name
        if checkpoint is None:
            where = "no checkpoint (checkpoint_every is null): a new run starts over"
        elif saved_now:
            where = f"checkpoint saved at the end of epoch {epoch - 1} in {checkpoint.path}"
        else:
            where = f"the same command resumes from the last checkpoint in {checkpoint.path}, if any"
        return TrainingInterrupted(f"stopped by {name} at epoch {epoch}; {where}")


def _describe(terms: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in terms.items()
                     if not math.isfinite(float(value.detach()))) or "sum overflowed"
