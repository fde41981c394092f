"""``hetcomp build-ensemble``: stack teacher trajectories into the ensemble knowledge and evaluate it.

Writes into ``--out`` (atomically): ``knowledge.npz`` and ``meta.json`` (``hetcomp.ensemble``,
read back by ``hetcomp.knowledge.load_knowledge``), and the evaluation of the final-checkpoint
ensemble as a recommender (the "Ensemble" row): ``metrics.json``, ``per_user.npz``, ``run_info.json``.
With ``--expect-record`` it writes nothing unless its metrics equal that record's (the workflow
passes an ensemble's record when it rebuilds a recorded ensemble: see ``hetcomp.reference``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hetcomp.config import config_hash
from hetcomp.data.store import load_split
from hetcomp.errors import HetCompError
from hetcomp.ensemble import (build_knowledge, check_compatible, final_score_fn, load_teacher_run,
                              write_knowledge)
from hetcomp.evaluation import Evaluator
from hetcomp.io import atomic_output_dir, write_json
from hetcomp.outputs import metrics_record, write_per_user
from hetcomp.reference import differences_from_record
from hetcomp.runtime import resolve_device, run_info
from hetcomp.trajectory import split_fingerprint

log = logging.getLogger(__name__)

HELP = "build the heterogeneous-teacher ensemble (knowledge.npz) from teacher runs and evaluate it"


def add_arguments(parser):
    parser.add_argument("--split", required=True, type=Path, help="prepared split directory")
    parser.add_argument("--teachers", required=True, nargs="+", metavar="RUN",
                        help="teacher run directories (hetcomp train-teacher outputs), in teacher order")
    parser.add_argument("--out", required=True, type=Path, help="output ensemble directory")
    parser.add_argument("--top-k", type=int, default=100, help="length of the final ensemble list (<= N)")
    parser.add_argument("--observed", type=int, default=10,
                        help="length of each user's ranked training-item list (padded with -1)")
    parser.add_argument("--temperature", type=float, default=10.0,
                        help="rank importance exp(-rank / temperature)")
    parser.add_argument("--expect-record", type=Path, metavar="RECORD",
                        help="a record of this ensemble (hetcomp record): fail, writing nothing, "
                             "unless the rebuilt ensemble's metrics equal it")


def run(args) -> int:
    started = time.perf_counter()
    if args.expect_record is not None and not (args.expect_record / "metrics.json").is_file():
        raise HetCompError(f"--expect-record {args.expect_record}: no metrics.json there")
    split = load_split(args.split)
    runs = [load_teacher_run(run_dir) for run_dir in args.teachers]
    fingerprint = split_fingerprint(split)
    check_compatible(runs, split.n_users, split.n_items, split.train.nnz, fingerprint)
    seeds = {run.seed for run in runs}
    seed = seeds.pop() if len(seeds) == 1 else None
    provenance = {"split_dir": str(args.split), "dataset": split.meta.get("dataset"),
                  "split_fingerprint": fingerprint, "teacher_seeds": [run.seed for run in runs]}
    knowledge = build_knowledge(runs, split.train, top_k=args.top_k, observed=args.observed,
                                temperature=args.temperature, meta=provenance)
    device = resolve_device("cpu")
    results = Evaluator(split, device=device).evaluate(final_score_fn(knowledge, device))
    n_parameters = [run.n_parameters for run in runs]
    metrics = metrics_record(None, results["valid"], results["test"], model="ensemble",
                             teachers=knowledge.teachers,
                             n_parameters=sum(n_parameters) if None not in n_parameters else None,
                             teacher_n_parameters=dict(zip(knowledge.teachers, n_parameters)))
    config = {"teachers": knowledge.teachers, "top_k": args.top_k, "observed": args.observed,
              "temperature": args.temperature, "dataset": split.meta.get("dataset")}
    if args.expect_record is not None:
        _check_record(metrics, args.expect_record)
    with atomic_output_dir(args.out) as tmp:
        write_knowledge(knowledge, tmp)
        write_json(tmp / "metrics.json", metrics)
        write_per_user(tmp / "per_user.npz", results["valid"], results["test"])
        write_json(tmp / "run_info.json", run_info(
            config=config, config_hash=config_hash(config), seed=seed, device=device,
            wall_time_s=time.perf_counter() - started, command=args.command, split_dir=str(args.split),
            split_fingerprint=fingerprint, teacher_runs=list(args.teachers)))
    log.info("ensemble of %s: valid recall@50 %.4f, test recall@50 %.4f -> %s", ", ".join(knowledge.teachers),
             results["valid"].means()["recall@50"], results["test"].means()["recall@50"], args.out)
    return 0


def _check_record(metrics: dict, record: Path) -> None:
    differences = differences_from_record(metrics, record)
    if differences:
        raise HetCompError(
            f"the rebuilt ensemble differs from its record {record} ({differences[0]}; "
            f"{len(differences)} metric(s) differ): its teachers did not repeat their records "
            "(another thread count, code version or CPU, see their run_info.json), and the "
            "recorded students of this seed distilled the recorded ensemble")
