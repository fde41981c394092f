"""``hetcomp distill``: train the student with one distillation method (or w/o KD).

Writes into ``--out`` (atomically): ``student.pt`` (the student's best state, CPU tensors),
``metrics.json`` (best-epoch validation/test metrics + ``n_parameters``, ``train_time_s``,
``method``, ``teacher``), ``history.jsonl`` (per evaluation: metrics, loss terms and the
method's epoch record, e.g. HetComp's phase and checkpoint selection), ``per_user.npz``,
``run_info.json`` and ``method_state.json``.

``--config`` is the method YAML (``config/methods/NAME.yaml``); its per-dataset overrides are
merged for the split's dataset. ``--teacher NAME`` distils that teacher of the ensemble alone
(the homogeneous-teacher control). Methods that distil nothing (``wokd``) need no ``--ensemble``.
``--tuned DIR`` lays the point chosen by ``hetcomp tune`` (its ``chosen.yaml``) over the YAML's
values; ``run_info.json`` records it as ``tuned`` (null: the YAML's own values). On the tuning seed
that run was already trained by ``hetcomp tune`` (its ``best_run``, same config, seed, split,
ensemble and device): it is copied instead of trained again.

Resuming: every ``checkpoint_every`` evaluations (a loop key, default 5; null: off) the run saves
its training state to ``--checkpoint`` (default ``<out>.partial/checkpoint.pt``, next to the
output, see ``hetcomp.checkpoint``). The same command, run again after an interruption, continues
from there and ends with the same results; the checkpoint is removed once the outputs are written.
A checkpoint of another config, seed, input or device is ignored.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hetcomp.checkpoint import Checkpoint, array_fingerprint, checkpoint_path, run_key
from hetcomp.config import apply_set, config_hash, load_yaml, resolve_overrides
from hetcomp.data.store import load_split
from hetcomp.distill.runner import (input_provenance, resolve_method_config, run_distillation,
                                   write_distillation_outputs)
from hetcomp.errors import HetCompError
from hetcomp.knowledge import load_knowledge
from hetcomp.registry import METHODS, load_all
from hetcomp.runtime import resolve_device
from hetcomp.trajectory import split_fingerprint
from hetcomp.tuning import copy_run, load_chosen, reusable_run

log = logging.getLogger(__name__)

HELP = "train the student with a distillation method (hetcomp, wokd, or a baseline) on a split"


def add_arguments(parser):
    parser.add_argument("--method", required=True, help="registered method name (see `hetcomp list`)")
    parser.add_argument("--split", required=True, type=Path, help="prepared split directory")
    parser.add_argument("--ensemble", type=Path, help="ensemble directory (hetcomp build-ensemble output)")
    parser.add_argument("--teacher", help="distil only this teacher of the ensemble (homogeneous control)")
    parser.add_argument("--config", required=True, type=Path, help="method YAML (config/methods/NAME.yaml)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    parser.add_argument("--out", required=True, type=Path, help="output run directory")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a key of the YAML (repeatable), e.g. --set max_epochs=5")
    parser.add_argument("--checkpoint", type=Path,
                        help="resumable checkpoint file (default: <out>.partial/checkpoint.pt)")
    parser.add_argument("--tuned", type=Path, metavar="DIR_OR_YAML",
                        help="use the setting chosen by `hetcomp tune` (its folder or chosen.yaml)")


def run(args) -> int:
    started = time.perf_counter()
    load_all()
    method_cls = METHODS.get(args.method)
    uses_knowledge = getattr(method_cls, "uses_knowledge", True)
    if args.teacher and not args.ensemble:
        raise HetCompError("--teacher needs --ensemble DIR")
    if uses_knowledge and not args.ensemble:
        raise HetCompError(f"method {args.method} distils teacher knowledge: give --ensemble DIR")
    split = load_split(args.split)
    dataset = split.meta.get("dataset")
    where = f"{args.config} ({args.method})"
    config = apply_set(resolve_overrides(load_yaml(args.config), dataset), args.set)
    resolved = resolve_method_config(method_cls, config, where)
    tuned = load_chosen(args.tuned, resolved.grid, where) if args.tuned else None
    if tuned:
        config.update(tuned)
        resolved = resolve_method_config(method_cls, config, where)
    device = resolve_device(args.device)
    knowledge = None
    if uses_knowledge:
        knowledge = load_knowledge(args.ensemble)
        if args.teacher:
            knowledge = knowledge.single_teacher(args.teacher)
    elif args.ensemble:
        log.info("method %s uses no teacher knowledge; --ensemble is ignored", args.method)

    teacher = (args.teacher or "ensemble") if uses_knowledge else None
    fingerprint = split_fingerprint(split)
    effective = {"method": args.method, "teacher": teacher, "dataset": dataset, **resolved.effective()}
    reusable = reusable_run(args.tuned, config_hash=config_hash(effective), seed=args.seed,
                            split_fingerprint=fingerprint, device=str(device),
                            ensemble_dir=str(args.ensemble) if knowledge is not None else None) if tuned else None
    if reusable is not None and not args.teacher:
        copy_run(reusable, args.out, tuned_from=str(args.tuned))
        log.info("%s: the tuning run of this seed and setting is this run: reused %s -> %s", args.method,
                 reusable, args.out)
        return 0
    checkpoint = Checkpoint(args.checkpoint or checkpoint_path(args.out), run_key(
        resolved.effective(), command="distill", method=args.method, teacher=teacher, seed=args.seed,
        device=str(device), split=fingerprint, knowledge=None if knowledge is None else array_fingerprint(
            knowledge.trajectories, knowledge.observed, knowledge.final_topk)))
    result, distiller = run_distillation(args.method, split, knowledge, config, args.seed, device, where,
                                         checkpoint)
    provenance = {"command": args.command, **input_provenance(args, fingerprint, knowledge),
                  "tuned": tuned, "tuned_from": str(args.tuned) if tuned else None}
    write_distillation_outputs(args.out, method_name=args.method, teacher=teacher, result=result,
                               distiller=distiller, config=effective, seed=args.seed, device=device,
                               started=started, **provenance)
    checkpoint.discard()
    select = resolved.loop.select_metric
    log.info("%s: best epoch %d, valid %s %.4f, test %s %.4f -> %s", args.method, result.best_epoch,
             select, result.valid.means()[select], select, result.test.means()[select], args.out)
    return 0
