"""The fused rest-mass kernel against the float64 torch reference: values, gradients, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed: the fused rest-mass kernel is unavailable")

from hetcomp.distill import fused_rest, losses  # noqa: E402
from hetcomp.distill.losses import factorized_rest_log_mass, rest_kernel, rest_log_mass  # noqa: E402
from hetcomp.errors import HetCompError  # noqa: E402

RTOL = 1e-6


def _problem(seed, n_rows=7, n_items=300, dim=6, scale=0.7, n_train=5, n_targets=20):
    """float32 embeddings and two row-ordered exclusion groups (training items, target lists),
    with duplicates inside and across the groups."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randn(n_rows, dim, generator=g) * scale
    items = torch.randn(n_items, dim, generator=g) * scale
    rows = torch.arange(n_rows).unsqueeze(1)
    train = torch.sort(torch.randint(0, n_items, (n_rows, n_train), generator=g), 1).values
    targets = torch.randint(0, n_items, (n_rows, n_targets), generator=g)
    targets[:, 1] = targets[:, 0]                         # a duplicate inside a list
    targets[:, 2] = train[:, 0]                           # a training item in the list too
    groups = [(rows * n_items + train).flatten(), (rows * n_items + targets).flatten()]
    return users, items, groups


def _reference(users, items, groups, clamp):
    """float64 autograd reference: ``rest_log_mass`` of the clamped score matrix."""
    u = users.double().requires_grad_(True)
    i = items.double().requires_grad_(True)
    s = u @ i.T
    if clamp is not None:
        s = s.clamp(-clamp, clamp)
    return u, i, rest_log_mass(s, torch.cat(groups))


def _fused(users, items, groups, clamp):
    u = users.clone().requires_grad_(True)
    i = items.clone().requires_grad_(True)
    return u, i, fused_rest.FusedRestLogMass.apply(u, i, groups, clamp)


