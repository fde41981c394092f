"""Reference records (hetcomp.reference, `hetcomp record`) and the reproduction check."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hetcomp.cli import main
from hetcomp.reference import differences_from_record, finished_runs, record_all, recorded_cpu, recorded_threads
from hetcomp.report.aggregate import history_rows, run_rows
from hetcomp.report.reproduction import TOLERANCE, reproduction_frame


def _fake_run(path, method="rrd", seed=0, recall=0.2):
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(
        {"best_epoch": 10, "valid": {"recall@50": recall}, "test": {"recall@50": recall}}))
    (path / "run_info.json").write_text(json.dumps({"seed": seed, "method": method, "config": {}}))
    (path / "history.jsonl").write_text(json.dumps({"epoch": 0, "valid": {"recall@50": recall}}) + "\n")
    np.savez_compressed(path / "per_user.npz", users=np.arange(3),
                        **{"test/recall@50": np.ones(3), "valid/recall@50": np.zeros(3)})
    (path / "student.pt").write_bytes(b"x" * 4096)           # never recorded


def test_record_copies_small_files_once_and_reports_read_them(tmp_path):
    work, ref = tmp_path / "work", tmp_path / "reference"
    _fake_run(work / "runs" / "ds" / "seed0" / "rrd")
    (work / "runs" / "ds" / "seed1" / "rrd").mkdir(parents=True)  # unfinished: no run_info.json
    assert [str(p) for p in finished_runs(work)] == ["runs/ds/seed0/rrd"]

    written = record_all(work, ref)
    record = ref / "runs" / "ds" / "seed0" / "rrd"
    assert [str(p) for p, _ in written] == ["runs/ds/seed0/rrd"]
    assert sorted(p.name for p in record.iterdir()) == [
        "history.jsonl.gz", "metrics.json", "per_user.npz", "run_info.json"]
    assert written[0][1] < 4096
    with np.load(record / "per_user.npz") as per_user:  # the per-user test metrics only
        assert sorted(per_user.files) == ["test/recall@50", "users"]
        assert per_user["test/recall@50"].tolist() == [1.0, 1.0, 1.0]
    # the reports read a record like the run itself
    assert run_rows(record, "student")[0]["value"] == 0.2
    assert history_rows(record, "student") == history_rows(work / "runs" / "ds" / "seed0" / "rrd", "student")
    # a record is never overwritten
    (work / "runs" / "ds" / "seed0" / "rrd" / "metrics.json").write_text("{}")
    assert record_all(work, ref) == []
    assert json.loads((record / "metrics.json").read_text())["best_epoch"] == 10


def test_record_command(tmp_path, capsys):
    _fake_run(tmp_path / "work" / "teachers" / "ds" / "seed0" / "mf")
    assert main(["record", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "ref")]) == 0
    assert "1 new record(s)" in capsys.readouterr().out
    assert main(["record", "--work", str(tmp_path / "missing"), "--out", str(tmp_path / "ref")]) == 2


def test_recorded_threads_and_differences_from_a_record(tmp_path):
    record = tmp_path / "record"
    _fake_run(record, recall=0.25)
    assert recorded_threads(record) is None  # an old record without the count
    info = json.loads((record / "run_info.json").read_text())
    (record / "run_info.json").write_text(json.dumps({**info, "device_name": "cpu (x86_64, 2 threads)"}))
    assert recorded_threads(record) == 2  # a record older than torch_threads names it here
    assert recorded_cpu(record) is None  # ... and no CPU model
    (record / "run_info.json").write_text(json.dumps(
        {**info, "device_name": "cpu (Intel(R) Xeon(R) Processor, AVX512, 1 threads)"}))
    assert recorded_cpu(record) == "Intel(R) Xeon(R) Processor, AVX512"
    (record / "run_info.json").write_text(json.dumps({**info, "torch_threads": 1}))
    assert recorded_threads(record) == 1 and recorded_threads(tmp_path / "none") is None
    same = {"best_epoch": 99, "valid": {"recall@50": 0.25}, "test": {"recall@50": 0.25}}
    assert differences_from_record(same, record) == []  # only valid and test are compared
    other = {"valid": {"recall@50": 0.25}, "test": {"recall@50": 0.25 + 1e-12, "ndcg@50": 0.1}}
    assert differences_from_record(other, record) == ["test ndcg@50 0.1 vs None",
                                                      "test recall@50 0.250000000001 vs 0.25"]


def _long(values_by_seed, method="rrd"):
    return pd.DataFrame([{"kind": "student", "dataset": "ds", "method": method, "teacher": "ensemble",
                          "seed": seed, "split": "test", "metric": "recall", "K": 50, "value": value}
                         for seed, value in values_by_seed.items()])


def test_reproduction_verdicts():
    reference = pd.concat([_long({0: 0.20, 1: 0.22, 2: 0.21}), _long({0: 0.30}, method="hetcomp")])
    # two seeds: band = 2 std of the reference over seeds 0 and 1
    std = float(np.std([0.20, 0.22], ddof=1))
    frame = reproduction_frame(_long({0: 0.21, 1: 0.21}), reference, [50])
    assert frame.loc[0, "verdict"] == "ok" and frame.loc[0, "band"] == pytest.approx(2 * std)
    frame = reproduction_frame(_long({0: 0.30, 1: 0.30}), reference, [50])
    assert frame.loc[0, "verdict"] == "outside"
    # one seed: the fixed tolerance
    assert reproduction_frame(_long({0: 0.30 + TOLERANCE / 2}, "hetcomp"), reference, [50]).loc[0, "verdict"] == "ok"
    assert reproduction_frame(_long({0: 0.30 + 2 * TOLERANCE}, "hetcomp"), reference, [50]).loc[0, "verdict"] == "outside"
    # seeds the reference lacks, or a method it lacks
    assert reproduction_frame(_long({5: 0.2}), reference, [50]).loc[0, "verdict"] == "no reference"
    assert reproduction_frame(_long({0: 0.2}, "cd"), reference, [50]).loc[0, "verdict"] == "no reference"
