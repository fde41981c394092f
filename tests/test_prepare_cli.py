"""``hetcomp prepare`` end to end, in process: real datasets, determinism, failures."""

import hashlib
import json
import logging

import pytest
import yaml

from hetcomp.cli import main
from hetcomp.data.store import load_id_map, load_split

CITEULIKE_T = ("citeulike-t: 5,219 users, 25,181 items, 125,580 interactions; 78,958 train, "
               "20,823 validation, 20,823 test; 4,719 evaluated users")


def prepare(*args):
    return main(["prepare", *map(str, args)])


def test_citeulike_t_summary_and_identical_bytes(data_dir, tmp_path, capsys):
    for out in ("a", "b"):
        assert prepare("--dataset", "citeulike-t", "--data-dir", data_dir, "--out", tmp_path / out) == 0
        assert capsys.readouterr().out.strip() == CITEULIKE_T
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["item_ids.tsv", "meta.json", "test.npz", "train.npz", "user_ids.tsv", "valid.npz"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert str(data_dir) not in json.dumps(meta) and str(tmp_path) not in json.dumps(meta)
    assert meta["split"] == {"method": "random", "test_ratio": 0.2, "valid_ratio": 0.2, "seed": 0}
    assert meta["filters"] == {"min_user_interactions": 5}
    assert meta["reader"] == {"name": "citeulike", "options": {}}
    assert meta["inputs"]["citeulike-t/users.dat"]["matches"] is True
    assert round(meta["density"], 6) == 0.000956


@pytest.mark.parametrize("dataset", ["citeulike-a", "foursquare", "amazon-music", "ml-1m", "gowalla"])
def test_other_datasets_prepare(dataset, data_dir, tmp_path, capsys):
    assert prepare("--dataset", dataset, "--data-dir", data_dir, "--out", tmp_path / "out") == 0
    split = load_split(tmp_path / "out")
    meta = split.meta
    assert capsys.readouterr().out.startswith(f"{dataset}: {meta['n_users']:,} users")
    assert (meta["n_train"], meta["n_valid"], meta["n_test"]) == (
        split.train.nnz, split.valid.nnz, split.test.nnz)
    assert meta["n_eval_users"] == len(split.eval_users) > 0.9 * meta["n_users"]
    assert all(entry["matches"] for entry in meta["inputs"].values())


def test_published_split_option(data_dir, tmp_path, capsys):
    assert prepare("--dataset", "amazon-music", "--split-method", "published",
                   "--data-dir", data_dir, "--out", tmp_path / "out") == 0
    meta = load_split(tmp_path / "out").meta
    assert meta["split"] == {"method": "published"}
    assert meta["n_train"] == 34915  # every train.txt line (no user falls under the filter)


def test_own_yaml_with_generic_reader(tmp_path, capsys):
    rows = "".join(f"u{u},i{(u + k) % 7},{k % 5 + 1}\n" for u in range(6) for k in range(6))
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "ratings.csv").write_text("user,item,rating\n" + rows)
    digest = hashlib.sha256((tmp_path / "raw" / "ratings.csv").read_bytes()).hexdigest()
    config = {
        "description": "six users",
        "sources": [{"path": "ratings.csv", "sha256": digest, "url": "file:///nonexistent"}],
        "reader": {"name": "interactions",
                   "options": {"user_col": "user", "item_col": "item", "rating_col": "rating"}},
        "filters": {"min_user_interactions": 5},
    }
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    assert prepare("--config", tmp_path / "mine.yaml", "--data-dir", tmp_path / "raw",
                   "--out", tmp_path / "out") == 0
    assert capsys.readouterr().out.startswith("mine: 6 users, 7 items, 36 interactions; 24 train")


def write_dataset(tmp_path, sources, reader_options, split=None, name="mine"):
    """A dataset YAML of local files only (no url, no sha256) in ``tmp_path``."""
    config = {"sources": [{"path": path} for path in sources],
              "reader": {"name": "interactions", "options": reader_options},
              "filters": {"min_user_interactions": 1}}
    if split:
        config["split"] = split
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / f"{name}.yaml"


