"""``--set KEY=VALUE`` on ``train-teacher`` and ``distill``: values read as YAML, over the YAML's."""

import json

import pytest

from hetcomp.cli import main
from hetcomp.config import apply_set
from hetcomp.data.store import save_split
from hetcomp.errors import HetCompError


def test_apply_set_reads_values_as_yaml_and_leaves_the_input_alone():
    config = {"max_epochs": 1000, "lr": 0.1, "rank_prefixes": [5]}
    got = apply_set(config, ["max_epochs=5", "lr=1e-3", "rank_prefixes=[5, 2]", "name=x=y"])
    assert got == {"max_epochs": 5, "lr": 0.001, "rank_prefixes": [5, 2], "name": "x=y"}
    assert config["max_epochs"] == 1000 and apply_set(config, None) == config


@pytest.mark.parametrize("pair, message", [("max_epochs", "expected KEY=VALUE"), ("=5", "expected KEY=VALUE"),
                                           ("lr=[1", "cannot read the value as YAML")])
def test_apply_set_errors(pair, message):
    with pytest.raises(HetCompError, match=message):
        apply_set({}, [pair])


@pytest.mark.parametrize("command, config, name", [
    ("train-teacher", ".test/models/mf.yaml", ("--model", "mf")),
    ("distill", ".test/methods/wokd.yaml", ("--method", "wokd")),
])
def test_set_changes_the_run_and_unknown_keys_fail(command, config, name, tiny_split, tmp_path, capsys, one_thread):
    from hetcomp import REPO_ROOT

    save_split(tiny_split, tmp_path / "split")
    base = [command, *name, "--split", str(tmp_path / "split"), "--config", str(REPO_ROOT / config),
            "--seed", "0", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "run"), "--set", "max_epochs=1"]) == 0
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["config"]["max_epochs"] == 1  # the YAML says 3
    assert main([*base, "--out", str(tmp_path / "bad"), "--set", "max_epochz=1"]) == 2
    assert "unknown key(s) max_epochz" in capsys.readouterr().err
