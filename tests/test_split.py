"""The split rules, dataset configs, and the exact CiteULike-t numbers of the official protocol."""

import math
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from hetcomp.data.datasets import DATASET_DIR, dataset_names, load_dataset_config, prepare_split
from hetcomp.data.splitting import TEST, TRAIN, VALID, split_interactions
from hetcomp.errors import HetCompError

RANDOM = {"method": "random", "test_ratio": 0.2, "valid_ratio": 0.2, "seed": 0}


def rows(matrix):
    return [sorted(matrix.indices[matrix.indptr[u]:matrix.indptr[u + 1]].tolist())
            for u in range(matrix.shape[0])]


def reference_random_split(users, items, seed=0):
    """The rule written out naively (no filters): per user in id order, shuffle a list copy."""
    rng = np.random.RandomState(seed)
    by_user = {}
    for user, item in zip(users, items):
        by_user.setdefault(user, []).append(item)
    parts = {"train": [], "valid": [], "test": []}
    for user in sorted(by_user):
        mine = list(by_user[user])
        rng.shuffle(mine)
        n_t = math.floor(0.2 * len(mine))
        parts["test"].append(sorted(mine[:n_t]))
        parts["valid"].append(sorted(mine[n_t:2 * n_t]))
        parts["train"].append(sorted(mine[2 * n_t:]))
    return parts


def test_random_rule_matches_naive_reference():
    rng = np.random.RandomState(1)
    users = np.repeat(np.arange(40), rng.randint(5, 30, size=40))
    rng.shuffle(users)
    items = rng.randint(0, 15, size=len(users))
    pairs = list(dict.fromkeys(zip(users.tolist(), items.tolist())))  # distinct, first kept
    # ids already in order of first appearance, so the splitter keeps them as they are
    users = pd.factorize(np.array([user for user, _ in pairs]))[0]
    items = pd.factorize(np.array([item for _, item in pairs]))[0]
    split = split_interactions(users, items, None, split=RANDOM, min_user_interactions=0)
    expected = reference_random_split(users, items)
    assert rows(split.train) == expected["train"]
    seen = set(split.train.indices.tolist())
    for name in ("valid", "test"):
        got = rows(split.part(name))
        for user in range(split.n_users):
            evaluated = user in split.eval_users
            kept = [i for i in expected[name][user] if i in seen] if evaluated else []
            assert got[user] == kept


def test_dedup_filter_and_first_appearance_ids():
    # raw user 9 has 3 pairs (one repeated) -> 2 distinct < 3: dropped in one pass
    users = np.array([5, 9, 5, 9, 9, 7, 7, 7, 5])
    items = np.array([50, 1, 40, 1, 2, 40, 60, 70, 30])
    split = split_interactions(users, items, None, split={**RANDOM, "test_ratio": 0.0,
                                                          "valid_ratio": 0.0},
                               min_user_interactions=3)
    assert split.meta["raw"] == {"n_users": 3, "n_items": 7, "n_interactions": 9,
                                 "n_duplicates": 1}
    assert (split.n_users, split.n_items, split.meta["n_interactions"]) == (2, 5, 6)
    # users 5 -> 0, 7 -> 1; items 50, 40, 60, 70, 30 -> 0, 1, 2, 3, 4
    assert rows(split.train) == [[0, 1, 4], [1, 2, 3]]
    assert split.meta["n_eval_users"] == 0


