"""Strict YAML configs: unknown keys are errors, per-dataset overrides are merged in."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from hetcomp.errors import HetCompError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path) as handle:
            data = yaml.load(handle, Loader=_Loader)
    except FileNotFoundError:
        raise HetCompError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise HetCompError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HetCompError(f"{path}: expected a mapping at the top level")
    return data


def check_keys(config: Mapping, allowed: set[str] | Mapping, where: str) -> None:
    """Fail with one line naming every key of ``config`` that ``allowed`` does not know."""
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise HetCompError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def resolve_overrides(config: Mapping, dataset: str | None) -> dict:
    """Merge ``config["datasets"][dataset]`` over the top-level keys and drop ``datasets``.

    Method and model YAMLs keep their defaults at the top level and per-dataset changes
    under ``datasets: {name: {key: value}}``.
    """
    merged = {k: copy.deepcopy(v) for k, v in config.items() if k != "datasets"}
    overrides = (config.get("datasets") or {}).get(dataset, {}) if dataset else {}
    check_keys(overrides, merged, f"override for dataset {dataset!r}")
    merged.update(copy.deepcopy(overrides))
    return merged


def merge_defaults(defaults: Mapping, given: Mapping, where: str) -> dict:
    """``defaults`` updated with ``given``; keys that ``defaults`` lacks are errors."""
    check_keys(given, defaults, where)
    merged = copy.deepcopy(dict(defaults))
    merged.update(copy.deepcopy(dict(given)))
    return merged


def coerce_number(value: Any, default: Any, key: str, where: str, nullable: bool = False) -> Any:
    """``value`` checked against (and converted to) the numeric type of ``default``.

    Non-numeric defaults pass ``value`` through; ``nullable`` lets ``None`` through.
    """
    if value is None and nullable:
        return None
    if isinstance(default, bool) or default is None or not isinstance(default, (int, float)):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise HetCompError(f"{where}: {key} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise HetCompError(f"{where}: {key} must be a number, got {value!r}") from None
    if isinstance(default, int):
        if not number.is_integer():
            raise HetCompError(f"{where}: {key} must be an integer, got {value!r}")
        return int(number)
    return number


#: Top-level key of a method YAML holding its validation grid (``hetcomp tune``).
TUNE_KEY = "tune"
#: The most points a ``tune`` grid may have (every point is one full training run).
MAX_TUNE_POINTS = 6


def split_tune(config: Mapping) -> tuple[dict, Any]:
    """``(config without the tune key, the tune value or None)``."""
    return {k: v for k, v in config.items() if k != TUNE_KEY}, config.get(TUNE_KEY)


def grid_points(tune: Any, allowed: set[str] | Mapping, where: str) -> list[dict]:
    """The points of a ``tune`` grid (``{key: [values]}``), in grid order.

    Grid order is the product of the value lists in the order the keys are written, the first
    key varying slowest. Keys must be in ``allowed``; at most ``MAX_TUNE_POINTS`` points.
    """
    if not isinstance(tune, Mapping) or not tune:
        raise HetCompError(f"{where}: {TUNE_KEY} must be a mapping key -> list of values, got {tune!r}")
    check_keys(tune, allowed, f"{where}: {TUNE_KEY}")
    for key, values in tune.items():
        if not isinstance(values, list) or not values:
            raise HetCompError(f"{where}: {TUNE_KEY}.{key} must be a non-empty list of values, got {values!r}")
    n_points = math.prod(len(values) for values in tune.values())
    if n_points > MAX_TUNE_POINTS:
        sizes = " x ".join(str(len(values)) for values in tune.values())
        raise HetCompError(f"{where}: {TUNE_KEY} has {sizes} = {n_points} points; at most {MAX_TUNE_POINTS}")
    keys = list(tune)
    return [dict(zip(keys, values)) for values in itertools.product(*(tune[k] for k in keys))]


def config_hash(config: Mapping) -> str:
    """A short stable hash of a JSON-serialisable config."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def apply_set(config: Mapping, pairs: list[str] | None) -> dict:
    """``config`` with ``--set KEY=VALUE`` overrides applied (command-line tweaks of a YAML).

    Values are read as YAML (``5``, ``1e-3``, ``true``, ``[1, 2]``, text). Keys are top-level
    keys; the caller's strict key check rejects unknown ones.
    """
    merged = copy.deepcopy(dict(config))
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise HetCompError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set max_epochs=5")
        try:
            merged[key.strip()] = yaml.load(text, Loader=_Loader) if text.strip() else None
        except yaml.YAMLError:
            raise HetCompError(f"--set {pair!r}: cannot read the value as YAML") from None
    return merged
