"""HetComp's ablations: each switch changes exactly what it should, on the tiny split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from test_distill import TINY_HETCOMP, _naive_batch_loss, write_knowledge

from hetcomp import REPO_ROOT
from hetcomp.config import resolve_overrides
from hetcomp.distill.dkc import ensemble_topk
from hetcomp.distill.hetcomp import ABLATIONS, HetComp
from hetcomp.distill.runner import resolve_method_config
from hetcomp.distill.student import build_student
from hetcomp.errors import HetCompError
from hetcomp.knowledge import load_knowledge
from hetcomp.registry import METHODS, load_all
from hetcomp.report import ABLATION_LABELS

pytestmark = pytest.mark.usefixtures("one_thread")

SWITCHES = {"dkc", "switch_epoch", "loss", "separate_observed"}
BATCH_USERS = torch.tensor([3, 3, 0, 17, 59, 17, 42])


@pytest.fixture
def knowledge(tiny_split, tmp_path):
    return load_knowledge(write_knowledge(tiny_split, tmp_path / "ens"))


def make(name, split, knowledge, **overrides):
    """The registered method ``name`` on the tiny split, with a student of wide scores."""
    load_all()
    method_cls = METHODS.get(name)
    resolved = resolve_method_config(method_cls, {**TINY_HETCOMP, **overrides}, name)
    torch.manual_seed(0)
    student = build_student(split.n_users, split.n_items, {**resolved.student, "init_std": 1.0}, "cpu")
    student.setup(split.train, "cpu")
    return method_cls(split, knowledge, student, resolved.method, "cpu")


def loss_of(distiller):
    terms = distiller.loss_terms((BATCH_USERS, BATCH_USERS, BATCH_USERS))
    assert len(terms) == 1
    return next(iter(terms.items()))


def run_epochs(distiller, epochs):
    return {epoch: distiller.after_epoch(epoch) for epoch in epochs}


# ------------------------------------------------------------------------------------------ registry
def test_every_ablation_is_a_registered_hetcomp_differing_only_in_its_switches():
    load_all()
    assert set(ABLATIONS) == set(ABLATION_LABELS)
    for name, (switches, _) in ABLATIONS.items():
        cls = METHODS.get(name)
        assert issubclass(cls, HetComp) and cls is not HetComp
        assert cls.__dict__.keys() & {"loss_terms", "after_epoch", "run_dkc"} == set()   # no own logic
        changed = {k for k in cls.defaults if cls.defaults[k] != HetComp.defaults[k]}
        assert changed == set(switches) and changed <= SWITCHES


def test_hetcomp_list_shows_the_ablations(run_cli, capsys):
    assert run_cli(["list", "--kind", "method"]) == 0
    assert {f"method {name}" for name in ABLATIONS} <= set(capsys.readouterr().out.splitlines())


def test_ablation_yamls_are_hetcomp_yaml_plus_the_switch():
    base = yaml.safe_load((REPO_ROOT / "config" / "methods" / "hetcomp.yaml").read_text())
    assert {k: base[k] for k in SWITCHES} == {k: HetComp.defaults[k] for k in SWITCHES}
    for name, (switches, _) in ABLATIONS.items():
        values = yaml.safe_load((REPO_ROOT / "config" / "methods" / f"{name}.yaml").read_text())
        assert values == {**base, **switches}, name
        resolve_method_config(METHODS.get(name), resolve_overrides(values, "citeulike-t"), name)


@pytest.mark.parametrize("overrides, message", [
    ({"dkc": False}, "switch_epoch is needed"),
    ({"switch_epoch": 5}, "switch_epoch is needed"),
    ({"dkc": False, "switch_epoch": "late"}, "switch_epoch must be an epoch"),
    ({"loss": "both"}, "loss must be"),
    ({"separate_observed": "no"}, "true or false"),
])
def test_bad_switches_are_errors(tiny_split, knowledge, overrides, message):
    with pytest.raises(HetCompError, match=message):
        make("hetcomp", tiny_split, knowledge, **overrides)


# ------------------------------------------------------------------------------------------ no DKC
def test_nodkc_starts_from_the_final_ensemble_and_switches_at_the_fixed_epoch(tiny_split, knowledge):
    full = make("hetcomp", tiny_split, knowledge)
    ablation = make("hetcomp_nodkc", tiny_split, knowledge, switch_epoch=6)
    final = ensemble_topk(knowledge.trajectories[:, -1], knowledge.n_items, full.top_k)
    initial = ensemble_topk(knowledge.trajectories[:, 0], knowledge.n_items, full.top_k)
    assert torch.equal(ablation.targets, final) and torch.equal(full.targets, initial)
    assert (ablation.dkc.idx == knowledge.n_checkpoints - 1).all()
    records = run_epochs(ablation, range(10))
    assert not any("dkc" in r for r in records.values()) and ablation.dkc_epochs == []
    assert torch.equal(ablation.targets, final)
    assert ablation.phase == 2 and ablation.switch_epoch == 6
    assert loss_of(ablation)[0] == "rank"
    assert make("hetcomp_nodkc", tiny_split, knowledge).fixed_switch == 120


# ------------------------------------------------------------------------------------------ one loss only
def test_phase1_runs_dkc_to_the_end_and_never_switches(tiny_split, knowledge):
    ablation = make("hetcomp_phase1", tiny_split, knowledge)
    full = make("hetcomp", tiny_split, knowledge)
    for distiller in (ablation, full):
        run_epochs(distiller, range(12))
    # TINY_HETCOMP: DKC at epochs 2 (first), 4, 6 moves everyone to the last checkpoint
    assert ablation.dkc_epochs == full.dkc_epochs == [2, 4, 6]
    assert torch.equal(ablation.dkc.idx, full.dkc.idx) and ablation.knowledge_final()
    assert torch.equal(ablation.targets, full.targets)
    assert full.phase == 2 and full.switch_epoch == 6
    assert ablation.phase == 1 and ablation.switch_epoch is None
    assert loss_of(ablation)[0] == "overall"


def test_phase2_uses_the_rank_loss_from_epoch_0_and_runs_dkc(tiny_split, knowledge):
    ablation = make("hetcomp_phase2", tiny_split, knowledge)
    full = make("hetcomp", tiny_split, knowledge)
    assert torch.equal(ablation.targets, full.targets)          # the initial knowledge
    name, value = loss_of(ablation)
    full.phase = 2                                                # the full method's phase-2 loss
    assert name == "rank" and value.item() == pytest.approx(loss_of(full)[1].item(), rel=1e-6)
    records = run_epochs(ablation, range(12))
    assert ablation.dkc_epochs == [2, 4, 6] and "dkc" in records[4]
    assert ablation.knowledge_final() and ablation.switch_epoch is None and ablation.phase == 2


# ------------------------------------------------------------------------------------------ no separation
def _naive_merged_loss(distiller, users, phase):
    """The merged-list loss by a Python loop: training items are ordinary rest items."""
    scores = distiller.student.score(torch.as_tensor(users)).detach().double().clamp(-40, 40)
    total = 0.0
    for row, u in enumerate(users):
        s = scores[row].tolist()
        top = distiller.targets[u].tolist()
        merged = [i for i in distiller.observed[u].tolist() if i >= 0] + top

        def rest(excluded):
            return sum(math.exp(s[j]) for j in range(len(s)) if j not in excluded)

        def pl(items, r):
            return sum(-(s[items[k]] - math.log(sum(math.exp(s[j]) for j in items[k:]) + r))
                       for k in range(len(items)))

        if phase == 1:
            z = rest(set(merged))
            total += sum(-math.log(math.exp(s[a]) / (math.exp(s[a]) + z)) for a in merged)
        else:
            n_obs = len(merged) - len(top)
            total += sum(pl(merged[:n_obs + m], rest(set(merged[:n_obs + m]))) for m in distiller.prefixes) \
                / len(distiller.prefixes)
    return total


@pytest.mark.parametrize("phase, name, weight", [(1, "overall", 0.01), (2, "rank", 0.005)])
def test_nosep_is_the_merged_list_loss_and_differs_from_hetcomp(tiny_split, knowledge, phase, name, weight):
    # 5 observed of each user's 10 training items: the other 5 join the rest mass without separation
    ablation = make("hetcomp_nosep", tiny_split, knowledge, n_observed=5)
    full = make("hetcomp", tiny_split, knowledge, n_observed=5)
    unique = sorted(set(BATCH_USERS.tolist()))
    ablation.phase = full.phase = phase
    got, value = loss_of(ablation)
    assert got == name
    assert value.item() == pytest.approx(weight * _naive_merged_loss(ablation, unique, phase), rel=1e-4)
    assert loss_of(full)[1].item() == pytest.approx(weight * _naive_batch_loss(full, unique, phase), rel=1e-4)
    assert not np.isclose(value.item(), loss_of(full)[1].item(), rtol=1e-3)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in ablation.student.parameters())
