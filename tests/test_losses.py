"""HetComp's losses against a naive per-user loop, hand calculations and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetcomp.distill import losses
from hetcomp.distill.losses import (Workspace, factorized_rest_log_mass, overall_loss, plackett_luce,
                                    rank_loss, rest_log_mass)

pytestmark = pytest.mark.usefixtures("one_thread")

FLOOR = 1e-5


def _problem(seed=0, n_users=5, n_items=40, k=8, n_obs=4, scale=2.0):
    """Random float64 scores, training sets, a padded observed list and a top-K list per user."""
    rng = np.random.RandomState(seed)
    scores = torch.from_numpy(rng.randn(n_users, n_items) * scale)
    train, observed, top = [], [], []
    for u in range(n_users):
        perm = rng.permutation(n_items)
        n_train = 2 + u % 4                      # some users have fewer than n_obs training items
        train.append(sorted(perm[:n_train].tolist()))
        obs = list(perm[:min(n_train, n_obs)]) + [-1] * max(0, n_obs - n_train)
        observed.append(obs)
        top.append(perm[n_train:n_train + k].tolist())
    return scores, train, torch.tensor(observed), torch.tensor(top)


def _exclude_mask(train, top, n_items):
    mask = torch.zeros(len(train), n_items, dtype=torch.bool)
    for u, items in enumerate(train):
        mask[u, items] = True
    mask.scatter_(1, top, True)
    return mask


def _naive_rest(s, train_u, excluded):
    return sum(math.exp(s[j]) for j in range(len(s)) if j not in train_u and j not in excluded)


def _naive_overall(scores, train, observed, top, floor_on="denominator"):
    """The official formula: -log(e^s / max(e^s + Z, 1e-5)); or with the ratio floored."""
    total = 0.0
    for u in range(scores.shape[0]):
        s = scores[u].tolist()
        z = _naive_rest(s, set(train[u]), set(top[u].tolist()))
        for a in [i for i in observed[u].tolist() if i >= 0] + top[u].tolist():
            if floor_on == "denominator":
                total += -math.log(math.exp(s[a]) / max(math.exp(s[a]) + z, FLOOR))
            else:
                total += -math.log(max(math.exp(s[a]) / (math.exp(s[a]) + z), FLOOR))
    return total


def _naive_pl(s, items, rest):
    out = 0.0
    for k in range(len(items)):
        denominator = sum(math.exp(s[j]) for j in items[k:]) + rest
        out += -(s[items[k]] - math.log(max(denominator, FLOOR)))
    return out


def _naive_rank(scores, train, observed, top, prefixes):
    total = 0.0
    for u in range(scores.shape[0]):
        s = scores[u].tolist()
        t = top[u].tolist()
        rest = {m: _naive_rest(s, set(train[u]), set(t[:m])) for m in prefixes}
        obs = [i for i in observed[u].tolist() if i >= 0]
        total += _naive_pl(s, obs, rest[prefixes[0]])
        total += sum(_naive_pl(s, t[:m], rest[m]) for m in prefixes) / len(prefixes)
    return total


def _vector_overall(scores, train, observed, top, floor_on="denominator"):
    log_rest = rest_log_mass(scores, _exclude_mask(train, top, scores.shape[1]))
    items = torch.cat([observed.clamp(min=0), top], 1)
    mask = torch.cat([observed >= 0, torch.ones_like(top, dtype=torch.bool)], 1)
    return overall_loss(scores.gather(1, items), mask, log_rest, FLOOR, floor_on)


def _vector_rank(scores, train, observed, top, prefixes):
    log_rest = rest_log_mass(scores, _exclude_mask(train, top, scores.shape[1]))
    return rank_loss(scores.gather(1, observed.clamp(min=0)), observed >= 0, scores.gather(1, top),
                     log_rest, prefixes, FLOOR)


@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_overall_loss_matches_naive_loop(scale):
    scores, train, observed, top = _problem(scale=scale)
    expected = _naive_overall(scores, train, observed, top)
    assert _vector_overall(scores, train, observed, top).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("clamp", [40.0])
def test_overall_loss_is_the_official_formula_at_the_clamp(clamp):
    """Scores at the +-40 clamp: the official denominator floor never binds, every term keeps its
    gradient, and the loss equals the float64 naive formula."""
    scores, train, observed, top = _problem(scale=1.0)
    scores[0, top[0, 0]] = -clamp                # ratio ~ e^-40, far below 1e-5
    scores[1, top[1, 1]] = clamp
    scores[2, :] = scores[2, :].sign() * clamp   # a whole row at the clamp
    expected = _naive_overall(scores, train, observed, top)
    scores.requires_grad_(True)
    loss = _vector_overall(scores, train, observed, top)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert scores.grad[0, top[0, 0]].item() == pytest.approx(-1.0, abs=1e-12)


def test_ratio_floor_option_differs_where_it_binds():
    scores, train, observed, top = _problem(scale=1.0)
    official = _vector_overall(scores, train, observed, top).item()
    assert _vector_overall(scores, train, observed, top, "ratio").item() == pytest.approx(official, rel=1e-12)
    scores[0, top[0, 0]] = -30.0                 # ratio far below 1e-5: the cap binds
    expected = _naive_overall(scores, train, observed, top, "ratio")
    scores.requires_grad_(True)
    capped = _vector_overall(scores, train, observed, top, "ratio")
    assert capped.item() == pytest.approx(expected, rel=1e-10)
    assert capped.item() < _vector_overall(scores.detach(), train, observed, top).item() - 10
    capped.backward()
    assert scores.grad[0, top[0, 0]].item() == 0.0


@pytest.mark.parametrize("prefixes", [(5, 2), (8, 3), (3,)])
def test_rank_loss_matches_naive_loop(prefixes):
    scores, train, observed, top = _problem(seed=1, scale=3.0)
    expected = _naive_rank(scores, train, observed, top, prefixes)
    actual = _vector_rank(scores, train, observed, top, prefixes).item()
    assert actual == pytest.approx(expected, rel=1e-10)


def test_fully_padded_observed_list_adds_nothing_and_stays_finite():
    scores = torch.tensor([[0.3, -2.0, 1.0], [0.5, 0.1, -0.4]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, False, False], [True, True, False]])
    log_rest = torch.tensor([1.5, -30.0], dtype=torch.float64)
    out = plackett_luce(scores, log_rest, mask)
    assert out[0].item() == 0.0
    expected = _naive_pl(scores[1].tolist(), [0, 1], math.exp(-30.0))
    assert out[1].item() == pytest.approx(expected, rel=1e-12)
    out.sum().backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[0] == 0).all() and scores.grad[1, 2] == 0


def test_gradients_match_finite_differences():
    scores, train, observed, top = _problem(n_users=3, n_items=15, k=5, n_obs=3, scale=1.0)
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: _vector_overall(s, train, observed, top), (scores,))
    assert torch.autograd.gradcheck(lambda s: _vector_rank(s, train, observed, top, (3, 2)), (scores,))


@pytest.mark.parametrize("block_bytes", [1 << 20, 500])     # one block; blocks of 2 rows
# scale 0.5: the bound shift; 2.2: bound 45 > 40 but every score below 40 (no clamp pass); 3.0:
# scores up to 70, clamped in some blocks; a clamp above 40: the row-maximum shift, clamped too
@pytest.mark.parametrize("scale,clamp", [(0.5, 40.0), (2.2, 40.0), (3.0, 40.0), (3.0, 6.0), (3.0, None),
                                         (4.0, 50.0)])
def test_factorized_rest_mass_equals_reference(scale, clamp, block_bytes, monkeypatch):
    monkeypatch.setattr(losses, "_BLOCK_BYTES", block_bytes)
    rng = np.random.RandomState(2)
    users = torch.from_numpy(rng.randn(6, 4) * scale).requires_grad_(True)
    items = torch.from_numpy(rng.randn(30, 4) * scale).requires_grad_(True)
    exclude = torch.from_numpy(np.unique(rng.randint(0, 6 * 30, size=50)))

    def reference(u, i):
        s = u @ i.T
        return rest_log_mass(s if clamp is None else s.clamp(-clamp, clamp), exclude)

    def fused(u, i):
        return factorized_rest_log_mass(u, i, exclude, clamp, Workspace())

    a, b = fused(users, items), reference(users, items)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    weights = torch.from_numpy(rng.rand(6))
    ga = torch.autograd.grad((a * weights).sum(), (users, items))
    gb = torch.autograd.grad((b * weights).sum(), (users, items))
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (users, items))


def test_factorized_rest_mass_threaded_blocks_and_grouped_exclusions(monkeypatch):
    """Blocks dealt to 2 Python threads; exclusions given as two row-ordered groups."""
    monkeypatch.setattr(losses, "_BLOCK_BYTES", 300)      # 2 rows of 30 float32 per block
    torch.set_num_threads(2)
    rng = np.random.RandomState(3)
    users = torch.from_numpy(rng.randn(9, 4).astype(np.float32)).requires_grad_(True)
    items = torch.from_numpy(rng.randn(30, 4).astype(np.float32)).requires_grad_(True)
    train = torch.from_numpy(np.unique(rng.randint(0, 9 * 30, size=40)))
    targets = torch.from_numpy(rng.randint(0, 30, size=(9, 5)))
    rows = torch.arange(9).unsqueeze(1)
    groups = [train, (rows * 30 + targets).flatten()]     # second group: unsorted within rows
    a = factorized_rest_log_mass(users, items, groups, 40.0, Workspace())
    b = rest_log_mass(users @ items.T, torch.cat(groups))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.get_num_threads() == 2                  # restored after the threaded blocks
    weights = torch.from_numpy(rng.rand(9).astype(np.float32))
    ga = torch.autograd.grad((a * weights).sum(), (users, items))
    gb = torch.autograd.grad((b * weights).sum(), (users, items))
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def test_row_block_threads_multiply_like_one_thread(monkeypatch):
    """A new pool thread's matmul gives the bits of a one-thread matmul: OpenMP's and MKL's thread
    counts are per thread, and a new thread started at every core (two MKL threads here, whose
    sums of 3,000 terms differ from one thread's), which made HetComp's gradients depend on when
    the pool's threads were made."""
    monkeypatch.setattr(losses, "_POOL", None)        # fresh threads, as in a new process
    torch.manual_seed(0)
    left, right = torch.randn(6, 3000), torch.rand(3000, 87)
    expected = left @ right                           # one thread (the fixture)
    torch.set_num_threads(2)
    parts = losses.over_row_blocks(lambda firsts: left @ right, 2, 1, torch.device("cpu"))
    assert len(parts) == 2 and all(torch.equal(part, expected) for part in parts)


def test_factorized_rest_mass_float32_no_overflow():
    users = torch.full((2, 6), 3.0)               # raw scores 25 * 9 * 6 >> 40: clamped to 40
    items = torch.full((100, 6), 5.0)
    out = factorized_rest_log_mass(users, items, torch.tensor([0, 1, 2]), 40.0, Workspace())
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(40.0 + math.log(97), rel=1e-6)
    assert out[1].item() == pytest.approx(40.0 + math.log(100), rel=1e-6)


def test_hand_case_k2_five_items():
    """K = 2, a 5-item catalogue, one training item, worked by hand."""
    s = [1.0, 2.0, 0.0, -1.0, 0.5]               # item 0 is the training item (observed list [0])
    scores = torch.tensor([s], dtype=torch.float64)
    train, observed, top = [[0]], torch.tensor([[0]]), torch.tensor([[1, 2]])
    e = [math.exp(v) for v in s]
    z_t = e[3] + e[4]                             # rest of T = {1, 2}: items 3, 4 (not 0)
    z_t1 = e[2] + e[3] + e[4]                     # rest of T[:1] = {1}: items 2, 3, 4
    overall = (-math.log(e[0] / (e[0] + z_t)) - math.log(e[1] / (e[1] + z_t))
               - math.log(e[2] / (e[2] + z_t)))
    assert _vector_overall(scores, train, observed, top).item() == pytest.approx(overall, rel=1e-12)
    pl_obs = -(s[0] - math.log(e[0] + z_t))       # P competes with the rest of T[:2]
    pl_top2 = -(s[1] - math.log(e[1] + e[2] + z_t)) - (s[2] - math.log(e[2] + z_t))
    pl_top1 = -(s[1] - math.log(e[1] + z_t1))
    rank = pl_obs + 0.5 * (pl_top2 + pl_top1)
    assert _vector_rank(scores, train, observed, top, (2, 1)).item() == pytest.approx(rank, rel=1e-12)
    # the plain PL function on its own
    log_rest = torch.tensor([math.log(z_t)], dtype=torch.float64)
    assert plackett_luce(scores[:, [1, 2]], log_rest).item() == pytest.approx(pl_top2, rel=1e-12)


def test_training_items_never_enter_the_rest_mass():
    scores, train, observed, top = _problem(scale=1.0)
    mask = _exclude_mask(train, top, scores.shape[1])
    before = rest_log_mass(scores, mask)
    boosted = scores.clone()
    for u, items in enumerate(train):
        boosted[u, items] += 25.0                 # training items now dominate every row
    assert torch.allclose(rest_log_mass(boosted, mask), before, rtol=0, atol=0)
    boosted.requires_grad_(True)
    loss = (_vector_overall(boosted, train, observed, top)
            + _vector_rank(boosted, train, observed, top, (5, 2)))
    loss.backward()
    for u, items in enumerate(train):
        in_lists = set(observed[u].tolist())
        for j in items:
            if j not in in_lists:                 # unlisted training items: no gradient at all
                assert boosted.grad[u, j].item() == 0.0
    # and the fused version on flat indices
    rows, cols = mask.nonzero(as_tuple=True)
    flat = rows * scores.shape[1] + cols
    u = torch.randn(5, 3, dtype=torch.float64)
    i = torch.randn(40, 3, dtype=torch.float64)
    s = u @ i.T
    assert torch.allclose(factorized_rest_log_mass(u, i, flat, None), rest_log_mass(s, mask))
