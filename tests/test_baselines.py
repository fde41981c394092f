"""List-wise KD baselines (RRD, CL-DRD, MTD) and the shared pieces of baselines/common.py: losses
against naive per-user references (values and gradients, float64), per-epoch sampling, curricula,
determinism, configs, and a few training epochs on tiny synthetic data.

CD, DCD and RD have their own test module."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from baselines.cldrd import CLDRD, tiered_lambda_loss
from baselines.common import (NEG, TrainIndex, masked_logsumexp, method_config, plackett_luce_loss,
                              soft_bce_loss, student_rankings, weighted_logsigmoid_loss)
from baselines.mtd import GATE_KEY, MTD
from baselines.rrd import RRD
from hetcomp.config import resolve_overrides
from hetcomp.data.store import Split, to_csr
from hetcomp.errors import HetCompError
from hetcomp.knowledge import TeacherKnowledge, combine_rankings
from hetcomp.models.mf import MF

from doubles import ScoreOnly
from hetcomp.registry import METHODS, load_all

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CLASSES = {"rrd": RRD, "cldrd": CLDRD, "mtd": MTD}


# -------------------------------------------------------------------------------------------
# tiny synthetic data
# -------------------------------------------------------------------------------------------

def make_split(n_users=12, n_items=40, seed=0) -> Split:
    rng = np.random.default_rng(seed)
    parts = {"train": ([], []), "valid": ([], []), "test": ([], [])}
    for u in range(n_users):
        items = rng.permutation(n_items)[:7]
        for name, chosen in (("train", items[:5]), ("valid", items[5:6]), ("test", items[6:7])):
            parts[name][0].extend([u] * len(chosen))
            parts[name][1].extend(chosen.tolist())
    mats = {name: to_csr(np.array(us), np.array(its), (n_users, n_items))
            for name, (us, its) in parts.items()}
    return Split(meta={"dataset": "tiny"}, **mats)


def make_knowledge(split: Split, n_teachers=3, n_checkpoints=2, depth=15, top_k=10,
                   seed=1) -> TeacherKnowledge:
    """Teachers: noisy copies of one hidden preference, top-``depth`` non-training items each."""
    rng = np.random.default_rng(seed)
    train = split.train.toarray() > 0
    base = rng.normal(size=train.shape)
    lists = np.empty((n_teachers, n_checkpoints, split.n_users, depth), dtype=np.int32)
    for t in range(n_teachers):
        for c in range(n_checkpoints):
            noise = 1.5 / (c + 1)
            scores = base + noise * rng.normal(size=train.shape)
            scores[train] = -np.inf
            lists[t, c] = np.argsort(-scores, axis=1)[:, :depth]
    final = combine_rankings(lists[:, -1], split.n_items, top_k)
    observed = np.full((split.n_users, 10), -1, dtype=np.int32)
    return TeacherKnowledge(teachers=[f"T{t}" for t in range(n_teachers)], trajectories=lists,
                            observed=observed, final_topk=final, n_items=split.n_items, meta={})


def make_student(split: Split, seed=0, batch_size=16, double=False) -> MF:
    torch.manual_seed(seed)
    student = MF(split.n_users, split.n_items, dim=4, batch_size=batch_size, init_std=0.5)
    student.setup(split.train, CPU)
    return student.double() if double else student


def fixed_student(split: Split, scores: np.ndarray) -> MF:
    """An MF whose scores are exactly ``scores [n_users, n_items]`` (item embeddings = identity)."""
    student = MF(split.n_users, split.n_items, dim=split.n_items, batch_size=16)
    student.setup(split.train, CPU)
    with torch.no_grad():
        student.user_emb.weight.copy_(torch.as_tensor(scores, dtype=torch.float32))
        student.item_emb.weight.copy_(torch.eye(split.n_items))
    return student


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on shared cores: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    split = make_split()
    return split, make_knowledge(split)


def started(distiller, seed=0, epoch=0):
    """The distiller after its epoch-start hooks (per-epoch draws) for ``epoch``."""
    distiller.epoch_batches(epoch, torch.Generator().manual_seed(seed))
    return distiller


def batch_for(users, split):
    """A BPR batch touching exactly ``users`` (one triple each)."""
    users = torch.as_tensor(users, dtype=torch.long)
    pos = torch.as_tensor([split.train.indices[split.train.indptr[u]] for u in users.tolist()])
    neg = torch.as_tensor([next(i for i in range(split.n_items) if split.train[u, i] == 0)
                           for u in users.tolist()])
    return users, pos, neg


# -------------------------------------------------------------------------------------------
# naive references (one user at a time, scalar torch ops so autograd gives reference gradients)
# -------------------------------------------------------------------------------------------

def naive_pl(list_scores, rest_scores):
    """-sum_k [s_k - log(sum_{j>=k} e^{s_j} + sum_rest e^{s_r})]."""
    total = 0.0
    for k, s in enumerate(list_scores):
        mass = sum(torch.exp(x) for x in list(list_scores[k:]) + list(rest_scores))
        total = total - (s - torch.log(mass))
    return total


def naive_tiered(scores, tiers):
    """CL-DRD's loss for one user: ``tiers[i]`` = label order (0 best; equal labels in the middle
    and negative tiers share one value). Mean over pairs with tier_i < tier_j of
    |1/p_i - 1/p_j| * log(1 + exp(s_j - s_i)), p = 1-based position by descending score."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i].detach().item())
    position = {i: p + 1 for p, i in enumerate(order)}
    total, count = 0.0, 0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if tiers[i] < tiers[j]:
                weight = abs(1.0 / position[i] - 1.0 / position[j])
                total = total + weight * torch.log1p(torch.exp(scores[j] - scores[i]))
                count += 1
    return total / max(count, 1)


