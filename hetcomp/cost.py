"""Inference cost of the teachers, their ensemble and the students (``hetcomp cost``).

What is timed is the work of serving recommendations: producing each user's top-``k`` list of
non-training items for one batch of users, on one device.

- **Student**: ``score(users)``, training items masked, ``topk(k)``.
- **Teacher**: the same with the teacher's model.
- **Ensemble**: every teacher's ``score`` + mask + ``topk(N)`` (``N`` = the trajectories' depth,
  the lists the ensemble is built from), then the rank-importance aggregation of those lists
  (``hetcomp.ensemble.ensemble_scores``: ``exp(-rank / temperature)`` summed over teachers) and
  ``topk(k)`` of the result. That is how ``hetcomp build-ensemble`` ranks, so the ensemble's cost
  is the sum of its teachers plus the aggregation.

Every candidate sees the same users (a seeded sample of the split's evaluated users), the same
batch size and ``k``. The users' training-item index is built once, outside the timing. Each
candidate runs ``warmup`` untimed times, then ``repeats`` timed times (CUDA is synchronised
around each); the table reports the median latency and ``batch / median`` users per second, with
the device named by ``hetcomp.runtime.describe_device``.

Reloading a run: the model's constructor arguments come from the run's ``run_info.json``
(``config``): for a teacher run the keys of the model's constructor; for a student (distill run)
``student_dim`` -> ``dim`` plus ``batch_size``/``init_std`` of the MF student. The state comes
from ``model.pt`` / ``student.pt``. As a check of the reload, the teachers' top-``N`` lists are
compared with the final checkpoint of their exported trajectory (``reload_agreement``).

The same command also measures the **ranking discrepancy** between each student and every
checkpoint of every teacher (docs/METHOD.md, "DKC": ``1 - NDCG*`` of the student's top-50 against the
checkpoint's top-50, position weights ``2^{exp(-t/10)} - 1``), averaged over the evaluated users
(``discrepancy.csv``); the report plots it against the checkpoint.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from hetcomp.data.store import Split
from hetcomp.errors import HetCompError
from hetcomp.evaluation import _flat_keys, top_unobserved
from hetcomp.io import read_json
from hetcomp.models.base import Recommender, build_model

log = logging.getLogger(__name__)

#: Depth of the DKC discrepancy (docs/METHOD.md, "DKC"): the student's and the checkpoint's top-50.
DISCREPANCY_DEPTH = 50

STUDENT_MODEL = "mf"
#: Method-YAML keys of the student and the MF constructor argument each maps to.
STUDENT_KEYS = {"student_dim": "dim", "batch_size": "batch_size", "init_std": "init_std"}


@dataclass
class LoadedRun:
    """A reloaded teacher or student run, ready to score."""

    kind: str  # "teacher" | "student"
    name: str  # model name (teacher) or method name (student)
    run_dir: str
    model: Recommender
    info: dict = field(default_factory=dict)
    teacher: str | None = None  # the single teacher of a control run (None: the ensemble or none)

    @property
    def n_parameters(self) -> int:
        return int(self.model.n_parameters())


def _constructor_kwargs(model_cls, config: dict) -> dict:
    parameters = inspect.signature(model_cls.__init__).parameters
    names = [name for name in list(parameters)[1:] if name not in ("n_users", "n_items")]
    return {name: config[name] for name in names if name in config}


def _load_state(path: Path) -> dict:
    if not path.is_file():
        raise HetCompError(f"{path}: missing; cannot reload the run")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _instantiate(model_name: str, kwargs: dict, split: Split, state: dict, device: torch.device,
                 where: str) -> Recommender:
    from hetcomp.registry import MODELS, load_all

    load_all()
    model_cls = MODELS.get(model_name)
    model = build_model(model_cls, split, kwargs, device, f"{where} ({model_name})")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise HetCompError(f"{where}: checkpoint does not fit model {model_name!r} ({first})") from None
    model.to(device)
    model.eval()
    return model


def load_teacher(run_dir: str | Path, split: Split, device: torch.device) -> LoadedRun:
    """Rebuild a ``hetcomp train-teacher`` run from ``run_info.json`` and ``model.pt``."""
    from hetcomp.registry import MODELS, load_all

    run_dir = Path(run_dir)
    info = read_json(run_dir / "run_info.json")
    config = info.get("config") or {}
    name = config.get("model")
    if not name:
        raise HetCompError(f"{run_dir}/run_info.json: no config.model; not a teacher run")
    load_all()
    kwargs = _constructor_kwargs(MODELS.get(name), config)
    model = _instantiate(name, kwargs, split, _load_state(run_dir / "model.pt"), device, str(run_dir))
    return LoadedRun("teacher", name, str(run_dir), model, info)


def load_student(run_dir: str | Path, split: Split, device: torch.device) -> LoadedRun:
    """Rebuild a ``hetcomp distill`` run's MF student from ``run_info.json`` and ``student.pt``."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / "run_info.json")
    config = info.get("config") or {}
    state = _load_state(run_dir / "student.pt")
    kwargs = {target: config[key] for key, target in STUDENT_KEYS.items() if key in config}
    if "user_emb.weight" in state:  # the state is the authority on the embedding size
        kwargs["dim"] = int(state["user_emb.weight"].shape[1])
    model_name = config.get("student_model", STUDENT_MODEL)
    model = _instantiate(model_name, kwargs, split, state, device, str(run_dir))
    method = info.get("method") or config.get("method") or run_dir.name
    teacher = info.get("teacher") or config.get("teacher")
    if teacher in ("ensemble", "none"):  # only a single-teacher control names its teacher
        teacher = None
    return LoadedRun("student", str(method), str(run_dir), model, info, teacher=teacher)


