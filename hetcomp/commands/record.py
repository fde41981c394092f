"""``hetcomp record``: copy the small records of finished runs into the reference folder."""

from __future__ import annotations

from pathlib import Path

from hetcomp.errors import HetCompError

HELP = "record every finished run of a work folder (metrics, history, per-user metrics) as reference"


def add_arguments(parser):
    parser.add_argument("--work", type=Path, default=Path("work"), help="the workflow's work folder")
    parser.add_argument("--out", type=Path, default=Path("results/reference"),
                        help="the reference folder (records are added, never overwritten)")


def run(args) -> int:
    from hetcomp.reference import record_all

    if not args.work.is_dir():
        raise HetCompError(f"{args.work}: no such work folder")
    written = record_all(args.work, args.out)
    for relative, size in written:
        print(f"{size / 1024:7.1f} KB  {args.out / relative}")
    total = sum(size for _, size in written)
    print(f"{len(written)} new record(s), {total / 1024:.1f} KB -> {args.out}")
    return 0
