"""Strict YAML configs: unknown keys are errors, per-dataset overrides are merged in."""

from __future__ import annotations

import copy
import hashlib
import json
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


def config_hash(config: Mapping) -> str:
    """A short stable hash of a JSON-serialisable config."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
