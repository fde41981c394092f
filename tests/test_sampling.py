"""ItemSampler: negatives outside training and list items, and rank-based draws."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import chisquare

from baselines.sampling import ItemSampler
from hetcomp.errors import HetCompError


def random_train(n_users=30, n_items=60, density=0.2, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.random((n_users, n_items)) < density
    return sp.csr_matrix(dense.astype(np.float32))


def random_lists(n_users, n_items, length, seed=1):
    rng = np.random.default_rng(seed)
    listed = torch.tensor(np.stack([rng.choice(n_items, length, replace=False) for _ in range(n_users)]))
    valid = torch.tensor(rng.random((n_users, length)) < 0.8)
    return listed, valid


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_uniform_outside_excludes_training_and_listed_items_and_is_distinct():
    train = random_train()
    sampler = ItemSampler(train, torch.device("cpu"))
    users = torch.arange(30)
    listed, valid = random_lists(30, 60, 10)
    drawn = sampler.uniform_outside(users, listed, valid, 20, generator())
    assert drawn.shape == (30, 20)
    dense = train.toarray() > 0
    for b in range(30):
        row = drawn[b].tolist()
        assert len(set(row)) == 20
        assert not dense[b, row].any()
        assert not set(row) & set(listed[b][valid[b]].tolist())
        assert all(0 <= item < 60 for item in row)


def test_uniform_outside_short_rows_take_the_exact_path():
    # user 0 owns all but 5 items: rejection always comes up short for n = 4
    dense = np.zeros((2, 100), dtype=np.float32)
    dense[0, 5:] = 1
    sampler = ItemSampler(sp.csr_matrix(dense), torch.device("cpu"))
    listed = torch.tensor([[0], [0]])
    valid = torch.tensor([[True], [True]])
    drawn = sampler.uniform_outside(torch.tensor([0, 1]), listed, valid, 4, generator())
    assert sorted(drawn[0].tolist()) == [1, 2, 3, 4]
    assert len(set(drawn[1].tolist())) == 4 and 0 not in drawn[1].tolist()


def test_uniform_outside_repeats_when_too_few_items_and_rejects_none():
    dense = np.ones((2, 10), dtype=np.float32)
    dense[0, [2, 7]] = 0
    sampler = ItemSampler(sp.csr_matrix(dense), torch.device("cpu"))
    none = torch.zeros(2, 1, dtype=torch.bool)
    drawn = sampler.uniform_outside(torch.tensor([0]), torch.zeros(1, 1, dtype=torch.long), none[:1], 5,
                                    generator())
    assert set(drawn[0].tolist()) == {2, 7}
    with pytest.raises(HetCompError, match="no item outside"):
        sampler.uniform_outside(torch.tensor([1]), torch.zeros(1, 1, dtype=torch.long), none[:1], 5,
                                generator())


def test_uniform_outside_is_deterministic_under_a_seeded_generator():
    sampler = ItemSampler(random_train(), torch.device("cpu"))
    listed, valid = random_lists(30, 60, 10)
    first = sampler.uniform_outside(torch.arange(30), listed, valid, 15, generator(7))
    again = sampler.uniform_outside(torch.arange(30), listed, valid, 15, generator(7))
    other = sampler.uniform_outside(torch.arange(30), listed, valid, 15, generator(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_uniform_outside_is_uniform_over_the_allowed_items():
    # one user, 40 items: 8 training, 6 listed (one more listed but invalid) -> 26 allowed items
    dense = np.zeros((1, 40), dtype=np.float32)
    dense[0, :8] = 1
    sampler = ItemSampler(sp.csr_matrix(dense), torch.device("cpu"))
    listed = torch.tensor([[8, 9, 10, 11, 12, 13, 14]])
    valid = torch.tensor([[True] * 6 + [False]])
    users = torch.zeros(4000, dtype=torch.long)
    drawn = sampler.uniform_outside(users, listed.expand(4000, -1), valid.expand(4000, -1), 5, generator(3))
    counts = np.bincount(drawn.flatten().numpy(), minlength=40)
    assert counts[:14].sum() == 0
    allowed = counts[14:]
    assert (allowed > 0).all()
    assert chisquare(allowed).pvalue > 1e-3


def test_uniform_outside_never_builds_catalogue_wide_tensors_on_the_fast_path(monkeypatch):
    sampler = ItemSampler(random_train(n_items=5000, density=0.01), torch.device("cpu"))
    monkeypatch.setattr(sampler, "_exact", lambda *args: pytest.fail("exact path on easy rows"))
    listed, valid = random_lists(30, 5000, 100)
    drawn = sampler.uniform_outside(torch.arange(30), listed, valid, 40, generator())
    assert drawn.shape == (30, 40)


def test_by_rank_returns_distinct_valid_entries_in_list_order():
    ranked = torch.tensor([[5, 3, 9, 1, 7, -1, -1], [2, -1, -1, -1, -1, -1, -1]])
    items, valid = ItemSampler.by_rank(ranked, 3, 2.0, generator())
    assert valid[0].all() and valid[1].tolist() == [True, False, False]
    assert items[1].tolist() == [2, -1, -1]
    row = items[0].tolist()
    assert len(set(row)) == 3 and set(row) <= {5, 3, 9, 1, 7}
    order = [ranked[0].tolist().index(item) for item in row]
    assert order == sorted(order)


def test_by_rank_is_deterministic_under_a_seeded_generator():
    ranked = torch.arange(50).repeat(20, 1)
    first = ItemSampler.by_rank(ranked, 5, 10.0, generator(4))
    again = ItemSampler.by_rank(ranked, 5, 10.0, generator(4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_by_rank_single_draw_follows_exp_minus_rank_over_temperature():
    length, temperature, draws = 12, 3.0, 20000
    ranked = torch.arange(length).repeat(draws, 1)
    items, valid = ItemSampler.by_rank(ranked, 1, temperature, generator(11))
    assert valid.all()
    observed = np.bincount(items.flatten().numpy(), minlength=length)
    p = np.exp(-np.arange(length) / temperature)
    expected = draws * p / p.sum()
    assert expected.min() > 5   # every cell large enough for the chi-square approximation
    assert chisquare(observed, expected).pvalue > 1e-3


def test_by_rank_without_replacement_matches_successive_sampling():
    # P(entry i among 2 draws of 3) = p_i + sum_{j != i} p_j p_i / (1 - p_j)
    length, temperature, draws = 3, 1.0, 20000
    ranked = torch.arange(length).repeat(draws, 1)
    items, _ = ItemSampler.by_rank(ranked, 2, temperature, generator(12))
    w = np.exp(-np.arange(length) / temperature)
    p = w / w.sum()
    inclusion = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(length) if j != i)
                          for i in range(length)])
    observed = np.bincount(items.flatten().numpy(), minlength=length)
    assert chisquare(observed, draws * inclusion).pvalue > 1e-3