def test_published_rule_unseen_items_and_empty_users():
    # train (0,1) (0,2) (1,1) (1,3) (1,4) (2,2) (2,3); valid (0,3) (1,9) (2,1); test (0,2) (1,2) (2,4)
    users = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2])
    items = np.array([1, 2, 1, 3, 4, 2, 3, 3, 9, 1, 2, 2, 4])
    parts = np.array([TRAIN] * 7 + [VALID] * 3 + [TEST] * 3)
    split = split_interactions(users, items, parts, split={"method": "published"},
                               min_user_interactions=0)
    # items by first appearance over train, valid, test: 1, 2, 3, 4, 9 -> 0, 1, 2, 3, 4
    assert split.n_items == 5  # item 9 keeps its column although no part holds it
    assert rows(split.train) == [[0, 1], [0, 2, 3], [1, 2]]
    # user 0: test (0,2) repeats a train pair, is dropped, so the user loses its validation too;
    # user 1: validation item 9 never occurs in train, so the user loses its test too
    assert rows(split.valid) == [[], [], [0]]
    assert rows(split.test) == [[], [], [3]]
    assert split.eval_users.tolist() == [2]
    assert split.meta["raw"]["n_duplicates"] == 1
    with pytest.raises(HetCompError, match="published split needs"):
        split_interactions(users, items, None, split={"method": "published"},
                           min_user_interactions=0)


def test_citeulike_t_matches_the_official_protocol(data_dir):
    split = prepare_split(load_dataset_config("citeulike-t"), data_dir)
    counts = {key: split.meta[key] for key in ("n_users", "n_items", "n_interactions", "n_train",
                                              "n_valid", "n_test", "n_eval_users")}
    assert counts == {"n_users": 5219, "n_items": 25181, "n_interactions": 125580,
                      "n_train": 78958, "n_valid": 20823, "n_test": 20823, "n_eval_users": 4719}
    assert len(split.eval_users) == 4719
    train_sizes = np.diff(split.train.indptr)
    assert len(np.unique(split.train.indices)) == 22392
    assert train_sizes.min() == 3 and (train_sizes < 10).sum() == 3268
    assert split.meta["inputs"]["citeulike-t/users.dat"]["matches"] is True


def test_shipped_configs_validate_and_match_sha256sums(data_dir):
    assert dataset_names() == ["amazon-music", "citeulike-a", "citeulike-t", "foursquare",
                               "gowalla", "ml-1m"]
    published = dict(line.split()[::-1] for line in (data_dir / "SHA256SUMS").read_text().splitlines())
    for name in dataset_names():
        config = load_dataset_config(name)
        assert config["split"] == RANDOM
        for source in config["sources"]:
            assert published[f"./{source['path']}"] == source["sha256"]
            assert source["url"].startswith("https://raw.githubusercontent.com/")


def test_published_split_needs_three_parts():
    assert load_dataset_config("ml-1m", split_method="published")["split"] == {"method": "published"}
    with pytest.raises(HetCompError, match="gowalla.yaml: a published split needs sources"):
        load_dataset_config("gowalla", split_method="published")


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(HetCompError, match="unknown dataset 'nope'; known: amazon-music, "
                                           "citeulike-a, citeulike-t, foursquare, gowalla, ml-1m"):
        load_dataset_config("nope")


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown key(s) colour"),
    ({"filters": {"min_items": 3}}, "filters: unknown key(s) min_items"),
    ({"split": {"method": "random", "seed": 0}}, "needs test_ratio, valid_ratio and seed"),
    ({"split": {"method": "published", "seed": 0}}, "split: unknown key(s) seed"),
    ({"reader": {"name": "citeulike", "options": {"sep": ","}}}, "unknown option(s) sep"),
])
def test_bad_dataset_yaml_names_key_and_file(tmp_path, change, message):
    config = yaml.safe_load((DATASET_DIR / "citeulike-t.yaml").read_text())
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({**config, **change}))
    with pytest.raises(HetCompError, match=f"^{re.escape(str(path))}.*{re.escape(message)}"):
        load_dataset_config(path)


def test_tiny_split_fixture(tiny_split):
    assert (tiny_split.n_users, tiny_split.n_items) == (60, 80)
    for name in ("train", "valid", "test"):
        assert (np.diff(tiny_split.part(name).indptr) > 0).all()
    assert len(tiny_split.eval_users) == 60
    # planted structure: most of a user's items belong to the user's group
    groups = tiny_split.train.tocoo()
    assert np.mean(groups.row // 15 == groups.col // 20) > 0.7
