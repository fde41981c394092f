"""The ensemble: importance arithmetic, observed lists, stacking checks and `hetcomp build-ensemble`."""

import json
import math

import numpy as np
import pytest
import torch

from hetcomp.data.store import Split, save_split, to_csr
from hetcomp.ensemble import (TeacherRun, build_knowledge, ensemble_scores, observed_ranking,
                              selection_score_fn)
from hetcomp.errors import HetCompError
from hetcomp.io import write_json
from hetcomp.knowledge import combine_rankings, load_knowledge
from hetcomp.trajectory import Trajectory, split_fingerprint

W = [math.exp(-r / 10) for r in range(4)]  # importance of ranks 0..3 at temperature 10


def _csr(rows, shape):
    users = [u for u, items in enumerate(rows) for _ in items]
    items = [i for row in rows for i in row]
    return to_csr(np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64), shape)


def _run(name, topn, train_rank, epochs=None, run_dir=None):
    topn = np.asarray(topn, dtype=np.int32)
    epochs = np.arange(topn.shape[0]) * 10 if epochs is None else np.asarray(epochs)
    return TeacherRun(name=name, run_dir=run_dir or name,
                      trajectory=Trajectory(topn=topn, epochs=epochs, train_rank=np.asarray(train_rank)))


# user 0 trains on items 4, 5, 6; user 1 on item 0; user 2 on nothing (7 items)
TRAIN = _csr([[4, 5, 6], [0], []], (3, 7))
# one checkpoint per teacher; lists of 3 non-training items per user
TEACHER_A = [[[0, 1, 2], [1, 2, 3], [0, 1, 2]]]
TEACHER_B = [[[2, 0, 3], [3, 2, 1], [6, 1, 4]]]
RANKS_A = [2, 0, 1, 0]  # CSR order: (0,4) (0,5) (0,6) (1,0)
RANKS_B = [1, 2, 0, 0]


def test_hand_made_ensemble():
    runs = [_run("A", TEACHER_A, RANKS_A), _run("B", TEACHER_B, RANKS_B)]
    knowledge = build_knowledge(runs, TRAIN, top_k=3, observed=4, temperature=10.0)
    assert knowledge.trajectories.shape == (2, 1, 3, 3)
    # user 0: item 0 = w0 + w1, item 2 = w2 + w0, item 1 = w1, item 3 = w2
    assert knowledge.final_topk[0].tolist() == [0, 2, 1]
    scores = ensemble_scores(np.stack([np.asarray(TEACHER_A)[0], np.asarray(TEACHER_B)[0]]), 7, 10.0)
    assert scores[0].tolist() == pytest.approx([W[0] + W[1], W[1], W[2] + W[0], W[2], 0, 0, 0])
    # user 1: items 1 and 3 tie at w0 + w2, item 2 = 2 w1 is just below
    assert scores[1].tolist() == pytest.approx([0, W[0] + W[2], 2 * W[1], W[2] + W[0], 0, 0, 0])
    assert knowledge.final_topk[1, 2] == 2 and set(knowledge.final_topk[1, :2].tolist()) == {1, 3}
    # user 2: item 1 = 2 w1, then items 0 and 6 tie at w0
    assert knowledge.final_topk[2, 0] == 1 and set(knowledge.final_topk[2, 1:].tolist()) == {0, 6}
    # observed: user 0 item 4 = w2 + w1, item 5 = w0 + w2, item 6 = w1 + w0 -> 6, 5, 4, pad
    assert knowledge.observed.tolist() == [[6, 5, 4, -1], [0, -1, -1, -1], [-1, -1, -1, -1]]
    assert knowledge.observed.dtype == np.int32 and knowledge.final_topk.dtype == np.int32


def test_observed_ties_follow_item_order_and_length_cuts():
    ranks = np.array([[0, 1, 2, 0], [1, 0, 2, 0]])  # items 4 and 5 of user 0 tie
    assert observed_ranking(TRAIN, ranks, 2, 10.0).tolist() == [[4, 5], [0, -1], [-1, -1]]
    assert observed_ranking(TRAIN, ranks, 0, 10.0).shape == (3, 0)


