"""Strict configs: YAML numbers, unknown keys, per-dataset overrides."""

import pytest

from hetcomp.config import check_keys, config_hash, load_yaml, merge_defaults, resolve_overrides
from hetcomp.errors import HetCompError


def test_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nepochs: 10\nwd: 1.0e-5\nname: mf\n")
    assert load_yaml(path) == {"lr": 0.001, "epochs": 10, "wd": 1e-5, "name": "mf"}


def test_invalid_yaml_and_non_mapping_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(HetCompError, match="invalid YAML"):
        load_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(HetCompError, match="mapping"):
        load_yaml(bad)


def test_unknown_keys_are_named():
    with pytest.raises(HetCompError, match="unknown key\\(s\\) lrr"):
        check_keys({"lrr": 1}, {"lr"}, "method.yaml")
    with pytest.raises(HetCompError, match="unknown key"):
        merge_defaults({"lr": 1}, {"lr": 2, "x": 3}, "here")


def test_dataset_overrides_merge_over_defaults():
    config = {"lr": 0.1, "dim": 64, "datasets": {"gowalla": {"dim": 32}}}
    assert resolve_overrides(config, "gowalla") == {"lr": 0.1, "dim": 32}
    assert resolve_overrides(config, "ml-1m") == {"lr": 0.1, "dim": 64}
    with pytest.raises(HetCompError, match="unknown key"):
        resolve_overrides({"lr": 0.1, "datasets": {"x": {"typo": 1}}}, "x")


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
