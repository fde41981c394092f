"""`hetcomp cost` and hetcomp.cost on small hand-made run folders (random MF teachers and students)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from hetcomp import cost as C
from hetcomp.data.store import save_split
from hetcomp.ensemble import ensemble_scores
from hetcomp.evaluation import top_unobserved
from hetcomp.knowledge import combine_rankings
from hetcomp.models.mf import MF

DEPTH, N_CHECKPOINTS = 30, 3


def _mf(split, dim, seed):
    torch.manual_seed(seed)
    model = MF(split.n_users, split.n_items, dim=dim, init_std=0.5)
    model.eval()
    return model


def _write_json(path, obj):
    path.write_text(json.dumps(obj))


@pytest.fixture
def runs(tmp_path, tiny_split):
    """A split, two MF teachers, their ensemble (contract files), and two students."""
    split_dir = tmp_path / "split"
    save_split(tiny_split, split_dir)
    teachers, trajectories = [], []
    for t, name in enumerate(["mf", "mf_b"]):
        model = _mf(tiny_split, 8, seed=t)
        run = tmp_path / "teachers" / name
        run.mkdir(parents=True)
        torch.save(model.state_dict(), run / "model.pt")
        _write_json(run / "run_info.json", {"config": {"model": "mf", "dim": 8, "lr": 0.01, "top_n": DEPTH,
                                                       "dataset": "tiny"}, "seed": 0})
        final = top_unobserved(model.score, tiny_split.train, DEPTH)
        # earlier checkpoints: the final list shifted, so that only the last one matches the model
        lists = [np.roll(final, c + 1, axis=1) for c in range(N_CHECKPOINTS - 1)] + [final]
        trajectories.append(np.stack(lists))
        teachers.append(run)
    trajectories = np.stack(trajectories).astype(np.int32)
    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    np.savez_compressed(ensemble / "knowledge.npz", trajectories=trajectories,
                        observed=np.full((tiny_split.n_users, 2), -1, dtype=np.int32),
                        final_topk=combine_rankings(trajectories[:, -1], tiny_split.n_items, 20))
    _write_json(ensemble / "meta.json", {"teachers": ["mf", "mf"], "n_items": tiny_split.n_items,
                                         "temperature": 10.0, "checkpoint_epochs": {"mf": [1, 2, 3]}})
    students = []
    for name, teacher in (("wokd", None), ("rrd", "ensemble")):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        torch.save(_mf(tiny_split, 3, seed=10 + len(students)).state_dict(), run / "student.pt")
        _write_json(run / "run_info.json", {"config": {"method": name, "teacher": teacher, "student_dim": 3,
                                                       "batch_size": 64, "dataset": "tiny"}, "seed": 0})
        students.append(run)
    return {"split": split_dir, "teachers": teachers, "ensemble": ensemble, "students": students,
            "trajectories": trajectories}


# ------------------------------------------------------------------------------------------ units
def test_ranking_discrepancy_identical_disjoint_and_partial():
    student = np.arange(50)[None]
    assert C.ranking_discrepancy(student, student)[0] == pytest.approx(0.0)
    assert C.ranking_discrepancy(student, student[:, ::-1])[0] == pytest.approx(0.0)  # order ignored
    assert C.ranking_discrepancy(student, student + 100)[0] == pytest.approx(1.0)
    # only the student's first item is in the teacher's set
    teacher = np.concatenate([[0], np.arange(100, 149)])[None]
    t = np.arange(50)
    weights = (2.0 ** np.exp(-t / 10) - 1) / np.log2(t + 2)
    expected = 1 - round(weights[0] / weights.sum(), 4)
    assert C.ranking_discrepancy(student, teacher)[0] == pytest.approx(expected)


def test_student_discrepancy_shape_and_final_checkpoint(runs, tiny_split):
    trajectories = runs["trajectories"]
    # a "student" whose list is the first teacher's final list: distance 0 to that checkpoint
    values = C.student_discrepancy(trajectories[0, -1], trajectories)
    assert values.shape == (2, N_CHECKPOINTS)
    assert values[0, -1] == pytest.approx(0.0)
    assert (values >= 0).all() and (values <= 1).all()


def test_ensemble_topk_matches_combine_rankings(runs, tiny_split):
    models = [C.load_teacher(run, tiny_split, torch.device("cpu")).model for run in runs["teachers"]]
    users_np = tiny_split.eval_users[:17]
    users = torch.from_numpy(users_np)
    keys = C.batch_train_keys(tiny_split.train, users_np, torch.device("cpu"))
    with torch.inference_mode():
        ours = C.ensemble_topk(models, users, keys, DEPTH, 10, 10.0, tiny_split.n_items).numpy()
    lists = runs["trajectories"][:, -1][:, users_np]
    reference = combine_rankings(lists, tiny_split.n_items, 10)
    scores = ensemble_scores(lists, tiny_split.n_items, 10.0).numpy()
    # the same ranking up to the order of tied items: equal scores position by position
    np.testing.assert_allclose(np.take_along_axis(scores, ours.astype(np.int64), 1),
                               np.take_along_axis(scores, reference.astype(np.int64), 1), rtol=1e-6)


def test_masked_topk_never_returns_training_items(tiny_split):
    model = _mf(tiny_split, 4, seed=0)
    users_np = tiny_split.eval_users
    keys = C.batch_train_keys(tiny_split.train, users_np, torch.device("cpu"))
    with torch.inference_mode():
        top = C.masked_topk(model, torch.from_numpy(users_np), keys, 10).numpy()
    dense = tiny_split.train.toarray() > 0
    assert not np.take_along_axis(dense[users_np], top, 1).any()


def test_time_calls_and_summary():
    calls = []
    times = C.time_calls(lambda: calls.append(1), torch.device("cpu"), repeats=5, warmup=2)
    assert len(times) == 5 and len(calls) == 7 and all(t >= 0 for t in times)
    summary = C.summarize_times([0.002, 0.001, 0.003], batch_size=10)
    assert summary["latency_ms"] == pytest.approx(2.0)
    assert summary["throughput_users_per_s"] == pytest.approx(5000.0)
    with pytest.raises(Exception):
        C.time_calls(lambda: None, torch.device("cpu"), repeats=0, warmup=0)


def test_sample_users_is_seeded_and_capped(tiny_split):
    a = C.sample_users(tiny_split, 10, seed=1)
    assert len(a) == 10 and (np.diff(a) > 0).all() and np.isin(a, tiny_split.eval_users).all()
    assert (a == C.sample_users(tiny_split, 10, seed=1)).all()
    assert len(C.sample_users(tiny_split, 10_000, seed=1)) == len(tiny_split.eval_users)


def test_load_student_reads_dim_from_state(runs, tiny_split):
    loaded = C.load_student(runs["students"][1], tiny_split, torch.device("cpu"))
    assert loaded.name == "rrd" and loaded.teacher is None  # "ensemble" is not a single teacher
    assert loaded.n_parameters == (tiny_split.n_users + tiny_split.n_items) * 3


# ------------------------------------------------------------------------------------------ CLI
def test_cost_cli_writes_tables_with_the_device(runs, run_cli, tmp_path):
    out = tmp_path / "cost"
    argv = ["cost", "--split", str(runs["split"]), "--ensemble", str(runs["ensemble"]),
            "--teachers", *map(str, runs["teachers"]), "--students", *map(str, runs["students"]),
            "--batch-size", "16", "--k", "10", "--repeats", "3", "--warmup", "1", "--device", "cpu",
            "--out", str(out)]
    # the ensemble's teacher names must match the runs' models (both "mf" here: allowed)
    assert run_cli(argv) == 0
    table = pd.read_csv(out / "cost.csv")
    assert list(table["kind"]) == ["teacher", "teacher", "ensemble", "student", "student"]
    assert (table["batch_size"] == 16).all() and (table["k"] == 10).all()
    assert table["device"].eq("cpu").all() and table["device_name"].str.startswith("cpu").all()
    ensemble = table[table["kind"] == "ensemble"].iloc[0]
    teachers = table[table["kind"] == "teacher"]
    assert ensemble["n_parameters"] == teachers["n_parameters"].sum()
    assert (table["latency_ms"] > 0).all() and (table["throughput_users_per_s"] > 0).all()
    info = json.loads((out / "cost.json").read_text())
    assert info["reload_agreement"] == {"mf": 1.0}
    assert len(info["users"]) == 16 and len(info["rows"]) == 5
    assert all(len(row["times_s"]) == 3 for row in info["rows"])
    discrepancy = pd.read_csv(out / "discrepancy.csv")
    assert len(discrepancy) == 2 * 2 * N_CHECKPOINTS  # students x teachers x checkpoints
    assert discrepancy["discrepancy"].between(0, 1).all()


def test_cost_cli_rejects_teachers_not_in_the_ensemble(runs, run_cli, tmp_path, capsys):
    argv = ["cost", "--split", str(runs["split"]), "--ensemble", str(runs["ensemble"]),
            "--teachers", str(runs["teachers"][0]), "--out", str(tmp_path / "cost"), "--device", "cpu"]
    assert run_cli(argv) == 2
    assert "ensemble's teachers" in capsys.readouterr().err
    assert not (tmp_path / "cost").exists()