def cldrd_tiers(n_ordered, list_length, n_negatives):
    return list(range(n_ordered)) + [list_length] * (list_length - n_ordered) + [list_length + 1] * n_negatives


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def gradients(student, loss):
    student.zero_grad()
    loss.backward()
    return student.user_emb.weight.grad.clone(), student.item_emb.weight.grad.clone()


def assert_same_value_and_gradients(student, got, want):
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    (gu, gi), (wu, wi) = gradients(student, got), gradients(student, want)
    assert torch.allclose(gu, wu, rtol=1e-9, atol=1e-12) and torch.allclose(gi, wi, rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------------------------------
# pure losses
# -------------------------------------------------------------------------------------------

def test_plackett_luce_matches_naive():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    rest_scores = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    rest_keep = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]], dtype=torch.bool)
    got = plackett_luce_loss(scores, valid, masked_logsumexp(rest_scores, rest_keep))
    for b in range(3):
        want = naive_pl(scores[b][valid[b]], rest_scores[b][rest_keep[b]])
        assert got[b].item() == pytest.approx(float(want), rel=1e-10)


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_tiered_lambda_loss_matches_naive(dtype, rel):
    """float64: the torch path; float32 on the CPU: the numba kernel (polynomial exp and log1p)."""
    gen = torch.Generator().manual_seed(1)
    scores = (torch.randn(3, 9, generator=gen, dtype=torch.float64) * 3).to(dtype)
    scores[2, 7] = scores[2, 0] + 60.0         # far apart: exp(-|d|) at its float32 floor
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, 4:6] = False                      # padding inside the list (list = 6, negatives = 3)
    for n_ordered in (1, 3, 6):
        got = tiered_lambda_loss(scores, valid, n_ordered, 6)
        tiers = cldrd_tiers(n_ordered, 6, 3)
        for b in range(3):
            keep = valid[b].nonzero().flatten().tolist()
            want = naive_tiered([scores[b, i].double() for i in keep], [tiers[i] for i in keep])
            assert got[b].item() == pytest.approx(float(want), rel=rel)


