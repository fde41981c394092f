"""Running any registered distillation method: config resolution, the student, the loop, outputs.

Shared by ``hetcomp distill``, HetComp, w/o KD and every baseline in ``baselines/``.

A method YAML (``config/methods/NAME.yaml``, per-dataset overrides under ``datasets:`` resolved
with ``hetcomp.config.resolve_overrides`` beforehand) is flat; its keys go to three places:

- loop keys (fields of ``hetcomp.training.LoopConfig``: ``lr, weight_decay, max_epochs,
  eval_every, patience, select_metric, round_select, checkpoint_every``);
- student keys (``hetcomp.distill.student.STUDENT_DEFAULTS``: ``student_dim, batch_size,
  init_std``);
- method keys, checked against the method class's ``defaults`` dict (class attribute; a key it
  lacks is an error, a key the YAML omits takes its default). The distiller receives the merged
  method keys only, as its ``config``.

Numbers are converted from strings where the default is a number (YAML 1.1 reads ``1e-3``
without a dot as a string); method keys may be ``null`` to switch a feature off.

The top-level ``tune`` key (a validation grid of loop/method keys for ``hetcomp tune``) goes to
none of them: it is checked here (every point must resolve) and kept as ``MethodConfig.grid``;
a run uses the YAML's own values unless a chosen point is overlaid (``hetcomp distill --tuned``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from hetcomp.config import check_keys, coerce_number, config_hash, grid_points, split_tune
from hetcomp.data.store import Split
from hetcomp.distill.student import STUDENT_DEFAULTS, build_student
from hetcomp.errors import HetCompError
from hetcomp.evaluation import Evaluator
from hetcomp.io import atomic_output_dir, write_json
from hetcomp.knowledge import TeacherKnowledge
from hetcomp.outputs import metrics_record, write_run_outputs
from hetcomp.registry import METHODS, load_all
from hetcomp.runtime import run_info, seed_everything
from hetcomp.training import FitResult, LoopConfig, fit

log = logging.getLogger(__name__)

LOOP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoopConfig)}


@dataclass
class MethodConfig:
    """A method YAML split into its three parts, every default filled in."""

    loop: LoopConfig
    student: dict
    method: dict
    #: The points of the YAML's ``tune`` grid (empty without one); not applied to this config.
    grid: list[dict] = field(default_factory=list)

    def effective(self) -> dict:
        """All keys with their values (what the run used), for ``run_info.json`` and the hash."""
        return {**dataclasses.asdict(self.loop), **self.student, **self.method}


def method_defaults(method_cls) -> dict:
    return dict(getattr(method_cls, "defaults", None) or {})


def resolve_method_config(method_cls, config: Mapping[str, Any], where: str) -> MethodConfig:
    """Split and check a resolved (override-merged) method config; unknown keys are errors.

    A ``tune`` grid may name loop and method keys only; each of its points must resolve too.
    """
    defaults = method_defaults(method_cls)
    config, tune = split_tune(config)
    resolved = _resolve(defaults, config, where)
    if tune is not None:
        resolved.grid = grid_points(tune, {**LOOP_DEFAULTS, **defaults}, where)
        for point in resolved.grid:
            _resolve(defaults, {**config, **point}, f"{where}, tune point {point}")
    return resolved


def _resolve(defaults: dict, config: Mapping[str, Any], where: str) -> MethodConfig:
    clash = sorted(set(defaults) & (set(LOOP_DEFAULTS) | set(STUDENT_DEFAULTS)))
    if clash:
        raise HetCompError(f"{where}: method keys {', '.join(clash)} clash with loop/student keys")
    check_keys(config, {**LOOP_DEFAULTS, **STUDENT_DEFAULTS, **defaults}, where)
    loop_config = LoopConfig.from_config(config, where)
    student = {k: coerce_number(config.get(k, d), d, k, where) for k, d in STUDENT_DEFAULTS.items()}
    method = {k: coerce_number(config.get(k, d), d, k, where, nullable=True) for k, d in defaults.items()}
    return MethodConfig(loop=loop_config, student=student, method=method)


def run_distillation(method_name: str, split: Split, knowledge: TeacherKnowledge | None,
                     config: Mapping[str, Any], seed: int, device: torch.device | str,
                     where: str | None = None, checkpoint: Checkpoint | None = None):
    """Train the student with ``method_name``; returns ``(FitResult, distiller)``.

    ``config`` is the method YAML after per-dataset overrides. Methods with
    ``uses_knowledge = False`` ignore ``knowledge``; the others need it. The student ends in
    its best state (validation ``select_metric``). With ``checkpoint`` the run resumes from it
    and saves to it (``hetcomp.training.fit``).
    """
    load_all()
    method_cls = METHODS.get(method_name)
    where = where or f"method {method_name}"
    resolved = resolve_method_config(method_cls, config, where)
    uses_knowledge = getattr(method_cls, "uses_knowledge", True)
    if uses_knowledge and knowledge is None:
        raise HetCompError(f"method {method_name} distils teacher knowledge: give --ensemble DIR")
    if uses_knowledge:
        shape = knowledge.trajectories.shape
        if shape[2] != split.n_users or knowledge.n_items != split.n_items:
            raise HetCompError(f"the ensemble has {shape[2]} users x {knowledge.n_items} items but the "
                               f"split has {split.n_users} x {split.n_items}: built from another split?")
    device = torch.device(device)
    generator = seed_everything(seed)
    student = build_student(split.n_users, split.n_items, resolved.student, device)
    student.setup(split.train, device)
    distiller = method_cls(split, knowledge if uses_knowledge else None, student, resolved.method, device)
    evaluator = Evaluator(split, device=device)
    log.info("distilling with %s on %s (%d users, %d items), seed %d, %s", method_name,
             split.meta.get("dataset", "?"), split.n_users, split.n_items, seed, device)
    result = fit(distiller, evaluator, resolved.loop, generator, checkpoint)
    return result, distiller


def input_provenance(args, split_fingerprint: str, knowledge: TeacherKnowledge | None) -> dict:
    """Where a `distill`/`tune` run's inputs came from (its YAML, split and ensemble), for run_info."""
    return {"config_file": str(args.config), "split_dir": str(args.split), "split_fingerprint": split_fingerprint,
            "ensemble_dir": str(args.ensemble) if knowledge is not None else None,
            "teachers": list(knowledge.teachers) if knowledge is not None else None}


def write_distillation_outputs(out: str | Path, *, method_name: str, teacher: str | None,
                               result: FitResult, distiller, config: dict, seed: int,
                               device: torch.device, started: float, **provenance) -> None:
    """Write a distillation run into ``out`` atomically (see docs/CONTRACTS.md)."""
    student = distiller.student
    metrics = metrics_record(result.best_epoch, result.valid, result.test, method=method_name,
                             teacher=teacher, n_parameters=student.n_parameters(),
                             train_time_s=round(result.train_time_s, 3))
    state = distiller.method_state()
    with atomic_output_dir(out) as tmp:
        torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, tmp / "student.pt")
        info = run_info(config=config, config_hash=config_hash(config), seed=seed, device=device,
                        wall_time_s=time.perf_counter() - started, resumed_at_epochs=result.resumed_at,
                        **provenance)
        write_run_outputs(tmp, metrics=metrics, valid=result.valid, test=result.test,
                          history=result.history, info=info)
        write_json(tmp / "method_state.json", state)
