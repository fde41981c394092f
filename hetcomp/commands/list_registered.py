"""``hetcomp list``: every registered dataset, model and method."""

from hetcomp.data.datasets import dataset_names
from hetcomp.registry import METHODS, MODELS, load_all

HELP = "print every registered dataset, model and method, one per line as 'KIND NAME'"


def add_arguments(parser):
    parser.add_argument("--kind", choices=["dataset", "model", "method"], help="only this kind")


def run(args):
    load_all()
    entries = {"dataset": dataset_names(), "model": MODELS.names(), "method": METHODS.names()}
    for kind, names in entries.items():
        if args.kind in (None, kind):
            for name in names:
                print(f"{kind} {name}")
    return 0
