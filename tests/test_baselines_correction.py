"""CD, DCD and RD as their papers define them: losses against naive per-user references (value and
gradient, float64), DCD's correction weights by hand, sampling rules, determinism and the YAMLs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from baselines.cd import CD, rank_labels
from baselines.common import method_config
from baselines.dcd import DCD, discrepancy_weights, weighted_draw
from baselines.rd import RD
from hetcomp.config import resolve_overrides
from hetcomp.data.store import Split, to_csr
from hetcomp.errors import HetCompError
from hetcomp.knowledge import TeacherKnowledge
from hetcomp.models.mf import MF
from hetcomp.registry import METHODS, load_all

from doubles import ScoreOnly

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CLASSES = {"cd": CD, "dcd": DCD, "rd": RD}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -------------------------------------------------------------------------------------------
# tiny data
# -------------------------------------------------------------------------------------------

def make_case(n_users=6, n_items=30, top_k=8, seed=0, pad=True):
    """Random items per user: 4 training, 1 validation, 1 test, and an ensemble list of other
    non-training items; with ``pad`` the last user's list is padded (-1) after 5 entries."""
    rng = np.random.default_rng(seed)
    parts = {"train": ([], []), "valid": ([], []), "test": ([], [])}
    lists = np.full((n_users, top_k), -1, dtype=np.int32)
    for u in range(n_users):
        order = rng.permutation(n_items)
        for name, chosen in (("train", order[:4]), ("valid", order[4:5]), ("test", order[5:6])):
            parts[name][0].extend([u] * len(chosen))
            parts[name][1].extend(chosen.tolist())
        length = 5 if pad and u == n_users - 1 else top_k
        lists[u, :length] = order[6:6 + length]
    split = Split(**{name: to_csr(np.array(us), np.array(its), (n_users, n_items))
                     for name, (us, its) in parts.items()})
    knowledge = TeacherKnowledge(teachers=["T"], trajectories=lists[None, None], observed=np.full((n_users, 2), -1),
                                 final_topk=lists, n_items=n_items)
    return split, knowledge


def make_student(split, seed=0):
    torch.manual_seed(seed)
    student = MF(split.n_users, split.n_items, dim=4, batch_size=8, init_std=0.7)
    student.setup(split.train, CPU)
    return student.double()


def fixed_student(split, scores):
    """An MF whose scores are exactly ``scores [n_users, n_items]`` (identity item embeddings)."""
    student = MF(split.n_users, split.n_items, dim=split.n_items, batch_size=8)
    student.setup(split.train, CPU)
    with torch.no_grad():
        student.user_emb.weight.copy_(torch.as_tensor(scores, dtype=torch.float32))
        student.item_emb.weight.copy_(torch.eye(split.n_items))
    return student


def started(cls, split, knowledge, student, config, epoch=0, seed=3):
    distiller = cls(split, knowledge, student, config, CPU)
    distiller.epoch_batches(epoch, torch.Generator().manual_seed(seed))
    return distiller


def student_ranks(student, split, user):
    """Naive: 0-based rank of every item among the user's non-training items (-1 for training items)."""
    with torch.no_grad():
        scores = student.score(torch.tensor([user]))[0].tolist()
    train = set(split.train[user].indices.tolist())
    return [-1 if i in train else sum(scores[j] > scores[i] for j in range(split.n_items) if j not in train)
            for i in range(split.n_items)]


def compare_with_reference(distiller, student, users, reference):
    """``distiller.kd_loss`` and ``reference(scores [n_users, n_items])`` agree in value and gradient."""
    student.zero_grad()
    distiller.kd_loss(torch.tensor(users)).backward()
    got = [p.grad.clone() for p in (student.user_emb.weight, student.item_emb.weight)]
    value = distiller.kd_loss(torch.tensor(users)).item()
    student.zero_grad()
    want = reference(student.user_emb.weight @ student.item_emb.weight.T)
    want.backward()
    assert value == pytest.approx(want.item(), rel=1e-10)
    for g, p in zip(got, (student.user_emb.weight, student.item_emb.weight)):
        assert torch.allclose(g, p.grad, rtol=1e-9, atol=1e-12)


def naive_pl(listed, rest):
    """-sum_k [s_k - log(sum_{j>=k} e^{s_j} + sum_rest e^{s_r})] on 0-d tensors."""
    total = 0.0
    rest_mass = sum(torch.exp(r) for r in rest) if rest else 0.0
    for k, s in enumerate(listed):
        total = total - (s - torch.log(sum(torch.exp(x) for x in listed[k:]) + rest_mass))
    return total