def test_local_files_need_no_url_or_checksum_and_id_maps_span_all_files(tmp_path, capsys, caplog):
    """Text ids are mapped over every file together; the maps and the merged duplicates are reported."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.csv").write_text("user,item\nann,x\nbob,y\nann,x\n")
    (tmp_path / "raw" / "b.csv").write_text("user,item\nbob,x\ncid,z\n")
    path = write_dataset(tmp_path, ["a.csv", "b.csv"], {"user_col": "user", "item_col": "item"},
                         {"method": "random", "test_ratio": 0.0, "valid_ratio": 0.0, "seed": 0})
    with caplog.at_level(logging.INFO):
        assert prepare("--config", path, "--data-dir", tmp_path / "raw", "--out", tmp_path / "out") == 0
    assert capsys.readouterr().out.startswith("mine: 3 users, 3 items, 4 interactions")
    assert "merged 1 duplicate (user, item) rows" in caplog.text
    assert "user ids are text; mapped to 0, 1, ..." in caplog.text
    users = load_id_map(tmp_path / "out", "user")
    assert users.to_dict("list") == {"original_id": ["ann", "bob", "cid"], "internal_id": [0, 1, 2]}
    assert load_id_map(tmp_path / "out", "item")["original_id"].tolist() == ["x", "y", "z"]
    meta = load_split(tmp_path / "out").meta
    assert meta["inputs"]["a.csv"]["published_sha256"] is None and meta["inputs"]["a.csv"]["matches"] is None


def test_temporal_split_holds_out_each_users_latest_pairs(tmp_path, capsys):
    rows = "".join(f"{u},{(u + k) % 6},{100 - k}\n" for u in range(4) for k in range(5))  # k=4 oldest
    (tmp_path / "r.csv").write_text("u,i,t\n" + rows)
    path = write_dataset(tmp_path, ["r.csv"], {"user_col": "u", "item_col": "i", "timestamp_col": "t"},
                         {"method": "temporal", "test_ratio": 0.2, "valid_ratio": 0.2})
    assert prepare("--config", path, "--data-dir", tmp_path, "--out", tmp_path / "out") == 0
    split = load_split(tmp_path / "out")
    items = load_id_map(tmp_path / "out", "item")["original_id"].astype(int).to_numpy()
    for user in range(4):  # newest (k=0) is test, k=1 validation, when its item occurs in train
        train = set(items[split.train[user].indices])
        assert train == {(user + k) % 6 for k in (2, 3, 4)}
        for part, k in (("test", 0), ("valid", 1)):
            got = set(items[split.part(part)[user].indices])
            assert got <= {(user + k) % 6}


@pytest.mark.parametrize("split, message", [
    (None, "reader option timestamp_col is used only by the temporal split"),
    ({"method": "temporal", "test_ratio": 0.2, "valid_ratio": 0.2},
     "a temporal split needs reader 'interactions' with option timestamp_col"),
])
def test_timestamp_column_and_temporal_split_go_together(tmp_path, capsys, split, message):
    options = {"timestamp_col": "t"} if split is None else {}
    path = write_dataset(tmp_path, ["r.csv"], options, split)
    assert prepare("--config", path, "--out", tmp_path / "out") == 2
    assert message in capsys.readouterr().err


def bad_yaml(tmp_path, **change):
    config = {"sources": [{"path": "users.dat", "sha256": "0" * 64, "url": "file:///nonexistent"}],
              "reader": {"name": "citeulike"}, **change}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    return ["--config", tmp_path / "bad.yaml"]


@pytest.mark.parametrize("case, message", [
    ("unknown-dataset", "unknown dataset 'nope'; known: amazon-music, citeulike-a, citeulike-t"),
    ("unknown-key", "bad.yaml: unknown key(s) shuffle"),
    ("count-mismatch", "users.dat:2: count field says 2 items but 1 follow"),
    ("missing-file", "absent.dat is missing from the data directory"),
])
def test_failures_exit_2_with_one_line_and_no_output(case, message, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "users.dat").write_text("1 4\n2 5\n")
    args = {
        "unknown-dataset": lambda: ["--dataset", "nope"],
        "unknown-key": lambda: bad_yaml(tmp_path, shuffle=True),
        "count-mismatch": lambda: bad_yaml(tmp_path),
        "missing-file": lambda: bad_yaml(tmp_path, sources=[
            {"path": "absent.dat", "sha256": "0" * 64, "url": "file:///nonexistent"}]),
    }[case]()
    assert prepare(*args, "--data-dir", tmp_path / "data", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("hetcomp prepare: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
