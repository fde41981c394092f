"""The ``hetcomp`` command line: one subcommand per stage of the pipeline.

Each subcommand lives in a module of ``hetcomp/commands/`` (see ``COMMANDS``) that defines
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; only the invoked one is imported. Errors of type ``HetCompError`` become
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hetcomp import __version__
from hetcomp.errors import HetCompError

#: Subcommand name -> module in ``hetcomp.commands``.
COMMANDS = {
    "list": "list_registered",
    "prepare": "prepare",
    "train-teacher": "train_teacher",
    "build-ensemble": "build_ensemble",
    "distill": "distill",
    "tune": "tune",
    "cost": "cost",
    "aggregate": "aggregate",
    "report": "report",
    "record": "record",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one with just that subcommand, to skip other imports."""
    parser = argparse.ArgumentParser(
        prog="hetcomp",
        description="Knowledge distillation from heterogeneous teachers for top-K recommendation "
                    "(HetComp, WWW 2023) and its KD baselines.",
    )
    parser.add_argument("--version", action="version", version=f"hetcomp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            continue
        module = importlib.import_module(f"hetcomp.commands.{module_name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except HetCompError as exc:
        print(f"hetcomp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hetcomp {args.command}: interrupted", file=sys.stderr)
        return 130
