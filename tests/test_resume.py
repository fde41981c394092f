"""Resumable training: an interrupted run, run again, ends exactly as an uninterrupted one.

Interruptions: a crash inside an evaluation (resume from the last periodic checkpoint), SIGTERM
during an evaluation (a checkpoint is saved at the end of that epoch) and SIGINT in the middle of
an epoch (stops before the next batch). Also: early stopping on rounded metrics and a task's minimum epochs, the progress line.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
import yaml

from hetcomp.checkpoint import Checkpoint, checkpoint_path
from hetcomp.cli import main
from hetcomp.data.store import save_split
from hetcomp.errors import HetCompError
from hetcomp.evaluation import EvalResult, Evaluator
from hetcomp.training import LoopConfig, fit, progress_line
from test_distill import TINY_HETCOMP, write_knowledge

pytestmark = pytest.mark.usefixtures("one_thread")

#: Run outputs that differ between two identical runs only by timing (or by provenance).
TIMING_KEYS = {"elapsed_s", "seconds", "train_time_s", "dkc_seconds_mean"}

TEACHER = {"lr": 0.01, "max_epochs": 8, "eval_every": 1, "patience": 10, "checkpoint_every": 2,
           "n_checkpoints": 3, "top_n": 12, "dim": 4, "batch_size": 128}
SMALL = {"student_dim": 4, "batch_size": 256, "checkpoint_every": 1}
METHODS = {
    "wokd": {"max_epochs": 6, "eval_every": 1, **SMALL},
    # DKC at epochs 2 (first call), 4, 6; the crash at the evaluation of epoch 6 resumes from the
    # checkpoint after epoch 4, so the resumed run makes the third DKC call itself
    "hetcomp": {**TINY_HETCOMP, **SMALL},
    "dcd": {"max_epochs": 6, "eval_every": 1, "top_k": 10, "n_uninteresting": 5, "n_under": 3, "n_over": 3,
            **SMALL},
    "mtd": {"max_epochs": 6, "eval_every": 1, "top_k": 10, "n_uninteresting": 5, **SMALL},
}


@pytest.fixture
def workspace(tmp_path, tiny_split):
    save_split(tiny_split, tmp_path / "split")
    write_knowledge(tiny_split, tmp_path / "ens")
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(TEACHER))
    for name, values in METHODS.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(values))
    return tmp_path


def _command(ws, what, out):
    if what == "teacher":
        return ["train-teacher", "--model", "mf", "--split", str(ws / "split"), "--config",
                str(ws / "teacher.yaml"), "--seed", "3", "--out", str(ws / out), "--device", "cpu"]
    args = ["distill", "--method", what, "--split", str(ws / "split"), "--config", str(ws / f"{what}.yaml"),
            "--seed", "3", "--out", str(ws / out), "--device", "cpu"]
    return args + (["--ensemble", str(ws / "ens")] if what != "wokd" else [])


def _interrupt_at_evaluation(monkeypatch, number, action):
    """Run ``action()`` at the start of the ``number``-th evaluation (1-based) of every fit."""
    original = Evaluator.evaluate
    calls = []

    def evaluate(self, score_fn):
        calls.append(1)
        if len(calls) == number:
            action()
        return original(self, score_fn)

    monkeypatch.setattr(Evaluator, "evaluate", evaluate)


class Crash(Exception):
    pass


def _crash():
    raise Crash()


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _outputs(run):
    """Everything a run wrote, less timing and provenance: JSON as data, arrays and tensors as numpy."""
    out = {}
    for path in sorted(run.iterdir()):
        if path.name == "run_info.json":
            continue
        if path.suffix == ".json":
            out[path.name] = _without_timing(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            out[path.name] = [_without_timing(json.loads(line)) for line in path.read_text().splitlines()]
        elif path.suffix == ".npz":
            with np.load(path) as arrays:
                out.update({f"{path.name}:{k}": arrays[k] for k in arrays.files})
        elif path.suffix == ".pt":
            out.update({f"{path.name}:{k}": v.numpy() for k, v in torch.load(path).items()})
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("what", ["teacher", *METHODS])
def test_crashed_run_resumes_to_the_same_results(workspace, monkeypatch, what):
    assert main(_command(workspace, what, "full")) == 0
    assert not checkpoint_path(workspace / "full").parent.exists()
    with monkeypatch.context() as patch:
        _interrupt_at_evaluation(patch, 4, _crash)
        with pytest.raises(Crash):
            main(_command(workspace, what, "resumed"))
    assert not (workspace / "resumed").exists() and checkpoint_path(workspace / "resumed").is_file()
    assert main(_command(workspace, what, "resumed")) == 0
    _assert_same(_outputs(workspace / "full"), _outputs(workspace / "resumed"))
    info = json.loads((workspace / "resumed" / "run_info.json").read_text())
    every = (TEACHER if what == "teacher" else METHODS[what])["eval_every"]
    checkpointed = 2 if what == "teacher" else 3     # evaluations before the crash with a checkpoint
    assert info["resumed_at_epochs"] == [(checkpointed - 1) * every + 1]
    assert not checkpoint_path(workspace / "resumed").parent.exists()


@pytest.mark.parametrize("sig, number, expect", [
    (signal.SIGTERM, 3, "checkpoint saved at the end of epoch 4"),   # hetcomp evaluates epochs 0, 2, 4
    (signal.SIGINT, None, "resumes from the last checkpoint"),
])
def test_signal_stops_the_run_and_it_resumes(workspace, monkeypatch, capsys, sig, number, expect):
    assert main(_command(workspace, "hetcomp", "full")) == 0
    handler = signal.getsignal(sig)
    with monkeypatch.context() as patch:
        def send():
            os.kill(os.getpid(), sig)

        if number is not None:              # during an evaluation
            _interrupt_at_evaluation(patch, number, send)
        else:                               # during the second batch of epoch 5 (of 3 per epoch)
            from hetcomp.distill.hetcomp import HetComp
            original, batches = HetComp.loss_terms, []

            def loss_terms(self, batch):
                batches.append(1)
                if len(batches) == 5 * 3 + 2:
                    send()
                return original(self, batch)

            patch.setattr(HetComp, "loss_terms", loss_terms)
        capsys.readouterr()
        assert main(_command(workspace, "hetcomp", "resumed")) == 2
    err = capsys.readouterr().err
    assert signal.Signals(sig).name in err and expect in err and len(err.strip().splitlines()) == 1
    assert not (workspace / "resumed").exists()
    assert signal.getsignal(sig) == handler
    assert main(_command(workspace, "hetcomp", "resumed")) == 0
    _assert_same(_outputs(workspace / "full"), _outputs(workspace / "resumed"))


def test_a_checkpoint_of_another_config_is_ignored(workspace, monkeypatch, caplog):
    with monkeypatch.context() as patch:
        _interrupt_at_evaluation(patch, 4, _crash)
        with pytest.raises(Crash):
            main(_command(workspace, "wokd", "run"))
    (workspace / "wokd.yaml").write_text(yaml.safe_dump({**METHODS["wokd"], "lr": 0.02}))
    assert main(_command(workspace, "wokd", "run")) == 0
    assert "belongs to another configuration" in caplog.text
    assert json.loads((workspace / "run" / "run_info.json").read_text())["resumed_at_epochs"] == []


# -- the loop alone ----------------------------------------------------------------------------

class ScriptedEvaluator:
    """Validation (and test) recall@50 from a list, one value per evaluation."""

    def __init__(self, values):
        self.values = iter(values)

    def evaluate(self, score_fn):
        result = EvalResult(users=np.arange(1), per_user={"recall@50": np.array([next(self.values)])})
        return {"valid": result, "test": result}


class OneParameter:
    """The smallest task: one parameter pulled towards 0, one batch per epoch."""

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.ones(2))

    def parameters(self):
        return [self.weight]

    def epoch_batches(self, epoch, generator):
        return [None]

    def loss_terms(self, batch):
        return {"square": (self.weight ** 2).sum()}

    def after_step(self):
        pass

    def after_epoch(self, epoch):
        return {}

    def on_evaluation(self, epoch):
        pass

    def score(self, users):
        return self.weight.expand(len(users), 2)

    def train(self, mode=True):
        return self

    def state_dict(self):
        return {"weight": self.weight.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.weight.copy_(state["weight"])

    def extra_state(self):
        return {}

    def load_extra_state(self, state):
        pass


@pytest.mark.parametrize("round_select, best_epoch, last_epoch", [(None, 1, 3), (4, 0, 2)])
def test_rounded_selection_can_pick_another_best_epoch(round_select, best_epoch, last_epoch):
    # exact: 0.10004 (epoch 1) beats 0.10001; to 4 decimals every value is 0.1, so epoch 0 stays best
    values = [0.10001, 0.10004, 0.10003, 0.10002, 0.1]
    config = LoopConfig(max_epochs=5, eval_every=1, patience=2, round_select=round_select, checkpoint_every=None)
    result = fit(OneParameter(), ScriptedEvaluator(values), config, torch.Generator())
    assert result.best_epoch == best_epoch and result.history[-1]["epoch"] == last_epoch
    assert result.valid.means()["recall@50"] == values[best_epoch]


@pytest.mark.parametrize("min_epochs, last_epoch", [(0, 2), (5, 4), (50, 5)])
def test_early_stopping_waits_for_the_tasks_min_epochs(min_epochs, last_epoch):
    # best at epoch 0, stale from then on: patience 2 stops at epoch 2 unless the task (a
    # curriculum) asks for more epochs; max_epochs still ends the run
    task = OneParameter()
    task.min_epochs = min_epochs
    config = LoopConfig(max_epochs=6, eval_every=1, patience=2, checkpoint_every=None)
    result = fit(task, ScriptedEvaluator([0.3, 0.2, 0.2, 0.2, 0.2, 0.2]), config, torch.Generator())
    assert result.best_epoch == 0 and result.history[-1]["epoch"] == last_epoch


def test_loop_config_keys_are_checked():
    assert LoopConfig.from_config({"round_select": "4", "checkpoint_every": None, "other": 1}, "x") == \
        LoopConfig(round_select=4, checkpoint_every=None)
    for bad, message in (({"round_select": -1}, "round_select must be null or >= 0"),
                         ({"checkpoint_every": 0}, "checkpoint_every must be null or >= 1"),
                         ({"round_select": 1.5}, "round_select must be an integer"),
                         ({"patience": 0}, "must be >= 1")):
        with pytest.raises(HetCompError, match=message):
            LoopConfig.from_config(bad, "x")


def test_checkpoint_of_the_loop_alone_round_trips(tmp_path):
    values = [0.1, 0.3, 0.2, 0.25, 0.2, 0.1]
    config = LoopConfig(max_epochs=6, eval_every=1, patience=3, checkpoint_every=1)
    full_task = OneParameter()
    full = fit(full_task, ScriptedEvaluator(values), config, torch.Generator())
    checkpoint = Checkpoint(tmp_path / "ck.pt", key="k")
    with pytest.raises(StopIteration):    # the evaluator runs dry at the 4th evaluation
        fit(OneParameter(), ScriptedEvaluator(values[:3]), config, torch.Generator(), checkpoint)
    assert checkpoint.load()["next_epoch"] == 3
    task = OneParameter()
    resumed = fit(task, ScriptedEvaluator(values[3:]), config, torch.Generator(), checkpoint)
    assert resumed.best_epoch == full.best_epoch == 1 and resumed.resumed_at == [3]
    assert torch.equal(task.weight.detach(), full_task.weight.detach())
    assert _without_timing(resumed.history) == _without_timing(full.history)
    assert Checkpoint(tmp_path / "ck.pt", key="other").load() is None


def test_progress_line_gives_both_upper_bounds():
    config = LoopConfig(max_epochs=100, eval_every=5, patience=3)
    line = progress_line(9, config, 0.5, 0.1234, 0.2, 5, 1, 100.0)
    assert line == ("epoch 9/100 loss 0.5000 | valid recall@50 0.1234 | best 0.2000 @ 5 (1/3 stale)"
                    " | 1m40s elapsed, <= 1m40s left (patience), <= 15m00s (max_epochs)")
    assert progress_line(98, config, 0.5, 0.1, 0.2, 5, 0, 99.0).endswith("<= 1s left (patience)")