def listed(knowledge, u):
    return [int(i) for i in knowledge.final_topk[u] if i >= 0]


# -------------------------------------------------------------------------------------------
# RD
# -------------------------------------------------------------------------------------------

def test_rd_position_weights_before_start_and_reference():
    split, knowledge = make_case()
    student = make_student(split)
    rd = started(RD, split, knowledge, student, {"top_k": 8, "dynamic_start": 2}, epoch=1)
    assert rd.updated_at is None                       # epoch 1 < dynamic_start: position weights

    def reference(scores):
        losses = []
        for u in range(split.n_users):
            items = listed(knowledge, u)
            raw = [math.exp(-r / 1.0) for r in range(len(items))]
            losses.append(sum(-w / sum(raw) * torch.nn.functional.logsigmoid(scores[u, i])
                              for w, i in zip(raw, items)))
        return sum(losses) / len(losses)

    compare_with_reference(rd, student, list(range(split.n_users)), reference)


def test_rd_hybrid_weights_from_exact_student_ranks():
    split, knowledge = make_case()
    student = make_student(split, seed=4)
    mu, temperature = 0.5, 2.0
    rd = started(RD, split, knowledge, student, {"top_k": 8, "dynamic_start": 2, "dynamic_mu": mu,
                                                 "weight_temperature": temperature}, epoch=2)
    assert rd.updated_at == 2
    for u in range(split.n_users):
        ranks = student_ranks(student, split, u)
        raw = [math.exp(-r / temperature) * math.tanh(max(mu * (ranks[i] - r), 0.0))
               for r, i in enumerate(listed(knowledge, u))]
        want = [w / sum(raw) if sum(raw) else 0.0 for w in raw]
        assert rd.weights[u, :len(want)].tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert rd.weights[u, len(want):].abs().sum() == 0


# -------------------------------------------------------------------------------------------
# CD
# -------------------------------------------------------------------------------------------

def test_rank_labels_hand_case():
    teacher = torch.tensor([[5, 2, 9, 0]])
    valid = torch.tensor([[True, True, True, False]])
    labels = rank_labels(teacher, valid, torch.tensor([[2, 0, 9, 7, -1]]), 2.0)
    assert labels[0].tolist() == pytest.approx([math.exp(-0.5), 0.0, math.exp(-1.0), 0.0, 0.0])


def test_cd_draws_from_the_students_top_and_matches_reference():
    split, knowledge = make_case()
    student = make_student(split)
    config = {"top_k": 8, "candidates": 6, "n_samples": 4, "sample_temperature": 3.0, "label_temperature": 5.0}
    cd = started(CD, split, knowledge, student, config)
    for u in range(split.n_users):
        ranks = student_ranks(student, split, u)
        drawn = cd.samples[u].tolist()
        assert len(set(drawn)) == 4 and all(0 <= ranks[i] < 6 for i in drawn)   # distinct, student's top-6
    # over-ranked items (student's top, not on the teacher's list) get label 0
    assert bool((cd.labels == 0).any()) and bool((cd.labels > 0).any())

    def reference(scores):
        losses = []
        for u in range(split.n_users):
            items = listed(knowledge, u)
            total = 0.0
            for i in cd.samples[u].tolist():
                q = math.exp(-items.index(i) / 5.0) if i in items else 0.0
                p = torch.sigmoid(scores[u, i])
                total = total - (q * torch.log(p) + (1 - q) * torch.log(1 - p))
            losses.append(total)
        return sum(losses) / len(losses)

    compare_with_reference(cd, student, list(range(split.n_users)), reference)


def test_cd_rank_aware_draw_prefers_the_students_top():
    """Over many epochs the student's first item is drawn more often than its sixth."""
    split, knowledge = make_case()
    student = make_student(split)
    cd = CD(split, knowledge, student, {"top_k": 8, "candidates": 6, "n_samples": 1, "sample_temperature": 1.0}, CPU)
    cd.epoch_batches(0, torch.Generator().manual_seed(0))
    top, _ = cd.rankings(None, 6)
    counts = np.zeros(6)
    for epoch in range(200):
        cd.on_epoch(epoch)
        counts += (top == cd.samples[:, :1]).sum(0).numpy()
    assert counts[0] > 2 * counts[2] > 0 and counts.sum() == 200 * split.n_users