# ------------------------------------------------------------------------------------------
# Top-K producers (what is timed)
# ------------------------------------------------------------------------------------------

def masked_topk(model: Recommender, users: torch.Tensor, train_keys: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` non-training items of ``users`` under ``model`` (``train_keys``: flat row*n_items+item)."""
    scores = model.score(users).float()
    scores.view(-1)[train_keys] = -torch.inf
    return torch.topk(scores, k, dim=1).indices


def ensemble_topk(teachers: Sequence[Recommender], users: torch.Tensor, train_keys: torch.Tensor,
                  depth: int, k: int, temperature: float, n_items: int) -> torch.Tensor:
    """The ensemble's top-``k``: each teacher's top-``depth`` list, rank importance summed, top-``k``."""
    from hetcomp.ensemble import ensemble_scores

    lists = torch.stack([masked_topk(model, users, train_keys, depth) for model in teachers])
    return torch.topk(ensemble_scores(lists, n_items, temperature, users.device), k, dim=1).indices


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise HetCompError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _synchronize(device)
        times = []
        for _ in range(repeats):
            _synchronize(device)
            started = time.perf_counter()
            fn()
            _synchronize(device)
            times.append(time.perf_counter() - started)
    return times


def summarize_times(times: Sequence[float], batch_size: int) -> dict:
    median = statistics.median(times)
    return {
        "latency_ms": round(1000 * median, 4),
        "latency_ms_mean": round(1000 * statistics.fmean(times), 4),
        "latency_ms_min": round(1000 * min(times), 4),
        "latency_ms_max": round(1000 * max(times), 4),
        "throughput_users_per_s": round(batch_size / median, 2) if median > 0 else float("inf"),
    }


def sample_users(split: Split, batch_size: int, seed: int) -> np.ndarray:
    """``batch_size`` evaluated users (all of them when fewer), a seeded sample in id order."""
    users = split.eval_users
    if len(users) == 0:
        raise HetCompError("the split has no evaluated users")
    if batch_size < len(users):
        users = np.random.default_rng(seed).choice(users, size=batch_size, replace=False)
    return np.sort(users)


def batch_train_keys(train: sp.csr_matrix, users: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_flat_keys(train, users, train.shape[1])).to(device)


# ------------------------------------------------------------------------------------------
# Discrepancy (docs/METHOD.md, "DKC")
# ------------------------------------------------------------------------------------------

def ranking_discrepancy(student_top: np.ndarray, teacher_top: np.ndarray,
                        depth: int = DISCREPANCY_DEPTH) -> np.ndarray:
    """Per-user ``1 - NDCG*``: the student's list (in its order) against the teacher list's set.

    ``student_top [U, >=d]`` and ``teacher_top [U, >=d]`` with ``d = min(depth, both widths)``.
    An item of the student's top-``d`` is relevant when it is in the teacher's top-``d``; the
    teacher's own order is not used. The measure is HetComp's own
    (``hetcomp.distill.dkc.discrepancy``, NDCG* rounded to 4 decimals as in DKC).
    """
    from hetcomp.distill.dkc import discrepancy

    d = min(depth, student_top.shape[1], teacher_top.shape[1])
    student = torch.from_numpy(np.ascontiguousarray(student_top[:, :d], dtype=np.int64))
    teacher_sets = torch.sort(torch.from_numpy(np.ascontiguousarray(teacher_top[:, :d], dtype=np.int64)),
                              dim=1).values
    return discrepancy(student, teacher_sets).numpy()


def student_discrepancy(student_top: np.ndarray, trajectories: np.ndarray,
                        users: np.ndarray | None = None) -> np.ndarray:
    """Mean discrepancy ``[n_teachers, n_checkpoints]`` of one student to every checkpoint.

    ``student_top [n_users, >=50]`` and ``trajectories [T, C, n_users, N]``; ``users`` restricts
    the mean (default: every user).
    """
    rows = np.arange(trajectories.shape[2]) if users is None else np.asarray(users)
    out = np.empty(trajectories.shape[:2])
    for t in range(trajectories.shape[0]):
        for c in range(trajectories.shape[1]):
            out[t, c] = ranking_discrepancy(student_top[rows], trajectories[t, c, rows]).mean()
    return out


def student_top_lists(model: Recommender, split: Split, depth: int, device: torch.device) -> np.ndarray:
    """The student's top-``depth`` non-training items of every user, ``[n_users, depth]``."""
    with torch.inference_mode():
        return top_unobserved(model.score, split.train, depth, device=device)
