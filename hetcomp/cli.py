"""The ``hetcomp`` command line: one subcommand per stage of the pipeline.

Each subcommand lives in ``hetcomp/commands/<name>.py`` and defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Errors of type ``HetCompError`` become
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hetcomp import __version__
from hetcomp.errors import HetCompError

COMMAND_MODULES = [
    "list_registered",
    "prepare",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetcomp",
        description="Knowledge distillation from heterogeneous teachers for top-K recommendation "
                    "(HetComp, WWW 2023) and its KD baselines.",
    )
    parser.add_argument("--version", action="version", version=f"hetcomp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(f"hetcomp.commands.{module_name}")
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
