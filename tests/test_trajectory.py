"""Trajectory recording: checkpoint selection, exported lists and train ranks."""

import numpy as np
import pytest
import torch

from hetcomp.data.store import Split, to_csr
from hetcomp.errors import HetCompError
from hetcomp.trajectory import (Trajectory, TrajectoryRecorder, select_checkpoints, split_fingerprint,
                                train_ranks)


def _random_train(n_users=30, n_items=50, seed=0):
    rng = np.random.default_rng(seed)
    users, items = [], []
    for user in range(n_users):
        row = rng.choice(n_items, size=int(rng.integers(0, 12)), replace=False)  # includes empty rows
        users += [user] * len(row)
        items += row.tolist()
    return to_csr(np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64), (n_users, n_items))


class _TableModel:
    """A stand-in recommender whose scores are a fixed table (changed between evaluations)."""

    def __init__(self, table):
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def score(self, users):
        return self.table[users]


def test_even_policy_on_a_long_run():
    epochs = list(range(0, 400, 10))
    assert select_checkpoints(epochs, 390, 4).tolist() == [9, 19, 29, 39]
    assert [epochs[i] for i in select_checkpoints(epochs, 190, 4)] == [40, 90, 140, 190]


@pytest.mark.parametrize("policy", ["even", "last"])
def test_selection_is_increasing_and_ends_at_best(policy):
    for n_evals in range(1, 25):
        epochs = [5 * e for e in range(n_evals)]
        for best in range(n_evals):
            for n_ckpt in range(1, 7):
                chosen = select_checkpoints(epochs, epochs[best], n_ckpt, policy)
                assert len(chosen) == n_ckpt
                assert chosen[-1] == best
                assert chosen.min() >= 0
                assert (np.diff(chosen) >= 0).all()
                if best + 1 >= n_ckpt:
                    assert (np.diff(chosen) > 0).all()


def test_short_runs_repeat_checkpoints():
    assert select_checkpoints([0, 10], 10, 4).tolist() == [0, 0, 1, 1]
    assert select_checkpoints([0], 0, 4).tolist() == [0, 0, 0, 0]
    assert select_checkpoints([0, 10, 20], 10, 4, "last").tolist() == [0, 0, 0, 1]


def test_selection_errors():
    with pytest.raises(HetCompError, match="not recorded"):
        select_checkpoints([0, 10], 5, 4)
    with pytest.raises(HetCompError, match="unknown checkpoint policy"):
        select_checkpoints([0, 10], 10, 4, "random")


def test_train_ranks_match_a_naive_per_user_sort():
    train = _random_train()
    rng = np.random.default_rng(1)
    table = rng.integers(0, 4, size=train.shape).astype(np.float32)  # many ties
    got = train_ranks(_TableModel(table).score, train, batch_size=7)
    assert got.dtype == np.int32 and got.shape == (train.nnz,)
    for user in range(train.shape[0]):
        lo, hi = train.indptr[user], train.indptr[user + 1]
        items = train.indices[lo:hi]
        order = np.argsort(-table[user, items], kind="stable")
        expected = np.empty(len(items), dtype=np.int64)
        expected[order] = np.arange(len(items))
        assert got[lo:hi].tolist() == expected.tolist()


def test_recorder_exports_sorted_unobserved_lists():
    train = _random_train()
    n_users, n_items = train.shape
    rng = np.random.default_rng(2)
    recorder = TrajectoryRecorder(train, top_n=8, n_checkpoints=3, batch_size=11)
    tables = {}
    for epoch in range(0, 50, 10):
        tables[epoch] = rng.normal(size=(n_users, n_items)).astype(np.float32)
        recorder(epoch, _TableModel(tables[epoch]))
    best = _TableModel(tables[30])
    trajectory = recorder.finish(30, best)
    assert trajectory.topn.shape == (3, n_users, 8) and trajectory.topn.dtype == np.int32
    assert trajectory.epochs.tolist() == [10, 20, 30]  # 4 evaluations up to the best, C = 3
    dense_train = train.toarray() > 0
    for c, epoch in enumerate(trajectory.epochs):
        table = tables[int(epoch)]
        for user in range(n_users):
            row = trajectory.topn[c, user]
            assert len(set(row.tolist())) == 8
            assert not dense_train[user, row].any()
            scores = table[user, row]
            assert (np.diff(scores) <= 0).all()
            rest = np.setdiff1d(np.flatnonzero(~dense_train[user]), row)
            assert scores[-1] >= table[user, rest].max()
    assert trajectory.train_rank.tolist() == train_ranks(best.score, train).tolist()
    assert recorder.lists == []


def test_recorder_rejects_a_too_long_list():
    train = _random_train(n_items=15)
    with pytest.raises(HetCompError, match="top_n must be between"):
        TrajectoryRecorder(train, top_n=14)


def test_trajectory_file_round_trip(tmp_path):
    trajectory = Trajectory(topn=np.arange(24, dtype=np.int64).reshape(2, 3, 4),
                            epochs=np.array([0, 10]), train_rank=np.array([0, 1, 0]))
    trajectory.save(tmp_path / "trajectory.npz")
    back = Trajectory.load(tmp_path / "trajectory.npz")
    assert back.topn.dtype == np.int32 and back.train_rank.dtype == np.int32
    assert back.topn.tolist() == trajectory.topn.tolist()
    assert back.epochs.tolist() == [0, 10]
    with pytest.raises(HetCompError, match="no trajectory"):
        Trajectory.load(tmp_path / "missing.npz")


def test_split_fingerprint_tells_splits_apart():
    a, b = _random_train(seed=0), _random_train(seed=1)
    split_a = Split(train=a, valid=a, test=a)
    assert split_fingerprint(split_a) == split_fingerprint(Split(train=a.copy(), valid=a, test=a))
    assert split_fingerprint(split_a) != split_fingerprint(Split(train=b, valid=a, test=a))
