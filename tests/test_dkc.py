"""Dynamic knowledge construction: the discrepancy by hand and the selection rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetcomp.distill.dkc import DynamicKnowledgeConstruction, discrepancy, position_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_position_weights_by_hand():
    w = position_weights(3).tolist()
    assert w[0] == pytest.approx((2 ** math.exp(0) - 1) / math.log2(2))
    assert w[1] == pytest.approx((2 ** math.exp(-0.1) - 1) / math.log2(3))
    assert w[2] == pytest.approx((2 ** math.exp(-0.2) - 1) / math.log2(4))


def test_discrepancy_by_hand():
    # student ranks 5, 7, 9; the teacher's top-3 set is {1, 7, 9} (its order is irrelevant)
    g = [2 ** math.exp(-t / 10) - 1 for t in range(3)]
    w = [g[t] / math.log2(t + 2) for t in range(3)]
    expected = 1 - round((w[1] + w[2]) / sum(w), 4)
    student = torch.tensor([[5, 7, 9], [1, 7, 9], [2, 3, 4]])
    teacher = torch.sort(torch.tensor([[9, 1, 7]] * 3), dim=1).values
    d = discrepancy(student, teacher).tolist()
    assert d[0] == pytest.approx(expected, abs=1e-12)
    assert d[1] == 0.0                                 # same set: no discrepancy
    assert d[2] == 1.0                                 # disjoint


def _dkc(n_teachers=2, n_checkpoints=4, n_users=3, **kwargs):
    trajectories = np.zeros((n_teachers, n_checkpoints, n_users, 5), dtype=np.int32)
    return DynamicKnowledgeConstruction(trajectories, depth=5, **kwargs)


def _with_distances(dkc, d_next_by_ckpt):
    """Make ``all_discrepancies`` return ``d[t, c, u] = d_next_by_ckpt[c]`` (scalars or [T, U])."""
    d = torch.stack([torch.as_tensor(v, dtype=torch.float64).expand(dkc.n_teachers, dkc.n_users)
                     for v in d_next_by_ckpt], dim=1)
    dkc.all_discrepancies = lambda student_top: d.clone()


def test_first_call_moves_nothing_and_stores_next_distance():
    dkc = _dkc()
    _with_distances(dkc, [0.1, 0.5, 0.7, 0.9])
    advanced, _ = dkc.step(10, torch.zeros(3, 5, dtype=torch.int64))
    assert not advanced.any() and (dkc.idx == 0).all()
    assert torch.allclose(dkc.last_d, torch.full((2, 3), 0.5, dtype=torch.float64))


def test_rule_advance_stay_and_refresh():
    dkc = _dkc(n_teachers=1, n_users=4)
    _with_distances(dkc, [0.0, 0.5, 0.8, 0.9])
    dkc.step(10, None)                                  # last_d = 0.5 for everyone
    # theta at epoch 20 = 1.05 * 0.995^2 = 1.0395
    d1 = torch.tensor([[0.45, 0.49, 0.60, 0.0]], dtype=torch.float64)  # ratio 1.11, 1.02, 0.83, inf
    _with_distances(dkc, [0.0, d1, 0.8, 0.9])
    advanced, _ = dkc.step(20, None)
    assert advanced.tolist() == [[True, False, True, True]]
    assert dkc.idx.tolist() == [[1, 0, 1, 1]]
    # refreshed to the distance to the new next checkpoint (2) only where advanced
    assert dkc.last_d.tolist() == [[0.8, 0.5, 0.8, 0.8]]


def test_zero_distances_do_not_divide_by_zero():
    dkc = _dkc(n_teachers=1, n_users=2)
    _with_distances(dkc, [0.0, torch.tensor([[0.0, 0.3]]), 0.0, 0.0])
    dkc.step(10, None)                                  # last_d = [0, 0.3]
    _with_distances(dkc, [0.0, 0.0, 0.0, 0.0])
    advanced, _ = dkc.step(20, None)                    # 0/0 and 0.3/0: both advance
    assert advanced.all()


def test_threshold_below_one_forces_progress_and_stops_at_last():
    dkc = _dkc(n_checkpoints=4, alpha=1.05, decay=0.995, period=10)
    assert dkc.threshold(90) > 1.0 and dkc.threshold(100) < 1.0
    rng = np.random.RandomState(0)
    _with_distances(dkc, [0.5] * 4)
    dkc.step(10, None)
    epoch, history = 100, [dkc.idx.clone()]
    for _ in range(6):
        _with_distances(dkc, [torch.from_numpy(rng.rand(2, 3)) for _ in range(4)])
        advanced, _ = dkc.step(epoch, None)
        history.append(dkc.idx.clone())
        epoch += 10
    # one step per call for every pair until the last checkpoint, then nothing
    assert [int(h.min()) for h in history] == [0, 1, 2, 3, 3, 3, 3]
    assert (history[-1] == 3).all()


def test_indices_never_decrease_on_random_distances():
    dkc = _dkc(n_teachers=3, n_checkpoints=4, n_users=50)
    rng = np.random.RandomState(1)
    previous = dkc.idx.clone()
    for epoch in range(10, 400, 10):
        _with_distances(dkc, [torch.from_numpy(np.round(rng.rand(3, 50), 4)) for _ in range(4)])
        advanced, _ = dkc.step(epoch, None)
        step = dkc.idx - previous
        assert ((step == 0) | (step == 1)).all()
        assert torch.equal(step.bool(), advanced)
        assert (dkc.idx <= 3).all()
        previous = dkc.idx.clone()
    assert (dkc.idx == 3).all()                         # theta < 1 from epoch 100 on


def test_real_discrepancies_on_a_synthetic_trajectory():
    # 1 teacher, 3 checkpoints, 2 users, lists of 4; the student's top-4 equals checkpoint 1's set
    trajectories = np.array([[[[0, 1, 2, 3], [10, 11, 12, 13]],
                              [[4, 5, 6, 7], [14, 15, 16, 17]],
                              [[8, 9, 20, 21], [18, 19, 22, 23]]]], dtype=np.int32)
    dkc = DynamicKnowledgeConstruction(trajectories, depth=4)
    student = torch.tensor([[7, 6, 5, 4], [14, 15, 30, 31]])
    d = dkc.all_discrepancies(student)
    assert d[0, 0].tolist() == [1.0, 1.0]
    assert d[0, 1, 0].item() == 0.0
    w = position_weights(4)
    assert d[0, 1, 1].item() == pytest.approx(1 - round(float(w[:2].sum() / w.sum()), 4), abs=1e-12)
    dkc.step(10, student)
    assert torch.equal(dkc.last_d, d[:, 1])


def test_all_discrepancies_match_the_reference():
    rng = np.random.RandomState(4)
    n_teachers, n_ckpt, n_users, n_items, depth = 3, 4, 37, 60, 8
    trajectories = np.stack([[[rng.permutation(n_items)[:12] for _ in range(n_users)]
                              for _ in range(n_ckpt)] for _ in range(n_teachers)]).astype(np.int32)
    trajectories[0, 0, 5, 6:] = -1                       # padding never matches
    dkc = DynamicKnowledgeConstruction(trajectories, depth=depth)
    student = torch.from_numpy(np.stack([rng.permutation(n_items)[:depth] for _ in range(n_users)]))
    student[:4] = torch.from_numpy(trajectories[1, 2, :4, :depth].astype(np.int64)).flip(1)
    fast = dkc.all_discrepancies(student, block=10)
    sets = torch.sort(torch.from_numpy(trajectories[..., :depth].astype(np.int64)), dim=-1).values
    reference = discrepancy(student, sets)
    assert torch.allclose(fast, reference, atol=1e-12)
    assert (fast[1, 2, :4] == 0).all()                   # same set, reversed order: d = 0


def test_ensemble_topk_matches_combine_rankings():
    from hetcomp.distill.dkc import ensemble_topk
    from hetcomp.knowledge import combine_rankings
    rng = np.random.RandomState(5)
    n_items, k = 50, 12
    lists = np.stack([[rng.permutation(n_items)[:10] for _ in range(30)] for _ in range(3)]).astype(np.int32)
    ours = ensemble_topk(lists, n_items, k, batch_size=7)
    theirs = torch.from_numpy(combine_rankings(lists, n_items, k).astype(np.int64))
    scores = torch.zeros(lists.shape[1], n_items)             # the ensemble's dense scores
    for t in range(lists.shape[0]):
        for u in range(lists.shape[1]):
            for r, item in enumerate(lists[t, u]):
                scores[u, item] += math.exp(-r / 10)
    # same scores position by position (ties may be ordered differently), non-increasing
    assert torch.equal(scores.gather(1, ours), scores.gather(1, theirs))
    assert (scores.gather(1, ours)[:, :-1] >= scores.gather(1, ours)[:, 1:]).all()
    # a single teacher: no ties, identical lists; fewer candidates than k: filled like combine_rankings
    single = lists[:1]
    assert torch.equal(ensemble_topk(single, n_items, 10), torch.from_numpy(single[0].astype(np.int64)))
    filled = ensemble_topk(single, n_items, 15)
    assert torch.equal(filled[:, :10], torch.from_numpy(single[0].astype(np.int64)))
    assert torch.equal(filled, torch.from_numpy(combine_rankings(single, n_items, 15).astype(np.int64)))


def test_factorized_top_unobserved_matches_evaluation_helper(tiny_split):
    from hetcomp.distill.dkc import factorized_top_unobserved
    from hetcomp.evaluation import top_unobserved
    torch.manual_seed(0)
    users, items = torch.randn(tiny_split.n_users, 3), torch.randn(tiny_split.n_items, 3)
    train = tiny_split.train.tocsr()
    indptr = torch.from_numpy(train.indptr.astype(np.int64))
    flat = torch.repeat_interleave(torch.arange(tiny_split.n_users), indptr.diff()) * tiny_split.n_items \
        + torch.from_numpy(train.indices.astype(np.int64))
    ours = factorized_top_unobserved(users, items, indptr, flat, 7, block_rows=8)
    reference = top_unobserved(lambda u: users[u] @ items.T, train, 7)
    assert torch.equal(ours, torch.from_numpy(reference.astype(np.int64)))
