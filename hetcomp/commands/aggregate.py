"""``hetcomp aggregate``: every run into one long CSV, plus the extras the figures need.

Writes ``--out`` (the long table, ``hetcomp.report.aggregate.LONG_COLUMNS``) and, when ``--extras``
is given, that folder (atomically) with ``history.csv``, ``datasets.csv``, ``cost.csv``,
``discrepancy.csv`` and ``tuning.csv``. See ``hetcomp.report.aggregate`` for the columns and how
runs are identified.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hetcomp.errors import HetCompError
from hetcomp.io import atomic_output_dir, atomic_write_text

log = logging.getLogger(__name__)

HELP = "collect teacher, ensemble and student runs into one long CSV (plus histories, datasets, cost)"


def add_arguments(parser):
    parser.add_argument("--teachers", nargs="*", default=[], type=Path, metavar="RUN",
                        help="teacher run directories (train-teacher outputs)")
    parser.add_argument("--ensembles", nargs="*", default=[], type=Path, metavar="DIR",
                        help="ensemble directories (build-ensemble outputs)")
    parser.add_argument("--students", nargs="*", default=[], type=Path, metavar="RUN",
                        help="student run directories (distill outputs, single-teacher controls included)")
    parser.add_argument("--splits", nargs="*", default=[], type=Path, metavar="SPLIT",
                        help="prepared split directories (for the dataset table)")
    parser.add_argument("--cost", nargs="*", default=[], type=Path, metavar="DIR",
                        help="cost directories (hetcomp cost outputs)")
    parser.add_argument("--tuning", nargs="*", default=[], type=Path, metavar="DIR",
                        help="tuning folders (hetcomp tune outputs)")
    parser.add_argument("--out", required=True, type=Path, help="output long CSV")
    parser.add_argument("--extras", type=Path,
                        help="output folder for history/datasets/cost/discrepancy/tuning CSVs")


def run(args) -> int:
    if not (args.teachers or args.ensembles or args.students):
        raise HetCompError("no runs given (--teachers, --ensembles, --students)")
    from hetcomp.report.aggregate import EXTRAS, aggregate  # pandas: imported only when needed

    frames = aggregate(teachers=args.teachers, ensembles=args.ensembles, students=args.students,
                       splits=args.splits, cost=args.cost, tuning=args.tuning)
    atomic_write_text(args.out, frames["long"].to_csv(index=False))
    if args.extras:
        with atomic_output_dir(args.extras) as tmp:
            for name in EXTRAS:
                frames[name].to_csv(tmp / f"{name}.csv", index=False)
    long = frames["long"]
    print(f"{long.drop_duplicates(['kind', 'dataset', 'method', 'teacher', 'seed']).shape[0]} runs, "
          f"{len(long)} rows -> {args.out}")
    return 0
