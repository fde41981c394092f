"""From an interaction stream to a frozen split, following the official CiteULike logic.

1. Repeated (user, item) pairs are dropped, keeping the first occurrence (the raw files we
   ship have none; a pair in both train and test of a published split stays in train).
2. Users with fewer than ``min_user_interactions`` pairs are dropped: one pass, no item filter.
3. Users and items get 0-based ids in order of first appearance in the filtered stream
   (without the official code's phantom extra user and item); ``Split.user_ids`` and
   ``Split.item_ids`` keep the original id of every internal one.
4. ``random``: for each user in id order, one ``np.random.RandomState(seed)`` shuffles the
   user's items (in stream order); the first ``floor(test_ratio * n)`` go to test, the next
   ``floor(valid_ratio * n)`` to validation, the rest to train.
   ``temporal``: each user's pairs ordered by timestamp (ties in stream order); the last
   ``floor(test_ratio * n)`` go to test, the ``floor(valid_ratio * n)`` before them to
   validation, the rest to train.
   ``published``: each pair keeps the part of the file it came from.
5. Validation and test pairs whose item never occurs in train are removed; users left with
   an empty validation or test set lose both (their train pairs are kept).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from hetcomp.data.store import Split, to_csr
from hetcomp.errors import HetCompError

TRAIN, VALID, TEST = 0, 1, 2
PART_CODES = {"train": TRAIN, "valid": VALID, "test": TEST}


def first_appearance_ids(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Map values to 0, 1, ... in order of first appearance; return (codes, number of distinct)."""
    codes, uniques = pd.factorize(values, sort=False)
    return codes.astype(np.int64), len(uniques)


def random_parts(users: np.ndarray, n_users: int, test_ratio: float, valid_ratio: float,
                 seed: int) -> np.ndarray:
    """The part (TRAIN/VALID/TEST) of each pair under the per-user random rule."""
    rng = np.random.RandomState(seed)
    parts = np.full(len(users), TRAIN, dtype=np.int8)
    order = np.argsort(users, kind="stable")  # each user's pairs, in stream order
    bounds = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=n_users))])
    for user in range(n_users):
        positions = order[bounds[user]:bounds[user + 1]].copy()
        rng.shuffle(positions)
        n_test = math.floor(test_ratio * len(positions))
        n_valid = math.floor(valid_ratio * len(positions))
        parts[positions[:n_test]] = TEST
        parts[positions[n_test:n_test + n_valid]] = VALID
    return parts


def temporal_parts(users: np.ndarray, n_users: int, timestamps: np.ndarray, test_ratio: float,
                   valid_ratio: float) -> np.ndarray:
    """The part (TRAIN/VALID/TEST) of each pair under the per-user time-ordered rule."""
    order = np.lexsort((np.arange(len(users)), timestamps, users))  # by user, time, stream order
    counts = np.bincount(users, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sorted_users = users[order]
    rank = np.arange(len(users)) - starts[sorted_users]  # 0 = the user's earliest pair
    from_end = counts[sorted_users] - rank  # 1 = the user's latest pair
    n_test = np.floor(test_ratio * counts).astype(np.int64)[sorted_users]
    n_valid = np.floor(valid_ratio * counts).astype(np.int64)[sorted_users]
    parts = np.full(len(users), TRAIN, dtype=np.int8)
    parts[order[from_end <= n_test + n_valid]] = VALID
    parts[order[from_end <= n_test]] = TEST
    return parts


def split_interactions(users: np.ndarray, items: np.ndarray, parts: np.ndarray | None, *,
                       split: dict, min_user_interactions: int,
                       timestamps: np.ndarray | None = None) -> Split:
    """Build the split of a raw stream; ``parts`` (codes per pair) is needed for ``published``,
    ``timestamps`` (one per pair) for ``temporal``.

    ``users``/``items`` may hold integers or strings. ``split`` is the dataset's split rule.
    The returned ``Split.meta`` holds the counts.
    """
    if split["method"] == "published" and parts is None:
        raise HetCompError("the published split needs the part (train/valid/test) of every file")
    if split["method"] == "temporal" and timestamps is None:
        raise HetCompError("the temporal split needs a timestamp for every pair "
                           "(reader 'interactions' with timestamp_col)")
    raw = {"n_users": len(pd.unique(users)), "n_items": len(pd.unique(items)),
           "n_interactions": len(users)}
    keep = ~pd.DataFrame({"u": users, "i": items}).duplicated(keep="first").to_numpy()
    raw["n_duplicates"] = int((~keep).sum())
    user_codes, n_raw_users = first_appearance_ids(users[keep])
    active = np.bincount(user_codes, minlength=n_raw_users) >= min_user_interactions
    keep[keep] = active[user_codes]

    users, user_ids = pd.factorize(users[keep], sort=False)
    items, item_ids = pd.factorize(items[keep], sort=False)
    users, items = users.astype(np.int64), items.astype(np.int64)
    n_users, n_items = len(user_ids), len(item_ids)
    if n_users == 0:
        raise HetCompError(f"no user has at least {min_user_interactions} interactions")
    if split["method"] == "random":
        parts = random_parts(users, n_users, split["test_ratio"], split["valid_ratio"], split["seed"])
    elif split["method"] == "temporal":
        parts = temporal_parts(users, n_users, timestamps[keep], split["test_ratio"], split["valid_ratio"])
    else:
        parts = parts[keep]

    seen = np.zeros(n_items, dtype=bool)
    seen[items[parts == TRAIN]] = True
    held_out = (parts != TRAIN) & seen[items]
    has = {code: np.bincount(users[held_out & (parts == code)], minlength=n_users) > 0
           for code in (VALID, TEST)}
    evaluated = has[VALID] & has[TEST]
    held_out &= evaluated[users]

    shape = (n_users, n_items)
    masks = {"train": parts == TRAIN, "valid": held_out & (parts == VALID),
             "test": held_out & (parts == TEST)}
    matrices = {name: to_csr(users[mask], items[mask], shape) for name, mask in masks.items()}
    meta = {
        "n_users": n_users,
        "n_items": n_items,
        "n_interactions": len(users),
        "n_train": int(matrices["train"].nnz),
        "n_valid": int(matrices["valid"].nnz),
        "n_test": int(matrices["test"].nnz),
        "n_eval_users": int(evaluated.sum()),
        "density": len(users) / (n_users * n_items),
        "raw": raw,
    }
    return Split(meta=meta, user_ids=np.asarray(user_ids), item_ids=np.asarray(item_ids), **matrices)