def _check_against_reference(users, items, groups, clamp, weights=None):
    u, i, out = _fused(users, items, groups, clamp)
    ru, ri, ref = _reference(users, items, groups, clamp)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=0)
    weights = torch.linspace(0.5, 1.5, len(out)) if weights is None else weights
    (out * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    for got, want in ((u.grad, ru.grad), (i.grad, ri.grad)):
        # float32 scores: relative to the largest gradient entry (tiny entries carry absolute error)
        torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=RTOL * float(want.abs().max()))
    return u.grad, i.grad


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 64 items, so that a few hundred items span several tiles and a partial last one."""
    monkeypatch.setattr(fused_rest, "TILE", 64)


@pytest.mark.parametrize("n_rows", [6, 7])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("clamp", [40.0, None])
def test_values_and_gradients_equal_the_reference(clamp, threads, n_rows, one_thread):
    # rows go in groups of 4: with 2 threads, 7 rows are chunks of 4 and 3 (a padded group) and
    # 6 rows chunks of 3 and 3 (the first chunk's group reads a row of the other chunk)
    torch.set_num_threads(threads)
    _check_against_reference(*_problem(0, n_rows=n_rows), clamp)


def test_scores_at_the_clamp():
    """Scores far beyond +-40: clamped entries count with the clamped score and pass no gradient."""
    users, items, groups = _problem(1, scale=4.0)
    scores = users @ items.T
    assert (scores > 40).any() and (scores < -40).any() and (scores.abs() < 40).any()
    _check_against_reference(users, items, groups, 40.0)
    # an item whose every score is clamped gets no gradient at all
    users[1:] = users[0]
    items[0] = 50.0 * users[0].sign()
    _, grad_items = _check_against_reference(users, items, groups, 40.0)
    assert bool(((users @ items[0]).abs() > 40).all()) and bool((grad_items[0] == 0).all())


@pytest.mark.parametrize("threads", [1, 2])
def test_no_clamp_with_scores_beyond_the_safe_shift(threads, one_thread):
    """Without a clamp and with score bounds above 40 the shift is each row's largest kept score
    (with 2 threads each computes its chunk's shifts while the other may read them)."""
    torch.set_num_threads(threads)
    users, items, groups = _problem(2, n_rows=6, scale=2.0)
    bound = users.norm(dim=1) * items.norm(dim=1).max()
    assert bool((bound > fused_rest.SAFE_SHIFT).any()) and bool((bound < fused_rest.SAFE_SHIFT).any())
    _check_against_reference(users, items, groups, None)


def test_rows_with_nothing_left():
    """A row whose every item is excluded: ``log Z = -inf`` and no gradient; other rows as usual."""
    users, items, groups = _problem(3, n_rows=5, n_items=70)
    everything = 2 * 70 + torch.arange(70)
    train = torch.sort(torch.cat([groups[0], everything])).values        # still ordered by row
    u, i, out = _fused(users, items, [train, groups[1]], 40.0)
    assert out[2].item() == -np.inf and torch.isfinite(out[[0, 1, 3, 4]]).all()
    out.backward(torch.ones_like(out))      # even with a gradient on the empty row
    assert torch.isfinite(u.grad).all() and (u.grad[2] == 0).all() and torch.isfinite(i.grad).all()
    keep = torch.tensor([0, 1, 3, 4])
    rows_kept = [g[(g // 70 != 2)] for g in (train, groups[1])]
    rows_kept = [torch.where(g // 70 > 2, g - 70, g) for g in rows_kept]    # renumber rows 3, 4
    _check_against_reference(users[keep], items, rows_kept, 40.0)


def _row_exclusions(groups, n_rows, n_items):
    flat = torch.sort(torch.cat(groups)).values
    return losses.RowExclusions(torch.searchsorted(flat, torch.arange(n_rows + 1) * n_items), flat % n_items)


@pytest.mark.parametrize("threads", [1, 2])
def test_presorted_row_exclusions_equal_the_flat_groups(threads, one_thread, monkeypatch):
    """``RowExclusions`` (each row's items sorted, as HetComp keeps them) give the same result as
    the flat groups: bit for bit in the fused kernel, and the torch path agrees."""
    torch.set_num_threads(threads)
    users, items, groups = _problem(6, n_rows=6)
    rows = _row_exclusions(groups, 6, len(items))
    assert torch.equal(rows.flat(len(items)), torch.sort(torch.cat(groups)).values)
    results = []
    for exclude in (groups, rows):
        u, i, out = _fused(users, items, exclude, 40.0)
        (out * torch.arange(6.0)).sum().backward()
        results.append((out, u.grad, i.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    monkeypatch.setenv(losses.REST_KERNEL_ENV, "torch")
    torch.testing.assert_close(factorized_rest_log_mass(users, items, rows, 40.0), results[0][0],
                               rtol=RTOL, atol=0)


def test_two_runs_are_bit_identical(one_thread):
    torch.set_num_threads(2)
    users, items, groups = _problem(4, n_rows=11)
    results = []
    for _ in range(2):
        u, i, out = _fused(users, items, groups, 40.0)
        (out * torch.arange(11.0)).sum().backward()
        results.append((out, u.grad, i.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_dispatch_and_override(monkeypatch, one_thread):
    users, items, groups = _problem(5)
    monkeypatch.delenv(losses.REST_KERNEL_ENV, raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert rest_kernel(users, items) == "fused"
    assert rest_kernel(users.double(), items.double()) == "torch"
    torch.set_num_threads(2)                  # spinning OpenMP workers: auto keeps the torch path
    assert rest_kernel(users, items) == "torch"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert rest_kernel(users, items) == "fused"
    monkeypatch.setenv(losses.REST_KERNEL_ENV, "torch")
    assert rest_kernel(users, items) == "torch"
    on_torch = factorized_rest_log_mass(users, items, groups, 40.0)
    monkeypatch.setenv(losses.REST_KERNEL_ENV, "fused")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert rest_kernel(users, items) == "fused"
    torch.testing.assert_close(factorized_rest_log_mass(users, items, groups, 40.0), on_torch,
                               rtol=1e-5, atol=0)
    with pytest.raises(HetCompError, match="float32 CPU"):
        rest_kernel(users.double(), items.double())
    monkeypatch.setenv(losses.REST_KERNEL_ENV, "fast")
    with pytest.raises(HetCompError, match="must be one of"):
        rest_kernel(users, items)
