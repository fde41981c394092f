"""`hetcomp distill` end to end on a tiny split and tiny synthetic knowledge, and HetComp's batch loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from hetcomp.cli import main
from hetcomp.data.store import Split, save_split, to_csr
from hetcomp.distill.runner import resolve_method_config
from hetcomp.distill.student import build_student
from hetcomp.errors import HetCompError
from hetcomp.knowledge import combine_rankings, load_knowledge
from hetcomp.registry import METHODS, load_all

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHERS = ["mf", "cml"]
RUN_FILES = {"student.pt", "metrics.json", "history.jsonl", "per_user.npz", "run_info.json",
             "method_state.json"}


def write_knowledge(split, out_dir, n_checkpoints=3, depth=20, n_observed=12, seed=0):
    """A knowledge.npz + meta.json in ``hetcomp.knowledge``'s format from random teacher lists."""
    rng = np.random.RandomState(seed)
    n_users, n_items = split.n_users, split.n_items
    train = split.train.tocsr()
    trajectories = np.empty((len(TEACHERS), n_checkpoints, n_users, depth), dtype=np.int32)
    observed = np.full((n_users, n_observed), -1, dtype=np.int32)
    for u in range(n_users):
        items = train.indices[train.indptr[u]:train.indptr[u + 1]]
        candidates = np.setdiff1d(np.arange(n_items), items)
        for t in range(len(TEACHERS)):
            for c in range(n_checkpoints):
                trajectories[t, c, u] = rng.choice(candidates, depth, replace=False)
        ranked = rng.permutation(items)[:n_observed]
        observed[u, :len(ranked)] = ranked            # users have 10 training items: 2 padded
    out_dir.mkdir(parents=True)
    np.savez_compressed(out_dir / "knowledge.npz", trajectories=trajectories, observed=observed,
                        final_topk=combine_rankings(trajectories[:, -1], n_items, depth))
    (out_dir / "meta.json").write_text(json.dumps(
        {"teachers": TEACHERS, "n_items": n_items, "temperature": 10.0, "dataset": "tiny"}))
    return out_dir


TINY_HETCOMP = {
    "max_epochs": 10, "eval_every": 2, "patience": 5, "student_dim": 4, "batch_size": 256,
    "top_k": 10, "n_observed": 12, "rank_prefixes": [5, 2], "dkc_period": 2, "dkc_depth": 5,
    # alpha < 1: every DKC call after the first advances every pair (3 checkpoints: calls at
    # epochs 2 (first), 4, 6 -> everyone at the last checkpoint -> phase 2 from epoch 7)
    "alpha": 0.5, "lr": 0.01,
}


@pytest.fixture
def workspace(tmp_path, tiny_split):
    save_split(tiny_split, tmp_path / "split")
    write_knowledge(tiny_split, tmp_path / "ens")
    for name, values in (("hetcomp", TINY_HETCOMP),
                         ("wokd", {"max_epochs": 4, "eval_every": 2, "student_dim": 4, "batch_size": 256})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**values, "datasets": {}}))
    return tmp_path


def _distill(ws, method, out, *extra):
    return main(["distill", "--method", method, "--split", str(ws / "split"), "--config",
                 str(ws / f"{method}.yaml"), "--seed", "0", "--out", str(ws / out), "--device", "cpu",
                 *extra])


def test_distill_hetcomp_end_to_end(workspace):
    assert _distill(workspace, "hetcomp", "run", "--ensemble", str(workspace / "ens")) == 0
    run = workspace / "run"
    assert {p.name for p in run.iterdir()} == RUN_FILES
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "hetcomp" and metrics["teacher"] == "ensemble"
    assert metrics["n_parameters"] == (60 + 80) * 4 and "train_time_s" in metrics
    assert 0.0 <= metrics["test"]["recall@50"] <= 1.0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 2, 4, 6, 8]
    assert all(set(h["selection"]) == set(TEACHERS) and "valid" in h for h in history)
    assert [h["phase"] for h in history] == [1, 1, 1, 1, 2]
    assert "overall" in history[0]["loss"] and "rank" in history[-1]["loss"]
    assert [h["selection"]["mf"] for h in history] == [0.0, 0.0, 1.0, 2.0, 2.0]
    assert history[1]["dkc"]["first_call"] and history[3].get("switched_to_phase2")
    state = json.loads((run / "method_state.json").read_text())
    assert state["switch_epoch"] == 6 and state["dkc_epochs"] == [2, 4, 6]
    assert state["selection_counts"]["cml"] == [0, 0, 60]
    info = json.loads((run / "run_info.json").read_text())
    assert info["seed"] == 0 and info["config"]["top_k"] == 10 and info["config"]["lr"] == 0.01
    assert info["config"]["overall_weight"] == 0.01 and info["config_hash"]
    assert torch.load(run / "student.pt")["user_emb.weight"].shape == (60, 4)