def test_score_batch_agrees_with_combine_rankings():
    rng = np.random.default_rng(0)
    n_items = 40
    lists = np.stack([np.stack([rng.choice(n_items, 10, replace=False) for _ in range(25)])
                      for _ in range(3)]).astype(np.int32)
    scores = ensemble_scores(lists, n_items, 5.0)
    ours = torch.topk(scores, 10, dim=1).indices.numpy()
    theirs = combine_rankings(lists, n_items, 10, 5.0)
    values = scores.numpy()
    assert np.allclose(np.take_along_axis(values, ours, 1), np.take_along_axis(values, theirs, 1))


def test_selection_score_fn_uses_the_selected_checkpoints():
    rng = np.random.default_rng(1)
    n_items, n_users = 30, 6
    traj = [rng.permuted(np.tile(np.arange(n_items), (2, n_users, 1)), axis=2)[:, :, :8] for _ in range(2)]
    runs = [_run("A", traj[0], np.zeros(0, int)), _run("B", traj[1], np.zeros(0, int))]
    empty = _csr([[] for _ in range(n_users)], (n_users, n_items))
    knowledge = build_knowledge(runs, empty, top_k=5, observed=2, temperature=10.0)
    selection = rng.integers(0, 2, size=(2, n_users))
    users = torch.tensor([4, 0, 2])
    got = selection_score_fn(knowledge, selection)(users)
    lists = np.stack([traj[t][selection[t, u], u] for t in range(2) for u in [4, 0, 2]]).reshape(2, 3, 8)
    assert torch.allclose(got, ensemble_scores(lists, n_items, 10.0))


def test_stacking_errors():
    good = _run("A", TEACHER_A, RANKS_A)
    two_ckpt = _run("B", np.concatenate([TEACHER_B, TEACHER_B]), RANKS_B)
    with pytest.raises(HetCompError, match="differ in shape"):
        build_knowledge([good, two_ckpt], TRAIN)
    with pytest.raises(HetCompError, match="more than once"):
        build_knowledge([good, _run("A", TEACHER_B, RANKS_B)], TRAIN, top_k=3)
    with pytest.raises(HetCompError, match="does not match the split"):
        build_knowledge([_run("A", TEACHER_A, RANKS_A[:3])], TRAIN, top_k=3)
    with pytest.raises(HetCompError, match="top-k"):
        build_knowledge([good], TRAIN, top_k=4)


# -- the command line -------------------------------------------------------------------------

def _fake_teacher_run(path, name, split, n_checkpoints=4, depth=20, seed=0):
    """A run directory as `train-teacher` writes it, from random scores."""
    rng = np.random.default_rng(seed)
    train = split.train.toarray() > 0
    topn = []
    for _ in range(n_checkpoints):
        scores = rng.normal(size=train.shape)
        scores[train] = -np.inf
        topn.append(np.argsort(-scores, axis=1, kind="stable")[:, :depth])
    ranks = np.concatenate([rng.permutation(n) for n in np.diff(split.train.indptr)])
    path.mkdir(parents=True)
    Trajectory(topn=np.stack(topn), epochs=np.arange(n_checkpoints) * 10, train_rank=ranks).save(
        path / "trajectory.npz")
    write_json(path / "run_info.json", {"config": {"model": name}, "seed": 0,
                                        "split_fingerprint": split_fingerprint(split)})
    write_json(path / "metrics.json", {"n_parameters": 100})
    return path


@pytest.fixture
def setup(tmp_path, tiny_split):
    split = tiny_split
    save_split(split, tmp_path / "split")
    runs = [_fake_teacher_run(tmp_path / name, name, split, seed=seed)
            for seed, name in enumerate(["mf", "cml", "gnn"])]
    return split, tmp_path / "split", runs


def _build(run_cli, split_dir, runs, out, *extra):
    return run_cli(["build-ensemble", "--split", str(split_dir), "--teachers", *map(str, runs),
                    "--out", str(out), *extra])


