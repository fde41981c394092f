"""`hetcomp train-teacher` on a tiny split: outputs, determinism, config errors, atomicity."""

import json

import numpy as np
import pytest
import torch

from hetcomp.data.store import load_split, save_split
from hetcomp.evaluation import top_unobserved
from hetcomp.registry import MODELS
from hetcomp.trajectory import Trajectory, train_ranks

OUTPUTS = {"model.pt", "trajectory.npz", "metrics.json", "history.jsonl", "per_user.npz", "run_info.json"}


@pytest.fixture
def split_dir(tmp_path, tiny_split):
    path = tmp_path / "split"
    save_split(tiny_split, path)
    return path


CONFIG = """\
lr: 1e-2
max_epochs: 5
eval_every: 1
patience: 10
n_checkpoints: 3
top_n: 12
dim: 8
batch_size: 64
datasets:
  tiny: {dim: 4}
"""


def _write_config(tmp_path, text=CONFIG):
    path = tmp_path / "mf.yaml"
    path.write_text(text)
    return path


def _train(run_cli, split_dir, config, out, seed=0):
    return run_cli(["train-teacher", "--model", "mf", "--split", str(split_dir), "--config", str(config),
                    "--seed", str(seed), "--out", str(out), "--device", "cpu"])


def test_train_teacher_writes_a_consistent_run(tmp_path, split_dir, run_cli):
    out = tmp_path / "run"
    assert _train(run_cli, split_dir, _write_config(tmp_path), out) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS
    split = load_split(split_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    assert info["config"]["model"] == "mf" and info["config"]["dim"] == 4  # dataset override applied
    assert info["config"]["lr"] == pytest.approx(1e-2) and info["seed"] == 0
    assert metrics["n_parameters"] == (split.n_users + split.n_items) * 4
    assert len((out / "history.jsonl").read_text().splitlines()) == 5

    trajectory = Trajectory.load(out / "trajectory.npz")
    assert trajectory.topn.shape == (3, split.n_users, 12)
    assert trajectory.epochs[-1] == metrics["best_epoch"]
    assert (np.diff(trajectory.epochs) >= 0).all()
    assert metrics["trajectory"]["epochs"] == trajectory.epochs.tolist()
    dense_train = split.train.toarray() > 0
    assert not np.take_along_axis(dense_train[None].repeat(3, 0), trajectory.topn, 2).any()

    # the last checkpoint and train_rank are those of the saved (best) model
    model = MODELS.get("mf")(split.n_users, split.n_items, dim=4)
    model.load_state_dict(torch.load(out / "model.pt"))
    model.eval()
    assert (trajectory.topn[-1] == top_unobserved(model.score, split.train, 12)).all()
    assert trajectory.train_rank.tolist() == train_ranks(model.score, split.train).tolist()


def test_same_seed_same_trajectory(tmp_path, split_dir, run_cli):
    config = _write_config(tmp_path)
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert _train(run_cli, split_dir, config, tmp_path / name, seed) == 0
        runs.append(Trajectory.load(tmp_path / name / "trajectory.npz"))
    a, b, c = runs
    assert np.array_equal(a.topn, b.topn) and np.array_equal(a.train_rank, b.train_rank)
    assert np.array_equal(a.epochs, b.epochs)
    assert not np.array_equal(a.topn, c.topn)


@pytest.mark.parametrize("text, message", [
    (CONFIG + "hidden: 3\n", "unknown key(s) hidden"),
    (CONFIG.replace("batch_size: 64", "batch_size: many"), "batch_size must be a number"),
    (CONFIG.replace("top_n: 12", "top_n: 500"), "top_n must be between"),
    (CONFIG.replace("tiny: {dim: 4}", "tiny: {depth: 4}"), "unknown key(s) depth"),
])
def test_bad_config_fails_in_one_line_without_output(tmp_path, split_dir, run_cli, capsys, text, message):
    out = tmp_path / "run"
    assert _train(run_cli, split_dir, _write_config(tmp_path, text), out) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_unknown_model_fails_without_output(tmp_path, split_dir, run_cli, capsys):
    out = tmp_path / "run"
    code = run_cli(["train-teacher", "--model", "nope", "--split", str(split_dir), "--config",
                    str(_write_config(tmp_path)), "--seed", "0", "--out", str(out)])
    assert code == 2 and "unknown model 'nope'" in capsys.readouterr().err
    assert not out.exists()


def test_failure_while_writing_leaves_no_output(tmp_path, split_dir, run_cli, monkeypatch):
    def broken_save(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(Trajectory, "save", broken_save)
    out = tmp_path / "run"
    with pytest.raises(OSError):
        _train(run_cli, split_dir, _write_config(tmp_path), out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


def test_teachers_to_ensemble(tmp_path, split_dir, run_cli):
    """mf and cml trained by the CLI stack into an ensemble that `load_knowledge` reads back."""
    from hetcomp.knowledge import load_knowledge

    assert _train(run_cli, split_dir, _write_config(tmp_path), tmp_path / "mf") == 0
    cml_config = tmp_path / "cml.yaml"
    cml_config.write_text("lr: 0.01\nmax_epochs: 3\neval_every: 1\nn_checkpoints: 3\ntop_n: 12\ndim: 8\n"
                          "n_neg: 4\n")
    code = run_cli(["train-teacher", "--model", "cml", "--split", str(split_dir), "--config", str(cml_config),
                    "--seed", "0", "--out", str(tmp_path / "cml"), "--device", "cpu"])
    assert code == 0
    out = tmp_path / "ens"
    assert run_cli(["build-ensemble", "--split", str(split_dir), "--teachers", str(tmp_path / "mf"),
                    str(tmp_path / "cml"), "--out", str(out), "--top-k", "10"]) == 0
    knowledge = load_knowledge(out)
    assert knowledge.teachers == ["mf", "cml"]
    assert knowledge.trajectories.shape[:2] == (2, 3) and knowledge.final_topk.shape[1] == 10
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 0 and info["config"]["teachers"] == ["mf", "cml"]
