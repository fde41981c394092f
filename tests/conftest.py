"""Shared fixtures: the real data directory and a tiny synthetic split with planted structure."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hetcomp import REPO_ROOT
from hetcomp.data.store import Split, to_csr

N_GROUPS, USERS_PER_GROUP, ITEMS_PER_GROUP = 4, 15, 20


@pytest.fixture
def data_dir() -> Path:
    """The folder of the real datasets: ``$HETCOMP_DATA_DIR`` or ``<repo>/../shared/data``."""
    path = Path(os.environ.get("HETCOMP_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    if not (path / "citeulike-t" / "users.dat").is_file():
        pytest.skip(f"real datasets not found in {path} (set HETCOMP_DATA_DIR)")
    return path


def make_tiny_split(seed: int = 0) -> Split:
    """60 users x 80 items in 4 groups: user u belongs to group u // 15 and mostly likes the
    20 items of that group (items 20g .. 20g+19).

    The j-th user of a group likes 12 consecutive items of a shuffled ring of the group's
    items (2 test, 2 validation, 8 train) and has 2 out-of-group train items as noise, so
    every user has train, validation and test items and every item of a group occurs in
    some user's train set.
    """
    rng = np.random.RandomState(seed)
    n_users, n_items = N_GROUPS * USERS_PER_GROUP, N_GROUPS * ITEMS_PER_GROUP
    rings = [g * ITEMS_PER_GROUP + rng.permutation(ITEMS_PER_GROUP) for g in range(N_GROUPS)]
    parts: dict[str, tuple[list, list]] = {name: ([], []) for name in ("train", "valid", "test")}
    for user in range(n_users):
        group, j = divmod(user, USERS_PER_GROUP)
        liked = rings[group][(j + np.arange(12)) % ITEMS_PER_GROUP]
        others = np.setdiff1d(np.arange(n_items), rings[group])
        noise = rng.choice(others, 2, replace=False)
        for name, chosen in (("test", liked[:2]), ("valid", liked[2:4]),
                             ("train", np.concatenate([liked[4:], noise]))):
            parts[name][0].extend([user] * len(chosen))
            parts[name][1].extend(chosen)
    matrices = {name: to_csr(np.array(u), np.array(i), (n_users, n_items))
                for name, (u, i) in parts.items()}
    n_interactions = sum(m.nnz for m in matrices.values())
    meta = {
        "dataset": "tiny", "n_users": n_users, "n_items": n_items,
        "n_interactions": n_interactions, "n_train": matrices["train"].nnz,
        "n_valid": matrices["valid"].nnz, "n_test": matrices["test"].nnz,
        "n_eval_users": n_users, "density": n_interactions / (n_users * n_items),
    }
    return Split(meta=meta, **matrices)


@pytest.fixture
def tiny_split() -> Split:
    """A small synthetic :class:`Split` (see :func:`make_tiny_split`); every user is evaluated."""
    return make_tiny_split()


@pytest.fixture
def run_cli():
    """The ``hetcomp`` entry point, called in-process with an argument list."""
    from hetcomp.cli import main

    return main


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: for tiny tensors thread pools only add latency."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
