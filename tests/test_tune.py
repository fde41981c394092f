"""Validation tuning of the baselines: the `tune` grid of a method YAML, `hetcomp tune`, `distill --tuned`,
the tuning tables and the workflow's tune jobs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hetcomp import REPO_ROOT
from hetcomp.cli import main
from hetcomp.data.store import save_split
from hetcomp.distill.runner import resolve_method_config
from hetcomp.errors import HetCompError
from hetcomp.registry import METHODS, load_all
from hetcomp.report import tables as T
from hetcomp.tuning import GRID_METRICS, TEST_COLUMNS, read_tunings, select_point, write_tuning

SNAKEMAKE = Path(sys.executable).with_name("snakemake")


@pytest.fixture
def rrd():
    load_all()
    return METHODS.get("rrd")


# ------------------------------------------------------------------------------------ the grid
def test_grid_points_in_order_and_not_passed_to_the_method(rrd):
    config = {"lambda": 0.5, "tune": {"lambda": [1e-3, 1e-2, 1e-1], "n_uninteresting": [40, 100]}}
    resolved = resolve_method_config(rrd, config, "rrd.yaml")
    assert resolved.method["lambda"] == 0.5 and "tune" not in resolved.effective()
    assert resolved.grid[:3] == [{"lambda": 1e-3, "n_uninteresting": 40}, {"lambda": 1e-3, "n_uninteresting": 100},
                                 {"lambda": 1e-2, "n_uninteresting": 40}]
    assert len(resolved.grid) == 6
    assert resolve_method_config(rrd, {"tune": {"lr": [0.01]}}, "x").grid == [{"lr": 0.01}]  # loop keys too


@pytest.mark.parametrize("tune,message", [
    ({"lambda": [1, 2, 3], "n_uninteresting": [1, 2, 3]}, "3 x 3 = 9 points; at most 6"),
    ({"bogus": [1, 2]}, "unknown key(s) bogus"),
    ({"student_dim": [4, 8]}, "unknown key(s) student_dim"),       # the student's size is not tuned
    ({"lambda": 0.1}, "tune.lambda must be a non-empty list"),
    ({"lambda": []}, "tune.lambda must be a non-empty list"),
    ([0.1, 0.2], "tune must be a mapping"),
    ({"lambda": ["abc"]}, "lambda must be a number"),
])
def test_bad_grids_are_one_line_errors(rrd, tune, message):
    with pytest.raises(HetCompError) as caught:
        resolve_method_config(rrd, {"tune": tune}, "rrd.yaml")
    assert message in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------------------- the selection
def _row(point, valid, test):
    return {"point": point, "lambda": [0.1, 0.2, 0.3][point], GRID_METRICS[0]: valid, GRID_METRICS[1]: valid / 2,
            "best_epoch": 10, "train_time_s": 1.0, "chosen": False, TEST_COLUMNS[0]: test, TEST_COLUMNS[1]: test}


def test_choice_reads_validation_never_test(tmp_path):
    grid = [{"lambda": 0.1}, {"lambda": 0.2}, {"lambda": 0.3}]
    rows = [_row(0, 0.20, 0.50), _row(1, 0.30, 0.10), _row(2, 0.25, 0.40)]   # test prefers point 0
    assert write_tuning(tmp_path / "t", rows, grid, {"seed": 3}) == {"lambda": 0.2}
    assert yaml.safe_load((tmp_path / "t" / "chosen.yaml").read_text()) == {"lambda": 0.2}
    frame = pd.read_csv(tmp_path / "t" / "grid.csv")
    assert frame["chosen"].tolist() == [False, True, False] and frame["lambda"].tolist() == [0.1, 0.2, 0.3]
    info = json.loads((tmp_path / "t" / "tune_info.json").read_text())
    assert info["chosen"] == {"lambda": 0.2} and info["chosen_point"] == 1 and info["seed"] == 3
    # a tie goes to the first point in grid order; a point without a number never wins
    assert select_point([_row(0, 0.3, 0), _row(1, 0.3, 1)]) == 0
    assert select_point([_row(0, float("nan"), 1), _row(1, 0.0, 0)]) == 1


# --------------------------------------------------------------------------- the command line
@pytest.fixture
def workspace(tmp_path, tiny_split, one_thread):
    save_split(tiny_split, tmp_path / "split")
    base = {"max_epochs": 2, "eval_every": 1, "student_dim": 4, "batch_size": 256, "lr": 0.01, "datasets": {}}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "wokd.yaml").write_text(yaml.safe_dump({**base, "tune": {"lr": [1.0e-4, 5.0e-2]}}))
    return tmp_path


def _cli(ws, command, out, config="wokd.yaml", *extra):
    return main([command, "--method", "wokd", "--split", str(ws / "split"), "--config", str(ws / config),
                 "--seed", "1", "--device", "cpu", "--out", str(ws / out), *extra])


def test_tune_then_distill_tuned(workspace, capsys):
    ws = workspace
    assert _cli(ws, "tune", "tuning") == 0
    tuning = ws / "tuning"
    assert {p.name for p in tuning.iterdir()} == {"chosen.yaml", "grid.csv", "tune_info.json", "best_run"}
    grid = pd.read_csv(tuning / "grid.csv")
    assert grid["lr"].tolist() == [1e-4, 5e-2] and grid["point"].tolist() == [0, 1]
    assert set(GRID_METRICS + TEST_COLUMNS + ["best_epoch", "train_time_s", "chosen"]) <= set(grid.columns)
    best = grid[GRID_METRICS[0]].idxmax()
    chosen = yaml.safe_load((tuning / "chosen.yaml").read_text())
    assert chosen == {"lr": grid["lr"][best]} and grid["chosen"].tolist() == [i == best for i in range(2)]
    info = json.loads((tuning / "tune_info.json").read_text())
    assert info["seed"] == 1 and info["device"] == "cpu" and info["config_hash"] and info["versions"]["torch"]
    assert info["dataset"] == "tiny" and info["grid"] == [{"lr": 1e-4}, {"lr": 5e-2}] and info["wall_time_s"] > 0

    # the tuning seed: the chosen point's run is reused, not trained again
    assert _cli(ws, "distill", "run", "wokd.yaml", "--tuned", str(tuning)) == 0
    run_info = json.loads((ws / "run" / "run_info.json").read_text())
    assert run_info["tuned"] == chosen and run_info["config"]["lr"] == chosen["lr"] and "tune" not in run_info["config"]
    assert run_info["reused_from"] == str(tuning / "best_run")
    assert (ws / "run" / "student.pt").read_bytes() == (tuning / "best_run" / "student.pt").read_bytes()
    # ... and it is the run `distill --tuned` trains: same code path and seed, same numbers
    shutil.rmtree(tuning / "best_run")
    assert _cli(ws, "distill", "trained", "wokd.yaml", "--tuned", str(tuning)) == 0
    trained = json.loads((ws / "trained" / "run_info.json").read_text())
    assert "reused_from" not in trained and trained["config_hash"] == run_info["config_hash"]
    for run in ("run", "trained"):
        metrics = json.loads((ws / run / "metrics.json").read_text())
        assert metrics["valid"]["recall@50"] == grid[GRID_METRICS[0]][best]
    assert (json.loads((ws / "run" / "metrics.json").read_text())["test"]
            == json.loads((ws / "trained" / "metrics.json").read_text())["test"])
    assert _cli(ws, "distill", "untuned", "wokd.yaml") == 0                  # the YAML's own values
    run_info = json.loads((ws / "untuned" / "run_info.json").read_text())
    assert run_info["tuned"] is None and run_info["config"]["lr"] == 0.01

    # the tables: the grid with its validation numbers and the setting of the row
    frame = read_tunings([tuning])
    assert frame["method"].tolist() == ["wokd", "wokd"] and frame["chosen"].sum() == 1
    text = T.tuning_markdown(frame)
    assert "w/o KD on tiny (seed 1)" in text
    assert "**chosen**" in text and "lr=0.05" in text and "lr=0.0001" in text
    assert f"lr={chosen['lr']:g}" in T.settings_note(frame[frame["chosen"]])
    assert "no validation tuning" in T.settings_note(pd.DataFrame())
    capsys.readouterr()

    # errors: no grid to tune; a setting of another grid; --tuned for a YAML without a grid
    assert _cli(ws, "tune", "none", "plain.yaml") == 2
    assert "no `tune` grid" in capsys.readouterr().err
    (ws / "other.yaml").write_text("lr: 0.3\n")
    assert _cli(ws, "distill", "bad", "wokd.yaml", "--tuned", str(ws / "other.yaml")) == 2
    assert "is not a point of the tune grid" in capsys.readouterr().err
    assert _cli(ws, "distill", "bad", "plain.yaml", "--tuned", str(tuning)) == 2
    assert "has no tune grid" in capsys.readouterr().err
    assert not (ws / "bad").exists() and not (ws / "none").exists()


def test_interrupted_tune_resumes_with_the_unfinished_points(workspace, monkeypatch):
    import hetcomp.commands.tune as tune_command

    real, calls = tune_command.run_distillation, []

    def failing_second(*args, **kwargs):
        calls.append(args[3]["lr"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_command, "run_distillation", failing_second)
    assert _cli(workspace, "tune", "tuning") == 130
    assert not (workspace / "tuning").exists() and (workspace / "tuning.partial" / "point0.done.pt").is_file()
    calls.clear()
    monkeypatch.setattr(tune_command, "run_distillation", lambda *a, **k: calls.append(a[3]["lr"]) or real(*a, **k))
    assert _cli(workspace, "tune", "tuning") == 0
    assert calls == [5e-2] and not (workspace / "tuning.partial").exists()
    assert len(pd.read_csv(workspace / "tuning" / "grid.csv")) == 2


def test_points_trained_one_by_one_then_chosen(workspace, monkeypatch, capsys):
    """`--point N` trains that point only (any order, as parallel jobs would); the command without
    it then trains nothing and chooses as a one-shot tune does."""
    import hetcomp.commands.tune as tune_command

    real, calls = tune_command.run_distillation, []
    monkeypatch.setattr(tune_command, "run_distillation", lambda *a, **k: calls.append(a[3]["lr"]) or real(*a, **k))
    for index in (1, 0):
        assert _cli(workspace, "tune", "tuning", "wokd.yaml", "--point", str(index)) == 0
        assert not (workspace / "tuning").exists()
    assert calls == [5e-2, 1e-4]
    assert _cli(workspace, "tune", "tuning") == 0
    assert calls == [5e-2, 1e-4] and not (workspace / "tuning.partial").exists()
    assert _cli(workspace, "tune", "oneshot") == 0
    by_points, oneshot = (pd.read_csv(workspace / out / "grid.csv").drop(columns="train_time_s")
                          for out in ("tuning", "oneshot"))
    pd.testing.assert_frame_equal(by_points, oneshot)
    capsys.readouterr()
    assert _cli(workspace, "tune", "bad", "wokd.yaml", "--point", "2") == 2
    assert "--point 2 is not a point of its 2-point grid" in capsys.readouterr().err
    assert not (workspace / "bad").exists() and not (workspace / "bad.partial").exists()


# ------------------------------------------------------------------------------- the workflow
@pytest.mark.skipif(not SNAKEMAKE.is_file(), reason=f"snakemake not installed next to {sys.executable}")
def test_workflow_tunes_methods_with_a_grid(tmp_path):
    methods = tmp_path / "methods"
    shutil.copytree(REPO_ROOT / ".test" / "methods", methods)
    for name in ("rrd", "dcd"):  # the tiny config's own grids off: RRD gets the one below, DCD none
        path = methods / f"{name}.yaml"
        config = yaml.safe_load(path.read_text())
        del config["tune"]
        path.write_text(yaml.safe_dump(config))
    rrd_yaml = methods / "rrd.yaml"
    rrd_yaml.write_text(rrd_yaml.read_text() + "tune:\n  lambda: [1.0e-3, 1.0e-2]\n")
    assert "tune" not in yaml.safe_load((methods / "dcd.yaml").read_text())

    def dry_run(*extra_configs):
        layered = tmp_path / "layer.yaml"
        layered.write_text(yaml.safe_dump({"method_configs": str(methods), "workdir": str(tmp_path / "work"),
                                           "results_dir": str(tmp_path / "results")}))
        result = subprocess.run([str(SNAKEMAKE), "-n", "-p", "--configfile", ".test/config.yaml", str(layered),
                                 *extra_configs], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
        return result.stdout + result.stderr

    out = dry_run()
    tuning = f"{tmp_path}/work/tuning/tiny/rrd"
    # one job per grid point, then one that chooses
    assert re.search(r"^tune\s+1$", out, re.MULTILINE) and re.search(r"^tune_point\s+2$", out, re.MULTILINE)
    assert out.count("hetcomp tune --method rrd") == 3 and "hetcomp tune --method dcd" not in out
    for index in (0, 1):
        assert f"--seed 0 --device cpu --out {tuning} --point {index} " in out
    assert f"--seed 0 --device cpu --out {tuning} >" in out
    # the rrd run and its two single-teacher controls (.test/config.yaml) train the chosen point
    assert out.count(f"--tuned {tuning}") == 3 and out.count("--tuned") == 3
    assert f"--tuning {tuning}" in out                                          # the aggregate reads the grid

    disabled = tmp_path / "disabled.yaml"
    disabled.write_text("tune: {enabled: false}\n")
    out = dry_run(str(disabled))
    assert "hetcomp tune" not in out and "--tuned" not in out
