"""Readers of raw files and the data directory (download, checksums), on small temp files."""

import hashlib
import logging
import re

import numpy as np
import pytest

from hetcomp.data import fetch
from hetcomp.data.readers import read
from hetcomp.errors import HetCompError


def write(tmp_path, text, name="data.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_citeulike_reads_line_index_as_user(tmp_path):
    got = read("citeulike", write(tmp_path, "2 5 7\n0\n1 3\n"))
    assert got.users.tolist() == [0, 0, 2]
    assert got.items.tolist() == [5, 7, 3]
    assert got.users.dtype == np.int64 and got.items.dtype == np.int64


@pytest.mark.parametrize("text, message", [
    ("2 5 7\n1 x\n", ":2: cannot parse item id 'x' as an integer"),
    ("2 5 7\n3 1 2\n", ":2: count field says 3 items but 2 follow"),
    ("1 4\n1 -4\n", ":2: negative item id -4"),
    ("", ": empty file"),
    ("1 4\n\n1 5\n", ":2: empty line"),
])
def test_citeulike_errors_name_file_and_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(HetCompError, match=f"^{re.escape(str(path))}{message}"):
        read("citeulike", path)


def test_triples_threshold_and_errors(tmp_path):
    path = write(tmp_path, "0 1 5.0\n0 2 3.0\n1 1 4\n")
    got = read("triples", path, {"rating_threshold": 4})
    assert got.users.tolist() == [0, 1] and got.items.tolist() == [1, 1]
    assert got.ratings.tolist() == [5.0, 4.0]
    assert len(read("triples", path)) == 3
    assert read("triples", write(tmp_path, "0 1\n", "pairs.txt")).items.tolist() == [1]
    with pytest.raises(HetCompError, match=r"pairs.txt:1: no rating column, but rating_threshold"):
        read("triples", tmp_path / "pairs.txt", {"rating_threshold": 4})
    with pytest.raises(HetCompError, match=r":2: expected 'user item \[rating\]', got 4 fields"):
        read("triples", write(tmp_path, "0 1 2\n0 1 2 3\n"))
    with pytest.raises(HetCompError, match=r":1: cannot parse rating 'high' as a number"):
        read("triples", write(tmp_path, "0 1 high\n"))


def test_tsv_counts(tmp_path):
    got = read("tsv_counts", write(tmp_path, "0\t3\t2\n1\t4\t0\n2\t5\t1\n"))
    assert got.users.tolist() == [0, 2] and got.items.tolist() == [3, 5]
    assert len(read("tsv_counts", tmp_path / "data.txt", {"min_count": 2})) == 1
    with pytest.raises(HetCompError, match=r":2: expected 'user<TAB>item<TAB>count', got 1 fields"):
        read("tsv_counts", write(tmp_path, "0\t3\t2\n0 3 2\n"))
    with pytest.raises(HetCompError, match=r":1: negative user id -1"):
        read("tsv_counts", write(tmp_path, "-1\t3\t2\n"))


def test_adjacency(tmp_path):
    got = read("adjacency", write(tmp_path, "0 4 5\n1\n2 6\n"))
    assert got.users.tolist() == [0, 0, 2] and got.items.tolist() == [4, 5, 6]
    with pytest.raises(HetCompError, match=r":3: cannot parse item id '6.5' as an integer"):
        read("adjacency", write(tmp_path, "0 4 5\n1\n2 6.5\n"))


def test_interactions_by_name_with_rating_and_timestamp(tmp_path):
    path = write(tmp_path, "uid,iid,stars,time\nA,x,5,100\nB,y,2,101\nA,y,4,102\n", "r.csv")
    got = read("interactions", path, {"user_col": "uid", "item_col": "iid", "rating_col": "stars",
                                      "rating_threshold": 4, "timestamp_col": "time"})
    assert got.users.tolist() == ["A", "A"]  # text ids stay text; `prepare` maps them over all files
    assert got.items.tolist() == ["x", "y"]
    assert got.ratings.tolist() == [5.0, 4.0] and got.timestamps.tolist() == [100, 102]


def test_interactions_by_index_without_header(tmp_path):
    got = read("interactions", write(tmp_path, "7\t3\n9\t4\n"),
               {"sep": "\t", "header": False, "user_col": 0, "item_col": 1})
    assert got.users.tolist() == [7, 9] and got.items.tolist() == [3, 4]


@pytest.mark.parametrize("text, options, message", [
    ("u,i,r\n1,2,5\n1,3,x\n", {"rating_col": "r"}, r":3: cannot parse rating 'x' as a number"),
    ("u,i\n1,2\n-1,3\n", {}, r":3: negative user id -1"),
    ("u,i\n1,2\n", {"item_col": "item"}, r": no item id column 'item' \(columns: u, i\)"),
    ("u,i\n1,2\n", {"rating_threshold": 3}, r": rating_threshold is set but rating_col is not"),
    ("", {}, r": empty file"),
])
def test_interactions_errors(tmp_path, text, options, message):
    path = write(tmp_path, text, "r.csv")
    with pytest.raises(HetCompError, match=f"^{re.escape(str(path))}{message}"):
        read("interactions", path, options)


def test_unknown_reader_or_option(tmp_path):
    path = write(tmp_path, "0 1\n")
    with pytest.raises(HetCompError, match="unknown reader 'nope'; known: adjacency, citeulike"):
        read("nope", path)
    with pytest.raises(HetCompError, match="reader 'adjacency': unknown option.* sep"):
        read("adjacency", path, {"sep": ","})


def test_data_dir_resolution(tmp_path, monkeypatch):
    """Argument, then $HETCOMP_DATA_DIR, then the per-user cache; never a folder beside the checkout."""
    monkeypatch.setenv(fetch.ENV_VAR, str(tmp_path / "env"))
    assert fetch.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert fetch.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv(fetch.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert fetch.resolve_data_dir(None) == tmp_path / "cache" / "hetcomp" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.resolve_data_dir(None) == tmp_path / "home" / ".cache" / "hetcomp" / "data"


def test_download_from_url_checks_sha256(tmp_path):
    remote = write(tmp_path, "1 2\n", "remote.dat")
    digest = hashlib.sha256(b"1 2\n").hexdigest()
    info = fetch.ensure_source(tmp_path / "data", "ds/users.dat", digest, remote.as_uri())
    assert info == {"sha256": digest, "published_sha256": digest, "matches": True}
    assert (tmp_path / "data" / "ds" / "users.dat").read_text() == "1 2\n"
    with pytest.raises(HetCompError, match="differs from the published"):
        fetch.ensure_source(tmp_path / "data", "ds/other.dat", "0" * 64, remote.as_uri())
    assert sorted(p.name for p in (tmp_path / "data" / "ds").iterdir()) == ["users.dat"]


def test_unreachable_url_names_file_url_and_target(tmp_path):
    message = (rf"^ds/users.dat is missing from the data directory {re.escape(str(tmp_path))} "
               r"\(the download failed: .*\): download it from file:///nonexistent and put it at "
               rf"{re.escape(str(tmp_path / 'ds' / 'users.dat'))}, or point --data-dir / HETCOMP_DATA_DIR")
    with pytest.raises(HetCompError, match=message):
        fetch.ensure_source(tmp_path, "ds/users.dat", "0" * 64, "file:///nonexistent")


def test_offline_or_no_url_never_downloads(tmp_path, monkeypatch):
    remote = write(tmp_path, "1 2\n", "remote.dat")
    monkeypatch.setenv(fetch.OFFLINE_VAR, "1")
    with pytest.raises(HetCompError, match=r"\(HETCOMP_OFFLINE is set\): download it from file:"):
        fetch.ensure_source(tmp_path / "data", "users.dat", None, remote.as_uri())
    monkeypatch.setenv(fetch.OFFLINE_VAR, "0")
    with pytest.raises(HetCompError, match=r"users.dat is missing .*: this dataset gives no download URL"):
        fetch.ensure_source(tmp_path / "data", "users.dat", None, None)
    assert not (tmp_path / "data").exists()
    info = fetch.ensure_source(tmp_path / "data", "users.dat", None, remote.as_uri())
    assert info == {"sha256": hashlib.sha256(b"1 2\n").hexdigest(), "published_sha256": None,
                    "matches": None}
    assert (tmp_path / "data" / "users.dat").stat().st_mode & 0o777 == 0o644


def test_present_file_with_other_checksum_warns(tmp_path, caplog):
    write(tmp_path, "1 2\n", "users.dat")
    with caplog.at_level(logging.WARNING):
        info = fetch.ensure_source(tmp_path, "users.dat", "0" * 64, "file:///nonexistent")
    assert info["matches"] is False and info["sha256"] == hashlib.sha256(b"1 2\n").hexdigest()
    assert "differs from the published" in caplog.text
