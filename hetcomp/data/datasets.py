"""Dataset configs (``config/datasets/*.yaml``): strict validation and preparation of the split.

A dataset YAML has the keys

- ``description``: free text;
- ``sources``: a list of ``{path[, url][, sha256][, part]}``; ``path`` is relative to the data
  directory, ``url`` is where a missing file is downloaded from, ``sha256`` its published
  checksum (both optional for files of your own), ``part`` (train/valid/test) says which
  published part the file holds;
- ``reader``: ``{name, options}`` (see ``hetcomp.data.readers``);
- ``filters``: ``{min_user_interactions}``;
- ``split``: ``{method: random, test_ratio, valid_ratio, seed}``,
  ``{method: temporal, test_ratio, valid_ratio}`` or ``{method: published}``.

docs/DATASETS.md describes every key and reader option with a worked example.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from hetcomp import CONFIG_DIR
from hetcomp.config import check_keys, load_yaml
from hetcomp.data.fetch import ensure_source
from hetcomp.data.readers import check_options, read
from hetcomp.data.splitting import PART_CODES, split_interactions
from hetcomp.data.store import Split
from hetcomp.errors import HetCompError

DATASET_DIR = CONFIG_DIR / "datasets"
TOP_KEYS = {"description", "sources", "reader", "filters", "split"}
SOURCE_KEYS = {"path", "sha256", "url", "part"}
READER_KEYS = {"name", "options"}
FILTER_KEYS = {"min_user_interactions"}
SPLIT_KEYS = {"random": {"method", "test_ratio", "valid_ratio", "seed"},
              "temporal": {"method", "test_ratio", "valid_ratio"},
              "published": {"method"}}
DEFAULT_SPLIT = {"method": "random", "test_ratio": 0.2, "valid_ratio": 0.2, "seed": 0}
log = logging.getLogger(__name__)


def dataset_names() -> list[str]:
    """The names of the shipped dataset configs."""
    return sorted(path.stem for path in DATASET_DIR.glob("*.yaml"))


def load_dataset_config(name_or_path: str | Path, split_method: str | None = None) -> dict:
    """Load and validate a shipped dataset (by name) or a dataset YAML file (by path).

    ``split_method`` overrides the file's split rule: ``random`` (the default ratios and seed)
    or ``published``. The result carries the dataset's ``name`` (the file stem) and every
    default filled in.
    """
    if str(name_or_path) in dataset_names():
        path = DATASET_DIR / f"{name_or_path}.yaml"
    elif Path(name_or_path).suffix in (".yaml", ".yml"):
        path = Path(name_or_path)
    else:
        raise HetCompError(f"unknown dataset {str(name_or_path)!r}; known: "
                           f"{', '.join(dataset_names())} (or pass a dataset YAML file)")
    config = load_yaml(path)
    current = config.get("split", DEFAULT_SPLIT)
    if split_method and not (isinstance(current, dict) and current.get("method") == split_method):
        config["split"] = dict(DEFAULT_SPLIT) if split_method == "random" else {"method": split_method}
    validate_dataset_config(config, str(path))
    config.setdefault("filters", {}).setdefault("min_user_interactions", 0)
    config.setdefault("split", dict(DEFAULT_SPLIT))
    config["reader"].setdefault("options", {})
    return {"name": path.stem, **config}


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise HetCompError(f"{where}: {message}")


def validate_dataset_config(config: dict, where: str) -> None:
    """Check keys and values of a dataset config; ``where`` (the file) prefixes every error."""
    check_keys(config, TOP_KEYS, where)
    for key in ("sources", "reader"):
        _require(key in config, where, f"missing key {key}")

    sources = config["sources"]
    _require(isinstance(sources, list) and sources, where, "sources must be a non-empty list")
    for index, source in enumerate(sources):
        at = f"{where}: sources[{index}]"
        _require(isinstance(source, dict), at, "expected a mapping")
        check_keys(source, SOURCE_KEYS, at)
        _require(isinstance(source.get("path"), str), at, "missing or non-text path")
        for key in ("sha256", "url"):
            _require(source.get(key) is None or isinstance(source[key], str), at, f"{key} must be text")
        relative = Path(source["path"])
        _require(not relative.is_absolute() and ".." not in relative.parts, at,
                 "path must be relative to the data directory")
        _require(source.get("sha256") is None or bool(re.fullmatch(r"[0-9a-f]{64}", source["sha256"])),
                 at, "sha256 must be 64 lowercase hex digits")
        _require(source.get("part", "train") in PART_CODES, at,
                 f"part must be one of {', '.join(PART_CODES)}")

    reader = config["reader"]
    _require(isinstance(reader, dict) and "name" in reader, where, "reader needs a name")
    check_keys(reader, READER_KEYS, f"{where}: reader")
    _require(isinstance(reader.get("options", {}), dict), where, "reader options must be a mapping")
    try:
        check_options(reader["name"], reader.get("options", {}))
    except HetCompError as exc:
        raise HetCompError(f"{where}: {exc}") from None

    filters = config.get("filters", {})
    _require(isinstance(filters, dict), where, "filters must be a mapping")
    check_keys(filters, FILTER_KEYS, f"{where}: filters")
    minimum = filters.get("min_user_interactions", 0)
    _require(isinstance(minimum, int) and minimum >= 0, where,
             "filters.min_user_interactions must be a non-negative integer")

    split = config.get("split", DEFAULT_SPLIT)
    _require(isinstance(split, dict) and split.get("method") in SPLIT_KEYS, where,
             f"split.method must be one of {', '.join(SPLIT_KEYS)}")
    check_keys(split, SPLIT_KEYS[split["method"]], f"{where}: split")
    has_time = reader.get("options", {}).get("timestamp_col") is not None
    if split["method"] == "temporal":
        _require(has_time, where, "a temporal split needs reader 'interactions' with option timestamp_col")
    else:
        _require(not has_time, where, "reader option timestamp_col is used only by the temporal split; "
                 "remove it or set split: {method: temporal, test_ratio: ..., valid_ratio: ...}")
    if split["method"] in ("random", "temporal"):
        needs = {"random": "test_ratio, valid_ratio and seed", "temporal": "test_ratio and valid_ratio"}
        _require(set(split) == SPLIT_KEYS[split["method"]], where,
                 f"a {split['method']} split needs {needs[split['method']]}")
        ratios_ok = all(isinstance(split[k], (int, float)) and 0 <= split[k] < 1
                        for k in ("test_ratio", "valid_ratio"))
        _require(ratios_ok and split["test_ratio"] + split["valid_ratio"] < 1, where,
                 "split ratios must be in [0, 1) and sum to less than 1")
        _require(isinstance(split.get("seed", 0), int), where, "split.seed must be an integer")
    else:
        given = {source.get("part") for source in sources}
        _require(given == set(PART_CODES), where,
                 "a published split needs sources with part train, valid and test (and no others)")


def prepare_split(config: dict, data_dir: str | Path) -> Split:
    """Read a validated dataset's sources from ``data_dir`` (downloading missing ones) and split.

    ``Split.meta`` holds the counts plus everything needed to redo the split: dataset,
    filters, split rule and seed, reader, and the checksums of the inputs. Text ids (the
    generic reader) are mapped to integers over all files together; merged duplicate rows
    and mapped ids are logged.
    """
    data_dir = Path(data_dir)
    sources = config["sources"]
    if config["split"]["method"] == "published":  # first appearance over train, valid, test
        sources = sorted(sources, key=lambda source: PART_CODES[source["part"]])
    inputs, users, items, parts, times = {}, [], [], [], []
    for source in sources:
        inputs[source["path"]] = ensure_source(data_dir, source["path"], source.get("sha256"),
                                               source.get("url"))
        pairs = read(config["reader"]["name"], data_dir / source["path"],
                     config["reader"]["options"])
        users.append(pairs.users)
        items.append(pairs.items)
        parts.append(np.full(len(pairs), PART_CODES[source.get("part", "train")], dtype=np.int8))
        times.append(pairs.timestamps)
    users, items = _joined_ids(users, "user", config["name"]), _joined_ids(items, "item", config["name"])
    split = split_interactions(users, items, np.concatenate(parts), split=config["split"],
                               min_user_interactions=config["filters"]["min_user_interactions"],
                               timestamps=None if any(t is None for t in times) else np.concatenate(times))
    duplicates = split.meta["raw"]["n_duplicates"]
    if duplicates:
        log.info("%s: merged %d duplicate (user, item) rows (the first occurrence is kept)",
                 config["name"], duplicates)
    split.meta = {
        "dataset": config["name"],
        "description": config.get("description", ""),
        **split.meta,
        "filters": config["filters"],
        "split": config["split"],
        "reader": config["reader"],
        "inputs": inputs,
    }
    return split


def _joined_ids(arrays: list[np.ndarray], what: str, dataset: str) -> np.ndarray:
    """The ids of every file in one array; text ids anywhere make every id text (logged)."""
    if all(array.dtype != object for array in arrays):
        return np.concatenate(arrays)
    log.info("%s: %s ids are text; mapped to 0, 1, ... in order of first appearance "
             "(%s_ids.tsv in the split keeps the originals)", dataset, what, what)
    return np.concatenate([array.astype(str).astype(object) for array in arrays])
