"""``hetcomp prepare``: raw files -> the frozen split of one dataset (matrices, meta.json, id maps)."""

import logging

from hetcomp.data.datasets import load_dataset_config, prepare_split
from hetcomp.data.fetch import resolve_data_dir
from hetcomp.data.store import save_split
from hetcomp.io import atomic_output_dir

HELP = "read a dataset's raw files, filter and split them, and write the frozen split"
log = logging.getLogger(__name__)


def add_arguments(parser):
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--dataset", help="name of a shipped dataset (see `hetcomp list`)")
    which.add_argument("--config", help="a dataset YAML file of your own")
    parser.add_argument("--data-dir", help="folder of the raw files (default: $HETCOMP_DATA_DIR, "
                                           "else $XDG_CACHE_HOME/hetcomp/data, i.e. ~/.cache/hetcomp/data); "
                                           "missing files are downloaded there unless HETCOMP_OFFLINE=1")
    parser.add_argument("--out", required=True, help="output folder of the split")
    parser.add_argument("--split-method", choices=["random", "published"],
                        help="override the config's split rule: the paper's random rule with "
                             "default ratios and seed, or the files' own train/valid/test")


def summary(meta: dict) -> str:
    """One line with the counts of a prepared split."""
    return (f"{meta['dataset']}: {meta['n_users']:,} users, {meta['n_items']:,} items, "
            f"{meta['n_interactions']:,} interactions; {meta['n_train']:,} train, "
            f"{meta['n_valid']:,} validation, {meta['n_test']:,} test; "
            f"{meta['n_eval_users']:,} evaluated users")


def run(args):
    config = load_dataset_config(args.dataset or args.config, split_method=args.split_method)
    data_dir = resolve_data_dir(args.data_dir)
    log.info("preparing %s from %s", config["name"], data_dir)
    split = prepare_split(config, data_dir)
    with atomic_output_dir(args.out) as tmp:
        save_split(split, tmp)
    print(summary(split.meta))
    return 0
