"""``hetcomp cost``: inference cost of the teachers, their ensemble and the students (``hetcomp.cost``).

Writes into ``--out`` (atomically):

- ``cost.csv``: one row per candidate (``kind`` teacher|ensemble|student, ``name``, ``teacher``
  for single-teacher students, ``n_parameters``, ``latency_ms`` (median), mean/min/max,
  ``throughput_users_per_s``, ``batch_size``, ``k``, ``repeats``, ``device``, ``device_name``, ``run``);
- ``cost.json``: the same rows, each with its raw timings (``times_s``), plus the users, the
  reload check (``reload_agreement``: overlap of each reloaded teacher's top-N with the final
  checkpoint of its exported trajectory, for the timed users) and the setup;
- ``discrepancy.csv``: each student's mean ranking discrepancy to every teacher checkpoint
  (``method, teacher, checkpoint, epoch, discrepancy``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hetcomp.errors import HetCompError

log = logging.getLogger(__name__)

HELP = ("measure parameters, latency and throughput of top-K inference for the teachers, their "
        "ensemble and the students on one device (plus the students' discrepancy to each checkpoint)")

COLUMNS = ["kind", "name", "teacher", "n_parameters", "latency_ms", "latency_ms_mean", "latency_ms_min",
           "latency_ms_max", "throughput_users_per_s", "batch_size", "k", "repeats", "warmup", "device",
           "device_name", "run"]


def add_arguments(parser):
    parser.add_argument("--split", required=True, type=Path, help="prepared split directory")
    parser.add_argument("--ensemble", required=True, type=Path, help="ensemble directory (build-ensemble)")
    parser.add_argument("--teachers", required=True, nargs="+", type=Path, metavar="RUN",
                        help="teacher run directories of that ensemble (train-teacher outputs)")
    parser.add_argument("--students", nargs="*", default=[], type=Path, metavar="RUN",
                        help="student run directories (distill outputs)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--batch-size", type=int, default=1024, help="users per batch (default 1024)")
    parser.add_argument("--k", type=int, default=50, help="length of the top-K lists (default 50)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the user sample (default 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")


def run(args) -> int:
    import numpy as np
    import pandas as pd
    import torch

    from hetcomp import cost as C
    from hetcomp.data.store import load_split
    from hetcomp.io import atomic_output_dir, write_json
    from hetcomp.knowledge import load_knowledge
    from hetcomp.runtime import describe_device, resolve_device, seed_everything

    if args.batch_size < 1 or args.k < 1:
        raise HetCompError("--batch-size and --k must be >= 1")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    split = load_split(args.split)
    knowledge = load_knowledge(args.ensemble)
    if args.k > split.n_items:
        raise HetCompError(f"--k {args.k} exceeds the {split.n_items} items of the split")
    depth = int(knowledge.trajectories.shape[3])
    dataset = split.meta.get("dataset")

    teachers = [C.load_teacher(path, split, device) for path in args.teachers]
    names = [t.name for t in teachers]
    if names != list(knowledge.teachers):
        raise HetCompError(f"--teachers {names} are not the ensemble's teachers {knowledge.teachers} "
                           "(same names, same order)")
    students = [C.load_student(path, split, device) for path in args.students]

    users_np = C.sample_users(split, args.batch_size, args.seed)
    users = torch.from_numpy(users_np).to(device)
    keys = C.batch_train_keys(split.train, users_np, device)
    batch = len(users_np)
    device_name = describe_device(device)
    log.info("timing %d teachers, their ensemble and %d students on %s: %d users, k=%d, %d repeats",
             len(teachers), len(students), device_name, batch, args.k, args.repeats)

    rows, timings, agreement = [], [], {}

    def measure(kind, name, fn, n_parameters, run_dir, teacher=None):
        times = C.time_calls(fn, device, args.repeats, args.warmup)
        row = {"kind": kind, "name": name, "teacher": teacher, "n_parameters": n_parameters,
               **C.summarize_times(times, batch), "batch_size": batch, "k": args.k,
               "repeats": args.repeats, "warmup": args.warmup, "device": str(device),
               "device_name": device_name, "run": run_dir}
        rows.append(row)
        timings.append([round(t, 6) for t in times])
        log.info("%s %s: %s params, median %.3f ms, %.0f users/s", kind, name, f"{n_parameters:,}",
                 row["latency_ms"], row["throughput_users_per_s"])

    with torch.inference_mode():
        for t, loaded in enumerate(teachers):  # reload check against the exported final checkpoint
            top = C.masked_topk(loaded.model, users, keys, depth).cpu().numpy()
            final = knowledge.trajectories[t, -1, users_np]
            agreement[loaded.name] = round(float(np.mean([len(np.intersect1d(a, b)) / depth
                                                          for a, b in zip(top, final)])), 4)
    for loaded in teachers:
        measure("teacher", loaded.name, lambda m=loaded.model: C.masked_topk(m, users, keys, args.k),
                loaded.n_parameters, loaded.run_dir)
    models = [t.model for t in teachers]
    measure("ensemble", "ensemble",
            lambda: C.ensemble_topk(models, users, keys, depth, args.k, knowledge.temperature, split.n_items),
            sum(t.n_parameters for t in teachers), str(args.ensemble))
    for loaded in students:
        measure("student", loaded.name, lambda m=loaded.model: C.masked_topk(m, users, keys, args.k),
                loaded.n_parameters, loaded.run_dir, teacher=loaded.teacher)

    discrepancy_rows = []
    epochs = knowledge.meta.get("checkpoint_epochs") or {}
    for loaded in students:
        top = C.student_top_lists(loaded.model, split, C.DISCREPANCY_DEPTH, device)
        values = C.student_discrepancy(top, knowledge.trajectories, split.eval_users)
        for t, teacher in enumerate(knowledge.teachers):
            teacher_epochs = epochs.get(teacher) or [None] * values.shape[1]
            for c in range(values.shape[1]):
                discrepancy_rows.append({
                    "method": loaded.name, "student_teacher": loaded.teacher, "teacher": teacher,
                    "checkpoint": c, "epoch": teacher_epochs[c], "discrepancy": round(float(values[t, c]), 6),
                    "run": loaded.run_dir})

    with atomic_output_dir(args.out) as tmp:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp / "cost.csv", index=False)
        pd.DataFrame(discrepancy_rows, columns=["method", "student_teacher", "teacher", "checkpoint",
                                                "epoch", "discrepancy", "run"]).to_csv(
            tmp / "discrepancy.csv", index=False)
        write_json(tmp / "cost.json", {
            "dataset": dataset, "device": str(device), "device_name": device_name,
            "torch_threads": torch.get_num_threads(), "batch_size": batch, "k": args.k,
            "repeats": args.repeats, "warmup": args.warmup, "ensemble_depth": depth,
            "temperature": knowledge.temperature, "seed": args.seed, "users": users_np.tolist(),
            "reload_agreement": agreement,
            "rows": [{**row, "times_s": times} for row, times in zip(rows, timings)],
        })
    print(pd.DataFrame(rows)[["kind", "name", "n_parameters", "latency_ms", "throughput_users_per_s"]]
          .to_string(index=False))
    return 0