# -------------------------------------------------------------------------------------------
# DCD
# -------------------------------------------------------------------------------------------

def test_dcd_discrepancy_weights_hand_case():
    ranks = torch.tensor([[0, 5, 2, 3], [3, 0, 1, 2]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    under, over = discrepancy_weights(ranks, valid, 2.0)
    t = math.tanh
    assert under.flatten().tolist() == pytest.approx([0, t(2.0), 0, 0, t(1.5), 0, 0, 0], rel=1e-15)
    assert over.flatten().tolist() == pytest.approx([0, 0, 0, 0, 0, t(0.5), t(0.5), 0], rel=1e-15)


def test_weighted_draw_never_takes_zero_weights():
    weights = torch.tensor([[0.0, 0.5, 0.0, 0.9, 0.1], [0.0] * 5, [1.0] * 5], dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        columns, drawn = weighted_draw(weights, 4, generator)
        assert columns[0, :3].tolist() == [1, 3, 4] and drawn[0].tolist() == [True, True, True, False]
        assert not bool(drawn[1].any())
        assert drawn[2].all() and columns[2].tolist() == sorted(set(columns[2].tolist()))


def dcd_hand_case():
    """One user, 8 items, item 7 a training item; teacher list [0, 1, 2, 3, 4].

    Student order of the non-training items: 4, 1, 0, 5, 3, 2, 6 -> student ranks 0->2, 1->1, 2->5,
    3->4, 4->0. Under-estimated (r_S > r_T): 0 (2 > 0), 2 (5 > 2), 3 (4 > 3); exact: 1; over-estimated
    (r_S < r_T): 4 (0 < 4). Item 5 (student rank 3) is outside the list: it has no teacher rank.
    """
    train = to_csr(np.array([0]), np.array([7]), (1, 8))
    split = Split(train=train, valid=train, test=train)
    lists = np.array([[0, 1, 2, 3, 4]], dtype=np.int32)
    knowledge = TeacherKnowledge(teachers=["T"], trajectories=lists[None, None], observed=np.full((1, 2), -1),
                                 final_topk=lists, n_items=8)
    scores = np.zeros((1, 8))
    for rank, item in enumerate([4, 1, 0, 5, 3, 2, 6]):
        scores[0, item] = 3.0 - 0.5 * rank
    scores[0, 7] = 10.0
    return split, knowledge, fixed_student(split, scores)


def test_dcd_correction_sets_hand_case():
    split, knowledge, student = dcd_hand_case()
    dcd = started(DCD, split, knowledge, student, {"top_k": 5, "n_uninteresting": 2, "n_under": 5, "n_over": 5})
    assert dcd.under[0].tolist() == [0, 2, 3, -1, -1]     # every positive one, in teacher order
    assert dcd.over[0].tolist() == [4, -1, -1, -1, -1]
    assert set(dcd.uninteresting[0].tolist()) <= {5, 6} and len(set(dcd.uninteresting[0].tolist())) == 2
    small = started(DCD, split, knowledge, student, {"top_k": 5, "n_uninteresting": 2, "n_under": 2, "n_over": 5})
    under = [i for i in small.under[0].tolist() if i >= 0]
    assert len(under) == 2 and set(under) <= {0, 2, 3} and under == sorted(under)


def test_dcd_matches_reference():
    split, knowledge = make_case()
    student = make_student(split, seed=2)
    dcd = started(DCD, split, knowledge, student, {"top_k": 8, "n_uninteresting": 5, "n_under": 3, "n_over": 3,
                                                   "discrepancy_temperature": 2.0})
    for u in range(split.n_users):
        items, ranks = listed(knowledge, u), student_ranks(student, split, u)
        under = [i for i in dcd.under[u].tolist() if i >= 0]
        over = [i for i in dcd.over[u].tolist() if i >= 0]
        assert all(ranks[i] > items.index(i) for i in under) and all(ranks[i] < items.index(i) for i in over)
        assert under == sorted(under, key=items.index)
        positive_under = sum(ranks[i] > r for r, i in enumerate(items))
        assert len(under) == min(3, positive_under)
        outside = set(range(split.n_items)) - set(items) - set(split.train[u].indices.tolist())
        assert set(dcd.uninteresting[u].tolist()) <= outside and len(set(dcd.uninteresting[u].tolist())) == 5

    def reference(scores):
        losses = []
        for u in range(split.n_users):
            s = scores[u]
            rrd = naive_pl([s[i] for i in listed(knowledge, u)], [s[i] for i in dcd.uninteresting[u].tolist()])
            ucd = naive_pl([s[i] for i in dcd.under[u].tolist() if i >= 0],
                           [s[i] for i in dcd.over[u].tolist() if i >= 0])
            losses.append(rrd + ucd)
        return sum(losses) / len(losses)

    compare_with_reference(dcd, student, list(range(split.n_users)), reference)


# -------------------------------------------------------------------------------------------
# determinism, configs
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLASSES))
def test_same_seed_same_losses(name):
    split, knowledge = make_case()
    config = {"top_k": 8, "dynamic_start": 0} if name == "rd" else {"top_k": 8}
    values = []
    for _ in range(2):
        distiller = CLASSES[name](split, knowledge, make_student(split), config, CPU)
        generator = torch.Generator().manual_seed(11)
        losses = []
        for epoch in range(2):
            for batch in distiller.epoch_batches(epoch, generator):
                losses.append(distiller.loss_terms(batch)["kd"].detach().clone())
        values.append(torch.stack(losses))
    assert torch.equal(values[0], values[1])


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_yaml_keys_and_tune_grid(name):
    config = resolve_overrides(yaml.safe_load((ROOT / "config" / "methods" / f"{name}.yaml").read_text()), "tiny")
    tune = config["tune"]
    merged = method_config(CLASSES[name].defaults, config, name)
    assert merged == dict(CLASSES[name].defaults)       # the YAML records the defaults
    assert set(tune) <= set(CLASSES[name].defaults) and "lambda" in tune and len(tune) == 2
    assert math.prod(len(v) for v in tune.values()) <= 6


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_factorized_and_generic_paths_agree(name):
    split, knowledge = make_case()
    mf = make_student(split)
    results = []
    for student in (mf, ScoreOnly(mf)):
        distiller = started(CLASSES[name], split, knowledge, student, {"top_k": 8})
        assert distiller.factorized is (student is mf)
        mf.zero_grad()
        distiller.kd_loss(torch.tensor([0, 2, 5])).backward()
        results.append([distiller.kd_loss(torch.tensor([0, 2, 5])).detach(), mf.user_emb.weight.grad.clone(),
                        mf.item_emb.weight.grad.clone()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("single", [False, True], ids=["ensemble", "single_teacher"])
def test_registered_and_run_through_the_runner(single):
    """Each YAML through ``run_distillation`` (registry, key checks, loop with evaluation and the
    epoch hooks), 3 epochs on the tiny split; the total training loss goes down."""
    from hetcomp.distill.runner import run_distillation

    load_all()
    split, knowledge = make_case(pad=not single)
    if single:      # the one teacher's own list (re-ranked by the ensemble rule)
        knowledge = knowledge.single_teacher("T")
    for name, cls in CLASSES.items():
        assert METHODS.get(name) is cls
        config = resolve_overrides(yaml.safe_load((ROOT / "config" / "methods" / f"{name}.yaml").read_text()), "tiny")
        config.update({"max_epochs": 3, "eval_every": 1, "batch_size": 8, "student_dim": 4, "top_k": 8,
                       "lr": 0.05, "dynamic_start": 1} if name == "rd" else
                      {"max_epochs": 3, "eval_every": 1, "batch_size": 8, "student_dim": 4, "top_k": 8, "lr": 0.05})
        result, distiller = run_distillation(name, split, knowledge, config, seed=0, device="cpu")
        assert isinstance(distiller, cls) and len(result.history) == 3
        totals = [sum(r["loss"].values()) for r in result.history]
        assert all(math.isfinite(t) for t in totals) and totals[-1] < totals[0]
        json.dumps(distiller.method_state())


@pytest.mark.parametrize("name,bad", [("cd", {"n_samples": 0}), ("cd", {"label_temperature": 0.0}),
                                      ("dcd", {"discrepancy_temperature": -1.0}), ("rd", {"dynamic_mu": 0.0})])
def test_bad_options(name, bad):
    split, knowledge = make_case()
    with pytest.raises(HetCompError):
        CLASSES[name](split, knowledge, make_student(split), {"top_k": 8, **bad}, CPU)
