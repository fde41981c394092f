"""``hetcomp tune``: train every point of a method's validation grid and choose one on validation.

The grid is the method YAML's ``tune`` key (``{key: [values]}``, at most 6 points, loop and method
keys only). Per-dataset overrides are merged first, then each point is laid over them and trained
on ``--seed`` exactly as ``hetcomp distill`` would train it, one point after the other. The point
with the best validation Recall@50 wins (the first in grid order on a tie). Writes into ``--out``
(atomically) ``chosen.yaml``, ``grid.csv``, ``tune_info.json`` and the winner's run ``best_run/``
(see ``hetcomp.tuning``); ``hetcomp distill --tuned OUT`` then trains with the chosen point, and on
the tuning seed reuses ``best_run`` instead of training it again.

Resuming: the running point saves its training state to ``<out>.partial/pointN.pt`` as
``hetcomp distill`` does (``hetcomp.checkpoint``), and each finished point its grid row to
``<out>.partial/pointN.done.pt``; the same command, run again after an interruption, skips the
finished points and continues the running one. The folder is removed once the outputs are written.

Parallel points: ``--point N`` trains grid point ``N`` only (0-based, grid order) into that folder
and stops without choosing; the workflow runs one such job per point (in parallel where cores or
cluster nodes allow), then this command without ``--point`` finds every point finished and chooses.
``tune_info.json``'s ``wall_time_s`` is this command's own time (then: the choosing only); each
point's training time is its ``train_time_s`` in ``grid.csv``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from hetcomp.checkpoint import Checkpoint, array_fingerprint, checkpoint_path, run_key
from hetcomp.config import config_hash, load_yaml, resolve_overrides
from hetcomp.data.store import load_split
from hetcomp.distill.runner import (input_provenance, resolve_method_config, run_distillation,
                                   write_distillation_outputs)
from hetcomp.errors import HetCompError
from hetcomp.knowledge import load_knowledge
from hetcomp.registry import METHODS, load_all
from hetcomp.runtime import resolve_device, run_info
from hetcomp.trajectory import split_fingerprint
from hetcomp.tuning import SELECT_METRIC, format_setting, grid_row, write_tuning

log = logging.getLogger(__name__)

HELP = "train each point of a method's `tune` grid on one seed and choose one on validation Recall@50"


def add_arguments(parser):
    parser.add_argument("--method", required=True, help="registered method name (see `hetcomp list`)")
    parser.add_argument("--split", required=True, type=Path, help="prepared split directory")
    parser.add_argument("--ensemble", type=Path, help="ensemble directory (hetcomp build-ensemble output)")
    parser.add_argument("--config", required=True, type=Path,
                        help="method YAML with a `tune` grid (config/methods/NAME.yaml)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every grid run (default 0)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--dataset", help="dataset whose overrides apply (default: the split's)")
    parser.add_argument("--point", type=int, metavar="N",
                        help="train grid point N only (0-based) and stop without choosing; run the "
                             "command without --point once every point is finished")


def run(args) -> int:
    started = time.perf_counter()
    load_all()
    method_cls = METHODS.get(args.method)
    uses_knowledge = getattr(method_cls, "uses_knowledge", True)
    where = f"{args.config} ({args.method})"
    split = load_split(args.split)
    dataset = args.dataset or split.meta.get("dataset")
    config = resolve_overrides(load_yaml(args.config), dataset)
    resolved = resolve_method_config(method_cls, config, where)
    if not resolved.grid:
        raise HetCompError(f"{where}: no `tune` grid to search (add one, e.g. `tune: {{lr: [1.0e-3, "
                           "1.0e-2]}}`, or train the YAML's values with hetcomp distill)")
    if uses_knowledge and not args.ensemble:
        raise HetCompError(f"method {args.method} distils teacher knowledge: give --ensemble DIR")
    if args.point is not None and not 0 <= args.point < len(resolved.grid):
        raise HetCompError(f"{where}: --point {args.point} is not a point of its {len(resolved.grid)}-point "
                           f"grid (0 to {len(resolved.grid) - 1})")
    device = resolve_device(args.device)
    knowledge = load_knowledge(args.ensemble) if uses_knowledge else None

    fingerprint = split_fingerprint(split)
    inputs = {"command": "tune", "method": args.method, "seed": args.seed, "device": str(device),
              "split": fingerprint, "knowledge": None if knowledge is None else array_fingerprint(
                  knowledge.trajectories, knowledge.observed, knowledge.final_topk)}
    partial = checkpoint_path(args.out).parent
    teacher = "ensemble" if uses_knowledge else None
    provenance = input_provenance(args, fingerprint, knowledge)
    rows, finished, point_runs = [], [], []
    for index, point in enumerate(resolved.grid):
        point_where = f"{where}, tune point {index}"
        point_config = resolve_method_config(method_cls, {**config, **point}, point_where).effective()
        key = run_key(point_config, **inputs)
        done = Checkpoint(partial / f"point{index}.done.pt", key)
        finished.append(done)
        point_runs.append(partial / f"point{index}.run")
        if args.point is not None and index != args.point:
            continue
        row = done.load()
        if row is not None and (point_runs[-1] / "run_info.json").is_file():
            log.info("point %d/%d: %s, finished before", index + 1, len(resolved.grid), format_setting(point))
            rows.append(row)
            continue
        log.info("point %d/%d: %s", index + 1, len(resolved.grid), format_setting(point))
        checkpoint = Checkpoint(partial / f"point{index}.pt", key)
        point_started = time.perf_counter()
        result, distiller = run_distillation(args.method, split, knowledge, {**config, **point}, args.seed,
                                             device, point_where, checkpoint)
        # the run exactly as `hetcomp distill --tuned` writes it (reused for the tuning seed)
        write_distillation_outputs(point_runs[-1], method_name=args.method, teacher=teacher, result=result,
                                   distiller=distiller, seed=args.seed, device=device, started=point_started,
                                   config={"method": args.method, "teacher": teacher, "dataset": dataset,
                                           **point_config},
                                   command="distill", **provenance, tuned=point, tuned_from=str(args.out))
        rows.append(grid_row(index, point, result.valid.means(), result.test.means(), result.best_epoch,
                             result.train_time_s))
        done.save(rows[-1])
        checkpoint.discard()
        log.info("point %d: valid %s %.4f", index + 1, SELECT_METRIC, rows[-1][f"valid_{SELECT_METRIC}"])
        del result, distiller
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.point is not None:
        log.info("point %d/%d finished; choose with the same command without --point", args.point + 1,
                 len(resolved.grid))
        return 0
    grid_config = {"method": args.method, "dataset": dataset, **resolved.effective(), "tune": resolved.grid}
    info = run_info(config=grid_config, config_hash=config_hash(grid_config), seed=args.seed, device=device,
                    wall_time_s=time.perf_counter() - started, command=args.command, method=args.method,
                    dataset=dataset, **provenance)
    chosen = write_tuning(args.out, rows, resolved.grid, info, point_runs)
    for done, point_run in zip(finished, point_runs):
        shutil.rmtree(point_run, ignore_errors=True)
        done.discard()
    log.info("%s: chose %s on validation %s -> %s", args.method, format_setting(chosen), SELECT_METRIC,
             args.out)
    return 0