def test_build_ensemble_cli(tmp_path, setup, run_cli):
    split, split_dir, runs = setup
    out = tmp_path / "ens"
    assert _build(run_cli, split_dir, runs, out, "--top-k", "15", "--observed", "12") == 0
    assert {p.name for p in out.iterdir()} == {"knowledge.npz", "meta.json", "metrics.json", "per_user.npz",
                                                "run_info.json"}
    knowledge = load_knowledge(out)
    assert knowledge.teachers == ["mf", "cml", "gnn"]
    assert knowledge.trajectories.shape == (3, 4, split.n_users, 20)
    assert knowledge.final_topk.shape == (split.n_users, 15)
    assert knowledge.observed.shape == (split.n_users, 12)
    train = split.train.toarray() > 0
    assert not np.take_along_axis(train, knowledge.final_topk, 1).any()
    for user, row in enumerate(knowledge.observed):
        n_train = int(train[user].sum())
        assert (row[:min(n_train, 12)] >= 0).all() and (row[n_train:] == -1).all()
        assert train[user, row[row >= 0]].all()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["teacher_runs"] == [str(r) for r in runs] and meta["temperature"] == 10.0
    assert meta["checkpoint_epochs"]["cml"] == [0, 10, 20, 30] and meta["observed_length"] == 12
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_parameters"] == 300 and 0 <= metrics["test"]["recall@50"] <= 1
    with np.load(out / "per_user.npz") as per_user:
        assert per_user["users"].tolist() == split.eval_users.tolist()


def test_mismatched_trajectories_fail_in_one_line(tmp_path, setup, run_cli, capsys):
    split, split_dir, runs = setup
    short = _fake_teacher_run(tmp_path / "short", "ae", split, n_checkpoints=3)
    out = tmp_path / "ens"
    assert _build(run_cli, split_dir, [*runs, short], out) == 2
    err = capsys.readouterr().err.strip()
    assert "differ in shape" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_other_split_fails(tmp_path, setup, run_cli, capsys):
    split, _, runs = setup
    train = split.train.tolil()
    train[0, split.train.indices[0]] = 0  # one interaction less
    other = Split(train=train.tocsr(), valid=split.valid, test=split.test, meta=split.meta)
    save_split(other, tmp_path / "other")
    out = tmp_path / "ens"
    assert _build(run_cli, tmp_path / "other", runs, out) == 2
    assert "different split" in capsys.readouterr().err
    assert not out.exists()


def test_missing_teacher_run_fails(tmp_path, setup, run_cli, capsys):
    _, split_dir, runs = setup
    assert _build(run_cli, split_dir, [runs[0], tmp_path / "nowhere"], tmp_path / "ens") == 2
    assert "not a teacher run" in capsys.readouterr().err
    assert not (tmp_path / "ens").exists()


def test_padded_lists_add_nothing_to_the_ensemble():
    """A teacher list shorter than the depth is padded with -1 (a user with few non-training items)."""
    from hetcomp.knowledge import ensemble_scores as dense_scores

    lists = np.array([[[2, 0, -1]], [[0, -1, -1]]])
    scores = dense_scores(lists, 4, 10.0)
    assert scores[0].tolist() == pytest.approx([W[1] + W[0], 0, W[0], 0])
    assert combine_rankings(lists, 4, 2, 10.0)[0].tolist() == [0, 2]


def test_an_ensemble_rebuilt_against_its_record_must_equal_it(tmp_path, setup, run_cli, capsys):
    split, split_dir, runs = setup
    record, top_k = tmp_path / "record", ("--top-k", "15")
    assert _build(run_cli, split_dir, runs, record, *top_k) == 0
    again = tmp_path / "again"
    assert _build(run_cli, split_dir, runs, again, *top_k, "--expect-record", str(record)) == 0
    assert (again / "knowledge.npz").is_file()
    capsys.readouterr()
    metrics = json.loads((record / "metrics.json").read_text())
    metrics["test"]["recall@50"] += 1e-9  # a record of other teachers, or another thread count
    (record / "metrics.json").write_text(json.dumps(metrics))
    other = tmp_path / "other"
    assert _build(run_cli, split_dir, runs, other, *top_k, "--expect-record", str(record)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs from its record" in err and "test recall@50" in err
    assert not other.exists()
    assert _build(run_cli, split_dir, runs, other, *top_k, "--expect-record", str(tmp_path / "none")) == 2
    assert "no metrics.json there" in capsys.readouterr().err and not other.exists()