def test_tiered_lambda_kernel_gradient_matches_float64_autograd():
    """The float32 kernel's gradient (computed with the loss) against float64 autograd on the torch
    path, on a realistic size (100 listed + 40 sampled, last stage and first stage)."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(64, 140, generator=gen, dtype=torch.float64) * 3
    valid = torch.rand(64, 140, generator=gen) > 0.05
    reference = scores.clone().requires_grad_(True)
    fast = scores.float().requires_grad_(True)
    for n_ordered in (10, 100):
        want = tiered_lambda_loss(reference, valid, n_ordered, 100)
        got = tiered_lambda_loss(fast, valid, n_ordered, 100)
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=0)
        weights = torch.linspace(0.5, 1.5, 64, dtype=torch.float64)
        (want_grad,) = torch.autograd.grad((want * weights).sum(), reference)
        (got_grad,) = torch.autograd.grad((got * weights.float()).sum(), fast)
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-6 * float(want_grad.abs().max()))
        assert (got_grad[~valid] == 0).all()


def test_tiered_lambda_loss_blocks_of_the_ordered_group_change_nothing(monkeypatch):
    """The ordered group in blocks of rows (each against the candidates after its first row) gives
    the loss and gradients of one block over the whole group."""
    import baselines.cldrd as cldrd

    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(4, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(4, 11, dtype=torch.bool)
    valid[2, 3] = valid[1, 9] = False
    results = []
    for block in (100, 2, 3):
        monkeypatch.setattr(cldrd, "ORDERED_BLOCK", block)
        loss = tiered_lambda_loss(scores, valid, 7, 8)
        results.append((loss.detach(), torch.autograd.grad(loss.sum(), scores)[0]))
    for got in results[1:]:
        assert torch.allclose(got[0], results[0][0], rtol=1e-12) and torch.allclose(got[1], results[0][1],
                                                                                    rtol=1e-12, atol=1e-15)


def test_listwise_gradients_finite_difference():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    rest_scores = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]], dtype=torch.bool)
    keep = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)

    def pl(s, r):
        return plackett_luce_loss(s, valid, masked_logsumexp(r, keep))

    assert torch.autograd.gradcheck(pl, (scores, rest_scores))
    # distinct scores: the positions (no gradient) are locally constant
    assert torch.autograd.gradcheck(lambda s: tiered_lambda_loss(s, torch.ones_like(valid), 2, 3), (scores,))
    # padding and masked rest items get exactly zero gradient, and no NaN anywhere
    g_s, g_r = torch.autograd.grad(pl(scores, rest_scores).sum(), (scores, rest_scores))
    assert torch.isfinite(g_s).all() and torch.isfinite(g_r).all()
    assert (g_s[~valid] == 0).all() and (g_r[~keep] == 0).all()


def test_empty_rest_and_empty_list():
    scores = torch.tensor([[1.0, 2.0], [0.5, -0.5]], dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True], [False, False]])
    rest = torch.full((2,), NEG, dtype=torch.float64)
    loss = plackett_luce_loss(scores, valid, rest)
    assert loss[0].item() == pytest.approx(float(naive_pl(scores[0].detach(), [])))
    assert loss[1].item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert tiered_lambda_loss(scores.detach(), valid, 1, 2).tolist()[1] == 0.0


def test_pointwise_losses_match_naive():
    scores = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.0, -0.4]], dtype=torch.float64)
    weights = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.4, 0.0], [0.9, 0.2, 0.1]], dtype=torch.float64)
    rd = weighted_logsigmoid_loss(scores, weights)
    cd = soft_bce_loss(scores, labels, weights)
    for b in range(2):
        s, w, q = scores[b].tolist(), weights[b].tolist(), labels[b].tolist()
        assert rd[b].item() == pytest.approx(sum(-wi * math.log(sigmoid(si)) for si, wi in zip(s, w)))
        want = sum(-wi * (qi * math.log(sigmoid(si)) + (1 - qi) * math.log(1 - sigmoid(si)))
                   for si, wi, qi in zip(s, w, q))
        assert cd[b].item() == pytest.approx(want)


def test_capped_student_ranks_equal_exact_ranks_below_the_cap():
    rng = np.random.RandomState(5)
    n_users, n_items = 7, 60
    scores = torch.from_numpy(np.round(rng.randn(n_users, n_items), 1).astype(np.float32))   # ties
    train = to_csr(rng.randint(0, n_users, 40), rng.randint(0, n_items, 40), (n_users, n_items))
    index = TrainIndex(train, CPU)
    items = torch.from_numpy(rng.randint(0, n_items, (n_users, 12)))
    score_fn = lambda users: scores[users]
    top, exact = student_rankings(score_fn, index, n_users, items, 5)
    kept = scores.masked_fill(index.mask(torch.arange(n_users)), -torch.inf)
    naive = (kept.unsqueeze(1) > kept.gather(1, items).unsqueeze(2)).sum(2)
    assert torch.equal(exact, naive)
    for cap in (3, 12, 200):
        capped_top, capped = student_rankings(score_fn, index, n_users, items, 5, rank_cap=cap,
                                              batch_size=3)
        assert torch.equal(capped, naive.clamp(max=cap))
        assert torch.equal(kept.gather(1, capped_top), kept.gather(1, top))    # ties may swap ids


def test_distiller_rankings_from_a_reused_block_equal_the_students_scores(data, monkeypatch):
    """KDBaseline.rankings writes an inner-product student's scores into one reused block (in
    place); the result equals student_rankings on the student's own (copied) scores."""
    import baselines.common as common

    monkeypatch.setattr(common, "RANKING_BATCH", 5)          # several blocks through one buffer
    split, knowledge = data
    distiller = RRD(split, knowledge, make_student(split), {}, CPU)
    items = distiller.topk
    want_top, want_ranks = student_rankings(distiller.student.score, distiller.train_index, split.n_users,
                                            items, 5, rank_cap=8)
    got_top, got_ranks = distiller.rankings(items, 5, rank_cap=8)
    assert torch.equal(got_top, want_top) and torch.equal(got_ranks, want_ranks)


