"""``hetcomp train-teacher``: train one teacher on a split and export its trajectory.

Writes into ``--out`` (atomically): ``model.pt`` (state_dict of the best epoch, CPU tensors),
``trajectory.npz`` (``hetcomp.trajectory``), ``metrics.json`` (+ ``n_parameters``,
``train_time_s``, the exported checkpoints' epochs and validation metrics), ``history.jsonl``,
``per_user.npz`` and ``run_info.json``.

The model YAML is flat (per-dataset overrides under ``datasets:``). Its keys go to three places:
the loop keys (fields of ``hetcomp.training.LoopConfig``), the trajectory keys
(``n_checkpoints``, ``top_n``) and every other key to the model's constructor. A key none of
them knows is an error, and so is a non-number where the default is a number.

Resuming: as ``hetcomp distill`` (``--checkpoint``, default ``<out>.partial/checkpoint.pt``; see
``hetcomp.checkpoint``); the checkpoint also holds the top-N lists recorded so far.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from pathlib import Path

import torch

from hetcomp.checkpoint import Checkpoint, checkpoint_path, run_key
from hetcomp.config import apply_set, check_keys, coerce_number, config_hash, load_yaml, resolve_overrides
from hetcomp.data.store import load_split
from hetcomp.errors import HetCompError
from hetcomp.evaluation import Evaluator
from hetcomp.io import atomic_output_dir
from hetcomp.models.base import ModelTask, build_model
from hetcomp.outputs import metrics_record, write_run_outputs
from hetcomp.registry import MODELS
from hetcomp.runtime import resolve_device, run_info, seed_everything
from hetcomp.training import LoopConfig, fit
from hetcomp.trajectory import TrajectoryRecorder, split_fingerprint

log = logging.getLogger(__name__)

HELP = "train one teacher model on a split and export its trajectory (top-N lists per checkpoint)"

TRAJECTORY_DEFAULTS = {"n_checkpoints": 4, "top_n": 100}


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="registered model name (see `hetcomp list`)")
    parser.add_argument("--split", required=True, type=Path, help="prepared split directory")
    parser.add_argument("--config", required=True, type=Path, help="model YAML (config/models/NAME.yaml)")
    parser.add_argument("--seed", required=True, type=int, help="run seed")
    parser.add_argument("--out", required=True, type=Path, help="output run directory")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a key of the YAML (repeatable), e.g. --set max_epochs=5")
    parser.add_argument("--checkpoint", type=Path,
                        help="resumable checkpoint file (default: <out>.partial/checkpoint.pt)")



def constructor_defaults(model_cls) -> dict:
    """The constructor's keyword parameters (except ``n_users``/``n_items``) and their defaults.

    A parameter without a default maps to ``inspect.Parameter.empty`` (then required in the YAML).
    """
    parameters = inspect.signature(model_cls.__init__).parameters
    return {name: p.default for name, p in list(parameters.items())[1:]
            if name not in ("n_users", "n_items")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def split_config(config: dict, model_cls, where: str) -> tuple[LoopConfig, dict, dict]:
    """``(LoopConfig, trajectory settings, constructor kwargs)`` of a resolved model config."""
    loop_defaults = {f.name: f.default for f in dataclasses.fields(LoopConfig)}
    model_defaults = constructor_defaults(model_cls)
    check_keys(config, {**loop_defaults, **TRAJECTORY_DEFAULTS, **model_defaults}, where)
    loop = LoopConfig.from_config(config, where)
    trajectory = dict(TRAJECTORY_DEFAULTS)
    trajectory.update({k: coerce_number(v, TRAJECTORY_DEFAULTS[k], k, where)
                       for k, v in config.items() if k in TRAJECTORY_DEFAULTS})
    model_kwargs = {}
    for key, default in model_defaults.items():
        if key in loop_defaults or key in TRAJECTORY_DEFAULTS:
            continue
        if key in config:
            model_kwargs[key] = coerce_number(config[key], default, key, where)
        elif default is inspect.Parameter.empty:
            raise HetCompError(f"{where}: missing required model key {key}")
        else:
            model_kwargs[key] = default
    return loop, trajectory, model_kwargs


def run(args) -> int:
    started = time.perf_counter()
    import hetcomp.models  # noqa: F401  (registers the models)

    model_cls = MODELS.get(args.model)
    split = load_split(args.split)
    dataset = split.meta.get("dataset")
    where = f"{args.config} ({args.model})"
    resolved = apply_set(resolve_overrides(load_yaml(args.config), dataset), args.set)
    loop, trajectory_settings, model_kwargs = split_config(resolved, model_cls, where)
    device = resolve_device(args.device)
    generator = seed_everything(args.seed)
    model = build_model(model_cls, split, model_kwargs, device, where)
    recorder = TrajectoryRecorder(split.train, device=device, **trajectory_settings)
    evaluator = Evaluator(split, device=device)
    log.info("training %s on %s (%d users, %d items) with seed %d on %s", args.model,
             dataset or args.split, split.n_users, split.n_items, args.seed, device)
    config = {"model": args.model, "dataset": dataset, **dataclasses.asdict(loop),
              **trajectory_settings, **model_kwargs}
    fingerprint = split_fingerprint(split)
    checkpoint = Checkpoint(args.checkpoint or checkpoint_path(args.out),
                            run_key(config, command="train-teacher", seed=args.seed, device=str(device),
                                    split=fingerprint))
    result = fit(ModelTask(model, on_evaluation=recorder), evaluator, loop, generator, checkpoint)
    trajectory = recorder.finish(result.best_epoch, model)

    valid_by_epoch = {record["epoch"]: record.get("valid") for record in result.history if "valid" in record}
    metrics = metrics_record(
        result.best_epoch, result.valid, result.test, model=args.model,
        n_parameters=model.n_parameters(), train_time_s=round(result.train_time_s, 3),
        trajectory={"policy": recorder.policy, "epochs": trajectory.epochs.tolist(),
                    "valid": [valid_by_epoch.get(int(e)) for e in trajectory.epochs]},
    )
    with atomic_output_dir(args.out) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
        trajectory.save(tmp / "trajectory.npz")
        info = run_info(config=config, config_hash=config_hash(config), seed=args.seed, device=device,
                        wall_time_s=time.perf_counter() - started, command=args.command,
                        config_file=str(args.config), split_dir=str(args.split),
                        split_fingerprint=fingerprint, resumed_at_epochs=result.resumed_at)
        write_run_outputs(tmp, metrics=metrics, valid=result.valid, test=result.test,
                          history=result.history, info=info)
    log.info("%s: best epoch %d, valid %s %.4f, checkpoints at epochs %s -> %s", args.model,
             result.best_epoch, loop.select_metric, result.valid.means()[loop.select_metric],
             trajectory.epochs.tolist(), args.out)
    checkpoint.discard()
    return 0