def test_distill_wokd_single_teacher_and_errors(workspace, capsys):
    assert _distill(workspace, "wokd", "wokd") == 0
    assert {p.name for p in (workspace / "wokd").iterdir()} == RUN_FILES
    metrics = json.loads((workspace / "wokd" / "metrics.json").read_text())
    assert metrics["method"] == "wokd" and metrics["teacher"] is None
    assert "bpr" in json.loads((workspace / "wokd" / "history.jsonl").read_text().splitlines()[0])["loss"]

    # the homogeneous-teacher control
    config = yaml.safe_load((workspace / "hetcomp.yaml").read_text())
    config["max_epochs"] = 3
    (workspace / "hetcomp.yaml").write_text(yaml.safe_dump(config))
    assert _distill(workspace, "hetcomp", "single", "--ensemble", str(workspace / "ens"), "--teacher", "cml") == 0
    state = json.loads((workspace / "single" / "method_state.json").read_text())
    assert state["teachers"] == ["cml"]
    capsys.readouterr()

    for out, args, needle in (
        ("nope", ("--method", "nope"), "unknown method 'nope'; known:"),
        ("noens", ("--method", "hetcomp"), "give --ensemble"),
    ):
        code = main(["distill", *args, "--split", str(workspace / "split"), "--config",
                     str(workspace / "hetcomp.yaml"), "--out", str(workspace / out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err
        assert not (workspace / out).exists()
    assert "hetcomp" in err and not list(workspace.glob(".nope*"))

    bad = workspace / "bad.yaml"
    bad.write_text(yaml.safe_dump({"top_k": 10, "temperature": 3}))
    assert _distill(workspace, "hetcomp", "bad", "--ensemble", str(workspace / "ens"), "--config", str(bad)) == 2
    assert "unknown key(s) temperature" in capsys.readouterr().err
    assert not (workspace / "bad").exists()


def _naive_batch_loss(distiller, users, phase):
    """Per-user Python loop over the student's scores, straight from the spec's formulas."""
    floor = 1e-5
    train = distiller.split.train.tocsr()
    scores = distiller.student.score(torch.as_tensor(users)).detach().double().clamp(-40, 40)
    total = 0.0
    for row, u in enumerate(users):
        s = scores[row].tolist()
        seen = set(train.indices[train.indptr[u]:train.indptr[u + 1]].tolist())
        top = distiller.targets[u].tolist()
        obs = [i for i in distiller.observed[u].tolist() if i >= 0]

        def rest(excluded):
            return sum(math.exp(s[j]) for j in range(len(s)) if j not in seen and j not in excluded)

        def pl(items, r):
            return sum(-(s[items[k]] - math.log(max(sum(math.exp(s[j]) for j in items[k:]) + r, floor)))
                       for k in range(len(items)))

        if phase == 1:
            z = rest(set(top))
            total += sum(-math.log(math.exp(s[a]) / max(math.exp(s[a]) + z, floor)) for a in obs + top)
        else:
            p = distiller.prefixes
            total += pl(obs, rest(set(top[:p[0]])))
            total += sum(pl(top[:m], rest(set(top[:m]))) for m in p) / len(p)
    return total


def test_hetcomp_batch_loss_matches_naive_loop(tiny_split, tmp_path):
    load_all()
    knowledge = load_knowledge(write_knowledge(tiny_split, tmp_path / "ens"))
    method_cls = METHODS.get("hetcomp")
    resolved = resolve_method_config(method_cls, TINY_HETCOMP, "test")
    torch.manual_seed(0)
    student = build_student(tiny_split.n_users, tiny_split.n_items, {**resolved.student, "init_std": 1.0}, "cpu")
    student.setup(tiny_split.train, "cpu")
    distiller = method_cls(tiny_split, knowledge, student, resolved.method, "cpu")
    users = torch.tensor([3, 3, 0, 17, 59, 17, 42])          # duplicates: unique users only
    batch = (users, users, users)
    unique = sorted(set(users.tolist()))
    # targets are disjoint from the training items, observed lists are training items
    train = tiny_split.train.tocsr()
    for u in range(tiny_split.n_users):
        seen = set(train.indices[train.indptr[u]:train.indptr[u + 1]].tolist())
        assert not seen & set(distiller.targets[u].tolist())
    for phase, name, weight in ((1, "overall", 0.01), (2, "rank", 0.005)):
        distiller.phase = phase
        terms = distiller.loss_terms(batch)
        assert list(terms) == [name]
        expected = weight * _naive_batch_loss(distiller, unique, phase)
        assert terms[name].item() == pytest.approx(expected, rel=1e-4)
        terms[name].backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters())
        student.zero_grad()


def test_resolve_method_config_is_strict():
    load_all()
    with pytest.raises(HetCompError, match="unknown key"):
        resolve_method_config(METHODS.get("wokd"), {"top_k": 5}, "wokd")
    resolved = resolve_method_config(METHODS.get("hetcomp"), {"lr": "1e-2", "log_floor": None}, "x")
    assert resolved.loop.lr == 0.01 and resolved.method["log_floor"] is None
    assert resolved.student == {"student_dim": 6, "batch_size": 1024, "init_std": 0.01}
    with pytest.raises(HetCompError, match="integer"):
        resolve_method_config(METHODS.get("hetcomp"), {"max_epochs": 1.5}, "x")


def _mid_size_split(n_users=900, n_items=3000, per_user=12, seed=0):
    """Random interactions (``per_user`` train, 1 valid, 1 test per user), many items per list."""
    rng = np.random.RandomState(seed)
    parts = {}
    chosen = np.stack([rng.choice(n_items, per_user + 2, replace=False) for _ in range(n_users)])
    users = np.arange(n_users)
    for name, cols in (("train", chosen[:, :per_user]), ("valid", chosen[:, per_user:per_user + 1]),
                       ("test", chosen[:, per_user + 1:])):
        parts[name] = to_csr(np.repeat(users, cols.shape[1]), cols.ravel(), (n_users, n_items))
    meta = {"dataset": "mid", "n_users": n_users, "n_items": n_items, "n_eval_users": n_users}
    return Split(meta=meta, **parts)


@pytest.mark.usefixtures("one_thread")          # restores torch's thread count afterwards
def test_hetcomp_gradients_are_bit_identical_with_two_threads(tmp_path):
    """Same batch, same state, two torch threads: the same gradients, bit for bit (a parallel
    scatter of the listed items' gradients adds in no fixed order; the list-score kernel does not;
    the row-block pool's threads must multiply on one MKL thread each, see test_losses)."""
    load_all()
    split = _mid_size_split()
    knowledge = load_knowledge(write_knowledge(split, tmp_path / "ens", depth=110, n_observed=12))
    method_cls = METHODS.get("hetcomp")
    resolved = resolve_method_config(method_cls, {**TINY_HETCOMP, "top_k": 100, "student_dim": 6}, "test")
    users = torch.arange(split.n_users)
    torch.set_num_threads(2)
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        student = build_student(split.n_users, split.n_items, resolved.student, "cpu")
        student.setup(split.train, "cpu")
        distiller = method_cls(split, knowledge, student, resolved.method, "cpu")
        sum(distiller.loss_terms((users, users, users)).values()).backward()
        grads.append({name: p.grad.clone() for name, p in student.named_parameters()})
    # the message names the parameter and the size of a difference
    for name, first in grads[0].items():
        second = grads[1][name]
        assert torch.equal(first, second), (f"{name}: {int((first != second).sum())} entries differ, "
                                            f"max |diff| {float((first - second).abs().max()):.3g}")


def test_hetcomp_exclusions_follow_the_targets(tiny_split, tmp_path):
    """The per-user excluded items (training items and T_u) are rebuilt when DKC moves targets."""
    load_all()
    knowledge = load_knowledge(write_knowledge(tiny_split, tmp_path / "ens"))
    method_cls = METHODS.get("hetcomp")
    resolved = resolve_method_config(method_cls, TINY_HETCOMP, "test")
    student = build_student(tiny_split.n_users, tiny_split.n_items, resolved.student, "cpu")
    student.setup(tiny_split.train, "cpu")
    distiller = method_cls(tiny_split, knowledge, student, resolved.method, "cpu")
    train = tiny_split.train.tocsr()

    def expected(u):
        return sorted(train.indices[train.indptr[u]:train.indptr[u + 1]].tolist() + distiller.targets[u].tolist())

    before = distiller.targets.clone()
    for epoch in (2, 4):                       # alpha < 1: the second call moves every pair
        distiller.run_dkc(epoch)
    assert not torch.equal(before, distiller.targets)
    users = torch.tensor([5, 0, 59, 17])
    batch = distiller._exclusions(users)
    for row, u in enumerate(users.tolist()):
        assert batch.items[batch.ptr[row]:batch.ptr[row + 1]].tolist() == expected(u)