# -------------------------------------------------------------------------------------------
# RRD
# -------------------------------------------------------------------------------------------

def test_rrd_matches_naive_value_and_gradient(data):
    split, knowledge = data
    student = make_student(split, double=True)
    rrd = started(RRD(split, knowledge, student, {"lambda": 0.5, "top_k": 8, "n_uninteresting": 6}, CPU))
    users = [0, 3, 5]
    terms = rrd.loss_terms(batch_for(users + [3], split))
    assert set(terms) == {"base", "kd"}
    assert terms["base"].item() == pytest.approx(student.loss(batch_for(users + [3], split)).item())
    scores = student.score(torch.tensor(users))
    want = sum(naive_pl(scores[row, knowledge.final_topk[u, :8]], scores[row, rrd.negatives[u]])
               for row, u in enumerate(users)) / len(users)
    assert_same_value_and_gradients(student, terms["kd"], 0.5 * want)


def test_rrd_uninteresting_items_are_sampled_outside_list_and_training_per_epoch(data):
    split, knowledge = data
    rrd = started(RRD(split, knowledge, make_student(split), {"top_k": 8, "n_uninteresting": 10}, CPU))
    first = rrd.negatives.clone()
    assert first.shape == (split.n_users, 10)
    for u in range(split.n_users):
        drawn = set(first[u].tolist())
        assert len(drawn) == 10
        assert not drawn & set(split.train[u].indices.tolist())
        assert not drawn & set(knowledge.final_topk[u, :8].tolist())
    rrd.epoch_batches(1, torch.Generator())                # the run's generator is not reused
    assert not torch.equal(rrd.negatives, first)         # redrawn every epoch
    again = started(RRD(split, knowledge, make_student(split), {"top_k": 8, "n_uninteresting": 10}, CPU))
    assert torch.equal(again.negatives, first)           # same run seed, same draws


def test_rrd_catalogue_option_matches_naive(data):
    split, knowledge = data
    student = make_student(split, double=True)
    rrd = RRD(split, knowledge, student, {"top_k": 8, "uninteresting": "catalogue"}, CPU)
    assert not rrd.needs_generator
    users = [1, 6]
    scores = student.score(torch.tensor(users))
    want = []
    for row, u in enumerate(users):
        lst = knowledge.final_topk[u, :8].tolist()
        train = set(split.train[u].indices.tolist())
        rest = [i for i in range(split.n_items) if i not in train and i not in lst]
        want.append(naive_pl(scores[row, lst], scores[row, rest]))
    assert_same_value_and_gradients(student, rrd.kd_loss(torch.tensor(users)), sum(want) / 2)


def test_rrd_training_items_never_uninteresting(data):
    split, knowledge = data
    scores = np.zeros((split.n_users, split.n_items))
    scores[:, split.train[0].indices] = 30.0     # user 0's training items score very high
    for option, n_rest in (("sampled", 6), ("catalogue", split.n_items - 5 - 5)):
        rrd = started(RRD(split, knowledge, fixed_student(split, scores),
                          {"top_k": 5, "uninteresting": option, "n_uninteresting": 6}, CPU))
        kd = rrd.kd_loss(torch.tensor([0]))
        assert kd.item() == pytest.approx(sum(math.log(5 - k + n_rest) for k in range(5)), rel=1e-5)


def test_rrd_sampled_top_variant(data):
    split, knowledge = data
    config = {"sample_top": True, "n_interesting": 4, "n_uninteresting": 6, "top_k": 10}
    rrd = started(RRD(split, knowledge, fixed_student(split, np.zeros((split.n_users, split.n_items))),
                      config, CPU))
    items, valid = rrd.interesting(torch.arange(split.n_users))
    assert valid.all()
    for u in range(split.n_users):
        positions = [knowledge.final_topk[u].tolist().index(i) for i in items[u].tolist()]
        assert positions == sorted(positions) and len(set(positions)) == 4     # teacher order, distinct
    # at equal scores the loss is sum_k log(n_int - k + n_unint)
    kd = rrd.kd_loss(torch.tensor([1, 2]))
    assert kd.item() == pytest.approx(sum(math.log(4 - k + 6) for k in range(4)), rel=1e-5)


def test_rrd_bad_options(data):
    split, knowledge = data
    with pytest.raises(HetCompError, match="uninteresting"):
        RRD(split, knowledge, make_student(split), {"uninteresting": "all"}, CPU)
    with pytest.raises(HetCompError, match="epoch_batches"):
        RRD(split, knowledge, make_student(split), {}, CPU).kd_loss(torch.tensor([0]))


