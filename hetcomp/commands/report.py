"""``hetcomp report``: the tables (Markdown, LaTeX) and figures (PNG) from ``hetcomp aggregate``'s output.

Tables (``--tables-dir``): ``main.md``, ``main.tex``, ``teachers.md``, ``cost.md``, ``datasets.md``,
``paper_comparison.md``, ``tuning.md``, ``ablation.md``, ``per_seed.md`` (``hetcomp.report.tables``),
``claims.md`` (``hetcomp.report.claims``), ``reproduction.md`` (``hetcomp.report.reproduction``: your numbers
against ``--reference-long``; not compared when that is the table being reported). Figures (``--figures-dir``):
``hetcomp.report.figures.FIGURES``. Each file is written atomically.

The heavy imports (pandas, scipy, seaborn) happen inside ``run``: every ``hetcomp`` call builds
the parser of every subcommand, so module-level imports here would slow down all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hetcomp.errors import HetCompError
from hetcomp.io import atomic_write_text

log = logging.getLogger(__name__)

HELP = "build the tables (Markdown, LaTeX) and figures (PNG) from the long CSV of `hetcomp aggregate`"

TABLES = ("main.md", "main.tex", "teachers.md", "cost.md", "datasets.md", "paper_comparison.md", "tuning.md",
          "claims.md", "ablation.md", "per_seed.md", "reproduction.md")


def add_arguments(parser):
    parser.add_argument("--long", required=True, type=Path, help="long CSV (hetcomp aggregate --out)")
    parser.add_argument("--extras", type=Path, help="extras folder (hetcomp aggregate --extras)")
    parser.add_argument("--paper", type=Path, help="published numbers: CSV dataset,method,metric,k,value")
    parser.add_argument("--reference-long", type=Path,
                        help="the reference results' long CSV, for reproduction.md (omit: nothing compared)")
    parser.add_argument("--tables-dir", type=Path, help="write the tables here")
    parser.add_argument("--figures-dir", type=Path, help="write the figures here")
    parser.add_argument("--ks", nargs="+", type=int, default=[10, 20, 50], help="K columns (default 10 20 50)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--methods", nargs="*", default=[], help="method order of the main table")
    parser.add_argument("--teachers", nargs="*", default=[], help="teacher order of the tables and figures")
    parser.add_argument("--datasets", nargs="*", default=[],
                        help="dataset order of the tables and figures (others follow, by name)")


def write_tables(long, extras, out_dir: Path, *, ks, alpha, methods, teachers, paper_path,
                 reference_long=None) -> list[Path]:
    from hetcomp.report import tables as T  # scipy.stats: imported only when needed
    from hetcomp.report.claims import claims_markdown
    from hetcomp.report.reproduction import reproduction_markdown

    out_dir = Path(out_dir)
    table = T.main_table(long, ks, methods, alpha, tuning=extras.get("tuning"))
    texts = {
        "main.md": T.main_markdown(table),
        "main.tex": T.main_latex(table),
        "teachers.md": T.teachers_markdown(long, ks, teachers),
        "cost.md": T.cost_markdown(extras.get("cost")),
        "datasets.md": T.datasets_markdown(extras.get("datasets")),
        "paper_comparison.md": T.paper_markdown(long, T.read_paper_results(paper_path), ks, methods, teachers),
        "tuning.md": T.tuning_markdown(extras.get("tuning")),
        "claims.md": claims_markdown(long, extras, ks, alpha),
        "ablation.md": T.ablation_markdown(long, ks),
        "per_seed.md": T.per_seed_markdown(long, ks, methods, teachers),
        "reproduction.md": reproduction_markdown(long, reference_long, ks),
    }
    for name, text in texts.items():
        atomic_write_text(out_dir / name, text)
    return [out_dir / name for name in TABLES]


def in_dataset_order(long, datasets):
    """The long table's rows with the given datasets first, in that order (the tables and figures
    list datasets in order of appearance); the other datasets follow in their own order."""
    rank = {name: i for i, name in enumerate(datasets)}
    return long.sort_values("dataset", key=lambda column: column.map(lambda d: rank.get(d, len(rank))),
                            kind="stable").reset_index(drop=True)


def run(args) -> int:
    if not (args.tables_dir or args.figures_dir):
        raise HetCompError("nothing to do: give --tables-dir and/or --figures-dir")
    if not 0 < args.alpha < 1:
        raise HetCompError(f"--alpha must be in (0, 1), got {args.alpha}")
    from hetcomp.report.aggregate import read_extras, read_long

    long = in_dataset_order(read_long(args.long), args.datasets)
    extras = read_extras(args.extras) if args.extras else {}
    written = []
    if args.tables_dir:
        reference = None
        if args.reference_long is not None and args.reference_long.resolve() != args.long.resolve():
            reference = read_long(args.reference_long)
        written += write_tables(long, extras, args.tables_dir, ks=args.ks, alpha=args.alpha,
                                methods=args.methods, teachers=args.teachers, paper_path=args.paper,
                                reference_long=reference)
    if args.figures_dir:
        from hetcomp.report.figures import write_figures

        written += write_figures(long, extras, args.figures_dir, methods=args.methods, teachers=args.teachers)
    for path in written:
        print(path)
    return 0
