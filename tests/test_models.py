"""The six backbones: they learn planted structure, score shapes, determinism, sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import hetcomp.models  # noqa: F401  (registers the models)
from hetcomp import REPO_ROOT
from hetcomp.config import load_yaml, resolve_overrides
from hetcomp.data.store import to_csr
from hetcomp.evaluation import Evaluator
from hetcomp.models.base import ModelTask
from hetcomp.models.lightgcn import _SymmetricSpMM, normalized_adjacency
from hetcomp.models.sampling import InteractionSampler, gather_rows
from hetcomp.registry import MODELS
from hetcomp.training import LoopConfig, fit

TEACHERS = ("mf", "cml", "neumf", "lightgcn", "vae", "iae")

#: Small sizes for the 60 x 80 tiny split: (constructor kwargs, learning rate, epochs).
SMALL = {
    "mf": (dict(dim=16, batch_size=128, init_std=0.1), 0.02, 30),
    "cml": (dict(dim=16, batch_size=128, n_neg=5), 0.02, 30),
    "neumf": (dict(dim=16, mlp_dim=8, batch_size=128), 0.02, 30),
    "lightgcn": (dict(dim=16, batch_size=128), 0.02, 30),
    "vae": (dict(hidden=32, latent=16, batch_size=16, total_anneal_steps=20), 0.01, 30),
    "iae": (dict(hidden=32, batch_size=16, loss_type="bce"), 0.01, 30),
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared machine extra threads only
    spin (several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name, split, seed=0):
    torch.manual_seed(seed)
    model = MODELS.get(name)(split.n_users, split.n_items, **SMALL[name][0])
    model.setup(split.train, torch.device("cpu"))
    return model


def train(name, split, seed=0, epochs=None):
    model = build(name, split, seed)
    generator = torch.Generator().manual_seed(seed)
    _, lr, default_epochs = SMALL[name]
    config = LoopConfig(lr=lr, max_epochs=epochs or default_epochs, eval_every=5, patience=100)
    result = fit(ModelTask(model), Evaluator(split), config, generator)
    return model, result


def random_recall_at_10(split) -> float:
    """Expected validation Recall@10 of a random ranking over each user's candidate items."""
    candidates = split.n_items - np.diff(split.train.indptr) - np.diff(split.test.indptr)
    return float(np.mean(np.minimum(10 / candidates, 1.0)))


def test_all_six_registered():
    assert set(TEACHERS) <= set(MODELS.names())


@pytest.mark.parametrize("name", TEACHERS)
def test_learns_planted_structure(name, tiny_split):
    _, result = train(name, tiny_split)
    recall = result.valid.means()["recall@10"]
    assert recall > 2.0 * random_recall_at_10(tiny_split), (name, recall)


@pytest.mark.parametrize("name", TEACHERS)
def test_score_shape_and_parameter_count(name, tiny_split):
    model = build(name, tiny_split)
    model.train(False)
    users = torch.tensor([0, 5, 59])
    with torch.no_grad():
        scores = model.score(users)
    assert scores.shape == (3, tiny_split.n_items)
    assert torch.isfinite(scores).all()
    assert model.n_parameters() == sum(p.numel() for p in model.parameters()) > 0
    # a batch loss is a finite scalar with gradients
    model.train(True)
    batch = next(iter(model.epoch_batches(0, torch.Generator().manual_seed(0))))
    loss = model.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("name", TEACHERS)
def test_same_seed_same_scores(name, tiny_split):
    users = torch.arange(tiny_split.n_users)
    first, _ = train(name, tiny_split, seed=3, epochs=3)
    second, _ = train(name, tiny_split, seed=3, epochs=3)
    with torch.no_grad():
        assert torch.equal(first.score(users), second.score(users))


@pytest.mark.parametrize("name", ["mf", "cml", "neumf", "lightgcn"])
def test_pairwise_batches_cover_every_interaction_once(name, tiny_split):
    model = build(name, tiny_split)
    batches = list(model.epoch_batches(0, torch.Generator().manual_seed(1)))
    users = torch.cat([b[0] for b in batches]).numpy()
    pos = torch.cat([b[1] for b in batches]).numpy()
    assert all(len(b[0]) <= model.batch_size for b in batches)
    seen = to_csr(users, pos, tiny_split.train.shape)
    assert len(users) == tiny_split.train.nnz and (seen != tiny_split.train).nnz == 0
    neg = torch.cat([b[2].reshape(len(b[0]), -1) for b in batches])
    assert neg.shape[1] == model.n_neg
    dense = tiny_split.train.toarray() > 0
    assert not dense[np.repeat(users, model.n_neg), neg.reshape(-1).numpy()].any()


def test_negatives_never_collide_even_for_dense_users():
    rng = np.random.RandomState(0)
    n_users, n_items = 30, 12
    dense = np.ones((n_users, n_items), dtype=bool)
    dense[rng.rand(n_users, n_items) < 0.3] = False
    dense[:, 0] = False          # every user has at least one free item
    dense[0, 1:] = True          # user 0 has exactly one free item (0)
    train = sp.csr_matrix(dense.astype(np.float32))
    sampler = InteractionSampler(train)
    users = torch.arange(n_users).repeat_interleave(50)
    negatives = sampler.negatives(users, 3, torch.Generator().manual_seed(0))
    assert not dense[users.numpy()[:, None], negatives.numpy()].any()
    assert (negatives[users == 0] == 0).all()
    assert sampler.is_training(torch.tensor([0, 1]), torch.tensor([5, 0])).tolist() == [True, False]