# -------------------------------------------------------------------------------------------
# CL-DRD
# -------------------------------------------------------------------------------------------

def test_cldrd_matches_naive_in_every_stage(data):
    split, knowledge = data
    student = make_student(split, double=True)
    cl = started(CLDRD(split, knowledge, student, {"top_k": 8, "n_negatives": 5, "stage_epochs": 2,
                                                   "ordered": [2, 4, 8]}, CPU))
    users = [0, 4, 9]
    for stage, n_ordered in enumerate([2, 4, 8]):
        cl.stage = stage
        scores = student.score(torch.tensor(users))
        want = sum(naive_tiered(scores[row, knowledge.final_topk[u, :8].tolist() + cl.negatives[u].tolist()],
                                cldrd_tiers(n_ordered, 8, 5)) for row, u in enumerate(users)) / len(users)
        assert_same_value_and_gradients(student, cl.kd_loss(torch.tensor(users)), want)


def test_cldrd_differs_from_rrd_in_every_stage(data):
    split, knowledge = data
    student = make_student(split)
    config = {"top_k": 10, "stage_epochs": 1, "ordered": [2, 5, 10]}
    cl = CLDRD(split, knowledge, student, {**config, "n_negatives": 6}, CPU)
    rrd = RRD(split, knowledge, student, {"top_k": 10, "n_uninteresting": 6}, CPU)
    users = torch.arange(split.n_users)
    for epoch in range(3):
        for distiller in (cl, rrd):
            distiller.epoch_batches(epoch, torch.Generator().manual_seed(epoch))
        assert cl.stage == epoch
        assert torch.equal(cl.negatives, rrd.negatives)       # same sampler, same seed
        a, b = cl.kd_loss(users), rrd.kd_loss(users)
        assert not math.isclose(a.item(), b.item(), rel_tol=1e-3)
        ga = torch.autograd.grad(a, student.item_emb.weight)[0]
        gb = torch.autograd.grad(b, student.item_emb.weight)[0]
        cosine = torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0)
        assert cosine < 0.999


def test_cldrd_stage_schedule_and_checks(data):
    split, knowledge = data
    cl = CLDRD(split, knowledge, make_student(split), {"top_k": 8, "stage_epochs": 2, "ordered": [2, 4, 100]},
               CPU)
    assert cl.ordered == [2, 4, 8]                     # capped at the list length
    stages = []
    for epoch in range(7):
        cl.epoch_batches(epoch, torch.Generator().manual_seed(0))
        stages.append(cl.after_epoch(epoch)["cldrd_stage"])
    assert stages == [0, 0, 1, 1, 2, 2, 2]
    assert cl.method_state()["ordered_group"] == 8
    assert cl.min_epochs == 6                          # three stages of 2 epochs before early stopping
    assert CLDRD.defaults["ordered"] == [10, 20, 50, 100]
    for bad in ({"ordered": [5, 2]}, {"ordered": []}, {"stage_epochs": 0}):
        with pytest.raises(HetCompError):
            CLDRD(split, knowledge, make_student(split), bad, CPU)


# -------------------------------------------------------------------------------------------
# MTD
# -------------------------------------------------------------------------------------------

def test_mtd_matches_naive_value_and_gradient(data):
    split, knowledge = data
    student = make_student(split, double=True)
    mtd = started(MTD(split, knowledge, student, {"top_k": 6, "n_uninteresting": 5}, CPU))
    with torch.no_grad():
        mtd.teacher_keys.copy_(torch.randn(3, 4, generator=torch.Generator().manual_seed(3)))
    users = [2, 7]
    scores = student.score(torch.tensor(users))
    emb = student.user_emb.weight.detach()
    want = 0.0
    for row, u in enumerate(users):
        logits = [emb[u] @ mtd.teacher_keys[t] for t in range(3)]
        norm = sum(torch.exp(x) for x in logits)
        for t in range(3):
            lst = knowledge.trajectories[t, -1, u, :6].tolist()
            want = want + torch.exp(logits[t]) / norm * naive_pl(scores[row, lst], scores[row, mtd.negatives[u]])
    got = mtd.kd_loss(torch.tensor(users))
    assert_same_value_and_gradients(student, got, want / 2)
    # the gate learns from the same loss, the student's embeddings do not move through it
    mtd.teacher_keys.grad = None
    mtd.kd_loss(torch.tensor(users)).backward()
    assert mtd.teacher_keys.grad is not None and mtd.teacher_keys.grad.abs().sum() > 0
    assert any(p is mtd.teacher_keys for p in mtd.parameters())


