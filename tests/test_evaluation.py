"""The full-ranking evaluator: hand-computed metrics, exclusion masks, batch-size invariance."""

import math

import numpy as np
import pytest
import torch

from hetcomp.data.store import Split, to_csr
from hetcomp.evaluation import Evaluator, ndcg_at_k, recall_at_k, top_unobserved


def _split(train, valid, test, n_users, n_items):
    def csr(pairs):
        users, items = (np.array(x, dtype=np.int64) for x in zip(*pairs)) if pairs else ([], [])
        return to_csr(np.asarray(users), np.asarray(items), (n_users, n_items))

    return Split(train=csr(train), valid=csr(valid), test=csr(test))


def _fixed_scores(matrix):
    table = torch.as_tensor(matrix, dtype=torch.float32)
    return lambda users: table[users]


def test_recall_and_ndcg_by_hand():
    hits = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    n_relevant = torch.tensor([4.0, 2.0], dtype=torch.float64)
    assert recall_at_k(hits, n_relevant, 3).tolist() == [0.5, 0.0]
    dcg = 1.0 + 1.0 / math.log2(4)
    idcg = 1.0 + 1.0 / math.log2(3) + 1.0 / math.log2(4)  # min(|GT|=4, K=3) ideal hits
    assert ndcg_at_k(hits, n_relevant, 3).tolist() == pytest.approx([dcg / idcg, 0.0])


def test_fewer_relevant_than_k_uses_min_in_idcg():
    hits = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    n_relevant = torch.tensor([1.0], dtype=torch.float64)
    assert recall_at_k(hits, n_relevant, 4).item() == 1.0
    assert ndcg_at_k(hits, n_relevant, 4).item() == pytest.approx(1.0 / math.log2(3))


def test_exclusion_masks_and_k_larger_than_catalogue():
    # user 0: train {0}, valid {1}, test {2}; 4 items; K=10 exceeds the catalogue.
    split = _split([(0, 0)], [(0, 1)], [(0, 2)], n_users=1, n_items=4)
    scores = _fixed_scores([[9.0, 1.0, 8.0, 5.0]])  # train item 0 best, test item 2 second
    result = Evaluator(split, ks=(1, 10)).evaluate(scores)
    # validation ranking excludes train (0) and test (2): [3, 1] -> item 1 at rank 2.
    assert result["valid"].means()["recall@1"] == 0.0
    assert result["valid"].means()["recall@10"] == 1.0
    assert result["valid"].means()["ndcg@10"] == pytest.approx(1.0 / math.log2(3))
    # test ranking excludes train (0) and valid (1): [2, 3] -> hit at rank 1.
    assert result["test"].means()["recall@1"] == 1.0
    assert result["test"].means()["ndcg@1"] == 1.0


def test_users_without_heldout_items_are_not_evaluated():
    split = _split([(0, 0), (1, 0)], [(0, 1)], [(0, 2), (1, 2)], n_users=2, n_items=3)
    assert split.eval_users.tolist() == [0]
    result = Evaluator(split).evaluate(_fixed_scores(np.zeros((2, 3))))
    assert result["test"].users.tolist() == [0]


def test_no_hits_gives_zero():
    split = _split([(0, 0)], [(0, 1)], [(0, 2)], n_users=1, n_items=30)
    scores = np.arange(30, dtype=np.float32)[::-1].copy()
    scores[1] = scores[2] = -100.0
    result = Evaluator(split, ks=(10,)).evaluate(_fixed_scores(scores[None]))
    assert result["test"].means() == {"recall@10": 0.0, "ndcg@10": 0.0}


def test_results_do_not_depend_on_batch_size(tiny_split):
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(tiny_split.n_users, tiny_split.n_items, generator=generator)
    results = [Evaluator(tiny_split, batch_size=b).evaluate(lambda u: table[u]) for b in (1, 7, 4096)]
    for part in ("valid", "test"):
        for name, values in results[0][part].per_user.items():
            for other in results[1:]:
                np.testing.assert_allclose(other[part].per_user[name], values, rtol=0, atol=1e-12)


def test_top_unobserved_skips_training_items():
    split = _split([(0, 0), (0, 3)], [(0, 1)], [(0, 2)], n_users=1, n_items=5)
    scores = _fixed_scores([[5.0, 1.0, 2.0, 9.0, 3.0]])
    assert top_unobserved(scores, split.train, 3).tolist() == [[4, 2, 1]]