def test_gather_rows_matches_scipy():
    matrix = sp.random(9, 7, density=0.4, format="csr", random_state=1)
    indptr, indices = torch.from_numpy(matrix.indptr.astype(np.int64)), torch.from_numpy(matrix.indices.astype(np.int64))
    rows = torch.tensor([3, 0, 8, 3])
    columns, offsets, counts = gather_rows(indptr, indices, rows)
    for j, row in enumerate(rows.tolist()):
        got = columns[offsets[j]:offsets[j] + counts[j]].numpy()
        assert got.tolist() == matrix[row].indices.tolist()


def test_lightgcn_propagation_is_normalised_and_differentiable():
    train = sp.random(6, 5, density=0.5, format="csr", random_state=2)
    train.data[:] = 1
    adj = normalized_adjacency(train)
    dense = adj.toarray()
    assert np.allclose(dense, dense.T)
    degree = np.asarray((train > 0).sum(1)).ravel()
    u, i = train.nonzero()
    item_degree = np.asarray((train > 0).sum(0)).ravel()
    assert np.allclose(dense[u, 6 + i], 1 / np.sqrt(degree[u] * item_degree[i]))
    tensors = [torch.from_numpy(a) for a in (adj.indptr.astype(np.int64), adj.indices.astype(np.int64),
                                             adj.data.astype(np.float64))]
    x = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(_SymmetricSpMM.apply(x, *tensors), torch.from_numpy(dense.astype(np.float64)) @ x)
    assert torch.autograd.gradcheck(lambda x: _SymmetricSpMM.apply(x, *tensors), (x,))


def test_neumf_fast_scoring_matches_pairwise_forward(tiny_split):
    model = build("neumf", tiny_split)
    model.score_chunk = 1000  # force several chunks
    model.train(False)
    users = torch.tensor([0, 7, 33, 59])
    with torch.no_grad():
        fast = model.score(users)
        slow = model.pair_logits(users[:, None].expand(-1, tiny_split.n_items),
                                 torch.arange(tiny_split.n_items).expand(len(users), -1))
    assert torch.allclose(fast, slow, atol=1e-5)


def test_cml_stays_in_unit_ball_and_scores_negative_distance(tiny_split):
    model, _ = train("cml", tiny_split, epochs=2)
    assert model.user_emb.weight.norm(dim=1).max() <= 1 + 1e-5
    assert model.item_emb.weight.norm(dim=1).max() <= 1 + 1e-5
    with torch.no_grad():
        scores = model.score(torch.tensor([4]))
        expected = -((model.user_emb.weight[4] - model.item_emb.weight) ** 2).sum(1)
    assert torch.allclose(scores[0], expected, atol=1e-5)


@pytest.mark.parametrize("name", ["lightgcn", "iae"])
def test_cached_scores_follow_parameter_changes(name, tiny_split):
    model = build(name, tiny_split)
    users = torch.arange(5)
    model.train(False)
    with torch.no_grad():
        before = model.score(users)
        assert torch.equal(before, model.score(users))      # cache hit is consistent
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train(True)
    for batch in model.epoch_batches(0, torch.Generator().manual_seed(0)):
        optimizer.zero_grad()
        model.loss(batch).backward()
        optimizer.step()
        model.after_step()
    model.train(False)
    with torch.no_grad():
        after = model.score(users)
        assert not torch.allclose(before, after)
        model.load_state_dict(state)
        assert torch.allclose(model.score(users), before)


def test_iae_multinomial_variant_learns(tiny_split):
    """SMALL trains the BCE variant; the configured teacher uses the multinomial one."""
    torch.manual_seed(0)
    model = MODELS.get("iae")(tiny_split.n_users, tiny_split.n_items, hidden=32, batch_size=16,
                              loss_type="multinomial")
    model.setup(tiny_split.train, torch.device("cpu"))
    result = fit(ModelTask(model), Evaluator(tiny_split),
                 LoopConfig(lr=0.01, max_epochs=30, eval_every=5, patience=100),
                 torch.Generator().manual_seed(0))
    assert result.valid.means()["recall@10"] > 2.0 * random_recall_at_10(tiny_split)


@pytest.mark.parametrize("name", TEACHERS)
def test_config_yaml_is_valid(name):
    from hetcomp.commands.train_teacher import split_config

    path = Path(REPO_ROOT) / "config" / "models" / f"{name}.yaml"
    raw = load_yaml(path)
    for dataset in [None, *(raw.get("datasets") or {})]:
        loop, trajectory, kwargs = split_config(resolve_overrides(raw, dataset), MODELS.get(name), str(path))
        assert trajectory == {"n_checkpoints": 4, "top_n": 100}
        assert loop.lr > 0 and loop.max_epochs >= 1
        MODELS.get(name)(7, 11, **kwargs)  # the constructor accepts every key