def test_mtd_negatives_lie_outside_every_teacher_list(data):
    split, knowledge = data
    mtd = started(MTD(split, knowledge, make_student(split), {"top_k": 6, "n_uninteresting": 8}, CPU))
    for u in range(split.n_users):
        listed = set(knowledge.trajectories[:, -1, u, :6].flatten().tolist())
        drawn = set(mtd.negatives[u].tolist())
        assert len(drawn) == 8 and not drawn & listed and not drawn & set(split.train[u].indices.tolist())


def test_mtd_uniform_weights_and_gate_start(data):
    split, knowledge = data
    student = make_student(split)
    gate = started(MTD(split, knowledge, student, {"top_k": 6}, CPU))
    uniform = started(MTD(split, knowledge, student, {"top_k": 6, "weighting": "uniform"}, CPU))
    users = torch.arange(split.n_users)
    assert gate.kd_loss(users).item() == pytest.approx(uniform.kd_loss(users).item(), rel=1e-6)  # keys start at 0
    assert gate.after_epoch(0) == {"mtd_weights": {"T0": 0.3333, "T1": 0.3333, "T2": 0.3333}}
    assert uniform.after_epoch(0) == {} and uniform.teacher_keys is None
    with pytest.raises(HetCompError, match="weighting"):
        MTD(split, knowledge, student, {"weighting": "agreement"}, CPU)
    with pytest.raises(HetCompError, match="user embeddings"):
        MTD(split, knowledge, ScoreOnly(student), {}, CPU)


def test_mtd_best_state_includes_the_gate(data):
    """The loop restores the best epoch's state: the gate's teacher vectors must come back with it."""
    split, knowledge = data
    mtd = started(MTD(split, knowledge, make_student(split), {"top_k": 6}, CPU))
    with torch.no_grad():
        mtd.teacher_keys.copy_(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))
    best, weights = copy.deepcopy(mtd.state_dict()), mtd.mean_weights()
    with torch.no_grad():
        mtd.teacher_keys.zero_()
        mtd.student.user_emb.weight.add_(1.0)
    assert mtd.mean_weights() != weights
    mtd.load_state_dict(best)
    assert mtd.mean_weights() == weights
    assert torch.equal(mtd.student.user_emb.weight, best["user_emb.weight"])
    assert set(mtd.student.state_dict()) == set(best) - {GATE_KEY}   # student.pt: the student only


def test_mtd_single_teacher_is_rrd_on_its_list(data):
    split, knowledge = data
    single = knowledge.single_teacher("T1")
    student = make_student(split)
    mtd = started(MTD(split, single, student, {"top_k": 6, "n_uninteresting": 5}, CPU))
    users = torch.arange(split.n_users)
    lists = torch.as_tensor(single.trajectories[0, -1, :, :6], dtype=torch.long)
    scores = student.score(users)
    want = plackett_luce_loss(scores.gather(1, lists), torch.ones_like(lists, dtype=torch.bool),
                              scores.gather(1, mtd.negatives).logsumexp(1)).mean()
    assert mtd.kd_loss(users).item() == pytest.approx(want.item(), rel=1e-6)


# -------------------------------------------------------------------------------------------
# every method: generic student path, determinism, configs, registry, training
# -------------------------------------------------------------------------------------------

GENERIC = [("rrd", {}), ("rrd", {"uninteresting": "catalogue"}), ("cldrd", {}), ("mtd", {"weighting": "uniform"})]


