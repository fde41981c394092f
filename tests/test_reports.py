"""`hetcomp aggregate` and `hetcomp report` on small hand-made run folders (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hetcomp import REPO_ROOT
from hetcomp.data.store import save_split
from hetcomp.errors import HetCompError
from hetcomp.report import aggregate as A
from hetcomp.report import claims as C
from hetcomp.report import tables as T
from hetcomp.report.figures import selection_frame, write_figures

KS = (10, 20, 50)
METRICS = [f"{m}@{k}" for m in ("recall", "ndcg") for k in KS]
TABLES = ["main.md", "main.tex", "teachers.md", "cost.md", "datasets.md", "paper_comparison.md", "tuning.md"]
FIGURES = ["training_curves.png", "checkpoint_selection.png", "accuracy_vs_cost.png", "discrepancy.png",
           "homogeneous_vs_heterogeneous.png"]
PNG = b"\x89PNG\r\n\x1a\n"
# Test Recall@50 level of each method; other metrics are scaled from it.
LEVEL = {"mf": 0.30, "cml": 0.25, "ensemble": 0.40, "wokd": 0.20, "rrd": 0.24, "hetcomp": 0.30}


def _metrics(level: float, rng: np.random.Generator) -> dict:
    return {name: round(level * (0.5 + 0.1 * i) + rng.normal(0, 0.002), 4) for i, name in enumerate(METRICS)}


def _make_run(path: Path, *, config: dict, seed: int, level: float, users: np.ndarray, rng,
              history: list[dict] | None = None, n_parameters: int = 100) -> Path:
    path.mkdir(parents=True)
    metrics = {"best_epoch": 20, "valid": _metrics(level, rng), "test": _metrics(level, rng),
               "n_parameters": n_parameters, "train_time_s": 1.5}
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "run_info.json").write_text(json.dumps({"config": config, "seed": seed, "peak_memory_mb": 123.0,
                                                    "wall_time_s": 2.0}))
    per_user = {"users": users}
    for part in ("valid", "test"):
        for name in METRICS:
            per_user[f"{part}/{name}"] = np.clip(rng.normal(metrics[part][name], 0.05, len(users)), 0, 1)
    np.savez(path / "per_user.npz", **per_user)
    if history is not None:
        (path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return path


def _history(level: float, hetcomp: bool) -> list[dict]:
    records = []
    for epoch in (0, 10, 20):
        record = {"epoch": epoch, "loss": {"base": 0.5}, "valid": {"recall@50": level * (0.5 + epoch / 40)},
                  "test": {"recall@50": level * (0.5 + epoch / 40)}}
        if hetcomp:
            record.update(phase=1, selection={"mf": epoch / 10, "cml": epoch / 20},
                          dkc={"discrepancy": {"mf": [0.5, 0.6, 0.7]}, "advanced": 0.5})
        records.append(record)
    return records


def build_runs(root: Path, split, seeds=(0, 1)) -> dict:
    """Teachers, ensembles, students (incl. one single-teacher control) and cost folders."""
    rng = np.random.default_rng(0)
    users = split.eval_users
    work = root / "work"
    save_split(split, work / "splits" / "tiny")
    out = {"splits": [work / "splits" / "tiny"], "teachers": [], "ensembles": [], "students": [], "cost": []}
    for seed in seeds:
        base = {"dataset": "tiny"}
        for teacher in ("mf", "cml"):
            out["teachers"].append(_make_run(work / "teachers" / "tiny" / f"seed{seed}" / teacher,
                                             config={**base, "model": teacher}, seed=seed,
                                             level=LEVEL[teacher], users=users, rng=rng, n_parameters=1000))
        out["ensembles"].append(_make_run(work / "ensembles" / "tiny" / f"seed{seed}",
                                          config={**base, "teachers": ["mf", "cml"]}, seed=seed,
                                          level=LEVEL["ensemble"], users=users, rng=rng, n_parameters=2000))
        for method in ("wokd", "rrd", "hetcomp"):
            teacher = None if method == "wokd" else "ensemble"
            out["students"].append(_make_run(
                work / "runs" / "tiny" / f"seed{seed}" / method,
                config={**base, "method": method, "teacher": teacher, "student_dim": 6}, seed=seed,
                level=LEVEL[method], users=users, rng=rng, history=_history(LEVEL[method], method == "hetcomp")))
        out["students"].append(_make_run(
            work / "controls" / "tiny" / f"seed{seed}" / "rrd" / "mf",
            config={**base, "method": "rrd", "teacher": "mf", "student_dim": 6}, seed=seed,
            level=0.27, users=users, rng=rng, history=_history(0.27, False)))
    cost = work / "cost" / "tiny" / f"seed{seeds[0]}"
    cost.mkdir(parents=True)
    rows = [("teacher", "mf", None, 1000, 2.0), ("teacher", "cml", None, 1000, 3.0),
            ("ensemble", "ensemble", None, 2000, 6.0), ("student", "wokd", None, 80, 0.1),
            ("student", "rrd", None, 80, 0.1), ("student", "hetcomp", None, 80, 0.1)]
    pd.DataFrame([{"kind": k, "name": n, "teacher": t, "n_parameters": p, "latency_ms": lat,
                   "latency_ms_mean": lat, "latency_ms_min": lat, "latency_ms_max": lat,
                   "throughput_users_per_s": 64 / lat * 1000, "batch_size": 64, "k": 50, "repeats": 5,
                   "warmup": 1, "device": "cpu", "device_name": "cpu (test, 1 threads)", "run": "x"}
                  for k, n, t, p, lat in rows]).to_csv(cost / "cost.csv", index=False)
    pd.DataFrame([{"method": m, "student_teacher": None, "teacher": t, "checkpoint": c, "epoch": 10 * c,
                   "discrepancy": 0.5 - 0.1 * c, "run": "x"} for m in ("wokd", "hetcomp") for t in ("mf", "cml")
                  for c in range(3)]).to_csv(cost / "discrepancy.csv", index=False)
    (cost / "cost.json").write_text(json.dumps({"dataset": "tiny", "seed": seeds[0]}))
    out["cost"].append(cost)
    return out


@pytest.fixture
def runs(tmp_path, tiny_split):
    return build_runs(tmp_path, tiny_split)


# ------------------------------------------------------------------------------------------ aggregate
def test_identify_from_run_info_and_from_the_layout(runs, tmp_path):
    assert A.identify(runs["students"][0], "student") == {
        "kind": "student", "dataset": "tiny", "method": "wokd", "teacher": "none", "seed": 0}
    assert A.identify(runs["students"][1], "student")["teacher"] == "ensemble"
    assert A.identify(runs["students"][3], "student")["teacher"] == "mf"
    assert A.identify(runs["ensembles"][0], "ensemble")["method"] == "ensemble"
    assert A.identify(runs["teachers"][1], "teacher")["method"] == "cml"
    # nothing in run_info: the workflow layout .../<dataset>/seed<seed>/<method>/<teacher>
    bare = tmp_path / "w" / "controls" / "other" / "seed7" / "cd" / "vae"
    bare.mkdir(parents=True)
    (bare / "run_info.json").write_text("{}")
    assert A.identify(bare, "student") == {"kind": "student", "dataset": "other", "method": "cd",
                                           "teacher": "vae", "seed": 7}


def test_aggregate_long_table(runs):
    frames = A.aggregate(teachers=runs["teachers"], ensembles=runs["ensembles"], students=runs["students"],
                         splits=runs["splits"], cost=runs["cost"])
    long = frames["long"]
    assert list(long.columns) == A.LONG_COLUMNS
    n_runs = len(runs["teachers"]) + len(runs["ensembles"]) + len(runs["students"])
    assert len(long) == n_runs * 2 * len(METRICS)
    assert set(long["kind"]) == {"teacher", "ensemble", "student"}
    assert set(long[long["kind"] == "student"]["teacher"]) == {"none", "ensemble", "mf"}
    row = long[(long["method"] == "hetcomp") & (long["seed"] == 1) & (long["split"] == "test")
               & (long["metric"] == "recall") & (long["K"] == 50)].iloc[0]
    metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
    assert row["value"] == metrics["test"]["recall@50"] and row["best_epoch"] == 20
    assert row["peak_memory_mb"] == 123.0 and row["train_time_s"] == 1.5
    history = frames["history"]
    assert {"valid/recall@50", "selection/mf", "loss/base", "dkc/discrepancy/mf/2"} <= set(history["key"])
    assert frames["datasets"].iloc[0]["n_users"] == 60
    assert len(frames["cost"]) == 6 and set(frames["cost"]["dataset"]) == {"tiny"}
    assert len(frames["discrepancy"]) == 12


def test_aggregate_rejects_the_same_run_twice(runs):
    with pytest.raises(HetCompError, match="two runs are the same"):
        A.aggregate(students=[runs["students"][0], runs["students"][0]])


def test_aggregate_rejects_unfinished_runs(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(HetCompError, match="run_info.json"):
        A.aggregate(students=[tmp_path / "r"])


# ------------------------------------------------------------------------------------------ tables
@pytest.fixture
def long(runs):
    return A.aggregate(teachers=runs["teachers"], ensembles=runs["ensembles"], students=runs["students"])["long"]


def _values(long, method, metric="recall", k=50):
    sel = long[(long["kind"] == "student") & (long["method"] == method) & (long["split"] == "test")
               & (long["metric"] == metric) & (long["K"] == k) & long["teacher"].isin(["ensemble", "none"])]
    return sel.sort_values("seed")["value"].to_numpy()


def test_main_table_mean_std_bold_and_order(long):
    table = T.main_table(long, KS, methods=["wokd", "hetcomp", "rrd"])
    assert table["methods"] == ["wokd", "rrd", "hetcomp"]  # w/o KD first, HetComp last
    mean, std, n = table["cells"][("hetcomp", "tiny", "recall", 50)]
    values = _values(long, "hetcomp")
    assert n == 2 and mean == pytest.approx(values.mean()) and std == pytest.approx(values.std(ddof=1))
    assert ("hetcomp", "tiny", "recall", 50) in table["bold"]
    text = T.main_markdown(table)
    assert f"**{mean:.4f} ± {std:.4f}" in text
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:4] == ["w/o KD", "RRD", "HetComp"]  # one RRD row: the control is not in the table
    tex = T.main_latex(table)
    assert "\\textbf{" in tex and "\\begin{tabular}{lcccccc}" in tex and "$\\pm$" in tex


def test_a_row_with_fewer_seeds_says_how_many(long):
    """A method recorded on fewer seeds than the others (a grid still growing) is marked (n=N)."""
    fewer = long[~((long["method"] == "rrd") & (long["seed"] == 1))]
    table = T.main_table(fewer, KS, methods=["wokd", "hetcomp", "rrd"])
    assert table["cells"][("rrd", "tiny", "recall", 50)][2] == 1
    rows = {line.split("|")[1].strip(): line for line in T.main_markdown(table).splitlines() if line.startswith("| ")}
    assert rows["RRD"].count("(n=1)") == len(KS) * 2 and "(n=" not in rows["HetComp"]
    full = T.main_markdown(T.main_table(long, KS, methods=["wokd", "hetcomp", "rrd"]))
    assert not [line for line in full.splitlines() if line.startswith("| ") and "(n=" in line]


def test_significance_over_seeds_matches_scipy(long):
    tests = T.significance(T.test_rows(T.main_students(long), KS), KS, ["tiny"])
    row = tests[(tests["metric"] == "recall") & (tests["K"] == 50)].iloc[0]
    assert row["baseline"] == "rrd" and row["test"] == "paired t-test over seeds" and row["n"] == 2
    expected = stats.ttest_rel(_values(long, "hetcomp"), _values(long, "rrd"))
    assert row["p"] == pytest.approx(expected.pvalue) and row["t"] == pytest.approx(expected.statistic)


def test_significance_with_one_seed_pairs_users(tmp_path, tiny_split):
    runs = build_runs(tmp_path, tiny_split, seeds=(0,))
    long = A.aggregate(students=runs["students"])["long"]
    tests = T.significance(T.test_rows(T.main_students(long), KS), KS, ["tiny"])
    row = tests[(tests["metric"] == "ndcg") & (tests["K"] == 10)].iloc[0]
    assert row["test"] == "paired t-test over users" and row["n"] == len(tiny_split.eval_users)
    a = np.load(runs["students"][2] / "per_user.npz")["test/ndcg@10"]
    b = np.load(runs["students"][1] / "per_user.npz")["test/ndcg@10"]
    assert row["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    table = T.main_table(long, KS, alpha=0.999)
    assert ("hetcomp", "tiny", "ndcg", 10) in table["marked"]
    # without the per-user files (e.g. a committed long.csv): no test, no mark
    moved = long.assign(run="/nonexistent")
    tests = T.significance(T.test_rows(T.main_students(moved), KS), KS, ["tiny"])
    assert tests["p"].isna().all() and tests["test"].str.startswith("n/a").all()


def test_significance_means_are_over_the_seeds_it_pairs(long):
    """HetComp on seeds 0-1, RRD on seed 0 only: the test pairs users of seed 0, and both means
    shown (table and claim (d)) are seed 0's, not HetComp's two-seed mean."""
    one_seed_rrd = long[~((long["method"] == "rrd") & (long["seed"] == 1))]
    tests = T.significance(T.test_rows(T.main_students(one_seed_rrd), KS), KS, ["tiny"])
    row = tests[(tests["metric"] == "recall") & (tests["K"] == 50) & (tests["baseline"] == "rrd")].iloc[0]
    hetcomp, rrd = _values(long, "hetcomp"), _values(long, "rrd")
    assert row["seeds"] == "0" and row["test"] == "paired t-test over users"
    assert row["hetcomp"] == pytest.approx(hetcomp[0]) and row["baseline_mean"] == pytest.approx(rrd[0])
    assert hetcomp.mean() != pytest.approx(hetcomp[0])
    check = [c for c in C.hetcomp_vs_baselines(T.test_rows(one_seed_rrd, KS), "tiny", KS, 0.05)
             if c.subject == "Recall@50"][0]
    assert f"HetComp {hetcomp[0]:.4f} vs strongest" in check.numbers and "(seeds 0;" in check.numbers
    assert T.seed_label([0, 1, 2, 3, 4]) == "0-4" and T.seed_label([1, 0]) == "0,1" and T.seed_label([]) == "n/a"


def test_teachers_table_has_teachers_ensemble_and_wokd(long):
    text = T.teachers_markdown(long, KS, ["cml", "mf"])
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["CML", "MF", "Ensemble", "w/o KD (student)"]
    assert "ensemble better: yes" in text and "2,000" in text


def test_paper_comparison_fills_published_values_and_na(long, tmp_path):
    paper = tmp_path / "paper.csv"
    paper.write_text("# a comment line\ndataset,method,metric,k,value\ntiny,hetcomp,recall,50,0.25\n"
                     "other,hetcomp,ndcg,10,0.1\n")
    frame = T.read_paper_results(paper)
    text = T.paper_markdown(long, frame, KS, ["wokd", "rrd", "hetcomp"], ["mf", "cml"])
    ours = long[(long["method"] == "hetcomp") & (long["split"] == "test") & (long["metric"] == "recall")
                & (long["K"] == 50) & (long["kind"] == "student")]["value"].mean()
    assert f"| 0.2500  | {ours - 0.25:+.4f}" in text
    assert "| other     | HetComp  | NDCG@10   | n/a" in text  # published, never run here
    assert "n/a     | n/a" in text  # run here, nothing published
    assert "2 published value(s)" in text


def test_shipped_paper_results_has_header_comment_and_no_numbers():
    path = REPO_ROOT / "config" / "paper_results.csv"
    lines = path.read_text().splitlines()
    assert any(line.startswith("#") for line in lines)
    data = [line for line in lines if line.strip() and not line.startswith("#")]
    assert data == ["dataset,method,metric,k,value"]
    assert T.read_paper_results(path).empty


def test_paper_results_with_a_wrong_header_is_an_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("dataset,method,value\nx,y,1\n")
    with pytest.raises(HetCompError, match="missing column"):
        T.read_paper_results(bad)


def test_cost_and_dataset_tables(runs):
    frames = A.aggregate(teachers=runs["teachers"], splits=runs["splits"], cost=runs["cost"])
    cost = T.cost_markdown(frames["cost"])
    assert "Device: cpu (test, 1 threads)" in cost and "| ensemble | Ensemble" in cost
    assert "60.0x" in cost  # ensemble latency 6 ms vs student 0.1 ms
    datasets = T.datasets_markdown(frames["datasets"])
    assert "| tiny " in datasets and "| 60 " in datasets
    assert "No cost measurement" in T.cost_markdown(pd.DataFrame())


def test_selection_frame_reads_hetcomp_history(runs):
    history = A.aggregate(students=runs["students"])["history"]
    frame = selection_frame(history, ["mf", "cml"])
    assert set(frame["teacher"]) == {"mf", "cml"}
    assert frame[(frame["teacher"] == "mf") & (frame["epoch"] == 20)]["value"].tolist() == [2.0, 2.0]


# ------------------------------------------------------------------------------------------ CLI
def test_aggregate_and_report_cli_write_every_table_and_figure(runs, run_cli, tmp_path):
    long_csv, extras = tmp_path / "results" / "long.csv", tmp_path / "extras"
    argv = ["aggregate", "--teachers", *map(str, runs["teachers"]), "--ensembles", *map(str, runs["ensembles"]),
            "--students", *map(str, runs["students"]), "--splits", *map(str, runs["splits"]),
            "--cost", *map(str, runs["cost"]), "--out", str(long_csv), "--extras", str(extras)]
    assert run_cli(argv) == 0
    assert {p.name for p in extras.iterdir()} == {"history.csv", "datasets.csv", "cost.csv", "discrepancy.csv",
                                                  "tuning.csv"}
    tables, figures = tmp_path / "results" / "tables", tmp_path / "results" / "figures"
    argv = ["report", "--long", str(long_csv), "--extras", str(extras),
            "--paper", str(REPO_ROOT / "config" / "paper_results.csv"), "--methods", "wokd", "hetcomp", "rrd",
            "--teachers", "mf", "cml", "--tables-dir", str(tables), "--figures-dir", str(figures)]
    assert run_cli(argv) == 0
    for name in TABLES:
        assert (tables / name).stat().st_size > 100, name
    for name in FIGURES:
        assert (figures / name).read_bytes()[:8] == PNG, name
    assert "Main results" in (tables / "main.md").read_text()


def test_figures_are_written_even_without_data(tmp_path):
    long = pd.DataFrame(columns=A.LONG_COLUMNS)
    paths = write_figures(long, {}, tmp_path)
    assert [p.name for p in paths] == FIGURES
    assert all(p.read_bytes()[:8] == PNG for p in paths)


def test_report_cli_needs_an_output(run_cli, tmp_path, capsys):
    assert run_cli(["report", "--long", str(tmp_path / "x.csv")]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_report_lists_datasets_in_the_given_order():
    from hetcomp.commands.report import in_dataset_order

    long = pd.DataFrame({"dataset": ["a", "c", "b", "c", "a"], "value": range(5)})
    ordered = in_dataset_order(long, ["c", "b"])
    assert list(ordered["dataset"]) == ["c", "c", "b", "a", "a"] and list(ordered["value"]) == [1, 3, 2, 0, 4]


def test_per_seed_table_lists_every_run_value_by_seed(long):
    fewer = long[~((long["method"] == "rrd") & (long["seed"] == 1))]
    text = T.per_seed_markdown(fewer, KS, methods=["wokd", "hetcomp", "rrd"])
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in text.split("## tiny, Recall@50")[1].split("##")[0].splitlines() if line.startswith("| ")}
    assert list(rows)[1:4] == ["w/o KD", "RRD", "HetComp"]
    assert rows["HetComp"] == [f"{value:.4f}" for value in _values(long, "hetcomp")]
    assert rows["RRD"] == [f"{_values(long, 'rrd')[0]:.4f}", "n/a"]  # seed 1 not run
    assert "Ensemble" in rows and "## tiny, NDCG@50" in text


def test_a_column_of_one_method_has_no_bold_best(long):
    only_wokd = long[(long["kind"] != "student") | (long["method"] == "wokd")]
    table = T.main_table(only_wokd, KS, methods=["wokd"])
    assert table["cells"] and not table["bold"]