@pytest.mark.parametrize("name,extra", GENERIC, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GENERIC)])
def test_factorized_and_generic_paths_agree(data, name, extra):
    """Embedding-based scores == the full score matrix, values and gradients."""
    split, knowledge = data
    mf = make_student(split)
    results = []
    for student in (mf, ScoreOnly(mf)):
        distiller = started(CLASSES[name](split, knowledge, student, {"top_k": 8, **extra}, CPU))
        assert distiller.factorized is (student is mf)
        mf.zero_grad()
        kd = distiller.kd_loss(torch.tensor([0, 2, 5, 11]))
        kd.backward()
        results.append((kd.item(), mf.user_emb.weight.grad.clone(), mf.item_emb.weight.grad.clone()))
    (a, ua, ia), (b, ub, ib) = results
    assert a == pytest.approx(b, rel=1e-5)
    assert torch.allclose(ua, ub, atol=1e-6) and torch.allclose(ia, ib, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_yaml_and_registry(name):
    load_all()
    assert METHODS.get(name) is CLASSES[name]
    raw = yaml.safe_load((ROOT / "config" / "methods" / f"{name}.yaml").read_text())
    config = resolve_overrides(raw, "tiny")
    for key, value in {"lr": 1e-3, "weight_decay": 1e-5, "batch_size": 1024, "eval_every": 10,
                       "patience": 5, "max_epochs": 1000, "student_dim": 6}.items():
        assert config[key] == value
    merged = method_config(CLASSES[name].defaults, config, name)
    assert merged == {**CLASSES[name].defaults, **{k: config[k] for k in merged}}
    assert set(merged) == set(CLASSES[name].defaults)
    with pytest.raises(HetCompError):
        method_config(CLASSES[name].defaults, {**config, "bogus": 1}, name)
    # the validation grid: at most 6 points over the KD weight and one method key
    grid = raw["tune"]
    assert "lambda" in grid and len(grid) == 2 and set(grid) <= set(CLASSES[name].defaults)
    assert math.prod(len(values) for values in grid.values()) <= 6
    assert all(config[key] in values for key, values in grid.items())     # the default is a grid point


VARIANTS = [("rrd", {}), ("rrd", {"sample_top": True, "n_interesting": 4, "n_uninteresting": 8}),
            ("rrd", {"uninteresting": "catalogue"}),
            ("cldrd", {"stage_epochs": 4, "ordered": [2, 4, 8], "lambda": 5.0}),
            ("mtd", {}), ("mtd", {"weighting": "uniform"})]


def train_epochs(distiller, epochs, lr=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(distiller.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        sums = {}
        for batch in distiller.epoch_batches(epoch, generator):
            terms = distiller.loss_terms(batch)
            loss = sum(terms.values())
            assert torch.isfinite(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        distiller.after_epoch(epoch)
        history.append(sums)
    return history


@pytest.mark.parametrize("single", [False, True], ids=["ensemble", "single_teacher"])
@pytest.mark.parametrize("name,extra", VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)])
def test_training_decreases_loss(data, name, extra, single):
    split, knowledge = data
    if single:
        knowledge = knowledge.single_teacher("T1")
    config = {"top_k": 8, "lambda": 0.05, **extra}
    distiller = CLASSES[name](split, knowledge, make_student(split), config, CPU)
    history = train_epochs(distiller, 12)
    # epoch averages over the first and last three epochs (the sampled negatives are noisy)
    first, last = ({key: np.mean([h[key] for h in part]) for key in part[0]}
                   for part in (history[:3], history[-3:]))
    assert last["base"] + last["kd"] < first["base"] + first["kd"]
    if name != "cldrd":      # CL-DRD's target grows with the stage
        assert last["kd"] < first["kd"]
    json.dumps(distiller.method_state())


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_same_seed_same_losses(data, name):
    split, knowledge = data
    runs = [train_epochs(CLASSES[name](split, knowledge, make_student(split), {"top_k": 8, "stage_epochs": 1}
                                       if name == "cldrd" else {"top_k": 8}, CPU), 3, seed=5)
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = train_epochs(CLASSES[name](split, knowledge, make_student(split), {"top_k": 8}, CPU), 3, seed=6)
    assert other != runs[0]


@pytest.mark.parametrize("single", [False, True], ids=["ensemble", "single_teacher"])
def test_runner_integration(data, single):
    """Each YAML through ``hetcomp.distill.runner.run_distillation`` (key checks, student, shared
    loop with evaluation and epoch hooks), shortened to 2 epochs on the tiny split."""
    from hetcomp.distill.runner import run_distillation

    split, knowledge = data
    if single:
        knowledge = knowledge.single_teacher("T2")
    for name in CLASSES:
        config = resolve_overrides(
            yaml.safe_load((ROOT / "config" / "methods" / f"{name}.yaml").read_text()), "tiny")
        config.update({"max_epochs": 2, "eval_every": 1, "batch_size": 16, "student_dim": 4, "top_k": 8})
        result, distiller = run_distillation(name, split, knowledge, config, seed=0, device="cpu")
        assert isinstance(distiller, CLASSES[name]) and distiller.cfg["top_k"] == 8
        assert len(result.history) == 2
        assert all(math.isfinite(sum(r["loss"].values())) for r in result.history)
        json.dumps(distiller.method_state())


def test_needs_knowledge(data):
    split, _ = data
    with pytest.raises(HetCompError):
        RRD(split, None, make_student(split), {}, CPU)


def test_plackett_luce_fast_and_wide_paths_agree():
    """Rows whose scores spread wider than FAST_SPREAD take the logcumsumexp path; both paths
    give the naive value, and a batch mixing both agrees row by row."""
    from baselines.common import FAST_SPREAD

    scores = torch.tensor([[2.0, 0.5, -1.0], [FAST_SPREAD + 50.0, 3.0, 0.0]], dtype=torch.float64,
                          requires_grad=True)
    valid = torch.ones(2, 3, dtype=torch.bool)
    rest = torch.tensor([0.3, 1.0], dtype=torch.float64)
    both = plackett_luce_loss(scores, valid, rest)
    for b in range(2):
        alone = plackett_luce_loss(scores[b:b + 1], valid[b:b + 1], rest[b:b + 1])
        want = naive_pl(scores[b].detach(), [rest[b]])
        assert both[b].item() == pytest.approx(float(want), rel=1e-12, abs=1e-12)
        assert alone.item() == pytest.approx(float(want), rel=1e-12, abs=1e-12)
    for b in range(2):
        row = scores[b:b + 1].detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda s: plackett_luce_loss(s, valid[:1], rest[b:b + 1]), (row,))


# -------------------------------------------------------------------------------------------
# CPU kernels (baselines/kernels.py) against their torch equivalents
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_list_scores_kernel_matches_autograd(dtype):
    from hetcomp.distill.list_scores import kernel_applies, list_scores

    gen = torch.Generator().manual_seed(5)
    user_table = torch.randn(7, 3, generator=gen, dtype=dtype, requires_grad=True)
    item_table = torch.randn(11, 3, generator=gen, dtype=dtype, requires_grad=True)
    users = torch.tensor([4, 0, 6])
    items = torch.randint(11, (3, 9), generator=gen)             # repeated items within and across rows
    weights = torch.randn(3, 9, generator=gen, dtype=dtype)
    assert kernel_applies(user_table, item_table)
    got = list_scores(user_table, item_table, users, items)
    want = (item_table[items] * user_table[users].unsqueeze(1)).sum(-1)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    assert torch.allclose(got, want, **tol)
    got_grads = torch.autograd.grad((got * weights).sum(), (user_table, item_table))
    want_grads = torch.autograd.grad((want * weights).sum(), (user_table, item_table))
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, **tol)


def test_relaxed_ranking_kernel_float32_rows_spread_beyond_float32_exp():
    """float32 scores (training's dtype) spread 150-500 nats: inside the fast path's FAST_SPREAD but
    beyond float32 ``exp`` (0 below about -104), so the kernel must work in float64. A float32 ``exp``
    made items far below the row's top weigh 0 and raised ZeroDivisionError (MTD at lambda 0.1)."""
    from baselines.common import kernel_applies

    scores = torch.tensor([[150.0, 20.0, 0.0, -10.0], [3.0, 1.0, -200.0, -497.0]], requires_grad=True)
    valid = torch.ones(2, 4, dtype=torch.bool)
    rest = torch.tensor([0.5, -2.0])
    assert kernel_applies(scores, rest)
    loss = plackett_luce_loss(scores, valid, rest)
    grad, = torch.autograd.grad(loss.sum(), scores)
    for b in range(2):
        row = scores[b].detach().double().requires_grad_()
        want = naive_pl(row, [rest[b].double()])
        want_grad, = torch.autograd.grad(want, row)
        assert loss[b].detach().item() == pytest.approx(want.item(), rel=1e-5)
        assert torch.allclose(grad[b].double(), want_grad, rtol=1e-5, atol=1e-6)


def test_relaxed_ranking_kernel_and_torch_paths_agree(monkeypatch):
    """The numba kernel and the torch code of the fast path: same loss and gradients (padding
    inside and at the end of lists, a row without rest, a row with nothing valid)."""
    import baselines.common as common

    gen = torch.Generator().manual_seed(6)
    scores = (5 * torch.randn(5, 12, generator=gen, dtype=torch.float64)).requires_grad_()
    valid = torch.rand(5, 12, generator=gen) > 0.25
    valid[3] = False
    rest = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    results = []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(common, "kernel_applies", lambda *tensors: False)
        rest_values = torch.where(torch.arange(5) == 1, torch.full_like(rest, NEG), rest)
        loss = plackett_luce_loss(scores, valid, rest_values)
        results.append((loss.detach(), *torch.autograd.grad(loss.sum(), (scores, rest))))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    for b in range(5):
        keep = valid[b]
        want = naive_pl(scores[b][keep].detach(), [] if b == 1 else [rest[b].detach()])
        assert results[0][0][b].item() == pytest.approx(float(want), rel=1e-10, abs=1e-12)
